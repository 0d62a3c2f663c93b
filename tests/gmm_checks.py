"""One gmm test base, run for every backend (tests/test_gmm.py subclasses it).

`GmmChecks` holds jmoe's own checks of `jmoe.gmm` (through its internal entry
`ops.gmm`, which takes per-product backend configs): values and the gradients of
both operands against `loop_oracle`, an obviously-right per-group loop in float64
numpy; exact zeros where the oracle is zero (rows outside the local groups and past
sum(group_sizes), their input gradient, an empty group's weight gradient); fuzzed
group sizes; group_offset; odd k and n; bf16 and float32; and every transformation
`lax.ragged_dot` supports (jvp, jacfwd, second order, vmap, export with symbolic
shapes, shard_map with check_vma, numpy inputs, eager calls without recompiling),
plus the float32 cotangent of bf16 operands. Tolerances come only from
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

import jmoe
from jmoe._src.gmm import ops
from tests.utils import assert_rel

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
  local_sizes = np.zeros(num_local, np.int64)
  avail = sizes[lo:lo + num_local]
  local_sizes[:len(avail)] = avail
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
    check_against_oracle(got, lhs, rhs, sizes, dy, offset, dtype=lhs.dtype,
                         transpose_rhs=transpose_rhs, what=what)

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
