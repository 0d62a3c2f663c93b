"""Grouped-matmul benchmark: jmoe's Pallas kernels against the ceiling and the peers.

  python -m benchmarks.gmm [--out FILE] [--cases NAME ...] [--routings ...]
                           [--quick] [--cpu-smoke | --cpu]
  python -m benchmarks.gmm --autotune [--tuned-out FILE] [--autotune-budget-s S]

For every (case, routing, method) it checks the output against a float32 reference
on fresh random inputs (per-group jnp.dot on a subset of groups), then times the
method (warm-up, then repeated batches of launches rotating over input sets larger
than L2, median of the batch means, host timer around block_until_ready). Methods:

  dense       one [rows, k] x [k, n] jnp.dot of equal FLOPs: the ceiling
  hbm_read    (decode only) a float32 sum over all expert weights: the HBM ceiling
  ragged_dot  jax.lax.ragged_dot (XLA)
  mosaic      jmoe.gmm(implementation="mosaic"): jmoe's Mosaic-GPU kernels (Hopper)
  triton      jmoe.gmm(implementation="pallas"): jmoe's Pallas-Triton kernels
              (interpret mode with --cpu-smoke)
  mgpu        jax.experimental.pallas.ops.gpu.ragged_dot_mgpu (forward only)
  tokamax     tokamax.ragged_dot(implementation="mosaic"), when importable
  cpu         jmoe.gmm(implementation="cpu"): the tile loops of XLA:CPU (`--cpu`)

`--cpu` benchmarks XLA:CPU at the shapes of `arg_specs.CPU_SPECS` (cpu-tiny's,
a wider and a 64-expert one): dense, ragged_dot and cpu, with more repeats (a
shared machine's timings are noisy), and records `cpu_ms` beside `ms`: the
process's CPU time (all threads) per launch, averaged over the timed launches,
which contention from other processes inflates less than the wall time.

Figures: ms, tflops (useful FLOPs: 2*rows*k*n forward, 3x that for fwd+bwd),
vs_dense (dense ms / method ms), weight_tb_per_s (decode: bytes of the experts that
have rows / time), rel_err, error. The table is printed last; the JSON has
top-level device, jax_version, date, records.

--autotune times the candidate tile configs of every kernel the selected cases use
(balanced routing), for the Triton and the Mosaic backends (--autotune-backends),
and merges the best per (backend, device kind, shape class) into
--tuned-out (default: the committed jmoe/_src/gmm/tuned_configs.json). Point
$JMOE_GMM_TUNED_CONFIGS at a table to benchmark with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmarks.arg_specs import (CPU_SMOKE_SPECS, CPU_SPECS, ROUTINGS, SPECS,
                                  GmmSpec, routing_sizes)

import jmoe
from jmoe._src.gmm import config as gmm_config
from jmoe._src.gmm import pallas_mosaic_gpu, pallas_triton, tiling

L2_BYTES = 60 * 2**20
# lax.ragged_dot on GPU rewrites to a dense masked product; skip it where that
# product alone would not fit (DeepSeek-V3: out of memory at 224 GiB, GPU.md).
RAGGED_DOT_MAX_BYTES = 80e9
BF16 = jnp.bfloat16


def log(*a):
  print(*a, flush=True)


# ----------------------------------------------------------------------------
# Inputs and reference


@dataclasses.dataclass
class Inputs:
  lhs: jax.Array
  rhs: jax.Array
  dy: jax.Array | None


def make_input_sets(spec: GmmSpec, dtype, *, min_sets: int = 2,
                    seed: int = 0) -> list[Inputs]:
  """>= min_sets independent random input sets, enough that their total exceeds L2
  (a rotated set is never served from L2 by the previous launch)."""
  itemsize = jnp.dtype(dtype).itemsize
  per_set = (spec.rows * spec.k + spec.num_groups * spec.k * spec.n
             + (spec.rows * spec.n if spec.bwd else 0)) * itemsize
  n_sets = max(min_sets, min(8, math.ceil(2 * L2_BYTES / max(per_set, 1))))
  sets = []
  for i in range(n_sets):
    kl, kr, kd = jax.random.split(jax.random.key(seed * 1000 + i), 3)
    lhs = jax.random.normal(kl, (spec.rows, spec.k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(kr, (spec.num_groups, spec.k, spec.n), dtype)
           * jnp.asarray(1.0 / math.sqrt(spec.k), dtype))
    dy = (jax.random.normal(kd, (spec.rows, spec.n), jnp.float32).astype(dtype)
          if spec.bwd else None)
    sets.append(Inputs(lhs, rhs, dy))
  jax.block_until_ready([(s.lhs, s.rhs, s.dy) for s in sets])
  return sets


def check_groups(sizes: np.ndarray) -> list[int]:
  """A subset of groups to check: the largest, a median and the smallest non-empty."""
  nz = np.flatnonzero(sizes)
  order = nz[np.argsort(sizes[nz], kind="stable")]
  picks = {int(order[-1]), int(order[len(order) // 2]), int(order[0])}
  return sorted(picks)


def rel_err_subset(results: dict[str, jax.Array], inp: Inputs,
                   sizes: np.ndarray, bwd: bool) -> tuple[float, str]:
  """Relative error of out (and dlhs, drhs) on a subset of groups vs float32
  per-group products; empty groups' drhs must be exactly zero."""
  ends = np.cumsum(sizes)
  starts = ends - sizes
  hi = jax.lax.Precision.HIGHEST
  f32 = lambda x: x.astype(jnp.float32)
  num = den = 0.0
  notes = []
  for g in check_groups(sizes):
    s, e = int(starts[g]), int(ends[g])
    pairs = [(results["out"][s:e], jnp.dot(f32(inp.lhs[s:e]), f32(inp.rhs[g]),
                                           precision=hi))]
    if bwd:
      pairs.append((results["dlhs"][s:e],
                    jnp.dot(f32(inp.dy[s:e]), f32(inp.rhs[g]).T, precision=hi)))
      pairs.append((results["drhs"][g],
                    jnp.dot(f32(inp.lhs[s:e]).T, f32(inp.dy[s:e]), precision=hi)))
    for got, want in pairs:
      d = f32(got) - want
      num += float(jnp.sum(d * d))
      den += float(jnp.sum(want * want))
  if bwd:
    for g in np.flatnonzero(sizes == 0)[:2]:
      if float(jnp.max(jnp.abs(f32(results["drhs"][int(g)])))) != 0.0:
        notes.append(f"drhs[{g}] of an empty group is not zero")
  err = math.sqrt(num / den) if den > 0 else math.sqrt(num)
  if not math.isfinite(err):
    notes.append("non-finite output")
  return err, "; ".join(notes)


# ----------------------------------------------------------------------------
# Methods: each builds a jitted fn(Inputs-derived args) -> dict of arrays.


def _vjp3(f, lhs, rhs, dy):
  out, vjp = jax.vjp(f, lhs, rhs)
  dlhs, drhs = vjp(dy)
  return dict(out=out, dlhs=dlhs, drhs=drhs)


def _grouped_method(f, spec: GmmSpec):
  """run(inputs, group_sizes, w) for a grouped matmul f(lhs, rhs, group_sizes):
  the forward, or forward + both gradients for a fwd+bwd spec."""
  if spec.bwd:
    fn = jax.jit(lambda l, r, gs, dy: _vjp3(lambda a, b: f(a, b, gs), l, r, dy))
    return lambda inp, gs, w: fn(inp.lhs, inp.rhs, gs, inp.dy)
  fn = jax.jit(lambda l, r, gs: dict(out=f(l, r, gs)))
  return lambda inp, gs, w: fn(inp.lhs, inp.rhs, gs)


def build_method(method: str, spec: GmmSpec, *, interpret: bool
                 ) -> Callable[[Inputs, jax.Array], dict[str, jax.Array]]:
  """Returns run(inputs, group_sizes) -> dict (out [, dlhs, drhs]); raises
  NotImplementedError('...') for a method that does not apply."""
  if method == "dense":
    if spec.bwd:
      fn = jax.jit(lambda l, w, dy: _vjp3(jnp.dot, l, w, dy))
      # w = rhs[0] is sliced outside the timed function.
      return lambda inp, gs, w: fn(inp.lhs, w, inp.dy)
    fn = jax.jit(lambda l, w: dict(out=jnp.dot(l, w)))
    return lambda inp, gs, w: fn(inp.lhs, w)

  if method == "hbm_read":
    if not spec.decode:
      raise NotImplementedError("only for decode")
    fn = jax.jit(lambda r: dict(out=jnp.sum(r, dtype=jnp.float32)))
    return lambda inp, gs, w: fn(inp.rhs)

  if method == "ragged_dot":
    need = spec.num_groups * spec.rows * spec.n * 4
    if need > RAGGED_DOT_MAX_BYTES and not ARGS.force_ragged:
      raise NotImplementedError(
          f"skipped: XLA's dense rewrite needs ~{need / 1e9:.0f} GB (out of memory"
          " on H200, GPU.md); --force-ragged to try")
    f = lambda l, r, gs: jax.lax.ragged_dot(l, r, gs)
    return _grouped_method(f, spec)

  if method in ("triton", "jmoe"):  # "jmoe": the name of earlier result files
    impl = "pallas_interpret" if interpret else "pallas"
    f = lambda l, r, gs: jmoe.gmm(l, r, gs, implementation=impl)
    return _grouped_method(f, spec)

  if method == "cpu":
    f = lambda l, r, gs: jmoe.gmm(l, r, gs, implementation="cpu")
    return _grouped_method(f, spec)

  if method == "mosaic":
    if interpret:
      raise NotImplementedError("skipped: Mosaic GPU has no CPU interpreter")
    f = lambda l, r, gs: jmoe.gmm(l, r, gs, implementation="mosaic")
    return _grouped_method(f, spec)

  if method == "mgpu":
    if spec.bwd:
      raise NotImplementedError("skipped: forward only (no VJP)")
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: PLC0415
    kw = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
              grid_block_n=1)
    fn = jax.jit(lambda l, r, gs: dict(out=ragged_dot_mgpu.ragged_dot(
        l, r, group_sizes=gs, **kw)))
    return lambda inp, gs, w: fn(inp.lhs, inp.rhs, gs)

  if method == "tokamax":
    try:
      import tokamax  # noqa: PLC0415
    except ImportError as e:
      raise NotImplementedError(f"skipped: tokamax not importable ({e})") from None
    f = lambda l, r, gs: tokamax.ragged_dot(l, r, group_sizes=gs,
                                            implementation="mosaic")
    return _grouped_method(f, spec)

  raise ValueError(f"unknown method {method!r}")


METHODS = ("dense", "hbm_read", "ragged_dot", "mosaic", "triton", "mgpu", "tokamax")
CPU_METHODS = ("dense", "ragged_dot", "cpu")


# ----------------------------------------------------------------------------
# Timing


def time_fn(call: Callable[[int], Any], *, n_sets: int, target_s: float,
            reps: int, max_iters: int = 500,
            sync_each: bool = False) -> tuple[float, int]:
  """Median over `reps` batches of the mean launch time (ms); launch i uses input
  set i % n_sets. Returns (ms, iterations per batch).

  sync_each waits for every launch (XLA:CPU's in-process collectives can deadlock
  with many collective launches in flight on few cores).
  """
  if sync_each:
    call = lambda i, f=call: jax.block_until_ready(f(i))
  jax.block_until_ready(call(0))  # warm (compiled already)
  t0 = time.perf_counter()
  for i in range(2):
    r = call(i % n_sets)
  jax.block_until_ready(r)
  est = (time.perf_counter() - t0) / 2
  iters = int(min(max_iters, max(3, target_s / max(est, 1e-6))))
  means = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for i in range(iters):
      r = call(i % n_sets)
    jax.block_until_ready(r)
    means.append((time.perf_counter() - t0) / iters * 1e3)
  return statistics.median(means), iters


# ----------------------------------------------------------------------------
# The benchmark


def run_case(spec: GmmSpec, routings, methods, *, interpret: bool, quick: bool,
             dtype) -> list[dict[str, Any]]:
  records = []
  log(f"\n== {spec.name}: rows={spec.rows} groups={spec.num_groups} k={spec.k}"
      f" n={spec.n}{' fwd+bwd' if spec.bwd else ''}  ({spec.note})")
  sets = make_input_sets(spec, dtype)
  dense_w = [s.rhs[0] for s in sets]
  builders: dict[str, Any] = {}
  for routing in routings:
    sizes = routing_sizes(spec.rows, spec.num_groups, routing)
    gs = jnp.asarray(sizes)
    nonempty = int((sizes > 0).sum())
    wbytes = nonempty * spec.k * spec.n * jnp.dtype(dtype).itemsize
    dense_ms = hbm_tbs = dense_cpu_ms = None
    for method in methods:
      if method == "hbm_read" and not spec.decode:
        continue
      rec: dict[str, Any] = dict(
          case=spec.name, routing=routing, method=method, rows=spec.rows,
          groups=spec.num_groups, k=spec.k, n=spec.n, bwd=spec.bwd,
          dtype=jnp.dtype(dtype).name, max_group=int(sizes.max()),
          empty_groups=int((sizes == 0).sum()), ms=None, tflops=None,
          vs_dense=None, weight_tb_per_s=None, rel_err=None, error=None)
      try:
        if method not in builders:
          builders[method] = build_method(method, spec, interpret=interpret)
        run = builders[method]
        call = lambda i: run(sets[i], gs, dense_w[i])
        t0 = time.perf_counter()
        res = jax.block_until_ready(call(0))
        rec["first_call_s"] = round(time.perf_counter() - t0, 2)
        if method in ("triton", "jmoe"):
          m, k, n, g = spec.rows, spec.k, spec.n, spec.num_groups
          sel = lambda op, a, b, c: gmm_config.select_config(
              op, a, b, c, g, dtype, interpret=interpret).to_dict()
          rec["config"] = sel("gmm", m, k, n)
          cfgs = [rec["config"]]
          if spec.bwd:
            rec["config_t"] = sel("gmm_t", m, n, k)
            rec["config_tgmm"] = sel("tgmm", m, k, n)
            cfgs += [rec["config_t"], rec["config_tgmm"]]
          rec["note"] = " | ".join(
              f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']}"
              f" s{c['num_stages']}" for c in cfgs)
        # Correctness on fresh inputs (set 0), before timing.
        if method in ("ragged_dot", "mosaic", "triton", "jmoe", "mgpu", "tokamax",
                      "cpu"):
          err, note = rel_err_subset(res, sets[0], sizes, spec.bwd)
          rec["rel_err"] = err
          if note:
            rec["error"] = note
          if not err < 2e-2:
            rec["error"] = (rec["error"] or "") + f" WRONG: rel_err {err:.3g}"
        elif method == "dense":
          got = res["out"][:256].astype(jnp.float32)
          want = jnp.dot(sets[0].lhs[:256].astype(jnp.float32),
                         dense_w[0].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
          rec["rel_err"] = float(jnp.linalg.norm(got - want)
                                 / jnp.linalg.norm(want))
        del res
        reps = (3 if quick else 5) * (2 if ARGS.cpu else 1)
        c0 = time.process_time()
        ms, iters = time_fn(call, n_sets=len(sets),
                            target_s=0.15 if quick else 0.5, reps=reps)
        rec.update(ms=ms, iters=iters)
        if ARGS.cpu:  # time_fn's launches: 1 + 2 warm-up, reps x iters timed
          rec["cpu_ms"] = ((time.process_time() - c0) * 1e3
                           / (3 + reps * iters))
        if method == "hbm_read":
          rec["weight_tb_per_s"] = hbm_tbs = spec.weight_bytes(
              jnp.dtype(dtype).itemsize) / (ms * 1e-3) / 1e12
        else:
          rec["tflops"] = spec.flops / (ms * 1e-3) / 1e12
          if spec.decode:
            rec["weight_tb_per_s"] = wbytes / (ms * 1e-3) / 1e12
            if hbm_tbs:
              rec["vs_hbm"] = rec["weight_tb_per_s"] / hbm_tbs
        if method == "dense":
          dense_ms = ms
        if dense_ms and method != "hbm_read":
          rec["vs_dense"] = dense_ms / ms
        if method == "dense" and "cpu_ms" in rec:
          dense_cpu_ms = rec["cpu_ms"]
        if "cpu_ms" in rec and dense_cpu_ms:
          rec["vs_dense_cpu_time"] = dense_cpu_ms / rec["cpu_ms"]
      except NotImplementedError as e:
        rec["error"] = str(e)
      except Exception as e:  # noqa: BLE001 - record and go on
        msg = f"{type(e).__name__}: {e}"
        rec["error"] = msg[:400]
        if ARGS.verbose:
          traceback.print_exc()
      records.append(rec)
      log(fmt_row(rec))
  return records  # the input sets are freed with this frame


def fmt_row(r: dict[str, Any]) -> str:
  def f(v, width, spec):
    return format("-" if v is None else format(v, spec), f">{width}")
  err = r.get("error") or r.get("note") or ""
  if "cpu_ms" in r:
    err = (f"cpu {r['cpu_ms']:.2f} ms ({r.get('vs_dense_cpu_time') or 0:.2f}x)"
           f" {err}")
  return (f"{r['case']:<15} {r['routing']:<9} {r['method']:<11}"
          f" {f(r['ms'], 9, '.3f')} {f(r['tflops'], 8, '.1f')}"
          f" {f(r['vs_dense'], 6, '.2f')} {f(r['weight_tb_per_s'], 6, '.2f')}"
          f" {f(r.get('vs_hbm'), 6, '.2f')} {f(r['rel_err'], 8, '.1e')}  {err[:80]}")


HEADER = (f"{'case':<15} {'routing':<9} {'method':<11} {'ms':>9} {'TFLOP/s':>8}"
          f" {'vsDns':>6} {'TB/s':>6} {'vsHBM':>6} {'rel_err':>8}  error/note")


# ----------------------------------------------------------------------------
# Autotuning


def autotune_cases(specs, *, interpret: bool, budget_s: float, out_path: str,
                   dtype, backends=("triton", "mosaic")) -> list[dict[str, Any]]:
  """Tunes every kernel the cases use (balanced routing), for each backend in
  `backends` ("triton", "mosaic"); merges the winners into out_path (one table,
  Mosaic entries under op names "mosaic:..."). Returns one record per trial."""
  kind = gmm_config._device_kind()  # noqa: SLF001 - same key the lookup uses
  if interpret:
    backends = [b for b in backends if b != "mosaic"]  # no CPU interpreter
  jobs = []  # (backend, key, op, spec, kernel-view dims)
  seen = set()
  for backend in backends:
    prefix = pallas_mosaic_gpu.TUNED_PREFIX if backend == "mosaic" else ""
    for spec in specs:
      m, k, n, g = spec.rows, spec.k, spec.n, spec.num_groups
      ops = [("gmm", (m, k, n))]
      if spec.bwd:
        ops += [("gmm_t", (m, n, k)), ("tgmm", (m, k, n))]
      for op, dims in ops:
        key = gmm_config.shape_key(kind, prefix + op, *dims, g, dtype)
        if key not in seen:
          seen.add(key)
          jobs.append((backend, key, op, spec, dims))
  per_op = budget_s / max(1, len(jobs))
  log(f"autotune: {len(jobs)} kernels, {per_op:.0f}s each, device {kind}")
  entries, records = {}, []
  for backend, key, op, spec, (m, kk, nn) in jobs:
    g = spec.num_groups
    sizes = jnp.asarray(routing_sizes(spec.rows, g, "balanced"))
    keys = jax.random.split(jax.random.key(7), 3)
    a = jax.random.normal(keys[0], (m, kk), jnp.float32).astype(dtype)
    if op == "tgmm":
      b = jax.random.normal(keys[1], (m, nn), jnp.float32).astype(dtype)
    elif op == "gmm_t":  # rhs [g, out=nn, contraction=kk]
      b = jax.random.normal(keys[1], (g, nn, kk), dtype)
    else:
      b = jax.random.normal(keys[1], (g, kk, nn), dtype)

    def make_run(cfg, op=op, a=a, b=b, m=m, g=g, sizes=sizes, backend=backend):
      off = jnp.int32(0)
      if backend == "mosaic" and op == "tgmm":
        f = lambda a, b, gs: pallas_mosaic_gpu.tgmm_call(
            a, b, gs, off, num_local=g, out_dtype=dtype, cfg=cfg)
      elif backend == "mosaic":
        f = lambda a, b, gs: pallas_mosaic_gpu.gmm_call(
            a, b, gs, off, transpose_rhs=op == "gmm_t", out_dtype=dtype, cfg=cfg)
      elif op == "tgmm":
        def f(a, b, gs):
          return pallas_triton.tgmm_call(
              a, b, tiling.group_schedule(gs, m, g), out_dtype=dtype, cfg=cfg,
              compute_dtype=dtype, interpret=interpret)
      else:
        def f(a, b, gs):
          t = tiling.row_tiles(gs, m, cfg.block_m, g)
          return pallas_triton.gmm_call(
              a, b, t.table, transpose_rhs=op == "gmm_t", out_dtype=dtype,
              cfg=cfg, compute_dtype=dtype, interpret=interpret)
      fj = jax.jit(f)
      return lambda: fj(a, b, sizes)

    space = (pallas_mosaic_gpu.candidate_configs if backend == "mosaic"
             else gmm_config.candidate_configs)
    cands = space(op, m, kk, nn, g, dtype)
    log(f"[{key}] {len(cands)} candidates")
    best, trials = gmm_config.autotune(op, make_run, cands, budget_s=per_op,
                                       iters=3 if interpret else 20, log=log)
    for t in trials:
      records.append(dict(method="autotune", backend=backend, key=key, op=op, **t))
    if best is not None:
      best_ms = min(t["ms"] for t in trials if "ms" in t)
      heur_ms = trials[0].get("ms")
      entries[key] = dict(best.to_dict(), ms=round(best_ms, 4),
                          heuristic_ms=None if heur_ms is None else round(heur_ms, 4))
      log(f"  best {best} {best_ms:.3f} ms (heuristic {heur_ms})")
      gmm_config.save_tuned({key: entries[key]}, out_path)  # incremental
  log(f"autotune: wrote {len(entries)} entries to {out_path}")
  return records


# ----------------------------------------------------------------------------


def write_json(path, meta, records, t_start):
  meta["wall_s"] = round(time.perf_counter() - t_start, 1)
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(dict(meta, records=records), f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def _cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def _loadavg() -> list[float] | None:
  """1, 5 and 15 minute load averages: how busy the (shared) machine was."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="JSON file for the records")
  p.add_argument("--cases", nargs="*", default=None,
                 help=f"subset of {list(SPECS)} (or of the smoke cases)")
  p.add_argument("--routings", nargs="*", default=list(ROUTINGS))
  p.add_argument("--methods", nargs="*", default=None,
                 help=f"default: {list(METHODS)} ({list(CPU_METHODS)} with --cpu)")
  p.add_argument("--quick", action="store_true", help="shorter timing")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny shapes, Pallas interpreter: runs on CPU")
  p.add_argument("--cpu", action="store_true",
                 help="XLA:CPU: cpu-tiny's and larger shapes, methods"
                      f" {list(CPU_METHODS)} (default --methods)")
  p.add_argument("--force-ragged", action="store_true",
                 help="run lax.ragged_dot even where it should run out of memory")
  p.add_argument("--autotune", action="store_true",
                 help="tune tile configs instead of benchmarking")
  p.add_argument("--tuned-out", default=gmm_config.TUNED_PATH)
  p.add_argument("--autotune-budget-s", type=float, default=420.0)
  p.add_argument("--autotune-backends", nargs="*", default=["triton", "mosaic"],
                 help="kernel families to tune (triton, mosaic)")
  p.add_argument("--verbose", action="store_true")
  return p.parse_args(argv)


ARGS: argparse.Namespace = parse_args([])


def main(argv=None):
  global ARGS
  ARGS = args = parse_args(sys.argv[1:] if argv is None else argv)
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  interpret = bool(args.cpu_smoke)
  if args.cpu and dev.platform != "cpu":
    log(f"--cpu benchmarks XLA:CPU; the default device here is {dev.platform}"
        " (JAX_PLATFORMS=cpu)")
    return 2
  if dev.platform != "gpu" and not interpret and not args.cpu:
    log(f"no GPU ({dev.platform}): use --cpu (XLA:CPU) or --cpu-smoke (the"
        " Pallas interpreter)")
    return 2
  if args.methods is None:
    args.methods = list(CPU_METHODS if args.cpu else METHODS)
  table = (CPU_SMOKE_SPECS if args.cpu_smoke else CPU_SPECS if args.cpu
           else SPECS)
  names = args.cases or list(table)
  unknown = [c for c in names if c not in table]
  if unknown:
    log(f"unknown cases {unknown}; known: {list(table)}")
    return 2
  specs = [table[c] for c in names]
  dtype = BF16
  meta = dict(device=f"{dev.platform}:{dev.device_kind}",
              num_devices=jax.device_count(), jax_version=jax.__version__,
              jaxlib_version=jaxlib.__version__,
              python=sys.version.split()[0],
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              argv=sys.argv[1:] if argv is None else list(argv),
              tuned_configs=gmm_config.tuned_path(),
              tuned_entries=len(gmm_config.tuned_table()))
  if args.cpu:
    meta.update(cpu_model=_cpu_model(), cpu_count=os.cpu_count(),
                loadavg_start=_loadavg())
  log(json.dumps(meta))
  records = []
  if args.autotune:
    records = autotune_cases(specs, interpret=interpret,
                             backends=args.autotune_backends,
                             budget_s=args.autotune_budget_s,
                             out_path=args.tuned_out, dtype=dtype)
  else:
    for spec in specs:
      records += run_case(spec, args.routings, args.methods, interpret=interpret,
                          quick=args.quick, dtype=dtype)
      write_json(args.out, meta, records, t_start)  # partial results survive
  if args.cpu:
    meta["loadavg_end"] = _loadavg()
  write_json(args.out, meta, records, t_start)
  if args.out:
    log(f"wrote {args.out}")
  if not args.autotune:
    log("\n" + HEADER)
    for r in records:
      log(fmt_row(r))
    wrong = [r for r in records if r.get("error") and "WRONG" in r["error"]]
    log(f"\n{len(records)} records, {len(wrong)} WRONG, {meta['wall_s']} s")
    return 1 if wrong else 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
