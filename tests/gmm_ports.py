"""Peer tests of ragged_dot, ported to call jmoe.gmm on every backend.

Part of the gmm test base: `RaggedDotPorts` is mixed into each backend's test
class in tests/test_gmm.py. Provenance is named per test; the peers are

* jax `tests/lax_test.py` (`RaggedTest`), `tests/export_test.py`
  (`test_ragged_dot`), `tests/shape_poly_test.py` (the "ragged_dot" harnesses,
  mode 1: jmoe.gmm is the ragged non-contracting mode), at jax-ml/jax cec06d1;
* jax `tests/pallas/tpu_gmm_test.py` (megablox `GroupedMatmulTest`), same commit;
* tokamax `tokamax/_src/ops/ragged_dot/test_base.py` (`RaggedDotTestBase`).

Differences from the originals, on purpose: every check also asserts that rows
past sum(group_sizes) are zeros (jmoe's contract; lax leaves them unspecified on
TPU); tolerances come from tests.utils (keyed by the operand dtype) instead of each
peer's own atol/rtol; shapes and example counts are scaled per backend (`PORT_*`)
so the CPU interpreter stays fast; lax's out_sharding and ragged-dimension-number
tests have no counterpart (jmoe.gmm has neither argument).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jmoe
from jmoe._src.gmm import ops
from tests.gmm_checks import BF16, F16, F32, group_sizes_strategy, loop_oracle
from tests.utils import assert_rel


def _lax_group_sizes(rng, m, num_groups):
  """lax_test's group sizes: sorted random run ends, the last one at m."""
  ends_no_final = np.sort(rng.choice(m, size=num_groups - 1))
  ends = np.concatenate([ends_no_final, [m]])
  return np.diff(np.concatenate([[0], ends])).astype(np.int32)


def _assert_tail_zero(out, group_sizes, what):
  total = int(np.sum(group_sizes))
  np.testing.assert_array_equal(np.asarray(out, np.float64)[total:], 0.0,
                                err_msg=f"{what}: rows past sum(group_sizes)")


class RaggedDotPorts:
  """Ported peer tests. Needs `gmm(...)` and `IMPL` from `GmmChecks`."""

  # Scaled shapes (GPU classes use the peers' own).
  PORT_LAX_SHAPES = ((64, 4, 3, 1), (64, 9, 8, 2))
  PORT_DTYPES = (F32, BF16, F16)
  PORT_MEGABLOX_SHAPES = ((128, 128, 128), (128, 8, 16))
  PORT_MEGABLOX_EXAMPLES = 4
  PORT_MEGABLOX_MAX_GROUPS = 8
  PORT_TOKAMAX = (4, 256, 64, 128)  # (num_groups, m, k, n); the peer: 8, 1024, 128, 256

  # -- jax tests/lax_test.py, RaggedTest

  def test_lax_ragged_dot(self):
    """RaggedTest.test_ragged_dot: jit agrees with eager, and both with the numpy
    reference (lax_reference.ragged_dot), over all floating dtypes. (lax skips
    float16 there; jmoe's backends take it.)"""
    rng = np.random.RandomState(0)
    for m, k, n, g in self.PORT_LAX_SHAPES:
      for dtype in self.PORT_DTYPES:
        # jtu.rand_small (scale 1e-3); float16 at scale 1, since products of
        # 1e-3 values are float16 subnormals.
        scale = 1.0 if dtype == F16 else 1e-3
        lhs = jnp.asarray(rng.randn(m, k) * scale, jnp.float32).astype(dtype)
        rhs = jnp.asarray(rng.randn(g, k, n) * scale, jnp.float32).astype(dtype)
        gs = _lax_group_sizes(rng, m, g)
        eager = self.gmm(lhs, rhs, gs)
        jitted = jax.jit(self.gmm)(lhs, rhs, gs)
        what = f"[{m},{k},{n},{g} {jnp.dtype(dtype).name}]"
        assert eager.dtype == jitted.dtype == dtype, what
        assert_rel(jitted, eager, dtype, f"{what} jit vs eager")
        assert_rel(eager, loop_oracle(lhs, rhs, gs)[0], dtype, f"{what} numpy")

  @pytest.mark.parametrize("m,k,n,g", [(5, 4, 3, 1), (5, 4, 3, 2), (9, 4, 3, 1),
                                       (10, 9, 8, 2)])
  def test_lax_ragged_dot_small_m(self, m, k, n, g):
    """RaggedTest.test_ragged_dot_small_m: ones, group sizes of one (tail rows)."""
    lhs = jnp.ones((m, k), jnp.float32)
    rhs = jnp.ones((g, k, n), jnp.float32)
    gs = jnp.ones((g,), jnp.int32)
    out = jax.jit(self.gmm)(lhs, rhs, gs)  # (jit vs eager: test_lax_ragged_dot)
    assert_rel(out, loop_oracle(lhs, rhs, gs)[0], F32, "small m")
    _assert_tail_zero(out, gs, "small m")

  def test_lax_ragged_dot_general_vmap(self):
    """RaggedTest.test_ragged_dot_general_vmap (batch 3, one size of its product):
    vmap over lhs, rhs and group sizes; HIGHEST precision, float32 output."""
    batch, m, k, n, g = 3, *self.PORT_VMAP
    rng = np.random.RandomState(1)
    lhs = (rng.randn(batch, m, k) * 1e-3).astype(np.float32)
    rhs = (rng.randn(batch, g, k, n) * 1e-3).astype(np.float32)
    gs = np.stack([_lax_group_sizes(rng, m, g) for _ in range(batch)])
    f = lambda a, b, s: self.gmm(a, b, s, preferred_element_type=jnp.float32,
                                 precision=jax.lax.Precision.HIGHEST)
    res = jax.vmap(f)(lhs, rhs, gs)
    for i in range(batch):
      assert_rel(res[i], f(lhs[i], rhs[i], gs[i]), F32, f"vmap [{i}]")
      assert_rel(res[i], loop_oracle(lhs[i], rhs[i], gs[i])[0], F32, f"[{i}]")

  PORT_VMAP = (128, 128, 128, 4)

  def test_lax_shape_inference(self):
    """RaggedTest.test_ragged_dot_general_shape_inference_success (the ragged
    non-contracting mode): [m, k] x [g, k, n] -> [m, n], on abstract values."""
    out = jax.eval_shape(self.gmm, jax.ShapeDtypeStruct((11, 5), jnp.float32),
                         jax.ShapeDtypeStruct((3, 5, 7), jnp.float32),
                         jax.ShapeDtypeStruct((3,), jnp.int32))
    assert out.shape == (11, 7) and out.dtype == jnp.float32

  # -- jax tests/export_test.py, test_ragged_dot

  @pytest.mark.parametrize("m,k,n,sizes", [(64, 4, 3, [64]),
                                           (64, 9, 8, [30, 34])])
  def test_export_ragged_dot(self, m, k, n, sizes):
    """export_test.test_ragged_dot: the exported function (static shapes) gives
    the native result."""
    from jax import export  # noqa: PLC0415
    gs = np.array(sizes, np.int32)
    lhs = np.arange(m * k, dtype=np.float32).reshape((m, k))
    rhs = np.arange(len(sizes) * k * n, dtype=np.float32).reshape((len(sizes), k, n))
    f = lambda x, y, s: self.gmm(x, y, s)
    native = f(lhs, rhs, gs)
    exp = export.export(jax.jit(f), disabled_checks=self.EXPORT_DISABLED_CHECKS)(
        jax.ShapeDtypeStruct.like(lhs), jax.ShapeDtypeStruct.like(rhs),
        jax.ShapeDtypeStruct.like(gs))
    assert_rel(exp.call(lhs, rhs, gs), native, F32, "exported")
    assert_rel(native, loop_oracle(lhs, rhs, gs)[0], F32, "native")

  EXPORT_DISABLED_CHECKS = ()

  # -- jax tests/shape_poly_test.py, the "ragged_dot" harnesses (mode 1)

  @pytest.mark.parametrize("dtype,out_dtype", [(F32, None), (F16, F32)],
                           ids=["f32", "f16_f32"])
  def test_shape_poly_ragged_dot(self, dtype, out_dtype):
    """mode_1_non_contracting and mode_1_non_contracting_f16_f32: polymorphic
    shapes "m, k", "_, k, n", "_"."""
    from jax import export  # noqa: PLC0415
    rng = np.random.RandomState(2)
    lhs = rng.randn(11, 5).astype(dtype)
    rhs = rng.randn(3, 5, 7).astype(dtype)
    gs = np.array([4, 4, 3], np.int32)
    f = lambda a, b, s: self.gmm(a, b, s, preferred_element_type=out_dtype)
    specs = export.symbolic_args_specs((lhs, rhs, gs), ["m, k", "_, k, n", "_"])
    exp = export.export(jax.jit(f))(*specs)
    out = exp.call(lhs, rhs, gs)
    assert out.dtype == (out_dtype or dtype)
    assert_rel(out, loop_oracle(lhs, rhs, gs)[0], dtype, "shape poly")
    # mode_1_non_contracting_dynamic_group_error: the group count must be static.
    specs = export.symbolic_args_specs((lhs, rhs, gs), ["m, k", "g, k, n", "g"])
    with pytest.raises(TypeError, match="group count .* must be static"):
      export.export(jax.jit(lambda a, b, s: jmoe.gmm(a, b, s,
                                                     implementation=self.IMPL))
                    )(*specs)

  # -- jax tests/pallas/tpu_gmm_test.py, GroupedMatmulTest

  def test_megablox_gmm(self):
    """GroupedMatmulTest.gmm_test: random group counts, lhs / rhs / out dtypes each
    float32 or bf16, transpose_rhs; values and both gradients (with a cotangent in
    the output dtype) against the per-group reference. Tolerance: the loosest
    dtype involved."""
    for m, k, n in self.PORT_MEGABLOX_SHAPES:
      self._megablox_check(m, k, n)()

  def _megablox_check(self, m, k, n):
    @settings(max_examples=self.PORT_MEGABLOX_EXAMPLES, deadline=None,
              derandomize=True)
    @given(st.data())
    def check(data):
      g = data.draw(st.integers(1, self.PORT_MEGABLOX_MAX_GROUPS))
      lhs_dt, rhs_dt, out_dt = (data.draw(st.sampled_from([F32, BF16]))
                                for _ in range(3))
      transpose_rhs = data.draw(st.booleans())
      sizes = data.draw(group_sizes_strategy(m, g, tail=False))
      rng = np.random.RandomState(g)
      rand = lambda shape, dt: jnp.asarray(  # random_dense, limit=1
          rng.uniform(-1, 1, shape).astype(np.float32)).astype(BF16).astype(dt)
      lhs = rand((m, k), lhs_dt)
      rhs = rand((g, n, k) if transpose_rhs else (g, k, n), rhs_dt)
      dy = rand((m, n), out_dt)
      f = jax.jit(lambda a, b: ops.gmm(
          a, b, sizes, transpose_rhs=transpose_rhs, preferred_element_type=out_dt,
          implementation=self.IMPL, options=self.OPTIONS))
      out, vjp = jax.vjp(f, lhs, rhs)
      dl, dr = vjp(dy)
      assert out.dtype == out_dt and dl.dtype == lhs_dt and dr.dtype == rhs_dt
      worst = BF16 if BF16 in (lhs_dt, rhs_dt, out_dt) else F32
      ref, dl_ref, dr_ref = loop_oracle(lhs, rhs, sizes, dy,
                                        transpose_rhs=transpose_rhs)
      what = f"[{m},{k},{n} g={g} {sizes.tolist()} t={transpose_rhs}]"
      assert_rel(out, ref, worst, f"{what} out")
      assert_rel(dl, dl_ref, worst, f"{what} dlhs")
      assert_rel(dr, dr_ref, worst, f"{what} drhs")

    return check

  def test_megablox_sharded_groups(self):
    """GroupedMatmulTest.test_gmm_sharded_groups: the groups split into shards of
    `stride`, each run with its group_offset; the shards' outputs summed (megablox
    accumulates them through existing_out) and weight gradients concatenated equal
    the unsharded oracle."""
    m, k, n = self.PORT_MEGABLOX_SHAPES[0]
    g, stride = 6, 2
    rng = np.random.RandomState(3)
    lhs = rng.uniform(-1, 1, (m, k)).astype(np.float32)
    rhs = rng.uniform(-1, 1, (g, k, n)).astype(np.float32)
    dy = rng.uniform(-1, 1, (m, n)).astype(np.float32)
    sizes = _lax_group_sizes(rng, m, g)

    @jax.jit
    def run(lhs, rhs, gs, dy):
      def f(a, b):
        return sum(self.gmm(a, b[o:o + stride], gs, jnp.int32(o))
                   for o in range(0, g, stride))
      out, vjp = jax.vjp(f, lhs, rhs)
      return (out, *vjp(dy))

    out, dl, dr = run(lhs, rhs, jnp.asarray(sizes), dy)
    ref, dl_ref, dr_ref = loop_oracle(lhs, rhs, sizes, dy)
    assert_rel(out, ref, F32, "sharded out")
    assert_rel(dl, dl_ref, F32, "sharded dlhs")
    assert_rel(dr, dr_ref, F32, "sharded drhs")

  # -- tokamax tokamax/_src/ops/ragged_dot/test_base.py, RaggedDotTestBase

  def _tokamax_inputs(self, dtype, random_groups=False, std=0.1):
    num_groups, m, k, n = self.PORT_TOKAMAX
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(0.0, std, (m, k)).astype(np.float32), dtype)
    b = jnp.asarray(rng.normal(0.0, std, (num_groups, k, n)).astype(np.float32),
                    dtype)
    if random_groups:
      gs = jnp.asarray(rng.integers(0, m // num_groups, (num_groups,), np.int32))
    else:  # tokamax passes uint32 group sizes
      gs = jnp.array([m // num_groups] * num_groups, jnp.uint32)
    return a, b, gs

  def _tokamax_f32(self, a, b, gs, **kw):
    """tokamax's _dot_fn_f32: float32 output, HIGHEST for float32 inputs."""
    if jnp.result_type(a, b) == jnp.float32:
      kw["precision"] = jax.lax.Precision.HIGHEST
    return self.gmm(a, b, gs, preferred_element_type=jnp.float32, **kw)

  @pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
  def test_tokamax_simple(self, dtype):
    """test_simple: even groups (uint32 sizes), float32 output."""
    a, b, gs = self._tokamax_inputs(dtype)
    actual = self._tokamax_f32(a, b, gs)
    assert_rel(actual, loop_oracle(a, b, gs)[0], F32 if dtype == F32 else BF16,
               "simple")

  def test_tokamax_padded(self):
    """test_padded: random group sizes summing to less than m."""
    a, b, gs = self._tokamax_inputs(BF16, random_groups=True)
    actual = self._tokamax_f32(a, b, gs)
    assert_rel(actual, loop_oracle(a, b, gs)[0], BF16, "padded")
    _assert_tail_zero(actual, gs, "padded")

  def test_tokamax_zero_group_sizes(self):
    """test_zero_group_sizes: every pattern of zeroed groups (2^G of them)."""
    a, b, gs = self._tokamax_inputs(BF16, random_groups=True)
    f = jax.jit(lambda s: self._tokamax_f32(a, b, s))
    num_groups = gs.shape[0]
    for i in range(2 ** num_groups):
      keep = np.array([(i >> j) & 1 for j in range(num_groups)], bool)
      sizes = np.where(keep, np.asarray(gs), 0).astype(np.int32)
      actual = f(jnp.asarray(sizes))
      ref = loop_oracle(a, b, sizes)[0]
      if sizes.sum():
        assert_rel(actual, ref, BF16, f"zero groups {sizes.tolist()}")
      _assert_tail_zero(actual, sizes, f"zero groups {sizes.tolist()}")

  @pytest.mark.parametrize("out_type", [None, BF16, F32],
                           ids=["none", "bf16", "f32"])
  def test_tokamax_preferred_element_type(self, out_type):
    """test_preferred_element_type: bf16 inputs; the output dtype as asked (the
    inputs' by default)."""
    a, b, gs = self._tokamax_inputs(BF16)
    actual = self.gmm(a, b, gs, preferred_element_type=out_type)
    assert actual.dtype == (out_type or BF16)
    assert_rel(actual, loop_oracle(a, b, gs)[0], BF16, "preferred_element_type")

  def test_tokamax_vjp(self):
    """test_vjp: bf16 inputs, float32 output; values and the vjp of a standardized
    cotangent against the float32 reference on the same (bf16-exact) values."""
    a, b, gs = self._tokamax_inputs(BF16)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    f = lambda x, y: self._tokamax_f32(x, y, gs)
    actual, f_vjp = jax.vjp(f, a, b)
    ref, _, _ = loop_oracle(a32, b32, gs)
    assert_rel(actual, ref, F32, "vjp primal")
    dout = jax.nn.standardize(jnp.asarray(ref, jnp.float32))
    # As tokamax does, bottleneck the cotangent to bf16 values.
    dout = dout.astype(jnp.bfloat16).astype(jnp.float32)
    _, dl_ref, dr_ref = loop_oracle(a32, b32, gs, dout)
    dl, dr = f_vjp(dout)
    assert dl.dtype == dr.dtype == BF16
    assert_rel(dl, dl_ref, BF16, "vjp dlhs")
    assert_rel(dr, dr_ref, BF16, "vjp drhs")
