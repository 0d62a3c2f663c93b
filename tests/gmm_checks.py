"""One gmm test base, run for every backend (tests/test_gmm.py subclasses it).

`GmmChecks` holds jmoe's own checks of `jmoe.gmm` (through its internal entry
`ops.gmm`, which takes per-product backend configs): values and the gradients of
both operands against `loop_oracle`, an obviously-right per-group loop in float64
numpy; exact zeros where the oracle is zero (rows outside the local groups and past
sum(group_sizes), their input gradient, an empty group's weight gradient); fuzzed
group sizes; group_offset; odd k and n; bf16 and float32; and every transformation
`lax.ragged_dot` supports (jvp, jacfwd, second order, vmap, export with symbolic
shapes, shard_map with check_vma, numpy inputs, eager calls without recompiling),
plus the float32 cotangent of bf16 operands; and `lax.ragged_dot`'s surface and
jmoe's one answer to bad input: integer and mixed operand dtypes (lax's result
dtype), `precision` honoured, `out_sharding`, negative group sizes, sums past m,
out-of-range offsets, empty and zero-width operands, non-finite values, and
checkify reporting what only values show. Tolerances come only from
`tests.utils.tol` / `assert_rel`, keyed by the operand dtype.

A subclass names the backend (`IMPL`, `OPTIONS`) and the shapes: tiny odd ones on
CPU, kernel-sized ones (tiles of 64/128 rows) on the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import jmoe
from jmoe._src.gmm import ops
from tests.utils import assert_rel, rel_err, tol

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
P = jax.sharding.PartitionSpec


# ----------------------------------------------------------------------------
# Oracles and helpers


def loop_oracle(lhs, rhs, group_sizes, dy=None, group_offset=0,
                transpose_rhs=False):
  """(out, dlhs, drhs) in float64 numpy: one product per local group on concrete
  row slices; rows of other groups and past the total stay zero.

  lhs [m, k]; rhs [L, k, n] ([L, n, k] with transpose_rhs); dy [m, n] or None
  (then dlhs, drhs are None). dlhs = dy @ W^T and drhs = lhs^T @ dy per group.
  """
  lhs = np.asarray(lhs, np.float64)
  w = np.asarray(rhs, np.float64)
  w = w.swapaxes(1, 2) if transpose_rhs else w          # [L, k, n]
  m, num_local = lhs.shape[0], w.shape[0]
  out = np.zeros((m, w.shape[2]))
  dlhs = np.zeros_like(lhs) if dy is not None else None
  dw = np.zeros_like(w) if dy is not None else None
  dy = None if dy is None else np.asarray(dy, np.float64)
  start = 0
  for g, s in enumerate(int(s) for s in np.asarray(group_sizes)):
    local = g - int(group_offset or 0)
    rows = slice(start, min(start + s, m))
    if 0 <= local < num_local and s:
      out[rows] = lhs[rows] @ w[local]
      if dy is not None:
        dlhs[rows] = dy[rows] @ w[local].T
        dw[local] = lhs[rows].T @ dy[rows]
    start += s
  if dw is not None and transpose_rhs:
    dw = dw.swapaxes(1, 2)
  return out, dlhs, dw


def loop_reference(lhs, rhs, group_sizes, group_offset=0):
  """The same loop in jnp (float32, HIGHEST), differentiable by JAX: the oracle of
  the transformation checks (jvp, jacfwd, second order). Static group sizes."""
  sizes = [int(s) for s in np.asarray(group_sizes)]
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  start = 0
  for g, s in enumerate(sizes):
    local = g - group_offset
    if 0 <= local < rhs.shape[0] and s:
      blk = jnp.dot(lhs[start:start + s].astype(jnp.float32),
                    rhs[local].astype(jnp.float32), precision="highest")
      out = out.at[start:start + s].set(blk)
    start += s
  return out


def make_inputs(m, k, n, num_local, dtype, seed=0, transpose_rhs=False):
  """lhs [m, k], rhs [L, k, n] (or [L, n, k]) scaled to O(1) outputs, dy [m, n]."""
  kl, kr, kd = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(kl, (m, k), jnp.float32).astype(dtype)
  shape = (num_local, n, k) if transpose_rhs else (num_local, k, n)
  rhs = (jax.random.normal(kr, shape, jnp.float32) / np.sqrt(k)).astype(dtype)
  dy = jax.random.normal(kd, (m, n), jnp.float32).astype(dtype)
  return lhs, rhs, dy


def fit_sizes(sizes, m):
  """Scales group sizes down so that they sum to at most m."""
  sizes = np.asarray(sizes, np.int64)
  if sizes.sum() > m:
    sizes = sizes * m // sizes.sum()
  return sizes.astype(np.int32)


def effective_sizes(sizes, m):
  """The group sizes jmoe.gmm reads (its documented bad-input behaviour): a
  negative size is 0, and groups are cut at row m."""
  ends = np.minimum(np.cumsum(np.maximum(np.asarray(sizes, np.int64), 0)), m)
  return np.diff(np.concatenate([[0], ends])).astype(np.int64)


@contextlib.contextmanager
def count_compiles():
  """Collects the names of the XLA compilations inside the block."""
  names: list[str] = []

  class Handler(logging.Handler):
    def emit(self, record):
      msg = record.getMessage()
      if msg.startswith("Compiling "):
        names.append(msg.split(" with ")[0])

  handler = Handler(level=logging.DEBUG)
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield names
  finally:
    logger.removeHandler(handler)


@functools.partial(jax.jit, static_argnames=("impl", "options", "out_dtype",
                                             "transpose_rhs"))
def fwd_bwd(lhs, rhs, group_sizes, dy, group_offset, *, impl, options,
            out_dtype=None, transpose_rhs=False):
  """(out, dlhs, drhs) of one backend, through jax.vjp, jitted once per shape."""
  f = lambda l, r: ops.gmm(l, r, group_sizes, group_offset,
                           transpose_rhs=transpose_rhs,
                           preferred_element_type=out_dtype, implementation=impl,
                           options=options)
  out, vjp = jax.vjp(f, lhs, rhs)
  return (out, *vjp(dy.astype(out.dtype)))


def check_against_oracle(got, lhs, rhs, group_sizes, dy, group_offset=None, *,
                         dtype, transpose_rhs=False, what=""):
  """got = (out, dlhs, drhs) vs `loop_oracle`: relative error below tol(dtype);
  exact zeros where the oracle is structurally zero."""
  out, dl, dr = got
  ref, dl_ref, dr_ref = loop_oracle(lhs, rhs, group_sizes, dy, group_offset,
                                    transpose_rhs)
  assert dl.dtype == lhs.dtype and dr.dtype == rhs.dtype, what
  assert_rel(out, ref, dtype, f"{what} out")
  assert_rel(dl, dl_ref, dtype, f"{what} dlhs")
  assert_rel(dr, dr_ref, dtype, f"{what} drhs")
  # Rows outside the local groups (and past the total) are exactly zero, and so
  # is their input gradient; an empty local group's weight gradient is exactly 0.
  sizes = np.asarray(group_sizes, np.int64)
  m, num_local = lhs.shape[0], rhs.shape[0]
  lo = int(group_offset or 0)
  gid = np.repeat(np.arange(len(sizes)), sizes)[:m] - lo
  local = np.zeros(m, bool)
  local[:len(gid)] = (gid >= 0) & (gid < num_local)
  f64 = lambda x: np.asarray(x, np.float64)
  np.testing.assert_array_equal(f64(out)[~local], 0.0,
                                err_msg=f"{what} out rows outside the groups")
  np.testing.assert_array_equal(f64(dl)[~local], 0.0,
                                err_msg=f"{what} dlhs rows outside the groups")
  local_sizes = np.array([sizes[lo + l] if 0 <= lo + l < len(sizes) else 0
                          for l in range(num_local)], np.int64)
  np.testing.assert_array_equal(f64(dr)[local_sizes == 0], 0.0,
                                err_msg=f"{what} drhs of empty groups")


def group_sizes_strategy(m: int, num_groups: int, *, tail: bool = True):
  """Group sizes as megablox's test draws them (sorted run ends, with replacement:
  zero-token groups come up often), optionally leaving tail rows past the total."""
  ends = st.lists(st.integers(0, m), min_size=num_groups, max_size=num_groups)

  def to_sizes(e):
    e = sorted(e)
    if not tail:
      e[-1] = m
    return np.diff(np.concatenate([[0], e])).astype(np.int32)

  return ends.map(to_sizes)


# ----------------------------------------------------------------------------
# The test base


class GmmChecks:
  """The checks; a subclass sets the backend and the shapes."""

  IMPL: str
  OPTIONS: ops.GmmOptions | None = None
  DTYPES: tuple = (F32, BF16)
  # Shapes (m, k, n, G) by name, and routings (group sizes) per shape name.
  SHAPES: dict
  ROUTINGS: dict
  # group_offset cases: name -> (m, k, n, all groups' sizes, local groups,
  # offsets to try).
  OFFSET_CASES: dict
  FUZZ_SHAPE: tuple            # (m, k, n, G)
  PUBLIC_SHAPE: tuple          # (m, k, n, G) and sizes of the public-API check
  PUBLIC_SIZES: list
  SMALL = (12, 5, 4, 3)        # jacfwd / second order: tiny on every backend
  SMALL_SIZES = [4, 0, 6]      # two tail rows

  # -- helpers

  def gmm(self, lhs, rhs, group_sizes, group_offset=None, **kw):
    return ops.gmm(lhs, rhs, group_sizes, group_offset, implementation=self.IMPL,
                   options=self.OPTIONS, **kw)

  def run_case(self, lhs, rhs, sizes, dy, offset=None, *, transpose_rhs=False,
               what=""):
    gs = jnp.asarray(sizes, jnp.int32)
    off = None if offset is None else jnp.int32(offset)
    got = fwd_bwd(lhs, rhs, gs, dy, off, impl=self.IMPL, options=self.OPTIONS,
                  out_dtype=lhs.dtype, transpose_rhs=transpose_rhs)
    assert got[0].dtype == lhs.dtype
    check_against_oracle(got, lhs, rhs, effective_sizes(sizes, lhs.shape[0]),
                         dy, offset, dtype=lhs.dtype,
                         transpose_rhs=transpose_rhs, what=what)
    return got

  def small_inputs(self, dtype=F32, seed=0):
    m, k, n, g = self.SMALL
    lhs, rhs, _ = make_inputs(m, k, n, g, dtype, seed=seed)
    return lhs, rhs, jnp.asarray(self.SMALL_SIZES, jnp.int32)

  # -- values and gradients

  @pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
  def test_forward_and_grads(self, dtype):
    if dtype not in self.DTYPES:
      pytest.skip(f"{self.IMPL} runs {dtype.name} on its fallback")
    for shape_name, (m, k, n, g) in self.SHAPES.items():
      lhs, rhs, dy = make_inputs(m, k, n, g, dtype)
      for name, sizes in self.ROUTINGS[shape_name].items():
        assert len(sizes) == g and sum(sizes) <= m, name
        self.run_case(lhs, rhs, sizes, dy, what=f"[{shape_name} {name}]")

  @pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
  def test_group_offset(self, dtype):
    if dtype not in self.DTYPES:
      pytest.skip(f"{self.IMPL} runs {dtype.name} on its fallback")
    for name, (m, k, n, sizes, num_local, offsets) in self.OFFSET_CASES.items():
      lhs, rhs, dy = make_inputs(m, k, n, num_local, dtype, seed=1)
      for offset in offsets:
        self.run_case(lhs, rhs, sizes, dy, offset,
                      what=f"[{name} offset={offset}]")

  def test_fuzz_group_sizes(self):
    m, k, n, g = self.FUZZ_SHAPE
    dtype = self.DTYPES[0]
    lhs, rhs, dy = make_inputs(m, k, n, g, dtype, seed=2)

    @settings(max_examples=self.FUZZ_EXAMPLES, deadline=None, derandomize=True)
    @given(group_sizes_strategy(m, g))
    @example(np.array([0] * (g - 1) + [m], np.int32))   # one group holds every row
    @example(np.array([m] + [0] * (g - 1), np.int32))
    @example(np.zeros(g, np.int32))                      # nothing routed
    def check(sizes):
      self.run_case(lhs, rhs, sizes.tolist(), dy, what=f"[{sizes.tolist()}]")

    check()

  FUZZ_EXAMPLES = 12

  def test_pair_shares_lhs_and_sums_its_input_gradient(self):
    """gmm_pair (SwiGLU's gate and up: two products of one lhs, one primitive)
    against the oracle: both outputs, both weight gradients, and the input
    gradient, which the pair computes as ONE product (gmm_sum: one kernel on
    Mosaic) of both cotangents. Fuzzed group sizes (empty groups, nothing
    routed, everything in one group) and a group offset."""
    m, k, n, g = self.FUZZ_SHAPE
    dtype = self.DTYPES[0]
    lhs, rhs_a, dy_a = make_inputs(m, k, n, g, dtype, seed=11)
    _, rhs_b, dy_b = make_inputs(m, k, n, g, dtype, seed=12)

    @jax.jit
    def run(lhs, rhs_a, rhs_b, gs, off):
      f = lambda l, a, b: ops.gmm_pair(l, a, b, gs, off, implementation=self.IMPL,
                                       options=self.OPTIONS)
      outs, vjp = jax.vjp(f, lhs, rhs_a, rhs_b)
      return outs, vjp((dy_a, dy_b))

    def check(sizes, offset, num_local, what):
      gs = jnp.asarray(sizes, jnp.int32)
      a, b = rhs_a[:num_local], rhs_b[:num_local]
      (out_a, out_b), (dl, da, db) = run(lhs, a, b, gs, jnp.int32(offset))
      eff = effective_sizes(sizes, m)
      ref_a, dl_a, da_ref = loop_oracle(lhs, a, eff, dy_a, offset)
      ref_b, dl_b, db_ref = loop_oracle(lhs, b, eff, dy_b, offset)
      assert out_a.dtype == out_b.dtype == dl.dtype == lhs.dtype, what
      for got, ref, name in ((out_a, ref_a, "out_a"), (out_b, ref_b, "out_b"),
                             (dl, dl_a + dl_b, "dlhs"), (da, da_ref, "drhs_a"),
                             (db, db_ref, "drhs_b")):
        assert_rel(got, ref, dtype, f"{what} {name}")
        # Structural zeros (rows outside the local groups, empty groups) exact.
        np.testing.assert_array_equal(np.asarray(got, np.float64)[ref == 0], 0.0,
                                      err_msg=f"{what} {name} zeros")

    @settings(max_examples=max(4, self.FUZZ_EXAMPLES // 3), deadline=None,
              derandomize=True)
    @given(group_sizes_strategy(m, g))
    @example(np.array([0] * (g - 1) + [m], np.int32))
    @example(np.zeros(g, np.int32))
    def fuzz(sizes):
      check(sizes.tolist(), 0, g, f"[{sizes.tolist()}]")

    fuzz()
    sizes = fit_sizes(np.arange(g) * 5 % 7 + 1, m - 5).tolist()
    check(sizes, 1, max(1, g - 2), "[offset 1]")

  def test_transpose_rhs(self):
    """rhs read as [L, n, k] (megablox's transpose_rhs; the input-gradient kernel
    as a forward product), and its gradients."""
    m, k, n, g = self.FUZZ_SHAPE
    dtype = self.DTYPES[0]
    lhs, rhs, dy = make_inputs(m, k, n, g, dtype, seed=3, transpose_rhs=True)
    sizes = fit_sizes(np.arange(g) * 7 % 11 + 1, m - 3).tolist()
    self.run_case(lhs, rhs, sizes, dy, transpose_rhs=True, what="[transpose_rhs]")

  def test_public_api_default_config(self):
    """jmoe.gmm with the backend's default configs, bf16 operands and a float32
    output (as expert_ffn's callers may ask), against the oracle."""
    m, k, n, g = self.PUBLIC_SHAPE
    lhs, rhs, dy = make_inputs(m, k, n, g, BF16, seed=4)
    dy = dy.astype(jnp.float32)
    sizes = self.PUBLIC_SIZES
    gs = jnp.asarray(sizes, jnp.int32)

    def run(l, r):
      f = lambda a, b: jmoe.gmm(a, b, gs, preferred_element_type=jnp.float32,
                                implementation=self.IMPL)
      out, vjp = jax.vjp(f, l, r)
      return (out, *vjp(dy))

    got = jax.jit(run)(lhs, rhs)
    assert got[0].dtype == jnp.float32
    check_against_oracle(got, lhs, rhs, sizes, dy, dtype=BF16, what="[default]")

  def test_bf16_operands_accumulate_in_float32(self):
    """bf16 operands: a float32 output is as exact as float32 accumulation of the
    bf16 values allows (float32 tolerance), a bf16 output within bf16's."""
    if BF16 not in self.DTYPES:
      pytest.skip(f"{self.IMPL} does not take bf16")
    m, k, n, g = self.FUZZ_SHAPE
    lhs, rhs, _ = make_inputs(m, k, n, g, BF16, seed=15)
    sizes = fit_sizes(np.arange(g) * 3 % 5 * 4, m - 1)
    sizes[1] = 0
    ref = loop_oracle(lhs, rhs, sizes)[0]
    out = jax.jit(lambda a, b: self.gmm(a, b, sizes,
                                        preferred_element_type=jnp.float32))(lhs, rhs)
    assert out.dtype == jnp.float32
    assert_rel(out, ref, F32, "bf16 in, f32 out")
    out16 = jax.jit(lambda a, b: self.gmm(a, b, sizes))(lhs, rhs)
    assert out16.dtype == jnp.bfloat16
    assert_rel(out16, ref, BF16, "bf16 out")

  def test_float32_cotangent_of_bf16_operands(self):
    """bf16 operands, float32 output: the backward uses the float32 cotangent (as
    lax.ragged_dot does), it does not round it to bf16 first. Built so that the
    rounding would show: ones times a cotangent 1 + 2^-10 (not a bf16) and -1."""
    m, k, g = 8, 16, 2
    d = 2.0 ** -10
    lhs = jnp.ones((m, k), jnp.bfloat16)
    rhs = jnp.ones((g, k, 2), jnp.bfloat16)
    gs = jnp.array([4, 4], jnp.int32)
    dy = jnp.stack([jnp.full((m,), 1 + d), jnp.full((m,), -1.0)], 1)
    dy = dy.at[::2].set(dy[::2, ::-1])            # rows alternate the two columns
    f = lambda a, b: self.gmm(a, b, gs, preferred_element_type=jnp.float32)
    out, vjp = jax.jit(lambda a, b: jax.vjp(f, a, b))(lhs, rhs)
    dlhs, drhs = vjp(dy)
    assert out.dtype == jnp.float32 and dlhs.dtype == drhs.dtype == jnp.bfloat16
    # dlhs[i, :] = sum_j dy[i, j] = d; drhs[g][:, j] = sum over 2+2 rows = 2 d.
    np.testing.assert_array_equal(np.asarray(dlhs, np.float32), d)
    np.testing.assert_array_equal(np.asarray(drhs, np.float32), 2 * d)

  # -- transformations

  def test_jvp_and_linearize(self):
    lhs, rhs, gs = self.small_inputs(seed=5)
    tl, tr, _ = self.small_inputs(seed=6)
    f = lambda a, b: self.gmm(a, b, gs)

    @jax.jit
    def run(lhs, rhs, tl, tr):
      out, tan = jax.jvp(f, (lhs, rhs), (tl, tr))
      # One operand's tangent only (the other a symbolic zero).
      _, tan_l = jax.jvp(lambda a: f(a, rhs), (lhs,), (tl,))
      _, lin = jax.linearize(f, lhs, rhs)
      return out, tan, tan_l, lin(tl, tr)

    out, tan, tan_l, lin = run(lhs, rhs, tl, tr)
    tan_ref = loop_oracle(tl, rhs, gs)[0] + loop_oracle(lhs, tr, gs)[0]
    assert_rel(out, loop_oracle(lhs, rhs, gs)[0], F32, "jvp primal")
    assert_rel(tan, tan_ref, F32, "jvp tangent")
    assert_rel(tan_l, loop_oracle(tl, rhs, gs)[0], F32, "jvp lhs only")
    assert_rel(lin, tan_ref, F32, "linearize")
    # Eagerly too (the primitive's impl).
    assert_rel(jax.jvp(f, (lhs, rhs), (tl, tr))[1], tan_ref, F32, "eager jvp")

  def test_jacfwd_equals_jacrev_and_oracle(self):
    lhs, rhs, gs = self.small_inputs(seed=7)
    sizes = self.SMALL_SIZES
    f = lambda a, b: self.gmm(a, b, gs)
    ref = lambda a, b: loop_reference(a, b, sizes)
    jacs = lambda g: [j(g, i)(lhs, rhs) for i in (0, 1)
                      for j in (jax.jacfwd, jax.jacrev)]
    got = jax.jit(lambda: jacs(f))()
    want = jax.jit(lambda: jacs(ref))()
    for name, a, b in zip(("fwd 0", "rev 0", "fwd 1", "rev 1"), got, want):
      assert_rel(a, b, F32, f"jac{name}")

  def test_second_order(self):
    """grad of grad, and a hessian-vector product (forward over reverse), of a
    nonlinear loss; against the same of the jnp loop."""
    lhs, rhs, gs = self.small_inputs(seed=8)
    vl, vr, _ = self.small_inputs(seed=9)
    sizes = self.SMALL_SIZES

    def loss(mm):
      return lambda a, b: jnp.sum(jnp.sin(mm(a, b)) ** 2)

    def both(f):
      gg = jax.grad(lambda a, b: jnp.sum(jax.grad(f, 0)(a, b) ** 2), (0, 1))
      hvp = lambda a, b: jax.jvp(jax.grad(f, (0, 1)), (a, b), (vl, vr))[1]
      return (*gg(lhs, rhs), *hvp(lhs, rhs))

    got = jax.jit(lambda: both(loss(lambda a, b: self.gmm(a, b, gs))))()
    want = jax.jit(lambda: both(loss(lambda a, b: loop_reference(a, b, sizes))))()
    for name, a, b in zip(("gg lhs", "gg rhs", "hvp lhs", "hvp rhs"), got, want):
      assert_rel(a, b, F32, name)

  def test_vmap(self):
    """Batched lhs, rhs and group sizes (lax's vmap test), and batched lhs on axis
    1 with shared rhs and sizes; per-example gradients."""
    m, k, n, g = self.SMALL
    b = 3
    keys = jax.random.split(jax.random.key(10), 2)
    lhs = jax.random.normal(keys[0], (b, m, k))
    rhs = jax.random.normal(keys[1], (b, g, k, n))
    gs = jnp.array([[4, 0, 6], [0, 12, 0], [1, 2, 3]], jnp.int32)
    f = lambda a, w, s: self.gmm(a, w, s)
    loss = lambda mm: lambda a, w, s: jnp.sum(mm(a, w, s) ** 2)

    @jax.jit
    def run(lhs, rhs, gs):
      full = jax.vmap(f)(lhs, rhs, gs)
      shared = jax.vmap(f, in_axes=(1, None, None), out_axes=1)(
          jnp.moveaxis(lhs, 0, 1), rhs[0], gs[0])
      grads = jax.vmap(jax.grad(loss(f)))(lhs, rhs, gs)
      return full, shared, grads

    full, shared, grads = run(lhs, rhs, gs)
    for i in range(b):
      assert_rel(full[i], loop_oracle(lhs[i], rhs[i], gs[i])[0], F32, f"vmap {i}")
      assert_rel(shared[:, i], loop_oracle(lhs[i], rhs[0], gs[0])[0], F32,
                 f"vmap lhs {i}")
      sizes = np.asarray(gs[i])
      want = jax.grad(loss(lambda a, w, s: loop_reference(a, w, sizes)))(
          lhs[i], rhs[i], None)
      assert_rel(grads[i], want, F32, f"vmap grad {i}")

  def test_numpy_inputs_and_no_recompile(self):
    """Eager calls with numpy inputs work, and a repeated call compiles nothing."""
    m, k, n, g = self.SMALL
    rng = np.random.default_rng(11)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = rng.standard_normal((g, k, n)).astype(np.float32)
    gs = np.array(self.SMALL_SIZES, np.int32)
    first = self.gmm(lhs, rhs, gs)
    assert_rel(first, loop_oracle(lhs, rhs, gs)[0], F32, "numpy inputs")
    public = jmoe.gmm(lhs, rhs, gs, implementation=self.IMPL)
    assert_rel(public, first, F32, "numpy inputs, public")
    with count_compiles() as names:
      again = self.gmm(lhs, rhs, gs)
      jmoe.gmm(lhs, rhs, gs, implementation=self.IMPL)
      jmoe.gmm(lhs, rhs, gs[::-1].copy(), implementation=self.IMPL)  # new sizes
    assert not names, f"repeated eager calls compiled {names}"
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    # Under jit: one trace for any group sizes.
    with count_compiles() as names:
      f = jax.jit(lambda a, s: self.gmm(a, rhs, s))
      f(lhs, gs)
      f(lhs, gs[::-1])
    assert len(names) == 1, names

  def test_export_symbolic_shapes(self):
    """jax.export with symbolic m, k, n (the group count stays static): lowers to
    XLA's ragged_dot; values and gradients of the exported function."""
    from jax import export  # noqa: PLC0415
    m, k, n, g = self.SMALL
    lhs, rhs, gs = self.small_inputs(seed=12)
    dy = jax.random.normal(jax.random.key(13), (m, n))
    sm, sk, sn = export.symbolic_shape("m, k, n")
    specs = (jax.ShapeDtypeStruct((sm, sk), jnp.float32),
             jax.ShapeDtypeStruct((g, sk, sn), jnp.float32),
             jax.ShapeDtypeStruct((g,), jnp.int32))
    f = lambda a, b, s: self.gmm(a, b, s)
    exp = export.export(jax.jit(f))(*specs)
    out = exp.call(lhs, rhs, gs)
    ref, dl_ref, dr_ref = loop_oracle(lhs, rhs, gs, dy)
    assert_rel(out, ref, F32, "exported out")
    np.testing.assert_array_equal(np.asarray(out)[sum(self.SMALL_SIZES):], 0.0)
    grad = lambda a, b, s, d: jax.grad(lambda a, b: jnp.sum(f(a, b, s) * d),
                                       (0, 1))(a, b)
    exp_g = export.export(jax.jit(grad))(
        *specs, jax.ShapeDtypeStruct((sm, sn), jnp.float32))
    dl, dr = exp_g.call(lhs, rhs, gs, dy)
    assert_rel(dl, dl_ref, F32, "exported dlhs")
    assert_rel(dr, dr_ref, F32, "exported drhs")

  def test_shard_map_expert_parallel(self):
    """Inside shard_map(check_vma=True), one shard per device holding its local
    experts (group_offset from the axis index), lhs replicated: the psum of the
    shards' outputs and the gradients equal the oracle's."""
    devices = jax.devices()
    m, k, n, g = self.FUZZ_SHAPE
    shards = max(s for s in range(1, len(devices) + 1) if g % s == 0)
    mesh = jax.sharding.Mesh(np.array(devices[:shards]), ("ep",))
    num_local = g // shards
    lhs, rhs, dy = make_inputs(m, k, n, g, self.DTYPES[0], seed=14)
    sizes = fit_sizes(np.arange(g) % 3 * 5 + 1, m - 2)
    gs = jnp.asarray(sizes)

    def body(a, w, s):
      off = jax.lax.axis_index("ep") * num_local
      return jax.lax.psum(self.gmm(a, w, s, off), "ep")

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("ep"), P()),
                      out_specs=P(), check_vma=True)

    def run(a, w):
      out, vjp = jax.vjp(lambda a, w: f(a, w, gs), a, w)
      return (out, *vjp(dy))

    got = jax.jit(run)(lhs, rhs)
    check_against_oracle(got, lhs, rhs, sizes, dy, dtype=self.DTYPES[0],
                         what=f"[{shards} shards]")

  # -- lax.ragged_dot's surface: dtypes, precision, out_sharding

  def test_integer_and_mixed_dtypes(self):
    """The operand dtypes lax.ragged_dot takes, with the result dtype it gives:
    int8 x int8 (int8, wrapping as lax's does; int32 when asked), int8 x bf16
    (bf16, differentiable in rhs), f16 x bf16 (bf16), bool x bool. Kernel
    backends run what they cannot take on their fallback."""
    m, k, n, g = self.SMALL
    sizes = self.SMALL_SIZES
    gs = jnp.asarray(sizes, jnp.int32)
    rng = np.random.default_rng(16)
    i8 = lambda shape: jnp.asarray(rng.integers(-100, 100, shape), jnp.int8)
    a8, w8 = i8((m, k)), i8((g, k, n))
    lax_dtype = lambda a, b, pet=None: jax.eval_shape(
        lambda a, b: jax.lax.ragged_dot(a, b, gs, preferred_element_type=pet),
        a, b).dtype
    exact = lambda a, b: loop_oracle(np.asarray(a, np.int64),
                                     np.asarray(b, np.int64), sizes)[0]

    @jax.jit
    def run(a8, w8, wb, a16):
      return (self.gmm(a8, w8, gs),
              self.gmm(a8, w8, gs, preferred_element_type=jnp.int32),
              self.gmm(a8, wb, gs), self.gmm(a16, wb, gs),
              self.gmm(a8 > 0, w8 > 0, gs),
              jax.grad(lambda w: jnp.sum(self.gmm(a8, w, gs).astype(F32)))(wb))

    wb = (w8.astype(F32) / 64).astype(BF16)
    a16 = (a8.astype(F32) / 32).astype(F16)
    o8, o32, ob, o16, obool, dwb = run(a8, w8, wb, a16)
    assert o8.dtype == lax_dtype(a8, w8) == jnp.int8
    want = exact(a8, w8)
    assert np.abs(want).max() > 127  # the int8 result wraps
    np.testing.assert_array_equal(np.asarray(o8), want.astype(np.int64)
                                  .astype(np.int8))
    assert o32.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(o32), want)
    assert ob.dtype == lax_dtype(a8, wb) == BF16
    assert_rel(ob, loop_oracle(a8, wb, sizes)[0], BF16, "int8 x bf16")
    assert o16.dtype == lax_dtype(a16, wb) == BF16
    assert_rel(o16, loop_oracle(a16, wb, sizes)[0], BF16, "f16 x bf16")
    assert obool.dtype == lax_dtype(a8 > 0, w8 > 0) == jnp.bool_
    np.testing.assert_array_equal(
        np.asarray(obool), exact(a8 > 0, w8 > 0) > 0)
    assert dwb.dtype == BF16
    ones = np.ones((m, n))
    assert_rel(dwb, loop_oracle(a8, wb, sizes, ones)[2], BF16, "int8 x bf16 drhs")

  def test_precision_is_honoured(self):
    """precision reaches every product. Where XLA honours dot algorithms (GPU),
    float32 operands with BF16_BF16_F32 give the products of their bf16
    roundings, which no float32 tolerance mistakes for the float32 products;
    XLA:CPU ignores algorithms in its numerics (lax.dot_general's too), so there
    every dot of the lowered forward and backward must carry the precision."""
    m, k, n, g = self.FUZZ_SHAPE
    lhs, rhs, dy = make_inputs(m, k, n, g, F32, seed=17)
    sizes = fit_sizes(np.arange(g) * 5 % 7 + 1, m - 2)
    gs = jnp.asarray(sizes)
    bf16 = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    highest = jax.lax.Precision.HIGHEST

    def run(precision):
      f = lambda a, b: self.gmm(a, b, gs, precision=precision)
      def fwd_bwd(a, b):
        out, vjp = jax.vjp(f, a, b)
        return (out, *vjp(dy))
      return jax.jit(fwd_bwd)

    if jax.devices()[0].platform == "cpu":
      for precision, attr in ((highest, "precision = [HIGHEST, HIGHEST]"),
                              (bf16, "lhs_precision_type = bf16")):
        text = run(precision).lower(lhs, rhs).as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert len(dots) >= 3, dots  # forward, input and weight gradients
        assert all(attr in line for line in dots), (precision, dots)
      return
    got_hi = run(highest)(lhs, rhs)
    got_lo = run(bf16)(lhs, rhs)
    ref = loop_oracle(lhs, rhs, sizes, dy)
    rounded = loop_oracle(lhs.astype(BF16), rhs.astype(BF16), sizes,
                          dy.astype(BF16))
    for i, name in enumerate(("out", "dlhs", "drhs")):
      assert_rel(got_hi[i], ref[i], F32, f"HIGHEST {name}")
      assert_rel(got_lo[i], rounded[i], F32, f"BF16_BF16_F32 {name}")
      assert rel_err(got_lo[i], ref[i]) > 100 * tol(F32), f"{name}: ignored"

  def test_out_sharding(self):
    """out_sharding as lax.ragged_dot takes it: over Explicit mesh axes the
    result has it (by default lhs's rows and rhs's columns, where lax asks for
    it), values and gradients unchanged; a PartitionSpec of Auto axes is refused
    as lax refuses it."""
    m, k, n, g = self.SMALL
    lhs, rhs, gs = self.small_inputs(seed=18)
    dy = jax.random.normal(jax.random.key(19), (m, n))
    ref, dl_ref, dr_ref = loop_oracle(lhs, rhs, gs, dy)
    devices = jax.devices()
    shards = max(s for s in (1, 2, 4) if s <= len(devices) and m % s == 0)
    axis_types = lambda t: dict(axis_types=(t,))
    explicit = jax.sharding.Mesh(np.array(devices[:shards]), ("x",),
                                 **axis_types(jax.sharding.AxisType.Explicit))

    @jax.jit
    def run(a, b):
      cols = self.gmm(a, b, gs, out_sharding=P(None, "x"))
      rows = jax.sharding.reshard(a, P("x"))
      f = lambda a, b: self.gmm(a, b, gs)  # default: as lhs's rows
      out, vjp = jax.vjp(f, rows, b)
      return cols, out, *vjp(dy)

    with jax.set_mesh(explicit):
      cols, out, dl, dr = run(lhs, rhs)
    assert jax.typeof(cols).sharding.spec == P(None, "x")
    assert jax.typeof(out).sharding.spec == P("x", None)
    assert_rel(cols, ref, F32, "out_sharding=P(None, x)")
    assert_rel(out, ref, F32, "lhs rows sharded")
    assert_rel(dl, dl_ref, F32, "lhs rows sharded: dlhs")
    assert_rel(dr, dr_ref, F32, "lhs rows sharded: drhs")
    auto = jax.sharding.Mesh(np.array(devices[:shards]), ("x",),
                             **axis_types(jax.sharding.AxisType.Auto))
    with jax.set_mesh(auto):
      with pytest.raises(ValueError, match="Auto"):
        self.gmm(lhs, rhs, gs, out_sharding=P("x"))

  # -- bad input: one answer on every backend

  def test_negative_group_sizes_read_as_zero(self):
    """A negative group size is read as 0 (the groups after it keep their
    rows), eager and under jit; checkify reports it (test_checkify_reports)."""
    m, k, n, g = self.FUZZ_SHAPE
    lhs, rhs, dy = make_inputs(m, k, n, g, self.DTYPES[0], seed=20)
    base = fit_sizes(np.arange(g) * 3 % 5 + 2, m // 2)
    for i in (0, g // 2, g - 1):
      sizes = base.copy()
      sizes[i] = -(i + 3)
      self.run_case(lhs, rhs, sizes.tolist(), dy, what=f"[{sizes.tolist()}]")
    lhs, rhs, gs = self.small_inputs(seed=20)   # eagerly
    eager = self.gmm(lhs, rhs, gs.at[1].set(-3))
    np.testing.assert_array_equal(np.asarray(eager),
                                  np.asarray(self.gmm(lhs, rhs, gs.at[1].set(0))))

  def test_group_sizes_past_m_are_cut(self):
    """sum(group_sizes) > m: groups are cut at row m (the group that crosses it
    is shortened, the later ones are empty), also for sums past int32."""
    m, k, n, g = self.FUZZ_SHAPE
    lhs, rhs, dy = make_inputs(m, k, n, g, self.DTYPES[0], seed=21)
    big = np.iinfo(np.int32).max
    for sizes in ([m // 2, m // 2 + 3] + [5] * (g - 2),
                  [m + 7] + [1] * (g - 1),
                  [3] + [big] * (g - 1)):
      self.run_case(lhs, rhs, sizes, dy, what=f"[{sizes}]")

  def test_group_offset_out_of_range(self):
    """group_offset outside [0, G - L]: local groups that are not groups of
    group_sizes are empty (zeros, zero weight gradient), on every backend; no
    clamping, also at the int32 extremes (partly and wholly outside, both
    sides)."""
    m, k, n, sizes, num_local, _ = next(iter(self.OFFSET_CASES.values()))
    lhs, rhs, dy = make_inputs(m, k, n, num_local, self.DTYPES[0], seed=22)
    g = len(sizes)
    i32 = np.iinfo(np.int32)
    for offset in (-1, g - num_local + 1, g + 3, i32.min, i32.max):
      self.run_case(lhs, rhs, sizes, dy, offset, what=f"[offset={offset}]")

  def test_non_finite_values_stay_in_their_group(self):
    """NaN/inf reach only the products that read them: an inf in rhs[h] makes
    some of group h's rows (and their input gradient) non-finite and nothing
    else; a NaN in one row of lhs, that row and its group's weight gradient;
    NaN in lhs and dy rows outside the local groups or past the total reaches
    nothing. Checked against the per-group float64 loop on the same values: same
    non-finite entries, the finite ones within tolerance."""
    m, k, n, sizes, num_local, offsets = next(iter(self.OFFSET_CASES.values()))
    dtype = self.DTYPES[0]
    lhs, rhs, dy = make_inputs(m, k, n, num_local, dtype, seed=23)
    offset = 1
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    # Rows of the group before the local ones (non-local) and the tail.
    outside = list(range(starts[0], ends[0])) + list(range(ends[-1], m))
    assert outside, "the case needs rows outside the local groups"
    h = next(l for l in range(num_local) if sizes[offset + l] > 1)
    row_h = starts[offset + h]
    lhs = lhs.at[np.array(outside)].set(jnp.nan).at[row_h, 1].set(jnp.nan)
    dy = dy.at[np.array(outside)].set(jnp.nan)
    w = (h + 1) % num_local
    rhs = rhs.at[w, 2, 3].set(jnp.inf)
    got = fwd_bwd(lhs, rhs, jnp.asarray(sizes, jnp.int32), dy, jnp.int32(offset),
                  impl=self.IMPL, options=self.OPTIONS, out_dtype=dtype)
    want = loop_oracle(lhs, rhs, sizes, dy, offset)
    for name, a, b in zip(("out", "dlhs", "drhs"), got, want):
      a = np.asarray(a, np.float64)
      np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b),
                                    err_msg=f"{name}: non-finite entries")
      fin = np.isfinite(b)
      assert_rel(a[fin], b[fin], dtype, f"{name} (finite entries)")
    assert not np.isfinite(np.asarray(got[0], np.float64)[row_h]).all()
    np.testing.assert_array_equal(np.asarray(got[0], np.float64)[outside], 0.0)
