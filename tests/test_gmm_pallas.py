"""The Pallas-Triton grouped matmul against the dense oracle: values and gradients.

One set of checks (`GmmKernelChecks`) runs twice: in the Pallas interpreter on CPU
at tiny shapes (every edge: tiles overhanging m, k and n, empty groups, tail rows,
group_offset), and on the real GPU kernels at bigger shapes (`@pytest.mark.gpu`,
skipped without a GPU). Kernel outputs start as NaN (`poison_outputs`), so a row a
kernel forgets to write fails the finiteness and exact-zero checks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jmoe
from jmoe._src.gmm import api, ops
from jmoe._src.gmm.config import GmmConfig, heuristic_config, select_config
from jmoe._src.gmm.pallas_triton import TritonConfig
from jmoe._src.gmm.reference import group_ids
from tests.utils import assert_rel

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "cfg",
                                             "out_dtype"))
def fwd_bwd(lhs, rhs, group_sizes, dy, group_offset, *, impl, interpret=True,
            cfg=None, out_dtype=None):
  """(out, dlhs, drhs) of one implementation, through jax.vjp."""
  if impl == "pallas":
    options = ops.GmmOptions.every(TritonConfig(tiles=cfg, poison_outputs=True))
    f = lambda l, r: ops.gmm(
        l, r, group_sizes, group_offset, preferred_element_type=out_dtype,
        implementation="pallas_interpret" if interpret else "pallas",
        options=options)
  else:
    f = lambda l, r: ops.gmm(l, r, group_sizes, group_offset,
                             preferred_element_type=out_dtype,
                             implementation="reference")
  out, vjp = jax.vjp(f, lhs, rhs)
  dlhs, drhs = vjp(dy.astype(out.dtype))
  return out, dlhs, drhs


def make_inputs(m, k, n, num_local, dtype, seed=0):
  kl, kr, kd = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(kl, (m, k), jnp.float32).astype(dtype)
  rhs = (jax.random.normal(kr, (num_local, k, n), jnp.float32) / np.sqrt(k)
         ).astype(dtype)
  dy = jax.random.normal(kd, (m, n), jnp.float32).astype(dtype)
  return lhs, rhs, dy


def check_against_oracle(lhs, rhs, group_sizes, dy, group_offset, *, interpret,
                         cfg, what=""):
  """Values and gradients vs the float32 oracle; exact zeros where it is zero."""
  dtype = lhs.dtype
  gs = jnp.asarray(group_sizes, jnp.int32)
  off = None if group_offset is None else jnp.int32(group_offset)
  out, dl, dr = fwd_bwd(lhs, rhs, gs, dy, off, impl="pallas", interpret=interpret,
                        cfg=cfg, out_dtype=dtype)
  f32 = lambda x: x.astype(jnp.float32)
  ref, dl_ref, dr_ref = fwd_bwd(f32(lhs), f32(rhs), gs, f32(dy), off,
                                impl="reference", out_dtype=F32)
  assert out.dtype == dtype and dl.dtype == lhs.dtype and dr.dtype == rhs.dtype
  assert_rel(out, ref, dtype, f"{what} out")
  assert_rel(dl, dl_ref, dtype, f"{what} dlhs")
  assert_rel(dr, dr_ref, dtype, f"{what} drhs")
  # Rows outside the local groups (and past the total) are exactly zero, and so is
  # their input gradient; an empty local group's weight gradient is exactly zero.
  m, num_local = lhs.shape[0], rhs.shape[0]
  local = np.asarray(group_ids(gs, m)) - (group_offset or 0)
  outside = (local < 0) | (local >= num_local)
  np.testing.assert_array_equal(np.asarray(f32(out))[outside], 0.0,
                                err_msg=f"{what} out rows outside the groups")
  np.testing.assert_array_equal(np.asarray(f32(dl))[outside], 0.0,
                                err_msg=f"{what} dlhs rows outside the groups")
  sizes = np.asarray(group_sizes)
  lo = group_offset or 0
  local_sizes = np.zeros(num_local, np.int64)
  avail = sizes[lo:lo + num_local]
  local_sizes[:len(avail)] = avail
  np.testing.assert_array_equal(np.asarray(f32(dr))[local_sizes == 0], 0.0,
                                err_msg=f"{what} drhs of empty groups")


class GmmKernelChecks:
  """The checks; subclasses choose interpret/GPU, shapes and routings."""

  interpret: bool
  M: int
  K: int
  N: int
  G: int
  CFG: GmmConfig | None
  ROUTINGS: dict
  OFFSET_SIZES: list      # group sizes of all groups for the group_offset test
  OFFSET_LOCAL: int       # local groups
  OFFSETS: tuple

  @pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
  def test_forward_and_grads(self, dtype):
    lhs, rhs, dy = make_inputs(self.M, self.K, self.N, self.G, dtype)
    for name, sizes in self.ROUTINGS.items():
      assert len(sizes) == self.G and sum(sizes) <= self.M, name
      check_against_oracle(lhs, rhs, sizes, dy, None, interpret=self.interpret,
                           cfg=self.CFG, what=f"[{name}]")

  @pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
  def test_group_offset(self, dtype):
    lhs, rhs, dy = make_inputs(self.M, self.K, self.N, self.OFFSET_LOCAL, dtype,
                               seed=1)
    for offset in self.OFFSETS:
      check_against_oracle(lhs, rhs, self.OFFSET_SIZES, dy, offset,
                           interpret=self.interpret, cfg=self.CFG,
                           what=f"[offset={offset}]")


class TestInterpret(GmmKernelChecks):
  """Tiny shapes, tiles of 16/32: m, k and n all overhang their last tile."""

  interpret = True
  M, K, N, G = 90, 48, 40, 5
  CFG = GmmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
  ROUTINGS = {
      "mixed": [17, 0, 40, 3, 25],          # empty group, tail of 5 rows
      "one_group": [0, 0, 90, 0, 0],
      "tail_heavy": [10, 0, 0, 20, 0],       # 60 tail rows
      "nothing_routed": [0, 0, 0, 0, 0],
      "tile_aligned": [16, 16, 32, 0, 26],
  }
  OFFSET_SIZES = [11, 0, 14, 30, 0, 9, 20]  # 7 groups, sum 84 < 90
  OFFSET_LOCAL = 3
  OFFSETS = (0, 2, 4)

  @settings(max_examples=20, deadline=None)
  @given(st.lists(st.integers(0, 40), min_size=5, max_size=5))
  def test_fuzz_group_sizes(self, sizes):
    sizes = np.asarray(sizes)
    if sizes.sum() > self.M:
      sizes = sizes * self.M // sizes.sum()
    lhs, rhs, dy = make_inputs(self.M, self.K, self.N, self.G, F32)
    check_against_oracle(lhs, rhs, sizes.tolist(), dy, None, interpret=True,
                         cfg=self.CFG, what=f"[{sizes.tolist()}]")

  def test_public_api_default_tiles(self):
    """jmoe.gmm(implementation="pallas_interpret") with the selected tiles, bf16
    inputs and a float32 output (as expert_ffn calls it)."""
    m, k, n, g = 96, 64, 64, 4
    lhs, rhs, dy = make_inputs(m, k, n, g, BF16, seed=2)
    dy = dy.astype(jnp.float32)
    gs = jnp.array([30, 0, 41, 20], jnp.int32)

    def run(impl):
      f = lambda l, r: jmoe.gmm(l, r, gs, preferred_element_type=jnp.float32,
                                implementation=impl)
      out, vjp = jax.vjp(f, lhs, rhs)
      return (out, *vjp(dy))

    got = jax.jit(lambda: run("pallas_interpret"))()
    want = jax.jit(lambda: run("reference"))()
    assert got[0].dtype == jnp.float32
    for name, a, b in zip(("out", "dlhs", "drhs"), got, want):
      assert_rel(a, b, BF16, name)
    np.testing.assert_array_equal(np.asarray(got[0][91:]), 0.0)
    np.testing.assert_array_equal(np.asarray(got[2][1], np.float32), 0.0)


def test_default_implementation_on_this_backend():
  want = "pallas" if jax.devices()[0].platform == "gpu" else "xla"
  assert api.default_implementation() == want
  assert "pallas" in api.IMPLEMENTATIONS and "pallas_interpret" in api.IMPLEMENTATIONS


def test_configs():
  with pytest.raises(ValueError, match="power of 2"):
    GmmConfig(block_m=48)
  with pytest.raises(TypeError):
    GmmConfig(128, 128)  # keyword-only
  # Decode: few rows per group -> a small row tile; training shapes: 128 rows.
  assert heuristic_config("gmm", 256, 4096, 14336, 8, BF16).block_m <= 64
  assert heuristic_config("gmm", 16384, 4096, 14336, 8, BF16).block_m == 128
  # Tiles never exceed the (power-of-2-rounded) problem.
  c = select_config("gmm", 90, 48, 40, 5, F32, interpret=True)
  assert c.block_n <= 64 and c.block_k <= 64


@pytest.mark.gpu
class TestGPU(GmmKernelChecks):
  """The compiled Triton kernels on the GPU, with the selected (tuned or heuristic)
  tiles: an aligned training-like shape; the ragged shapes are in
  `TestGPURagged`."""

  interpret = False
  M, K, N, G = 4096, 1024, 2048, 8
  CFG = None
  ROUTINGS = {
      "skewed_with_empty": [1500, 0, 700, 3, 1200, 0, 600, 90],   # sum 4093
      "balanced": [512] * 8,
      "one_group": [0, 0, 0, 4096, 0, 0, 0, 0],
      "tail_heavy": [100, 0, 0, 0, 0, 0, 0, 900],
  }
  OFFSET_SIZES = [400, 0, 1000, 333, 0, 777, 1200, 300, 0, 50]  # sum 4060
  OFFSET_LOCAL = 4
  OFFSETS = (0, 3, 6)

  def test_decode_shape(self):
    """Few rows per group (decode): 256 rows on 8 experts, bf16."""
    lhs, rhs, dy = make_inputs(256, 1024, 2048, 8, BF16, seed=3)
    check_against_oracle(lhs, rhs, [40, 0, 31, 33, 60, 2, 50, 40], dy, None,
                         interpret=False, cfg=None, what="[decode]")

  def test_public_api_default(self):
    """implementation=None picks the Pallas kernels on the GPU."""
    lhs, rhs, dy = make_inputs(512, 256, 512, 4, BF16, seed=4)
    gs = jnp.array([100, 0, 300, 50], jnp.int32)
    out = jax.jit(lambda l, r: jmoe.gmm(l, r, gs))(lhs, rhs)
    ref = ops.gmm(lhs.astype(F32), rhs.astype(F32), gs,
                  implementation="reference")
    assert_rel(out, ref, BF16, "out")
    np.testing.assert_array_equal(np.asarray(out[450:], np.float32), 0.0)


@pytest.mark.gpu
class TestGPURagged(GmmKernelChecks):
  """m, k, n not multiples of any tile, on the GPU."""

  interpret = False
  M, K, N, G = 1000, 200, 300, 6
  CFG = None
  ROUTINGS = {"mixed": [170, 0, 333, 1, 250, 200], "tail": [0, 77, 0, 0, 0, 400]}
  OFFSET_SIZES = [100, 200, 0, 300, 150, 200, 50]
  OFFSET_LOCAL = 3
  OFFSETS = (1, 4)


@pytest.mark.parametrize("case", ["bf16_aligned", "f32_ragged"])
def test_lowers_to_triton_ir(case):
  """The kernels lower to Triton IR for CUDA, on any machine (no GPU needed): the
  Pallas-Triton lowering rules accept every op the kernels use (forward, input
  gradient, weight gradient). PTX compilation itself happens only on a GPU."""
  if case == "bf16_aligned":
    m, k, n, g, dtype = 1024, 512, 1024, 8, BF16
  else:
    m, k, n, g, dtype = 1000, 200, 300, 6, F32
  lhs = jax.ShapeDtypeStruct((m, k), dtype)
  rhs = jax.ShapeDtypeStruct((g, k, n), dtype)
  gs = jax.ShapeDtypeStruct((g,), jnp.int32)
  dy = jax.ShapeDtypeStruct((m, n), dtype)

  def f(l, r, s, d):
    out, vjp = jax.vjp(lambda a, b: ops.gmm(a, b, s, implementation="pallas"),
                       l, r)
    return out, *vjp(d)

  try:
    text = jax.jit(f).trace(lhs, rhs, gs, dy).lower(
        lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip("jax >= 0.11 lowers Pallas-Triton only for a GPU it can see")
  for name in ("jmoe_gmm", "jmoe_gmm_t", "jmoe_tgmm"):
    assert f'name = "{name}"' in text, f"{name} missing from the CUDA lowering"


def test_benchmark_routings():
  """The benchmark's routings (shared shapes in benchmarks/arg_specs.py)."""
  from benchmarks.arg_specs import SPECS, routing_sizes
  for spec in SPECS.values():
    bal = routing_sizes(spec.rows, spec.num_groups, "balanced")
    skew = routing_sizes(spec.rows, spec.num_groups, "skewed")
    assert bal.sum() == skew.sum() == spec.rows
    assert (bal > 0).all() and (skew == 0).any()
    assert skew.max() > 2 * spec.rows / spec.num_groups
    np.testing.assert_array_equal(
        skew, routing_sizes(spec.rows, spec.num_groups, "skewed"))  # fixed seed
