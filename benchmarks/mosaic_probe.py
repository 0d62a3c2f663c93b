"""Mosaic-GPU grouped-matmul kernels on the GPU: correctness, then speed.

  python -m benchmarks.mosaic_probe [--check] [--time CASE ...] [--out FILE]

--check runs the three products (forward, input gradient, weight gradient) of
`jmoe._src.gmm.pallas_mosaic_gpu` against a float32 per-group reference on fresh
random inputs: fuzzed group sizes with empty groups, one group holding every row,
rows past sum(group_sizes), `group_offset`, odd k / n, m smaller than a tile,
bf16 / f16 operands with bf16 / f32 outputs, outputs pre-filled with NaN garbage
(rows a kernel forgets to write show up), and bitwise repeatability.

--time times each product at the benchmark shapes against a dense matmul of equal
FLOPs measured in the same run (and the Pallas-Triton kernel), for the given
tile configs. Writes JSON with device, jax version and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.arg_specs import SPECS, routing_sizes
from jmoe._src.gmm import pallas_mosaic_gpu as pm
from jmoe._src.gmm import pallas_triton, tiling
from jmoe._src.gmm.config import select_config

BF16 = jnp.bfloat16
RESULTS: list[dict] = []


def log(*a):
  print(*a, flush=True)


# ----------------------------------------------------------------------------
# Reference (numpy float64 per group)


def ref_products(lhs, rhs, dy, sizes, offset, num_local, transpose_rhs=False):
  """out = gmm(lhs, rhs) [m, n]; tg = tgmm(lhs, dy) [L, k, n_dy]."""
  lhs = np.asarray(lhs, np.float64)
  rhs = np.asarray(rhs, np.float64)
  m = lhs.shape[0]
  ends = np.minimum(np.cumsum(sizes), m)
  starts = np.concatenate([[0], ends[:-1]])
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out = np.zeros((m, n))
  tg = None
  if dy is not None:
    dy = np.asarray(dy, np.float64)
    tg = np.zeros((num_local, lhs.shape[1], dy.shape[1]))
  for l in range(num_local):
    g = offset + l
    if not 0 <= g < len(sizes):
      continue
    s, e = starts[g], ends[g]
    w = rhs[l].T if transpose_rhs else rhs[l]
    out[s:e] = lhs[s:e] @ w
    if dy is not None:
      tg[l] = lhs[s:e].T @ dy[s:e]
  return out, tg


def rel(got, want):
  got = np.asarray(got, np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  den = np.linalg.norm(want)
  return float(np.linalg.norm(got - want) / (den if den > 0 else 1.0))


def poison_memory():
  """Leaves freed device buffers full of NaN, so that an output row a kernel
  forgets to write is NaN rather than a lucky zero."""
  x = jnp.full((256 * 2**20,), jnp.nan, jnp.float32)
  x.block_until_ready()
  del x


def check_case(name, m, k, n, sizes, *, offset=0, num_local=None, dtype=BF16,
               out_dtype=BF16, cfg=None, cfg_t=None, cfg_tg=None, seed=0):
  sizes = np.asarray(sizes, np.int32)
  g_all = len(sizes)
  num_local = num_local or g_all
  rec = dict(kind="check", name=name, m=m, k=k, n=n, groups=g_all,
             num_local=num_local, offset=offset, dtype=jnp.dtype(dtype).name,
             out_dtype=jnp.dtype(out_dtype).name)
  try:
    ks = jax.random.split(jax.random.key(seed), 4)
    lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(ks[1], (num_local, k, n), jnp.float32).astype(dtype)
    rhs_t = jax.random.normal(ks[2], (num_local, k, n), jnp.float32).astype(dtype)
    dy = jax.random.normal(ks[3], (m, n), jnp.float32).astype(dtype)
    gs = jnp.asarray(sizes)
    off = jnp.int32(offset)
    mk = lambda op: pm.heuristic_config(op, m, k, n, num_local, dtype)
    cfg = cfg or mk("gmm")
    cfg_t = cfg_t or mk("gmm_t")
    cfg_tg = cfg_tg or mk("tgmm")
    fwd = jax.jit(lambda a, b, g, o: pm.gmm_call(
        a, b, g, o, transpose_rhs=False, out_dtype=out_dtype, cfg=cfg))
    fwd_t = jax.jit(lambda a, b, g, o: pm.gmm_call(
        a, b, g, o, transpose_rhs=True, out_dtype=out_dtype, cfg=cfg_t))
    tg = jax.jit(lambda a, b, g, o: pm.tgmm_call(
        a, b, g, o, num_local=num_local, out_dtype=out_dtype, cfg=cfg_tg))
    poison_memory()
    out = jax.block_until_ready(fwd(lhs, rhs, gs, off))
    poison_memory()
    out_t = jax.block_until_ready(fwd_t(dy, rhs_t, gs, off))
    poison_memory()
    dw = jax.block_until_ready(tg(lhs, dy, gs, off))
    want, want_tg = ref_products(lhs, rhs, dy, sizes, offset, num_local)
    want_t, _ = ref_products(dy, rhs_t, None, sizes, offset, num_local,
                             transpose_rhs=True)
    rec["err_fwd"] = rel(out, want)
    rec["err_dlhs"] = rel(out_t, want_t)
    rec["err_tgmm"] = rel(dw, want_tg)
    # Exact zeros where the reference is structurally zero.
    o = np.asarray(out, np.float32)
    zero_rows = ~np.any(want != 0, axis=1)
    rec["zeros_fwd_ok"] = bool(np.all(o[zero_rows] == 0))
    d = np.asarray(dw, np.float32)
    empty = [l for l in range(num_local)
             if not (0 <= offset + l < g_all) or sizes[offset + l] == 0]
    rec["zeros_tgmm_ok"] = bool(all(np.all(d[l] == 0) for l in empty))
    # Bitwise repeatable.
    rec["repeat_ok"] = bool(np.array_equal(
        np.asarray(fwd(lhs, rhs, gs, off)), np.asarray(out)) and np.array_equal(
        np.asarray(tg(lhs, dy, gs, off)), np.asarray(dw)))
    tol = 2e-2 if jnp.dtype(out_dtype) == jnp.dtype(BF16) or jnp.dtype(dtype) == jnp.dtype(BF16) else 5e-3
    rec["ok"] = bool(max(rec["err_fwd"], rec["err_dlhs"], rec["err_tgmm"]) < tol
                     and rec["zeros_fwd_ok"] and rec["zeros_tgmm_ok"]
                     and rec["repeat_ok"])
  except Exception as e:  # noqa: BLE001
    rec["ok"] = False
    rec["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    traceback.print_exc()
  RESULTS.append(rec)
  log(f"{'PASS' if rec['ok'] else 'FAIL'} {name}: " + ", ".join(
      f"{a}={b:.2e}" if isinstance(b, float) else f"{a}={b}"
      for a, b in rec.items() if a.startswith(("err", "zeros", "repeat", "error"))))
  return rec


def run_checks():
  rng = np.random.default_rng(0)
  def fuzz(m, g, zeros=0.3):
    p = rng.random(g) * (rng.random(g) > zeros)
    if p.sum() == 0:
      p[0] = 1
    s = rng.multinomial(int(m * rng.uniform(0.7, 1.0)), p / p.sum())
    return s.astype(np.int32)
  check_case("basic", 1000, 256, 384, fuzz(1000, 8))
  check_case("one_group_all_rows", 1000, 256, 384, [0, 0, 1000, 0, 0, 0, 0, 0])
  check_case("all_empty", 512, 128, 256, [0] * 8)
  check_case("tail_rows", 1000, 256, 384, [100, 37, 0, 250, 1, 0, 64, 128])
  check_case("offset", 1000, 256, 384, fuzz(1000, 8), offset=2, num_local=3)
  check_case("offset_past_end", 640, 128, 128, fuzz(640, 8), offset=7, num_local=3)
  check_case("odd_kn", 700, 200, 136, fuzz(700, 5))
  check_case("small_m", 40, 64, 64, [10, 0, 25, 5])
  check_case("aligned", 1024, 256, 512, [128, 256, 0, 384, 128, 0, 128, 0])
  check_case("f32_out", 1000, 256, 384, fuzz(1000, 8), out_dtype=jnp.float32)
  check_case("f16", 1000, 256, 384, fuzz(1000, 8), dtype=jnp.float16,
             out_dtype=jnp.float16)
  check_case("many_groups", 4096, 512, 256, fuzz(4096, 64, zeros=0.5))
  check_case("decode_like", 256, 512, 1024, fuzz(256, 8, zeros=0.1))
  for i in range(4):
    m = int(rng.integers(64, 3000))
    g = int(rng.integers(1, 40))
    check_case(f"fuzz{i}", m, 64 * int(rng.integers(1, 6)),
               64 * int(rng.integers(1, 6)), fuzz(m, g), seed=i + 1)
  # Non-default tiles.
  check_case("tile64", 1000, 256, 384, fuzz(1000, 8),
             cfg=pm.MosaicConfig(tile_m=64, tile_n=64, max_concurrent_steps=6),
             cfg_t=pm.MosaicConfig(tile_m=64, tile_n=128),
             cfg_tg=pm.MosaicConfig(tile_m=64, tile_n=64, tile_k=128))
  npass = sum(r["ok"] for r in RESULTS if r["kind"] == "check")
  ncheck = sum(1 for r in RESULTS if r["kind"] == "check")
  log(f"checks: {npass}/{ncheck} passed")


# ----------------------------------------------------------------------------
# Timing


def timeit(f, args_list, *, target_s=0.3, reps=5):
  jax.block_until_ready(f(*args_list[0]))
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args_list[1 % len(args_list)]))
  est = time.perf_counter() - t0
  iters = int(min(200, max(3, target_s / max(est, 1e-6))))
  means = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for i in range(iters):
      r = f(*args_list[i % len(args_list)])
    jax.block_until_ready(r)
    means.append((time.perf_counter() - t0) / iters * 1e3)
  return float(np.median(means))


VARIANTS = {
    "mixtral_fwdbwd": lambda h: [h.replace(grid_tile_width=8),
                                 h.replace(max_concurrent_steps=3)],
    "olmoe_fwdbwd": lambda h: [h.replace(grid_tile_width=16),
                               h.replace(max_concurrent_steps=3)],
    "deepseek_fwd": lambda h: [h.replace(tile_m=64), h.replace(grid_tile_width=16)],
    "decode": lambda h: [h.replace(tile_m=64), h.replace(tile_n=64,
                                                         max_concurrent_steps=6)],
}


def time_case(case, routing, configs, *, with_triton=True, aligned=False,
              mgpu_dense=False):
  spec = SPECS[case]
  m, k, n, g = spec.rows, spec.k, spec.n, spec.num_groups
  sizes = routing_sizes(m, g, routing)
  if aligned:  # DeepGEMM-style layout: every group a multiple of 128 rows
    sizes = (-(-sizes // 128) * 128).astype(np.int32)
    m = int(sizes.sum())
  gs = jnp.asarray(sizes)
  off = jnp.int32(0)
  n_sets = 2 if m * k * 2 + g * k * n * 2 > 2e9 else 3
  sets = []
  for i in range(n_sets):
    ks = jax.random.split(jax.random.key(100 + i), 4)
    sets.append(dict(
        lhs=jax.random.normal(ks[0], (m, k), jnp.float32).astype(BF16),
        rhs=(jax.random.normal(ks[1], (g, k, n), BF16) * (1 / math.sqrt(k))).astype(BF16),
        dy=jax.random.normal(ks[2], (m, n), jnp.float32).astype(BF16) if spec.bwd else None))
  flops = 2.0 * spec.rows * k * n
  base = dict(kind="time", case=case, routing=routing, aligned=aligned, m=m, k=k,
              n=n, groups=g, max_group=int(sizes.max()),
              empty=int((sizes == 0).sum()))
  # Dense ceilings of equal useful FLOPs, same run.
  dense = jax.jit(lambda a, w: jnp.dot(a, w))
  dense_ms = timeit(dense, [(s["lhs"][:spec.rows], s["rhs"][0]) for s in sets])
  rec = dict(base, product="dense_fwd", ms=dense_ms, tflops=flops / dense_ms / 1e9)
  RESULTS.append(rec); log(fmt(rec))
  if spec.bwd:
    dense_t = jax.jit(lambda d, w: jnp.dot(d, w.T))
    dense_t_ms = timeit(dense_t, [(s["dy"][:spec.rows], s["rhs"][0]) for s in sets])
    dense_w = jax.jit(lambda a, d: jnp.dot(a.T, d))
    dense_w_ms = timeit(dense_w, [(s["lhs"][:spec.rows], s["dy"][:spec.rows]) for s in sets])
    for prod, ms in (("dense_dlhs", dense_t_ms), ("dense_tgmm", dense_w_ms)):
      rec = dict(base, product=prod, ms=ms, tflops=flops / ms / 1e9)
      RESULTS.append(rec); log(fmt(rec))
  if mgpu_dense and not aligned:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm  # noqa: PLC0415
    hcfg = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                           grid_tile_width=16 if n >= 4096 else 8)
    try:
      f = jax.jit(lambda a, w: hm.matmul(a, w, None, hcfg))
      ms = timeit(f, [(s["lhs"][:spec.rows], s["rhs"][0]) for s in sets])
      rec = dict(base, product="mgpu_dense_fwd", ms=ms, tflops=flops / ms / 1e9,
                 vs_dense=dense_ms / ms)
    except Exception as e:  # noqa: BLE001
      rec = dict(base, product="mgpu_dense_fwd", error=f"{type(e).__name__}: {str(e)[:300]}")
    RESULTS.append(rec); log(fmt(rec))
  ceil = {"fwd": dense_ms}
  if spec.bwd:
    ceil.update(dlhs=dense_t_ms, tgmm=dense_w_ms)

  ends = np.cumsum(sizes)
  starts = ends - sizes
  nz = np.flatnonzero(sizes)
  picks = sorted({int(nz[np.argmax(sizes[nz])]), int(nz[len(nz) // 2]), int(nz[0])})
  hi = jax.lax.Precision.HIGHEST
  f32 = lambda x: x.astype(jnp.float32)

  def subset_err(prod, out):
    """Relative error on a few groups against float32 products (set 0)."""
    s0 = sets[0]
    num = den = 0.0
    for gi in picks:
      a, b = int(starts[gi]), int(ends[gi])
      if prod == "fwd":
        got, want = out[a:b], jnp.dot(f32(s0["lhs"][a:b]), f32(s0["rhs"][gi]), precision=hi)
      elif prod == "dlhs":
        got, want = out[a:b], jnp.dot(f32(s0["dy"][a:b]), f32(s0["rhs"][gi]).T, precision=hi)
      else:
        got, want = out[gi], jnp.dot(f32(s0["lhs"][a:b]).T, f32(s0["dy"][a:b]), precision=hi)
      d = f32(got) - want
      num += float(jnp.sum(d * d)); den += float(jnp.sum(want * want))
    return math.sqrt(num / den)

  def run_product(prod, label, f, args_list, cfg_dict):
    rec = dict(base, product=prod, method=label, config=cfg_dict)
    try:
      rec["rel_err"] = subset_err(prod, f(*args_list[0]))
      if not rec["rel_err"] < 2e-2:
        rec["error"] = f"WRONG rel_err {rec['rel_err']:.3g}"
      ms = timeit(f, args_list)
      rec.update(ms=ms, tflops=flops / ms / 1e9, vs_dense=ceil[prod] / ms)
    except Exception as e:  # noqa: BLE001
      rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
    RESULTS.append(rec); log(fmt(rec))

  for cfg in configs:
    cd = cfg.to_dict()
    f = jax.jit(lambda a, b, gs, o, cfg=cfg: pm.gmm_call(
        a, b, gs, o, transpose_rhs=False, out_dtype=BF16, cfg=cfg))
    run_product("fwd", "mosaic", f, [(s["lhs"], s["rhs"], gs, off) for s in sets], cd)
    if spec.bwd:
      # dlhs = dy @ rhs^T: the kernel reads rhs [g, k, n] as [g, n_out=k, k_c=n].
      f = jax.jit(lambda d, b, gs, o, cfg=cfg: pm.gmm_call(
          d, b, gs, o, transpose_rhs=True, out_dtype=BF16, cfg=cfg))
      run_product("dlhs", "mosaic", f, [(s["dy"], s["rhs"], gs, off) for s in sets], cd)
      f = jax.jit(lambda a, d, gs, o, cfg=cfg: pm.tgmm_call(
          a, d, gs, o, num_local=g, out_dtype=BF16, cfg=cfg))
      run_product("tgmm", "mosaic", f, [(s["lhs"], s["dy"], gs, off) for s in sets], cd)
  if with_triton:
    tcfg = select_config("gmm", m, k, n, g, BF16)
    def tri_fwd(a, b, gs):
      t = tiling.row_tiles(gs, m, tcfg.block_m, g)
      return pallas_triton.gmm_call(a, b, t.table, transpose_rhs=False,
                                    out_dtype=BF16, cfg=tcfg, compute_dtype=BF16)
    run_product("fwd", "triton", jax.jit(tri_fwd),
                [(s["lhs"], s["rhs"], gs) for s in sets], tcfg.to_dict())
  del sets


def fmt(r):
  c = r.get("config") or {}
  cs = (f"{c.get('tile_m', '')}x{c.get('tile_n', '')}x{c.get('tile_k', '')}"
        f" s{c.get('max_concurrent_steps', '')} w{c.get('grid_tile_width', '')}"
        ) if "tile_m" in c else ""
  vs = r.get("vs_dense")
  return (f"{r['case']:<15} {r['routing']:<9} {'al' if r.get('aligned') else '  '}"
          f" {r['product']:<10} {r.get('method', ''):<7} {cs:<30}"
          f" {r.get('ms', float('nan')):9.3f} ms {r.get('tflops', float('nan')):7.1f} TF"
          f" {'' if vs is None else f'{vs:5.2f}x'}"
          f" {'' if r.get('rel_err') is None else format(r['rel_err'], '.1e')}"
          f" {r.get('error', '')[:200]}")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--check", action="store_true")
  p.add_argument("--time", nargs="*", default=[])
  p.add_argument("--routings", nargs="*", default=["skewed"])
  p.add_argument("--variants", action="store_true",
                 help="time a few tile configs besides the heuristic")
  p.add_argument("--aligned", action="store_true",
                 help="also time groups padded to multiples of 128 rows")
  p.add_argument("--mgpu-dense", action="store_true",
                 help="also time JAX's hopper_matmul_mgpu on the dense shape")
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  meta = dict(device=f"{dev.platform}:{dev.device_kind}", jax_version=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              argv=sys.argv[1:] if argv is None else argv)
  log(json.dumps(meta))
  if a.check:
    run_checks()
  for case in a.time:
    spec = SPECS[case]
    h = pm.heuristic_config("gmm", spec.rows, spec.k, spec.n, spec.num_groups, BF16)
    configs = [h]
    if a.variants:
      configs += VARIANTS.get(case, lambda h: [])(h)
    for routing in a.routings:
      time_case(case, routing, configs, mgpu_dense=a.mgpu_dense)
      if a.aligned and not spec.decode:
        time_case(case, routing, [h], with_triton=False, aligned=True)
    if a.out:
      with open(a.out, "w") as f:
        json.dump(dict(meta, records=RESULTS), f, indent=1, default=str)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(dict(meta, records=RESULTS), f, indent=1, default=str)
  log("\n".join(fmt(r) for r in RESULTS if r["kind"] == "time"))
  bad = [r for r in RESULTS if r["kind"] == "check" and not r["ok"]]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
