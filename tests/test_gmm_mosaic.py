"""The Mosaic-GPU kernels where no GPU is: they lower for CUDA on CPU.

Mosaic GPU has no CPU interpreter, so the kernels' numerics are tested on the H200
(the gmm test base's Mosaic class, `gpu` marker; logs in benchmarks/results/).
Here, CI lowers each product for the "cuda" platform: that runs Mosaic's whole
Python lowering (layout inference, TMA tiling and divisibility checks, the shared-
memory budget), which is where a kernel change most often breaks.
"""

import jax
import jax.numpy as jnp
import pytest

from jmoe._src.gmm import pallas_mosaic_gpu as pm

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def lower(fn, *avals) -> str:
  return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


CASES = [
    # m, k, n, groups, local, dtype, out dtype, config
    (1000, 256, 384, 8, 8, BF16, BF16, None),
    (40, 200, 136, 5, 3, BF16, jnp.float32, None),      # pads m, k, n; offset
    (256, 512, 1024, 8, 8, jnp.float16, jnp.float16, None),  # decode heuristic
    (1000, 256, 384, 8, 8, BF16, BF16,
     pm.MosaicConfig(tile_m=64, tile_n=64, max_concurrent_steps=6)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
@pytest.mark.parametrize("op", ["gmm", "gmm_t", "tgmm"])
def test_lowers_for_cuda(case, op):
  m, k, n, g, num_local, dt, out_dt, cfg = case
  cfg = cfg or pm.heuristic_config(op, m, k, n, num_local, dt)
  gs, off = S((g,), jnp.int32), S((), jnp.int32)
  if op == "tgmm":
    text = lower(lambda a, d, s, o: pm.tgmm_call(
        a, d, s, o, num_local=num_local, out_dtype=out_dt, cfg=cfg, num_sms=132),
                 S((m, k), dt), S((m, n), dt), gs, off)
  else:
    rhs = (num_local, n, k) if op == "gmm_t" else (num_local, k, n)
    text = lower(lambda a, b, s, o: pm.gmm_call(
        a, b, s, o, transpose_rhs=op == "gmm_t", out_dtype=out_dt, cfg=cfg,
        num_sms=132), S((m, k), dt), S(rhs, dt), gs, off)
  assert "mosaic_gpu" in text
  # Each product's kernel carries its name into profiles (jax.profiler traces).
  assert f"jmoe_mosaic_{op}" in text


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_sum_of_two_products_lowers_as_one_kernel(case):
  """gmm_sum (the input gradient of gmm_pair): one launch whose K loop walks both
  pairs; pairs of different shapes are refused by gmm_call (gmm_sum then runs
  two launches)."""
  m, k, n, g, num_local, dt, out_dt, _ = case
  cfg = pm.heuristic_config("gmm_t", m, k, n, num_local, dt)
  gs, off = S((g,), jnp.int32), S((), jnp.int32)
  call = lambda a, b, a2, b2, s, o: pm.gmm_call(
      a, b, s, o, transpose_rhs=True, out_dtype=out_dt, cfg=cfg, num_sms=132,
      second=(a2, b2))
  lhs, rhs = S((m, k), dt), S((num_local, n, k), dt)
  text = lower(call, lhs, rhs, lhs, rhs, gs, off)
  assert text.count("jmoe_mosaic_gmm_t") >= 1 and "mosaic_gpu" in text
  with pytest.raises(ValueError, match="second pair"):
    lower(call, lhs, rhs, S((m, k + 8), dt), S((num_local, n, k + 8), dt), gs,
          off)


def test_too_much_shared_memory_is_refused_at_lowering():
  cfg = pm.MosaicConfig(tile_m=128, tile_n=256, max_concurrent_steps=6)
  with pytest.raises(ValueError, match="shared memory"):
    lower(lambda a, b, s, o: pm.gmm_call(a, b, s, o, transpose_rhs=False,
                                         out_dtype=BF16, cfg=cfg, num_sms=132),
          S((1024, 512), BF16), S((4, 512, 1024), BF16), S((4,), jnp.int32),
          S((), jnp.int32))


def test_config_validation():
  for bad in (dict(tile_m=32), dict(tile_n=96), dict(tile_k=16),
              dict(max_concurrent_steps=1), dict(grid_tile_width=0)):
    with pytest.raises(ValueError, match="MosaicConfig"):
      pm.MosaicConfig(**bad)


def test_dtypes_and_fallback():
  assert pm.supports_dtype(jnp.bfloat16) and pm.supports_dtype(jnp.float16)
  assert not pm.supports_dtype(jnp.float32)
  assert pm.FALLBACK == "pallas"


def test_padding_to_blocks():
  x = jnp.ones((5, 200), BF16)
  y = pm._pad_to(x, 1, 64, minimum=256)
  assert y.shape == (5, 256) and float(y[:, 200:].sum()) == 0.0
  assert pm._pad_to(x, 0, 8, minimum=64).shape == (64, 200)
  assert pm._pad_to(x, 1, 8) is x or pm._pad_to(x, 1, 8).shape == (5, 200)


def test_candidates_start_with_the_heuristic_and_are_distinct():
  for op in ("gmm", "gmm_t", "tgmm"):
    cands = pm.candidate_configs(op, 16384, 4096, 14336, 8, BF16)
    assert cands[0] == pm.heuristic_config(op, 16384, 4096, 14336, 8, BF16)
    assert len(set(cands)) == len(cands) > 5


def test_tuned_table_entry_is_used(tmp_path, monkeypatch):
  from jmoe._src.gmm import config as gmm_config
  tuned = pm.MosaicConfig(tile_m=64, tile_n=64, max_concurrent_steps=5,
                          grid_tile_width=4)
  key = gmm_config.shape_key(gmm_config._device_kind(), pm.TUNED_PREFIX + "gmm",
                             1000, 256, 384, 8, BF16)
  path = str(tmp_path / "tuned.json")
  gmm_config.save_tuned({key: dict(tuned.to_dict(), ms=1.0)}, path)
  monkeypatch.setenv(gmm_config.TUNED_ENV, path)
  assert pm.select_config("gmm", 1000, 256, 384, 8, BF16) == tuned
  # Other ops and shape classes keep the heuristic.
  assert pm.select_config("tgmm", 1000, 256, 384, 8, BF16) == pm.heuristic_config(
      "tgmm", 1000, 256, 384, 8, BF16)
