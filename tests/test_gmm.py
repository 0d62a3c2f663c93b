"""jmoe.gmm on every backend: one test base (tests/gmm_checks.py, with the ported
peer tests of tests/gmm_ports.py) subclassed per backend, and the dispatch tests.

CPU: "reference", "xla", "cpu" (the tile loop, 16-row tiles so that tiles
overhang group ends and row m) and "pallas_interpret" (the Pallas-Triton kernels
in the interpreter, tiles of 16/32 so that m, k and n all overhang their last
tile). GPU
(`@pytest.mark.gpu`, skipped without one): "pallas" (Triton) and "mosaic"
(Mosaic-GPU, Hopper) at shapes where 64/128-row tiles matter, plus small odd ones.
Kernel outputs start as NaN (`poison_outputs`) where the backend offers it, so a
row a kernel forgets to write fails the finiteness and exact-zero checks.
"""

import dataclasses
import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe._src.gmm import api, ops
from jmoe._src.gmm.config import GmmConfig, heuristic_config, select_config
from jmoe._src.gmm.cpu import CpuConfig, bucket_rows, default_block_m
from jmoe._src.gmm.pallas_triton import TritonConfig
from tests.gmm_checks import (BF16, F16, F32, GmmChecks, check_against_oracle,
                              fwd_bwd, loop_oracle, make_inputs)
from tests.gmm_ports import RaggedDotPorts
from tests.utils import assert_rel


class CpuCases:
  """Shapes and routings of the CPU backends (tests/test_gmm.py and
  tests/test_gmm_pallas.py before the merge, plus odd k and n)."""

  SHAPES = {
      "small": (40, 16, 24, 5),
      "tiles": (90, 48, 40, 5),
      "odd": (40, 33, 200, 3),
  }
  ROUTINGS = {
      "small": {
          "mixed": [8, 0, 12, 0, 20],
          "one_group": [40, 0, 0, 0, 0],
          "nothing_routed": [0, 0, 0, 0, 0],
          "uneven": [3, 7, 1, 9, 2],          # 18 tail rows
          "middle": [0, 5, 5, 5, 0],
          "bf16_case": [10, 0, 10, 10, 10],
      },
      "tiles": {
          "mixed": [17, 0, 40, 3, 25],         # empty group, tail of 5 rows
          "one_group": [0, 0, 90, 0, 0],
          "tail_heavy": [10, 0, 0, 20, 0],     # 60 tail rows
          "nothing_routed": [0, 0, 0, 0, 0],
          "tile_aligned": [16, 16, 32, 0, 26],
      },
      "odd": {"mixed": [13, 0, 20], "last": [0, 0, 39]},
  }
  OFFSET_CASES = {
      # (m, k, n, all groups' sizes, local groups, offsets); offsets past the
      # last group leave local groups with no rows (all zeros).
      "seven": (90, 48, 40, [11, 0, 14, 30, 0, 9, 20], 3, (0, 2, 4, 5, 7)),
      "five": (40, 16, 24, [6, 9, 0, 11, 8], 2, (0, 2, 4)),
  }
  FUZZ_SHAPE = (40, 16, 24, 5)
  FUZZ_EXAMPLES = 12
  PUBLIC_SHAPE, PUBLIC_SIZES = (96, 64, 64, 4), [30, 0, 41, 20]
  # Ported peer tests, scaled for CPU (float16 runs on the GPU classes).
  PORT_DTYPES = (F32, BF16)
  PORT_MEGABLOX_SHAPES = ((128, 128, 128), (128, 8, 16))
  PORT_MEGABLOX_EXAMPLES = 2


class TestReference(CpuCases, GmmChecks, RaggedDotPorts):
  IMPL = "reference"
  # Off TPU the "xla" backend runs this backend's masked products
  # (reference.masked_gmm / masked_tgmm), so on CPU TestXla covers these for
  # both; out_sharding is besides the front end's (auto_axes around them).
  test_out_sharding = None
  test_integer_and_mixed_dtypes = None
  test_non_finite_values_stay_in_their_group = None


class TestXla(CpuCases, GmmChecks, RaggedDotPorts):
  IMPL = "xla"
  FUZZ_EXAMPLES = 30


class TestCpu(CpuCases, GmmChecks, RaggedDotPorts):
  """The CPU tile loop with 16-row tiles: the last tile of a group overhangs into
  the next groups' rows, and at m = 40 or 90 the last tiles overhang row m."""

  IMPL = "cpu"
  OPTIONS = ops.GmmOptions.every(CpuConfig(block_m=16, loops=True,
                                           bucket_factor=None))
  FUZZ_EXAMPLES = 20

  def test_tile_heights(self):
    """Any tile height: an odd one, and more than m (clipped to m: one tile)."""
    m, k, n, g = CpuCases.SHAPES["tiles"]
    lhs, rhs, dy = make_inputs(m, k, n, g, F32, seed=20)
    sizes = CpuCases.ROUTINGS["tiles"]["mixed"]
    gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(0)
    for bm in (7, 4 * m):
      got = fwd_bwd(lhs, rhs, gs, dy, off, impl="cpu",
                    options=ops.GmmOptions.every(CpuConfig(block_m=bm,
                                                           loops=True)))
      check_against_oracle(got, lhs, rhs, sizes, dy, dtype=F32,
                           what=f"[block_m={bm}]")

  def test_non_finite_rows_reach_only_their_group(self):
    """A NaN row of lhs (or dy) spoils only its own group's output rows (weight
    gradient): the tile products that overhang into it are discarded, and the
    tail and other groups' rows never see it. Bitwise the same on a second run."""
    m, k, n, g = CpuCases.SHAPES["tiles"]
    lhs, rhs, dy = make_inputs(m, k, n, g, F32, seed=21)
    sizes = [17, 0, 40, 3, 25]             # groups 0, 2, 3, 4; 5 tail rows
    bad_lhs, bad_dy = 17 + 40 + 1, m - 1   # a row of group 3; a tail row
    lhs = lhs.at[bad_lhs].set(jnp.nan)
    dy = dy.at[bad_dy].set(jnp.nan).at[bad_lhs].set(jnp.nan)
    gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(0)
    got = fwd_bwd(lhs, rhs, gs, dy, off, impl="cpu", options=self.OPTIONS)
    out, dlhs, drhs = map(np.asarray, got)
    clean_lhs = lhs.at[bad_lhs].set(0.0)
    clean_dy = dy.at[bad_dy].set(0.0).at[bad_lhs].set(0.0)
    ref, dl_ref, dr_ref = loop_oracle(clean_lhs, rhs, sizes, clean_dy)
    rows = np.arange(m) != bad_lhs
    assert np.isnan(out[bad_lhs]).all() and np.isnan(dlhs[bad_lhs]).all()
    assert_rel(out[rows], ref[rows], F32, "out, other rows")
    assert_rel(dlhs[rows], dl_ref[rows], F32, "dlhs, other rows")
    np.testing.assert_array_equal(out[sum(sizes):], 0.0)
    np.testing.assert_array_equal(dlhs[sum(sizes):], 0.0)
    assert np.isnan(drhs[3]).all()
    assert_rel(drhs[[0, 1, 2, 4]], dr_ref[[0, 1, 2, 4]], F32, "drhs, other groups")
    again = fwd_bwd(lhs, rhs, gs, dy, off, impl="cpu", options=self.OPTIONS)
    for a, b in zip(got, again):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_loops_where_they_pay(self):
    """By default the tile loops run where they beat ragged_dot (>= 2 groups and
    >= 4 rows per group on average), ragged_dot elsewhere; `loops` forces
    either. Forward and both backward products follow the same rule."""
    def lowered(m, g, config=None):
      lhs, rhs, dy = make_inputs(m, 8, 8, g, F32)
      gs = jnp.full((g,), m // g, jnp.int32)
      opts = ops.GmmOptions.every(config)
      f = lambda a, b: fwd_bwd(a, b, gs, dy, jnp.int32(0), impl="cpu",
                               options=opts)
      return jax.jit(f).lower(lhs, rhs).as_text()

    # The "xla" fallback has one loop per product (its masked products), the tile
    # loops two (groups, then tiles): compare with loops forced off / on.
    whiles = lambda text: text.count("stablehlo.while")
    off, on = CpuConfig(loops=False), CpuConfig(loops=True)
    assert whiles(lowered(16, 4)) > whiles(lowered(16, 4, off))   # 4 rows per group
    assert whiles(lowered(12, 4)) == whiles(lowered(12, 4, off))  # 3 rows per group
    assert whiles(lowered(32, 1)) == whiles(lowered(32, 1, off))  # one group
    assert whiles(lowered(32, 1, on)) > whiles(lowered(32, 1, off))
    with pytest.raises(ValueError, match="block_m"):
      CpuConfig(block_m=0)

  def test_default_block_m(self):
    """Powers of 2 in [16, 64] (or m when smaller), smaller with fewer rows per
    group."""
    for m, k, n, g in [(4096, 128, 128, 8), (4096, 128, 128, 64), (16, 512, 512, 8),
                       (5, 8, 8, 2), (10**6, 4096, 4096, 8)]:
      bm = default_block_m(m, k, n, g)
      assert bm == m or (16 <= bm <= 64 and bm & (bm - 1) == 0), (m, g, bm)
    assert default_block_m(4096, 128, 128, 64) == 32
    assert default_block_m(4096, 128, 128, 8) == 64
    assert default_block_m(5, 8, 8, 2) == 5


class TestCpuBuckets(CpuCases, GmmChecks, RaggedDotPorts):
  """The CPU backend's bucket path: buckets of m rows (bucket_factor 100), so
  every routing fits and every product is one batched dot over the groups."""

  IMPL = "cpu"
  OPTIONS = ops.GmmOptions.every(CpuConfig(loops=True, bucket_factor=100.0))
  FUZZ_EXAMPLES = 20

  def test_buckets_or_loops_by_the_group_sizes(self):
    """bucket_factor 1.5: balanced sizes take the buckets alone, a group past C
    rows the buckets plus the loops for its overflow (one lax.cond, chosen at
    run time); both give the oracle's values, forward and both gradients. The
    default factor is 1.25."""
    m, k, n, g = 96, 16, 24, 4
    lhs, rhs, dy = make_inputs(m, k, n, g, F32, seed=30)
    assert bucket_rows(m, g, 1.5) == 40 and CpuConfig().bucket_factor == 1.25
    opts = ops.GmmOptions.every(CpuConfig(loops=True, bucket_factor=1.5))
    f = jax.jit(lambda a, b, gs, off: fwd_bwd(a, b, gs, dy, off, impl="cpu",
                                              options=opts))
    text = f.lower(lhs, rhs, jnp.zeros((g,), jnp.int32), jnp.int32(0)).as_text()
    assert "stablehlo.case" in text or "stablehlo.if" in text
    for sizes in ([24, 30, 20, 22], [40, 32, 24, 0], [41, 20, 20, 15], [0, 0, 96, 0],
                  [10, 0, 0, 5]):
      got = f(lhs, rhs, jnp.asarray(sizes, jnp.int32), jnp.int32(0))
      check_against_oracle(got, lhs, rhs, sizes, dy, dtype=F32, what=f"{sizes}")
    with pytest.raises(ValueError, match="bucket_factor"):
      CpuConfig(bucket_factor=0.0)
    with pytest.raises(ValueError, match="bucket_factor"):
      CpuConfig(bucket_factor=float("nan"))


def test_cpu_bf16_products_match_float32_products():
  """bf16 operands: the "cpu" backend multiplies them as bf16 x bf16 with float32
  accumulation (the products are exact in float32), and with `upcast=True` as
  float32. With float32 outputs the two agree to float32 summation-order
  rounding -- on the buckets, the buckets plus overflow loops, and the loops
  alone; forward, input-gradient and weight-gradient products -- and both match
  the float64 oracle. The default's dots take bf16 operands, upcast's float32
  ones. A non-bool `upcast` is refused."""
  from jmoe._src.gmm import cpu  # noqa: PLC0415
  m, k, n, g = 96, 32, 24, 4
  lhs, rhs, dy = make_inputs(m, k, n, g, BF16, seed=32)
  sizes = [40, 0, 30, 20]                       # 6 tail rows
  gs, off = jnp.asarray(sizes, jnp.int32), jnp.int32(0)
  ref = loop_oracle(lhs.astype(F32), rhs.astype(F32), sizes, dy.astype(F32))

  def products(config):
    kw = dict(out_dtype=F32, precision=None, config=config)
    return (cpu.gmm(lhs, rhs, gs, off, transpose_rhs=False, **kw),
            cpu.gmm(dy, rhs, gs, off, transpose_rhs=True, **kw),
            cpu.tgmm(lhs, dy, gs, off, num_local=g, **kw))

  for base in (CpuConfig(loops=True), CpuConfig(loops=True, bucket_factor=0.5),
               CpuConfig(loops=True, bucket_factor=None, block_m=16)):
    got = {}
    for upcast in (False, True):
      cfg = dataclasses.replace(base, upcast=upcast)
      got[upcast] = jax.jit(products, static_argnums=0)(cfg)
      text = jax.jit(products, static_argnums=0).lower(cfg).as_text()
      operands = [ln.rsplit(": (", 1)[1].split(") ->")[0]
                  for ln in text.splitlines() if "stablehlo.dot_general" in ln]
      assert operands and all(("bf16" in o) != upcast for o in operands), (
          cfg, operands)
      for a, r, what in zip(got[upcast], ref, ("out", "dlhs", "drhs")):
        assert_rel(a, r, F32, f"{cfg}: {what}")
    for a, b, what in zip(got[False], got[True], ("out", "dlhs", "drhs")):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                 err_msg=f"{base}: {what}")
  with pytest.raises(ValueError, match="upcast"):
    CpuConfig(upcast=1)


class TestCpuBucketOverflow(CpuCases, GmmChecks, RaggedDotPorts):
  """Buckets of half the mean group (bucket_factor 0.5): nearly every routing
  overflows them, so the products run the buckets and the tile loops for the
  overflow rows together, through the whole base (fuzz, empty groups, offsets,
  non-finite rows, transforms)."""

  IMPL = "cpu"
  OPTIONS = ops.GmmOptions.every(CpuConfig(loops=True, bucket_factor=0.5))
  FUZZ_EXAMPLES = 20

  def test_overflow_rows_take_the_loops(self):
    """One group far past C, one empty, one exactly C: the oracle's values, and
    every bucket/loop boundary (row C of a group) is exact in the forward."""
    m, k, n, g = 128, 8, 16, 4
    c = bucket_rows(m, g, 0.5)
    assert c == 16
    lhs, rhs, dy = make_inputs(m, k, n, g, F32, seed=31)
    f = jax.jit(lambda a, b, gs: fwd_bwd(a, b, gs, dy, jnp.int32(0), impl="cpu",
                                         options=self.OPTIONS))
    for sizes in ([90, 0, 16, 20], [16, 16, 16, 16], [0, 0, 0, 128], [17, 1, 0, 0]):
      got = f(lhs, rhs, jnp.asarray(sizes, jnp.int32))
      check_against_oracle(got, lhs, rhs, sizes, dy, dtype=F32, what=f"{sizes}")


class TestPallasInterpret(CpuCases, GmmChecks, RaggedDotPorts):
  """The Pallas-Triton kernels in the interpreter, with tiles of 16/32."""

  IMPL = "pallas_interpret"
  CFG = GmmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
  OPTIONS = ops.GmmOptions.every(TritonConfig(tiles=CFG, poison_outputs=True))
  # The "small" shape is the xla / reference one (tests/test_gmm.py before the
  # merge); the kernels' edges are in "tiles" and "odd".
  SHAPES = {k: v for k, v in CpuCases.SHAPES.items() if k != "small"}
  OFFSET_CASES = {"seven": CpuCases.OFFSET_CASES["seven"]}
  FUZZ_SHAPE = (90, 48, 40, 5)
  FUZZ_EXAMPLES = 20
  # The interpreter is the slowest backend to compile: one shape each for the
  # ports whose examples compile anew (k < 16 overhangs the smallest tile).
  PORT_LAX_SHAPES = ((64, 9, 8, 2),)
  PORT_MEGABLOX_SHAPES = ((128, 8, 16),)
  PORT_MEGABLOX_EXAMPLES = 3
  # The front end's auto_axes around the products: run by TestXla on CPU (and
  # by the GPU classes, where the kernels are custom calls in the partitioner).
  test_out_sharding = None


class GpuCases:
  """Kernel-sized shapes (tests/test_gmm_pallas.py's GPU classes before the merge,
  plus a training-like and an odd one)."""

  SHAPES = {
      "train": (1000, 256, 384, 8),
      "aligned": (4096, 1024, 2048, 8),
      "ragged": (1000, 200, 300, 6),
      "odd": (1000, 33, 200, 8),
      "decode": (256, 1024, 2048, 8),
  }
  ROUTINGS = {
      "train": {"skewed": [300, 0, 170, 1, 64, 128, 200, 100],
                "one_group": [0, 0, 0, 0, 0, 1000, 0, 0]},
      "aligned": {
          "skewed_with_empty": [1500, 0, 700, 3, 1200, 0, 600, 90],  # sum 4093
          "balanced": [512] * 8,
          "one_group": [0, 0, 0, 4096, 0, 0, 0, 0],
          "tail_heavy": [100, 0, 0, 0, 0, 0, 0, 900],
      },
      "ragged": {"mixed": [170, 0, 333, 1, 250, 200], "tail": [0, 77, 0, 0, 0, 400]},
      "odd": {"mixed": [129, 0, 64, 63, 300, 1, 0, 400]},
      "decode": {"decode": [40, 0, 31, 33, 60, 2, 50, 40]},
  }
  OFFSET_CASES = {
      "aligned": (4096, 1024, 2048, [400, 0, 1000, 333, 0, 777, 1200, 300, 0, 50],
                  4, (0, 3, 6)),
      "ragged": (1000, 200, 300, [100, 200, 0, 300, 150, 200, 50], 3, (1, 4)),
  }
  FUZZ_SHAPE = (1000, 256, 384, 8)
  FUZZ_EXAMPLES = 25
  PUBLIC_SHAPE, PUBLIC_SIZES = (512, 256, 512, 4), [100, 0, 300, 50]
  # The peers' own shapes.
  PORT_MEGABLOX_SHAPES = ((128, 128, 128), (512, 2048, 256), (128, 8, 16))
  PORT_MEGABLOX_EXAMPLES = 10
  PORT_MEGABLOX_MAX_GROUPS = 32
  PORT_TOKAMAX = (8, 1024, 128, 256)
  PORT_VMAP = (256, 256, 256, 4)
  PORT_DTYPES = (F32, BF16, F16)


@pytest.mark.gpu
class TestPallasTritonGPU(GpuCases, GmmChecks, RaggedDotPorts):
  """The compiled Triton kernels with the selected (tuned or heuristic) tiles."""

  IMPL = "pallas"
  OPTIONS = ops.GmmOptions.every(TritonConfig(poison_outputs=True))
  # A static export serializes the Triton kernel as a custom call, which has no
  # compatibility guarantee (jax.export refuses it unless told).
  EXPORT_DISABLED_CHECKS = tuple(
      jax.export.DisabledSafetyCheck.custom_call(t)
      for t in ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi"))

  def test_default_implementation_is_a_kernel(self):
    """implementation=None picks a GPU kernel ("mosaic" on Hopper when present,
    else "pallas"), and it is right."""
    assert ops.default_implementation() in ("pallas", "mosaic")
    lhs, rhs, _ = make_inputs(512, 256, 512, 4, BF16, seed=4)
    gs = jnp.array([100, 0, 300, 50], jnp.int32)
    out = jax.jit(lambda l, r: jmoe.gmm(l, r, gs))(lhs, rhs)
    assert_rel(out, loop_oracle(lhs, rhs, gs)[0], BF16, "out")
    np.testing.assert_array_equal(np.asarray(out[450:], np.float32), 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("jmoe._src.gmm.pallas_mosaic_gpu")
                    is None, reason="jmoe/_src/gmm/pallas_mosaic_gpu.py absent")
class TestMosaicGPU(GpuCases, GmmChecks, RaggedDotPorts):
  """The Mosaic-GPU kernels (Hopper); float32 operands run on their fallback."""

  IMPL = "mosaic"
  DTYPES = (BF16,)
  # Mosaic-GPU's custom call ("mosaic_gpu_v2") is export-stable; a float32
  # fallback would embed Triton's.
  EXPORT_DISABLED_CHECKS = TestPallasTritonGPU.EXPORT_DISABLED_CHECKS

  @pytest.fixture(autouse=True)
  def _hopper(self):
    if not ops._is_hopper(jax.devices()[0]):  # noqa: SLF001
      pytest.skip("Mosaic-GPU kernels need a Hopper GPU")


# ----------------------------------------------------------------------------
# Dispatch: names, defaults, fallbacks, options, empty and symbolic shapes


def test_implementation_names():
  assert set(api.IMPLEMENTATIONS) == {"xla", "reference", "pallas", "pallas_triton",
                                      "pallas_interpret", "mosaic", "cpu"}
  assert ops.canonical_name("pallas_triton") == ops.canonical_name("pallas")
  with pytest.raises(ValueError, match="implementation"):
    ops.canonical_name("cuda")
  lhs, rhs, _ = make_inputs(20, 8, 8, 2, F32)
  gs = jnp.array([5, 10], jnp.int32)
  # The bound primitives are the same (the rest of the jaxprs differs only in the
  # ids checkify.debug_check draws per trace).
  eqns = [[str(e) for e in jax.make_jaxpr(
      lambda a, b: jmoe.gmm(a, b, gs, implementation=i))(lhs, rhs).eqns
           if e.primitive is ops.gmm_p] for i in ("pallas_triton", "pallas")]
  assert len(eqns[0]) == 1 and eqns[0] == eqns[1]
  assert "implementation=pallas" in eqns[0][0]


def test_default_implementation_on_this_backend():
  if jax.devices()[0].platform == "cpu":
    assert api.default_implementation() == "cpu"
  else:
    assert api.default_implementation() in ("pallas", "mosaic")


@pytest.mark.parametrize("kind,cc,want", [
    ("NVIDIA H100 80GB HBM3", "9.0", "mosaic"),
    ("NVIDIA H200", None, "mosaic"),
    ("NVIDIA H20", None, "mosaic"),
    ("NVIDIA A100-SXM4-80GB", "8.0", "pallas"),
    ("NVIDIA GeForce RTX 4090", "8.9", "pallas"),
])
def test_default_implementation_by_gpu(monkeypatch, kind, cc, want):
  """Hopper (compute capability 9.x, or an H100/H200/H800/H20 device kind) gets
  the Mosaic kernels when their module is present, other NVIDIA GPUs Triton."""
  dev = types.SimpleNamespace(platform="gpu", device_kind=kind)
  if cc is not None:
    dev.compute_capability = cc
  monkeypatch.setattr(jax, "devices", lambda *a: [dev])
  monkeypatch.setattr(ops, "_mosaic_present", lambda: True)
  assert ops.default_implementation() == want
  monkeypatch.setattr(ops, "_mosaic_present", lambda: False)
  assert ops.default_implementation() == "pallas"


def test_mosaic_absent_is_a_clear_error():
  if importlib.util.find_spec("jmoe._src.gmm.pallas_mosaic_gpu") is not None:
    pytest.skip("the Mosaic module is present")
  lhs, rhs, _ = make_inputs(8, 16, 16, 1, BF16)
  with pytest.raises(ValueError, match="mosaic.*pallas_mosaic_gpu"):
    jmoe.gmm(lhs, rhs, jnp.array([8]), implementation="mosaic")


def test_gpu_kernels_off_gpu_are_a_clear_error():
  """implementation="pallas" (or "mosaic", whose float32 fallback is "pallas")
  where the kernels cannot lower: one ValueError naming the argument and what to
  use, eager and under jit, instead of Pallas's "Only interpret mode ..."."""
  if jax.devices()[0].platform == "gpu":
    pytest.skip("the kernels lower here")
  lhs, rhs, _ = make_inputs(8, 4, 4, 2, F32)
  gs = jnp.array([4, 4], jnp.int32)
  for impl, jit in (("pallas", False), ("mosaic", True)):
    f = lambda a, b: jmoe.gmm(a, b, gs, implementation=impl)
    with pytest.raises(ValueError, match=rf"implementation='{impl}'.*"
                       r"cannot run on cpu.*pallas_interpret"):
      (jax.jit(f) if jit else f)(lhs, rhs)


def _fake_backend(calls, supports, fallback):
  """A backend module recording its calls, on top of the reference."""
  from jmoe._src.gmm import reference  # noqa: PLC0415

  def gmm(*args, config=None, **kw):
    calls.append(("gmm", kw["transpose_rhs"], args[0].dtype, config))
    return reference.gmm(*args, config=config, **kw)

  def tgmm(*args, config=None, **kw):
    calls.append(("tgmm", None, args[0].dtype, config))
    return reference.tgmm(*args, config=config, **kw)

  return types.SimpleNamespace(gmm=gmm, tgmm=tgmm, FALLBACK=fallback,
                               supports_dtype=supports)


@pytest.fixture
def fake_backends(monkeypatch):
  """Registers "fake16" (16-bit floats only, falling back to "fakeall")."""
  calls = {"fake16": [], "fakeall": []}
  mods = {
      "jmoe_test_fake16": _fake_backend(
          calls["fake16"], lambda d: jnp.dtype(d).itemsize == 2, "fakeall"),
      "jmoe_test_fakeall": _fake_backend(calls["fakeall"], lambda d: True, None),
  }
  real_import = ops.importlib.import_module
  monkeypatch.setattr(ops.importlib, "import_module",
                      lambda name: mods.get(name) or real_import(name))
  registry = ops._BACKENDS  # noqa: SLF001
  monkeypatch.setitem(registry, "fake16", ("jmoe_test_fake16", {}))
  monkeypatch.setitem(registry, "fakeall", ("jmoe_test_fakeall", {}))
  monkeypatch.setattr(ops, "IMPLEMENTATIONS", ops.IMPLEMENTATIONS +
                      ("fake16", "fakeall"))
  ops.backend.cache_clear()
  yield calls
  ops.backend.cache_clear()


def test_dtype_fallback_and_options(fake_backends):
  """bf16 products run on the backend with its per-product configs; the float32
  cotangent's products (promoted) run on its FALLBACK with the default config.
  Products are named by kind: gmm -> fwd, gmm transposed -> dlhs, tgmm -> drhs."""
  lhs, rhs, _ = make_inputs(24, 8, 8, 3, BF16)
  gs = jnp.array([5, 0, 10], jnp.int32)
  opts = ops.GmmOptions(fwd="F", dlhs="DL", drhs="DR")
  f = lambda a, b, out: ops.gmm(a, b, gs, preferred_element_type=out,
                                implementation="fake16", options=opts)
  # bf16 cotangent: all three products on fake16. (The backends are called when
  # the primitives lower.)
  loss = lambda out: lambda a, b: jnp.sum(f(a, b, out))
  lower = lambda out: jax.jit(jax.value_and_grad(loss(out), (0, 1))).lower(lhs, rhs)
  lower(BF16)
  assert sorted(fake_backends["fake16"]) == sorted([
      ("gmm", False, BF16, "F"), ("gmm", True, BF16, "DL"),
      ("tgmm", None, BF16, "DR")])
  assert not fake_backends["fakeall"]
  fake_backends["fake16"].clear()
  # float32 output: forward on fake16; the backward computes in float32 on the
  # fallback, which gets no config (the options are fake16's).
  lower(F32)
  assert fake_backends["fake16"] == [("gmm", False, BF16, "F")]
  assert sorted(fake_backends["fakeall"]) == sorted([
      ("gmm", True, F32, None), ("tgmm", None, F32, None)])


def test_no_backend_for_dtype(fake_backends):
  del fake_backends
  # fakeall falls back to nothing; make it 16-bit only too (monkeypatch undoes it).
  registry = ops._BACKENDS  # noqa: SLF001
  registry["fakeall"] = registry["fake16"]
  ops.backend.cache_clear()
  with pytest.raises(TypeError, match="no backend takes float32"):
    ops.gmm(jnp.ones((4, 8)), jnp.ones((1, 8, 8)), jnp.array([4]),
            implementation="fake16")


@pytest.mark.parametrize("shape,offset", [
    ((0, 8, 8, 2), None), ((6, 0, 8, 2), None), ((6, 8, 0, 2), None),
    ((6, 8, 8, 0), None), ((6, 8, 8, 0), 1)], ids=["m0", "k0", "n0", "G0", "L0"])
def test_empty_shapes_are_zeros(shape, offset):
  """min(m, k, n, L) == 0 gives zeros of the result dtype (and zero gradients),
  eager and under jit, statically: no primitive is bound, so this holds for
  every backend ("pallas" included, off GPU too). Sizes that do not fit m=0 are
  cut to nothing, as any sum past m. tgmm likewise."""
  m, k, n, g = shape
  lhs, rhs = jnp.ones((m, k), BF16), jnp.ones((g, k, n), BF16)
  gs = jnp.full((g + (offset or 0),), 3, jnp.int32)
  off = None if offset is None else jnp.int32(offset)
  for impl in ("xla", "cpu", "pallas"):
    f = lambda a, b: jmoe.gmm(a, b, gs, group_offset=off, implementation=impl)
    assert "jmoe_gmm" not in str(jax.make_jaxpr(f)(lhs, rhs))
  grad = jax.grad(lambda a, b: jnp.sum(f(a, b).astype(F32)), (0, 1))
  for out, (dl, dr) in ((f(lhs, rhs), grad(lhs, rhs)),
                        jax.jit(lambda a, b: (f(a, b), grad(a, b)))(lhs, rhs)):
    assert out.shape == (m, n) and out.dtype == BF16
    assert dl.shape == lhs.shape and dr.shape == rhs.shape
    for x in (out, dl, dr):
      np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0)
  tg = ops.tgmm(lhs, jnp.ones((m, n), BF16), gs, off, num_local=g,
                implementation="pallas")
  assert tg.shape == (g, k, n) and not np.asarray(tg, np.float32).any()


def test_checkify_reports_what_only_values_show():
  """Under checkify.checkify (user checks) negative sizes, sums past m and
  offsets outside [0, G - L] are reported, through jit, for gmm and tgmm. The
  checks sit in the front end that every backend shares; without checkify they
  cost nothing and the documented results hold (GmmChecks' bad-input tests)."""
  from jax.experimental import checkify  # noqa: PLC0415
  lhs, rhs, _ = make_inputs(12, 5, 4, 3, F32)
  m, g = lhs.shape[0], rhs.shape[0]
  good = jnp.asarray([4, 0, 6], jnp.int32)

  checked = jax.jit(checkify.checkify(
      lambda a, b, s, o: jmoe.gmm(a, b, s, group_offset=o)))
  err, _ = checked(lhs, rhs, good, jnp.int32(0))
  assert err.get() is None, err.get()
  cases = {
      r"gmm: `group_sizes` must be >= 0": (good.at[1].set(-2), 0),
      rf"gmm: sum\(group_sizes\) must be <= m={m}": (good.at[1].set(m), 0),
      r"gmm: `group_offset` must be in \[0, 0\]": (good, g),
      r"gmm: `group_offset` .* got -1": (good, -1),
  }
  for msg, (s, o) in cases.items():
    err, _ = checked(lhs, rhs, s, jnp.int32(o))
    with pytest.raises(checkify.JaxRuntimeError, match=msg):
      err.throw()
  err, _ = jax.jit(checkify.checkify(lambda a, s: ops.tgmm(
      a, a, s, None, num_local=g)))(lhs, good.at[0].set(-1))
  with pytest.raises(checkify.JaxRuntimeError, match="tgmm: `group_sizes`"):
    err.throw()


def test_symbolic_shapes_lower_to_xla(monkeypatch):
  """With symbolic shapes the Pallas backend's product lowers through XLA's
  ragged_dot (the kernels need static shapes); with static ones, the kernel."""
  from jax import export  # noqa: PLC0415
  used = []
  real = ops.backend
  monkeypatch.setattr(ops, "backend", lambda name: used.append(name) or real(name))
  f = lambda a, b, s: jmoe.gmm(a, b, s, implementation="pallas_interpret")
  m, = export.symbolic_shape("m")
  export.export(jax.jit(f))(jax.ShapeDtypeStruct((m, 16), jnp.float32),
                            jax.ShapeDtypeStruct((2, 16, 8), jnp.float32),
                            jax.ShapeDtypeStruct((2,), jnp.int32))
  assert used and set(used) == {"xla"}, used
  used.clear()
  jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((2, 16, 8)), jnp.array([4, 4]))
  assert used and set(used) == {"pallas_interpret"}, used


def test_primitives_in_the_jaxpr():
  """One primitive per product: gmm forward, gmm transposed and tgmm backward."""
  lhs, rhs, _ = make_inputs(16, 8, 8, 2, F32)
  gs = jnp.array([8, 8], jnp.int32)
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda a, b: jnp.sum(jmoe.gmm(a, b, gs) ** 2), (0, 1)))(lhs, rhs))
  assert jaxpr.count("jmoe_gmm[") == 2 and jaxpr.count("jmoe_tgmm[") == 1
  assert "transpose_rhs=True" in jaxpr and "transpose_rhs=False" in jaxpr


def test_tgmm_entry_point():
  """ops.tgmm (the weight-gradient product alone) on every CPU backend."""
  m, k, n = 30, 9, 7
  lhs, _, dy = make_inputs(m, k, n, 1, F32, seed=3)
  sizes, offset, num_local = [5, 0, 9, 11, 3], 1, 3
  gs = jnp.array(sizes, jnp.int32)
  want = np.zeros((num_local, k, n))
  start = np.cumsum([0] + sizes)
  for l in range(num_local):
    rows = slice(start[offset + l], start[offset + l + 1])
    want[l] = np.asarray(lhs, np.float64)[rows].T @ np.asarray(dy, np.float64)[rows]
  for impl in ("xla", "reference", "cpu", "pallas_interpret"):
    got = ops.tgmm(lhs, dy, gs, jnp.int32(offset), num_local=num_local,
                   implementation=impl)
    assert_rel(got, want, F32, impl)
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)  # group 1 is empty


# ----------------------------------------------------------------------------
# The Triton backend: configs and lowering (no GPU needed)


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
    out, vjp = jax.vjp(lambda a, b: jmoe.gmm(a, b, s, implementation="pallas"),
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


@pytest.mark.skipif(importlib.util.find_spec("jmoe._src.gmm.pallas_mosaic_gpu")
                    is None, reason="jmoe/_src/gmm/pallas_mosaic_gpu.py absent")
def test_mosaic_wiring_lowers_for_cuda():
  """jmoe.gmm(implementation="mosaic") forward and backward lower for CUDA on any
  machine: bf16 products are Mosaic-GPU kernels; with a float32 output the
  backward's products (float32, promoted) fall back to the Triton kernels."""
  m, k, n, g = 1000, 256, 384, 8
  lhs = jax.ShapeDtypeStruct((m, k), BF16)
  rhs = jax.ShapeDtypeStruct((g, k, n), BF16)
  gs = jax.ShapeDtypeStruct((g,), jnp.int32)

  def text(out_dtype):
    def f(l, r, s):
      out, vjp = jax.vjp(lambda a, b: jmoe.gmm(
          a, b, s, preferred_element_type=out_dtype, implementation="mosaic"), l, r)
      return out, *vjp(jnp.ones(out.shape, out.dtype))
    try:
      return jax.jit(f).trace(lhs, rhs, gs).lower(
          lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
      if "No supported GPU devices found" not in str(e):
        raise
      pytest.skip("jax >= 0.11 lowers Pallas-Triton only for a GPU it can see")

  bf16 = text(BF16)
  assert bf16.count("mosaic_gpu") >= 3 and "jmoe_tgmm" not in bf16
  f32 = text(F32)
  assert "mosaic_gpu" in f32
  for name in ("jmoe_gmm_t", "jmoe_tgmm"):
    assert f'name = "{name}"' in f32, f"{name}: the float32 backward on Triton"


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
