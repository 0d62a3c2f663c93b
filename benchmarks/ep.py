"""Expert-parallel MoE layer benchmark: experts split over every local GPU vs one GPU.

  python -m benchmarks.ep [--out FILE] [--tokens-per-device N] [--variants ...]
                          [--gmm IMPL] [--cpu-smoke]

Layer (fwd+bwd, gradients w.r.t. x and every parameter), at the same tokens per
device:
  1dev            `jmoe.moe_ffn` on one device holding all E experts (the baseline)
  ep_dropless     `ExpertParallel(dispatcher="dropless")` (bound 2.0, the default)
  ep_dropless_b1.25   the same with dropless_bound=1.25 (smaller blocks)
  ep_all_to_all   dispatcher="all_to_all", per-shard capacity factor 1.25
  ep_all_gather   dispatcher="all_gather"
  ep_dropless_ragged  "dropless" with exchange="ragged_all_to_all" (--ragged-splits
                  updates per peer; GPU only)
Figures: ms per step, tokens/s per device, useful TFLOP/s per device (3 expert
matmuls x 2*rows*D*F, x3 for fwd+bwd; rows = tokens x top-k), vs_1dev (baseline ms /
ms: 1.0 = perfect scaling), rel_err of the forward output on device 0's tokens
against the 1-device layer on the same tokens (bf16), and the dispatch stats.

Exchange (forward only, one direction), bytes per device:
  jmoe_dispatch   the layer's dispatch half: plan, send gather, counts + rows
                  all_to_all, receiver reorder; bytes = the n*B-row send buffer
  all_to_all      plain `lax.all_to_all` of the same buffer: the ceiling
  all_to_all_payload  plain `lax.all_to_all` of only the routed rows (T*k)
  ragged_all_to_all   `lax.ragged_all_to_all` moving the same buffer, one update per
                  peer (where it runs)
  ragged_all_to_all_split  the same with each peer's slice split into
                  --ragged-splits updates (`jmoe.parallel.ragged_tables`)
  jmoe_dispatch_ragged  the dispatch half with exchange="ragged_all_to_all": only
                  the routed rows move, in --ragged-splits updates per peer
GB/s = buffer bytes per device / time (the self-block included, as a lax.all_to_all
of that buffer counts it). `exchange_fraction_of_all_to_all`: the plain
all_to_all's time over the variant's, for the same n*B-row buffer (1.0 = as fast as
moving it with lax.all_to_all).

Timing: warm-up, then batches of launches rotating over input sets, median of the
batch means (host timer around block_until_ready). JSON (device, jax_version, date,
config, records) to --out; the table is printed last.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None, help="JSON path (default: print only)")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="8 fake CPU devices, tiny shapes (a test of this script)")
  p.add_argument("--tokens-per-device", type=int, default=None)
  p.add_argument("--d-model", type=int, default=None)
  p.add_argument("--d-ff", type=int, default=None)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--gmm", default=None,
                 help="gmm implementation (default: jmoe's best for the backend)")
  p.add_argument("--variants", nargs="*", default=None,
                 help="subset of the layer and exchange variants to run")
  p.add_argument("--ragged-splits", type=int, default=32,
                 help="updates per peer of the ragged variants")
  p.add_argument("--target-s", type=float, default=None,
                 help="seconds of timed launches per batch")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None

import jax  # noqa: E402
from benchmarks import gmm as gmm_bench  # noqa: E402

if ARGS is not None and ARGS.cpu_smoke:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8)

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jmoe  # noqa: E402
from jmoe import parallel  # noqa: E402
from jmoe._src import moe as moe_lib  # noqa: E402
from jmoe._src import permute as permute_lib  # noqa: E402

LAYER_VARIANTS = ("1dev", "ep_dropless", "ep_dropless_b1.25", "ep_all_to_all",
                  "ep_all_gather", "ep_dropless_ragged")
EXCHANGE_VARIANTS = ("jmoe_dispatch", "all_to_all", "all_to_all_payload",
                     "ragged_all_to_all", "ragged_all_to_all_split",
                     "jmoe_dispatch_ragged")
CAPACITY_FACTOR = 1.25


def log(*a):
  print(*a, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Shape:
  tokens: int  # per device
  d_model: int
  d_ff: int
  experts: int
  top_k: int
  dtype: str = "bfloat16"

  def fwd_bwd_flops(self) -> float:
    """Useful FLOPs of the expert matmuls (SwiGLU: 3 per row), fwd + bwd."""
    return 3 * 3 * 2.0 * self.tokens * self.top_k * self.d_model * self.d_ff


def shape_from_args(args) -> Shape:
  smoke = args.cpu_smoke
  return Shape(
      tokens=args.tokens_per_device or (256 if smoke else 8192),
      d_model=args.d_model or (64 if smoke else 4096),
      d_ff=args.d_ff or (128 if smoke else 14336),
      experts=args.experts, top_k=args.top_k,
      dtype="float32" if smoke else "bfloat16")


def time_fn(call, *, n_sets: int, target_s: float, reps: int = 5,
            max_iters: int = 200) -> float:
  """benchmarks.gmm's timer (median of batch means, ms); on CPU every launch is
  waited for."""
  on_cpu = jax.devices()[0].platform == "cpu"
  ms, _ = gmm_bench.time_fn(call, n_sets=n_sets, target_s=target_s, reps=reps,
                            max_iters=max_iters, sync_each=on_cpu)
  return ms


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------
# Layer


def layer_step(layer, x, params, dy):
  """Forward + backward: grads w.r.t. x and every parameter; the forward y and the
  dispatch stats (None for the 1-device layer)."""
  def f(x, p):
    y, aux, *stats = layer(x, p)
    loss = jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)) + aux.balance_loss
    return loss, (y, stats[0] if stats else None)
  (_, (y, stats)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      x, params)
  return y, stats, grads


def run_layers(shape: Shape, variants, config: jmoe.MoEConfig, target_s: float,
               splits: int = 32):
  devices = jax.devices()
  n = len(devices)
  dtype = jnp.dtype(shape.dtype)
  params = jmoe.init_params(jax.random.key(0), shape.d_model, shape.d_ff,
                            shape.experts, dtype=dtype)
  t_global = n * shape.tokens
  xs = [jax.random.normal(jax.random.key(10 + i), (t_global, shape.d_model),
                          jnp.float32).astype(dtype) for i in range(2)]
  dy = jax.random.normal(jax.random.key(20), (t_global, shape.d_model),
                         jnp.float32).astype(dtype)
  mesh = jax.make_mesh((n,), ("expert",))
  records, y_dev0 = [], {}

  # The 1-device baseline: device 0's tokens, all experts on device 0.
  d0 = devices[0]
  p0 = jax.device_put(params, d0)
  x0 = [jax.device_put(x[:shape.tokens], d0) for x in xs]
  dy0 = jax.device_put(dy[:shape.tokens], d0)
  ref_cap = dataclasses.replace(config, capacity_factor=CAPACITY_FACTOR)
  for ref_name, cfg in (("exact", config), ("capacity", ref_cap)):
    y_dev0[ref_name] = np.asarray(jax.jit(
        lambda x, p, c=cfg: jmoe.moe_ffn(x, p, c)[0])(x0[0], p0), np.float32)

  for name in variants:
    if name not in LAYER_VARIANTS:
      continue
    rec = dict(kind="layer", variant=name, devices=1 if name == "1dev" else n,
               tokens_per_device=shape.tokens)
    log(f"layer {name} ...")
    try:
      if name == "1dev":
        step = jax.jit(lambda x, p, d: layer_step(
            lambda a, b: jmoe.moe_ffn(a, b, config), x, p, d))
        args = [(x, p0, dy0) for x in x0]
      else:
        kw = dict(dispatcher=name[3:].split("_b")[0].replace("_ragged", ""))
        if name == "ep_dropless_b1.25":
          kw["dropless_bound"] = 1.25
        if name.endswith("_ragged"):
          kw.update(exchange="ragged_all_to_all", ragged_splits=splits)
        if kw["dispatcher"] == "all_to_all":
          kw["capacity_factor"] = CAPACITY_FACTOR
        ep = parallel.ExpertParallel(mesh, **kw)
        ps = parallel.shard_params(params, ep)
        sh = ep.input_sharding()
        args = [(jax.device_put(x, sh), ps, jax.device_put(dy, sh)) for x in xs]
        step = jax.jit(lambda x, p, d, ep=ep: layer_step(
            lambda a, b: ep.moe_ffn_with_stats(a, b, config), x, p, d))
      t0 = time.perf_counter()
      y, stats, _ = jax.block_until_ready(step(*args[0]))
      rec["compile_s"] = round(time.perf_counter() - t0, 2)
      ref = y_dev0["capacity" if name == "ep_all_to_all" else "exact"]
      rec["rel_err"] = rel_err(np.asarray(y, np.float32)[:shape.tokens], ref)
      ms = time_fn(lambda i: step(*args[i]), n_sets=len(args), target_s=target_s)
      rec.update(ms=ms, tokens_per_s_per_device=shape.tokens / ms * 1e3,
                 tflops_per_device=shape.fwd_bwd_flops() / ms / 1e9)
      if stats is not None:
        rec["stats"] = {k: int(v) for k, v in dataclasses.asdict(stats).items()}
    except Exception as e:  # noqa: BLE001
      rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(traceback.format_exc())
    records.append(rec)
  base = next((r.get("ms") for r in records if r["variant"] == "1dev"), None)
  for r in records:
    if base and r.get("ms"):
      r["vs_1dev"] = base / r["ms"]
  return records


# ----------------------------------------------------------------------------
# Exchange


def run_exchange(shape: Shape, variants, config: jmoe.MoEConfig, target_s: float,
                 splits: int = 32):
  devices = jax.devices()
  n = len(devices)
  if n < 2:
    return [dict(kind="exchange", variant=v, error="needs >= 2 devices")
             for v in variants if v in EXCHANGE_VARIANTS]
  dtype = jnp.dtype(shape.dtype)
  mesh = jax.make_mesh((n,), ("expert",))
  ep = parallel.ExpertParallel(mesh)  # dropless, bound 2.0
  block = ep.block_rows(shape.tokens, shape.experts, config)
  payload = shape.tokens * shape.top_k
  payload = -(-payload // n) * n  # a multiple of n for the plain all_to_all
  row_bytes = shape.d_model * dtype.itemsize
  params = jmoe.init_params(jax.random.key(0), shape.d_model, shape.d_ff,
                            shape.experts, dtype=dtype)
  spec = P("expert")
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, spec))
  smap = lambda f, n_in: jax.jit(jax.shard_map(
      f, mesh=mesh, in_specs=(spec,) * n_in, out_specs=spec))
  records = []

  for name in variants:
    if name not in EXCHANGE_VARIANTS:
      continue
    log(f"exchange {name} ...")
    rows = payload if name == "all_to_all_payload" else n * block
    rec = dict(kind="exchange", variant=name, rows_per_device=rows,
               bytes_per_device=rows * row_bytes, block_rows=block)
    try:
      if name in ("jmoe_dispatch", "jmoe_dispatch_ragged"):
        def dispatch(xt, router, ragged=name.endswith("_ragged")):
          logits = moe_lib.router_logits(xt, router)
          routing = jmoe.route(logits, config.router)
          plan = permute_lib.dispatch_plan(routing.experts, shape.experts)
          out, _, _ = parallel._a2a_dispatch(xt, routing.experts, plan,
                                             "expert", block,
                                             splits if ragged else None)
          return out

        fn = jax.jit(jax.shard_map(dispatch, mesh=mesh, in_specs=(spec, P()),
                                   out_specs=spec))
        router = jax.device_put(params.router, NamedSharding(mesh, P()))
        args = [(shard(jax.random.normal(jax.random.key(i), (n * shape.tokens,
                                                              shape.d_model),
                                         jnp.float32).astype(dtype)), router)
                for i in range(2)]
      elif name in ("all_to_all", "all_to_all_payload"):
        fn = smap(lambda b: lax.all_to_all(b, "expert", 0, 0, tiled=True), 1)
        args = [(shard(jax.random.normal(jax.random.key(i), (n * rows,
                                                              shape.d_model),
                                         jnp.float32).astype(dtype)),)
                for i in range(2)]
      else:  # ragged_all_to_all moving the same blocks (one or `splits` updates)
        def ragged(b, per_peer=splits if name.endswith("_split") else 1):
          full = jnp.full((n,), block, jnp.int32)
          tables = parallel.ragged_tables(full, full, lax.axis_index("expert"),
                                          block, per_peer)
          return lax.ragged_all_to_all(b, jnp.zeros_like(b), *tables,
                                       axis_name="expert")
        fn = smap(ragged, 1)
        args = [(shard(jax.random.normal(jax.random.key(i), (n * rows,
                                                              shape.d_model),
                                         jnp.float32).astype(dtype)),)
                for i in range(2)]
        ref = smap(lambda b: lax.all_to_all(b, "expert", 0, 0, tiled=True), 1)
        rec["rel_err"] = rel_err(fn(*args[0]), ref(*args[0]))
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args[0]))
      rec["compile_s"] = round(time.perf_counter() - t0, 2)
      ms = time_fn(lambda i: fn(*args[i]), n_sets=len(args), target_s=target_s)
      rec.update(ms=ms, gb_per_s_per_device=rec["bytes_per_device"] / ms / 1e6)
    except Exception as e:  # noqa: BLE001
      rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    records.append(rec)
  plain = next((r.get("ms") for r in records if r["variant"] == "all_to_all"), None)
  for r in records:
    if plain and r.get("ms") and r["variant"] != "all_to_all_payload":
      r["exchange_fraction_of_all_to_all"] = plain / r["ms"]
  return records


# ----------------------------------------------------------------------------


def table(records) -> str:
  lines = []
  layer = [r for r in records if r["kind"] == "layer"]
  if layer:
    lines.append(f"{'layer fwd+bwd':22} {'devs':>4} {'ms':>9} {'tok/s/dev':>11}"
                 f" {'TFLOP/s/dev':>11} {'vs_1dev':>8} {'rel_err':>9}  stats / error")
    for r in layer:
      if "ms" not in r:
        lines.append(f"{r['variant']:22} {r['devices']:>4}  {r.get('error', '')}")
        continue
      st = r.get("stats")
      extra = (f"fallback={st['fallback']} rows {st['max_block_rows']}/"
               f"{st['block_rows']}" if st else "")
      lines.append(
          f"{r['variant']:22} {r['devices']:>4} {r['ms']:9.3f}"
          f" {r['tokens_per_s_per_device']:11.0f} {r['tflops_per_device']:11.1f}"
          f" {r.get('vs_1dev', float('nan')):8.2f} {r['rel_err']:9.2e}  {extra}")
  ex = [r for r in records if r["kind"] == "exchange"]
  if ex:
    lines.append("")
    lines.append(f"{'exchange (one way)':22} {'rows/dev':>9} {'MB/dev':>9} {'ms':>9}"
                 f" {'GB/s/dev':>9}  error")
    for r in ex:
      if "ms" not in r:
        lines.append(f"{r['variant']:22} {r.get('rows_per_device', 0):>9}"
                     f" {'':>9} {'':>9} {'':>9}  {r.get('error', '')}")
        continue
      lines.append(f"{r['variant']:22} {r['rows_per_device']:>9}"
                   f" {r['bytes_per_device'] / 1e6:9.1f} {r['ms']:9.3f}"
                   f" {r['gb_per_s_per_device']:9.1f}  {r.get('error', '')}")
  return "\n".join(lines)


def main(args):
  shape = shape_from_args(args)
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=shape.top_k),
                          gmm_implementation=args.gmm)
  variants = args.variants or (LAYER_VARIANTS + EXCHANGE_VARIANTS)
  target_s = args.target_s or (0.05 if args.cpu_smoke else 0.5)
  dev = jax.devices()[0]
  log(f"{len(jax.devices())} x {dev.device_kind}; jax {jax.__version__}; {shape}")
  t0 = time.time()
  records = run_layers(shape, variants, config, target_s, args.ragged_splits)
  records += run_exchange(shape, variants, config, target_s, args.ragged_splits)
  result = dict(
      device=dev.device_kind, platform=dev.platform, num_devices=jax.device_count(),
      jax_version=jax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      config=dict(dataclasses.asdict(shape), gmm_implementation=args.gmm,
                  capacity_factor=CAPACITY_FACTOR, cpu_smoke=args.cpu_smoke,
                  ragged_splits=args.ragged_splits),
      wall_s=round(time.time() - t0, 1), records=records)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    log(f"wrote {args.out}")
  print(table(records))
  return result


if __name__ == "__main__":
  main(ARGS)
