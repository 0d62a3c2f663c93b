"""Tile configurations of the Pallas grouped-matmul kernels.

A `GmmConfig` is data: a frozen keyword-only dataclass passed to the kernels. Where
none is given, `select_config` returns the tuned one recorded for this device kind
and shape class in `tuned_configs.json` (next to this file, loaded once, lazily; or
the file named by $JMOE_GMM_TUNED_CONFIGS) or else a heuristic default. `autotune` times candidates on the current device and
returns the best; it runs only when asked (`python -m benchmarks.gmm --autotune`),
never implicitly.

The three kernels and their dimensions (the "kernel view"):
  "gmm"   forward:        out[m, n]   = lhs[m, k] @ rhs[g][k, n]
  "gmm_t" input gradient: dlhs[m, n]  = dy[m, k] @ rhs[g][n, k]^T  (k: rhs dim 2)
  "tgmm"  weight grad:    drhs[g][k, n] = lhs[rows_g, k]^T @ dy[rows_g, n]
For "gmm"/"gmm_t" block_m tiles the rows and block_k the contraction; for "tgmm"
block_m is the contraction chunk (rows) and block_k, block_n tile the output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

OPS = ("gmm", "gmm_t", "tgmm")
# The committed table; the environment variable JMOE_GMM_TUNED_CONFIGS points the
# lookup at another file (a fresh autotune run, say) without editing the repo.
TUNED_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")
TUNED_ENV = "JMOE_GMM_TUNED_CONFIGS"
# Shared memory one block may use on an H100/H200 (227 KiB), with some headroom.
_SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class GmmConfig:
  """Tiles and launch parameters of one Pallas-Triton grouped-matmul kernel.

  Attributes:
    block_m: rows per tile ("gmm", "gmm_t"); rows per contraction step ("tgmm").
    block_n: output columns per tile.
    block_k: contraction per step ("gmm", "gmm_t"); output rows per tile ("tgmm").
    num_warps: warps per program (Triton).
    num_stages: software-pipelining stages of the contraction loop (Triton).
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for f in ("block_m", "block_n", "block_k"):
      v = getattr(self, f)
      if v < 16 or v & (v - 1):
        raise ValueError(f"GmmConfig: {f}={v} must be a power of 2 >= 16 (Triton"
                         " tiles are powers of 2; tl.dot needs >= 16).")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"GmmConfig: num_warps={self.num_warps} must be a power of"
                       " 2 <= 16.")
    if self.num_stages < 1:
      raise ValueError(f"GmmConfig: num_stages={self.num_stages} must be >= 1.")

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> "GmmConfig":
    return dataclasses.replace(self, **kw)


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def fit_to_shape(cfg: GmmConfig, op: str, m: int, k: int, n: int) -> GmmConfig:
  """Shrinks tiles that exceed the (power-of-2-rounded) problem dimensions.

  m, k, n are the kernel view's dimensions (see the module docstring).
  """
  del op  # block_m tiles m, block_k tiles k, block_n tiles n in every kernel view
  cap = lambda b, d: max(16, min(b, _pow2_at_least(d)))
  return cfg.replace(block_m=cap(cfg.block_m, m), block_k=cap(cfg.block_k, k),
                     block_n=cap(cfg.block_n, n))


def smem_bytes(cfg: GmmConfig, op: str, itemsize: int) -> int:
  """Shared memory the pipelined operand tiles need (Triton keeps num_stages)."""
  if op == "tgmm":
    per_stage = (cfg.block_m * cfg.block_k + cfg.block_m * cfg.block_n) * itemsize
  else:
    per_stage = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize
  return per_stage * cfg.num_stages


def heuristic_config(op: str, m: int, k: int, n: int, num_groups: int,
                     dtype) -> GmmConfig:
  """A reasonable default per shape, before any tuning.

  * Few rows per group (decode: 256 rows on 8 experts): the kernel streams weights,
    so tiles just cover a group's rows (block_m 16..64), with deep pipelining
    to keep HBM busy.
  * Otherwise the measured good dense tiles on H200: 128x256x64, 8 warps, 3 stages
    for outputs of 1024 columns or more, 128x128x64, 8 warps elsewhere (f32:
    128x128x32, 8 warps).
  * tgmm: 64 contraction rows x 128 x 256 output tiles, 8 warps, 3 stages.
  Every benchmark case is within 5% of its tuned best on H200
  (benchmarks/results/raw/h200_gmm_autotune_triton.json).
  """
  itemsize = jnp.dtype(dtype).itemsize
  rows_per_group = max(1, m // max(1, num_groups))
  if op == "tgmm":
    cfg = GmmConfig(block_m=64, block_k=128, block_n=256, num_warps=8,
                    num_stages=3)
    if itemsize >= 4:
      cfg = cfg.replace(block_m=32, block_k=64, block_n=64, num_warps=4)
  elif rows_per_group <= 64:
    bm = max(16, min(64, _pow2_at_least(2 * rows_per_group)))
    cfg = GmmConfig(block_m=bm, block_n=128, block_k=64, num_warps=4,
                    num_stages=4)
    if itemsize >= 4:
      cfg = cfg.replace(block_k=32, num_stages=3)
  elif n >= 1024 and itemsize <= 2:
    cfg = GmmConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                    num_stages=3)
  else:
    # 8 warps (two warpgroups of 64x128) keep the accumulator in registers: with
    # 4 warps ptxas spills (Triton 3.9, sm_90a), with 8 it uses ~160 registers.
    # f32 (TF32 or, at precision HIGHEST, FMA): block_k 32.
    cfg = GmmConfig(block_m=128, block_n=128, block_k=64 if itemsize <= 2 else 32,
                    num_warps=8, num_stages=3)
  return fit_to_shape(cfg, op, m, k, n)


# ----------------------------------------------------------------------------
# The tuned table: {"version": 1, "entries": {key: {config fields, "ms": ...}}}


def shape_key(device_kind: str, op: str, m: int, k: int, n: int,
              num_groups: int, dtype) -> str:
  """The shape class a tuned config applies to: rows rounded up to a power of 2."""
  return (f"{device_kind}|{op}|{jnp.dtype(dtype).name}|m{_pow2_at_least(m)}"
          f"|k{k}|n{n}|g{num_groups}")


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  return dict(data.get("entries", {}))


def tuned_path() -> str:
  return os.environ.get(TUNED_ENV) or TUNED_PATH


def tuned_table(path: str | None = None) -> dict[str, Any]:
  """The tuned entries (loaded once per path)."""
  return _load_table(path or tuned_path())


@functools.lru_cache(maxsize=None)
def _device_kind() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def select_config(op: str, m: int, k: int, n: int, num_groups: int, dtype, *,
                  interpret: bool = False) -> GmmConfig:
  """The tuned config for this device and shape class if recorded, else the
  heuristic. Interpret mode (CPU) always takes the heuristic."""
  if op not in OPS:
    raise ValueError(f"select_config: unknown op {op!r}; expected one of {OPS}.")
  if not interpret:
    entry = tuned_table().get(
        shape_key(_device_kind(), op, m, k, n, num_groups, dtype))
    if entry is not None:
      fields = {f.name for f in dataclasses.fields(GmmConfig)}
      return fit_to_shape(GmmConfig(**{a: b for a, b in entry.items()
                                       if a in fields}), op, m, k, n)
  return heuristic_config(op, m, k, n, num_groups, dtype)


def save_tuned(entries: dict[str, Any], path: str) -> None:
  """Merges `entries` into the JSON table at `path` (keys sorted, stable diff)."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("entries", {})
  old.update(entries)
  with open(path, "w") as f:
    json.dump({"version": 1, "entries": dict(sorted(old.items()))}, f, indent=1)
    f.write("\n")
  _load_table.cache_clear()


# ----------------------------------------------------------------------------
# Autotuning (explicit only).


# Curated search spaces (block_m, block_n, block_k, num_warps, num_stages): a few
# dozen at most, so that a tuning run stays within minutes per shape.
_COMPUTE_SPACE = [
    (128, 256, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 4, 4),
    (128, 128, 32, 4, 4), (128, 256, 32, 8, 4), (128, 128, 64, 8, 3),
    (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 4, 3),
    (64, 256, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 128, 4, 3),
]
_STREAM_SPACE = [  # few rows per group: stream the weights
    (64, 128, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4),
    (64, 128, 128, 4, 3), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4),
    (64, 64, 128, 4, 4), (32, 64, 256, 4, 3), (16, 64, 256, 4, 4),
    (32, 256, 64, 4, 4), (64, 256, 64, 8, 3), (16, 256, 64, 4, 4),
]
_TGMM_SPACE = [  # block_m = rows per contraction step; block_k x block_n out tile
    (64, 128, 128, 8, 3), (64, 128, 128, 4, 3), (32, 128, 128, 8, 4),
    (64, 256, 128, 8, 3), (64, 128, 256, 8, 3), (128, 128, 128, 8, 2),
    (32, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
    (32, 256, 128, 8, 3), (128, 128, 128, 8, 3), (64, 64, 64, 4, 4),
]


def candidate_configs(op: str, m: int, k: int, n: int, num_groups: int,
                      dtype) -> list[GmmConfig]:
  """The heuristic first, then a curated space, fitted to the shape and filtered by
  shared memory and accumulator registers (<= 128 f32 per thread)."""
  itemsize = jnp.dtype(dtype).itemsize
  rows_per_group = max(1, m // max(1, num_groups))
  if op == "tgmm":
    space = _TGMM_SPACE
  elif rows_per_group <= 64:
    space = _STREAM_SPACE
  else:
    space = _COMPUTE_SPACE
  cands = [heuristic_config(op, m, k, n, num_groups, dtype)] + [
      GmmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
      for bm, bn, bk, w, s in space]

  def ok(c: GmmConfig) -> bool:
    acc = (c.block_k * c.block_n) if op == "tgmm" else (c.block_m * c.block_n)
    if not 16 <= acc // (32 * c.num_warps) <= 128:
      return False
    return smem_bytes(c, op, itemsize) <= _SMEM_BUDGET

  seen, res = set(), []
  for c in cands:
    c = fit_to_shape(c, op, m, k, n)
    if c not in seen and ok(c):
      seen.add(c)
      res.append(c)
  return res


def autotune(op: str, run: Callable[[GmmConfig], Callable[[], Any]],
             candidates: Iterable[GmmConfig], *, iters: int = 20,
             budget_s: float = 60.0, log: Callable[[str], None] = print
             ) -> tuple[GmmConfig | None, list[dict[str, Any]]]:
  """Times each candidate on the current device; returns (best, trials).

  Args:
    op: the kernel ("gmm", "gmm_t", "tgmm"), for the log.
    run: config -> a zero-argument callable that launches the kernel (jitted, on
      fixed inputs) and returns its output.
    candidates: configs to try, best guesses first (the budget may cut the list).
    iters: timed launches per candidate (median of 3 batches).
    budget_s: wall-clock budget for this op (compiles included).
  """
  t_start = time.perf_counter()
  trials: list[dict[str, Any]] = []
  best, best_ms = None, math.inf
  for cfg in candidates:
    if time.perf_counter() - t_start > budget_s:
      log(f"  [{op}] budget of {budget_s:.0f}s spent; stopping")
      break
    try:
      f = run(cfg)
      jax.block_until_ready(f())
      jax.block_until_ready(f())
      batches = []
      for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
          r = f()
        jax.block_until_ready(r)
        batches.append((time.perf_counter() - t0) / iters * 1e3)
      ms = sorted(batches)[1]
    except Exception as e:  # noqa: BLE001 - a failing candidate is a data point
      trials.append(dict(cfg.to_dict(), error=f"{type(e).__name__}: {e}"[:300]))
      log(f"  [{op}] {cfg}: {type(e).__name__}")
      continue
    trials.append(dict(cfg.to_dict(), ms=ms))
    log(f"  [{op}] {cfg}: {ms:.3f} ms")
    if ms < best_ms:
      best, best_ms = cfg, ms
  return best, trials
