"""Whole-layer benchmark: jmoe.moe_ffn fwd+bwd against a dense SwiGLU FFN.

  python -m benchmarks.moe_layer [--out FILE] [--cases mixtral olmoe] [--cpu-smoke]

For each case (bf16 activations and weights) it times, in the same run:

  dense      a dense SwiGLU FFN with the same active FLOPs per token (hidden width =
             expert width x top-k), fwd+bwd w.r.t. x and all weights: the ceiling

Every method is timed as `jax.value_and_grad` (the loss value and the gradients,
as in a training step), so the forward output is computed: `jax.grad` alone let
XLA drop the dense FFN's last forward product (benchmarks/NOTES.md, fifth session).
  moe        jmoe.moe_ffn fwd+bwd (route, cumsum dispatch, three grouped matmuls
             with SwiGLU, combine), gradients w.r.t. x and all parameters
  dense_grad_only  the same with `jax.grad` alone, as this benchmark timed it
             before the fifth session: XLA drops its down projection's forward
             (8 of the 9 products); kept to show the correction in the same run
  experts    the three grouped matmuls + SwiGLU alone on pre-permuted rows, fwd+bwd
  experts_fused_gate_up  the same with gate and up as ONE grouped matmul against
             the concatenated [E, D, 2F] weights (measured slower on an H200:
             benchmarks/NOTES.md, "fused gate/up"; kept to compare in one run)
  dispatch   routing + permutation alone: router logits, route, dispatch plan,
             permute and unpermute (identity experts), fwd+bwd
  moe_xla    moe_ffn with gmm_implementation="xla" (lax.ragged_dot), where it fits

and reports vs_dense (dense ms / method ms), the share of layer time spent in
routing + permutation (dispatch ms / moe ms), and the bytes of the dispatch buffers:
the permuted rows plus the plan's temporaries, from XLA's memory analysis of a jitted
`permute`, against the dropless ideal (tokens x k rows of d_model).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import jmoe
from benchmarks import profiling
from benchmarks.gmm import time_fn, write_json
from jmoe._src import moe as moe_lib

BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSpec:
  name: str
  tokens: int
  d_model: int
  d_ff: int
  num_experts: int
  top_k: int
  note: str = ""

  @property
  def flops(self) -> float:
    """Active FLOPs of fwd+bwd: 3 matmuls x 2*T*k*D*F, times 3 for fwd+bwd."""
    return 18.0 * self.tokens * self.top_k * self.d_model * self.d_ff


CASES = {s.name: s for s in [
    LayerSpec(name="mixtral", tokens=8192, d_model=4096, d_ff=14336, num_experts=8,
              top_k=2, note="Mixtral 8x7B layer, 8192 tokens"),
    LayerSpec(name="olmoe", tokens=16384, d_model=2048, d_ff=1024, num_experts=64,
              top_k=8, note="OLMoE 1B-7B layer, 16384 tokens"),
]}
SMOKE = {s.name: s for s in [
    LayerSpec(name="tiny", tokens=256, d_model=64, d_ff=128, num_experts=8, top_k=2),
]}
# --cpu: the README example's layer (examples/train_lm.py --preset cpu-tiny: 16 x
# 128 tokens per step), on the default CPU backend.
CPU_CASES = {s.name: s for s in [
    LayerSpec(name="cpu-tiny", tokens=2048, d_model=128, d_ff=128, num_experts=8,
              top_k=2, note="cpu-tiny's MoE layer (one step's tokens)"),
]}


def log(*a):
  print(*a, flush=True)


def make_inputs(spec: LayerSpec, n_sets: int):
  params = jmoe.init_params(jax.random.key(0), spec.d_model, spec.d_ff,
                            spec.num_experts, dtype=BF16)
  dense = jmoe.FFNParams(
      w_up=(jax.random.normal(jax.random.key(1), (spec.d_model, spec.d_ff * spec.top_k), BF16)
            / np.sqrt(spec.d_model)).astype(BF16),
      w_down=(jax.random.normal(jax.random.key(2), (spec.d_ff * spec.top_k, spec.d_model), BF16)
              / np.sqrt(spec.d_ff * spec.top_k)).astype(BF16),
      w_gate=(jax.random.normal(jax.random.key(3), (spec.d_model, spec.d_ff * spec.top_k), BF16)
              / np.sqrt(spec.d_model)).astype(BF16))
  xs = [jax.random.normal(jax.random.key(10 + i), (spec.tokens, spec.d_model), BF16)
        for i in range(n_sets)]
  cs = [jax.random.normal(jax.random.key(20 + i), (spec.tokens, spec.d_model), BF16)
        for i in range(n_sets)]
  jax.block_until_ready((params, dense, xs, cs))
  return params, dense, xs, cs


def build(spec: LayerSpec, impl: str | None):
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=spec.top_k),
                          activation="swiglu", gmm_implementation=impl)

  def moe_loss(x, params, c):
    y, aux = jmoe.moe_ffn(x, params, config)
    return (jnp.sum(y.astype(jnp.float32) * c) + 0.01 * aux.balance_loss
            + 1e-3 * aux.z_loss)

  def dense_loss(x, p, c):
    return jnp.sum(jmoe.ffn(x, p, "swiglu").astype(jnp.float32) * c)

  def dispatch_loss(x, router, c):
    # Differentiated w.r.t. x and the router only: the expert weights' gradients
    # would be zeros here, and writing them (2 GB at Mixtral) is not dispatch.
    # The scopes of moe_ffn's stages, for --profile.
    with jax.named_scope("router"):
      routing = jmoe.route(moe_lib.router_logits(x, router), config.router)
    with jax.named_scope("dispatch"):
      rows, plan = jmoe.permute(x, routing)
    with jax.named_scope("combine"):
      y = jmoe.unpermute(rows, plan, routing.weights)
    with jax.named_scope("router"):
      balance = jmoe.load_balancing_loss(routing.probs, routing.experts)
    return jnp.sum(y.astype(jnp.float32) * c) + 0.01 * balance

  @jax.named_scope("experts")
  def experts_loss(rows, params, gs, c):
    out = jmoe.expert_ffn(rows, params.w_up, params.w_down, params.w_gate, gs,
                          "swiglu", implementation=impl)
    return jnp.sum(out.astype(jnp.float32) * c)

  def experts_fused_loss(rows, params, gs, c):
    mm = lambda a, w: jmoe.gmm(a, w, gs, implementation=impl)
    f = params.w_up.shape[-1]
    gate_up = mm(rows, jnp.concatenate([params.w_gate, params.w_up], -1))
    gate, up = (gate_up[:, :f].astype(jnp.float32),
                gate_up[:, f:].astype(jnp.float32))
    out = mm((jax.nn.silu(gate) * up).astype(rows.dtype), params.w_down)
    return jnp.sum(out.astype(jnp.float32) * c)

  # value_and_grad, as a training step computes it: the loss value needs the
  # layer's output. With `jax.grad` alone XLA drops the dense FFN's down-projection
  # forward (its output feeds only the discarded loss value), so the ceiling ran
  # 8 of its 9 products, while moe_ffn keeps all 9 (the routing weights' gradient
  # needs the experts' outputs). `dense_xla_flops_vs_active` records the check.
  grad = lambda f, n: jax.jit(jax.value_and_grad(f, argnums=tuple(range(n))))
  return dict(moe=grad(moe_loss, 2), dense=grad(dense_loss, 2),
              dense_grad_only=jax.jit(jax.grad(dense_loss, argnums=(0, 1))),
              dispatch=grad(dispatch_loss, 2), experts=grad(experts_loss, 2),
              experts_fused_gate_up=grad(experts_fused_loss, 2), config=config)


def dispatch_bytes(spec: LayerSpec, x, params, config) -> dict:
  """XLA's memory analysis of a jitted permute (rows out + temporaries)."""
  def f(x, router):
    logits = moe_lib.router_logits(x, router)
    routing = jmoe.route(logits, config.router)
    rows, plan = jmoe.permute(x, routing)
    return rows, plan
  compiled = jax.jit(f).lower(x, params.router).compile()
  ideal = spec.tokens * spec.top_k * spec.d_model * jnp.dtype(BF16).itemsize
  out = dict(ideal_bytes=ideal)
  try:
    ma = compiled.memory_analysis()
    out.update(output_bytes=int(ma.output_size_in_bytes),
               temp_bytes=int(ma.temp_size_in_bytes))
    out["vs_ideal"] = round((out["output_bytes"] + out["temp_bytes"]) / ideal, 4)
  except Exception as e:  # some backends do not report it
    out["error"] = repr(e)[:200]
  return out


def dense_flops_ratio(spec: LayerSpec, fn, args) -> float | None:
  """XLA's FLOP count of the compiled dense fwd+bwd over the active FLOPs it
  stands for (~1: all nine products run; 8/9 would mean one was dropped)."""
  try:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return round(float(cost["flops"]) / spec.flops, 4)
  except Exception:  # noqa: BLE001  (a backend without a cost model)
    return None


def run_case(spec: LayerSpec, *, quick: bool, with_xla: bool, smoke: bool,
             profile: bool = False, methods=None):
  n_sets = 2
  params, dense, xs, cs = make_inputs(spec, n_sets)
  impl = "pallas_interpret" if smoke else None
  fns = build(spec, impl)
  target = 0.05 if smoke else (0.3 if quick else 1.0)
  reps = 3 if (smoke or quick) else 5
  rec = dict(case=spec.name, note=spec.note, tokens=spec.tokens,
             d_model=spec.d_model, d_ff=spec.d_ff, num_experts=spec.num_experts,
             top_k=spec.top_k, active_flops_fwd_bwd=spec.flops,
             gmm_implementation=jmoe._src.gmm.api.default_implementation()
             if impl is None else impl)
  # Correctness first: the layer against the dense oracle on a slice of tokens
  # (fresh random inputs; every expert on every token, masked and weighted).
  xt = xs[0][:256]
  y, _ = jax.jit(jmoe.moe_ffn, static_argnums=2)(xt, params, fns["config"])
  routing, _ = moe_lib.route_tokens(xt, params, fns["config"])
  comb = jnp.einsum("tke,tk->te", jax.nn.one_hot(routing.experts, spec.num_experts),
                    routing.weights)
  ref = jnp.zeros(xt.shape, jnp.float32)
  for e in range(spec.num_experts):
    p = jmoe.FFNParams(params.w_up[e], params.w_down[e], params.w_gate[e])
    ref = ref + comb[:, e:e + 1] * jmoe.ffn(xt, p, "swiglu").astype(jnp.float32)
  rec["rel_err"] = float(jnp.linalg.norm(y.astype(jnp.float32) - ref)
                         / jnp.linalg.norm(ref))
  log(f"[{spec.name}] rel_err vs dense oracle (256 tokens): {rec['rel_err']:.2e}")

  rows_sets, gs_sets = [], []
  for x in xs:
    routing, _ = moe_lib.route_tokens(x, params, fns["config"])
    rows, plan = jmoe.permute(x, routing)
    rows_sets.append(rows)
    gs_sets.append(plan.group_sizes)
  rec["tokens_per_expert"] = np.asarray(jmoe.dispatch_plan(
      routing.experts, spec.num_experts).group_sizes).tolist()

  cs_rows = [jnp.tile(c, (spec.top_k, 1)) for c in cs]
  args = {
      "dense": lambda i: (xs[i], dense, cs[i]),
      "dense_grad_only": lambda i: (xs[i], dense, cs[i]),
      "moe": lambda i: (xs[i], params, cs[i]),
      "experts": lambda i: (rows_sets[i], params, gs_sets[i], cs_rows[i]),
      "experts_fused_gate_up": lambda i: (rows_sets[i], params, gs_sets[i],
                                          cs_rows[i]),
      "dispatch": lambda i: (xs[i], params.router, cs[i]),
  }
  calls = {name: (lambda i, f=fns[name], a=a: f(*a(i))) for name, a in args.items()
           if methods is None or name in methods}
  if with_xla:
    fns_xla = build(spec, "xla")
    calls["moe_xla"] = lambda i: fns_xla["moe"](xs[i], params, cs[i])
  times = {}
  for name, call in calls.items():
    t0 = time.perf_counter()
    try:
      jax.block_until_ready(call(0))
      compile_s = time.perf_counter() - t0
      ms, iters = time_fn(call, n_sets=n_sets, target_s=target, reps=reps)
      times[name] = ms
      rec[f"{name}_ms"] = round(ms, 4)
      rec[f"{name}_compile_s"] = round(compile_s, 1)
      log(f"[{spec.name}] {name:9s} {ms:9.3f} ms  ({iters} iters/batch,"
          f" compile {compile_s:.1f}s)")
    except Exception as e:
      rec[f"{name}_error"] = repr(e)[:300]
      log(f"[{spec.name}] {name}: ERROR {repr(e)[:300]}")
  try:  # the fused gate/up variant against jmoe's path: gradients agree
    if "experts_fused_gate_up" not in calls:
      raise KeyError("experts_fused_gate_up not timed (--methods)")
    ga = jax.tree.leaves(calls["experts_fused_gate_up"](0))
    gb = jax.tree.leaves(calls["experts"](0))
    rec["experts_fused_vs_unfused_grad_rel_err"] = max(
        float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel())
              / jnp.maximum(jnp.linalg.norm(b.astype(jnp.float32).ravel()), 1e-30))
        for a, b in zip(ga, gb))
  except Exception as e:  # noqa: BLE001
    rec["experts_fused_vs_unfused_error"] = repr(e)[:300]
  if "dense" in times:
    for name in ("moe", "moe_xla", "experts", "experts_fused_gate_up",
                 "dense_grad_only"):
      if name in times:
        rec[f"{name}_vs_dense"] = round(times["dense"] / times[name], 4)
        rec[f"{name}_tflops"] = round(spec.flops / times[name] / 1e9, 2)
    rec["dense_tflops"] = round(spec.flops / times["dense"] / 1e9, 2)
  if "moe" in times and "dispatch" in times:
    rec["dispatch_share"] = round(times["dispatch"] / times["moe"], 4)
  rec["dispatch_buffers"] = dispatch_bytes(spec, xs[0], params, fns["config"])
  if "dense" in calls:
    rec["dense_xla_flops_vs_active"] = dense_flops_ratio(spec, fns["dense"],
                                                         args["dense"](0))
  if profile:
    rec["profile"] = {name: profile_call(fns[name], args[name], n_sets)
                      for name in ("moe", "experts", "dispatch", "dense")
                      if name in calls}
  return rec


def _stage(op_name: str | None) -> str:
  """The layer stage (a `moe.SCOPES` name, else "other") and direction of an op."""
  if not op_name:
    return "unattributed"
  parts = [q for q in re.split(r"[/()]", op_name) if q]
  stage = next((q for q in parts if q in moe_lib.SCOPES), "other")
  return f"{stage} {'bwd' if 'transpose' in parts else 'fwd'}"


def profile_call(fn, args, n_sets: int, iters: int = 3, top: int = 25) -> dict:
  """Device time of `fn(*args(i))` by layer stage and by kernel (jax.profiler)."""
  compiled = fn.lower(*args(0)).compile()
  names = profiling.hlo_op_names(compiled.as_text())

  def run():
    r = None
    for i in range(iters):
      r = compiled(*args(i % n_sets))
    jax.block_until_ready(r)

  run()
  events = profiling.trace_events(run, names)
  by_stage, by_kernel = collections.Counter(), {}
  for name, op_name, dur, _ in events:
    by_stage[_stage(op_name)] += dur
    k = by_kernel.setdefault(name, [0, 0, op_name])
    k[0] += dur
    k[1] += 1
  ms = lambda ns: round(ns / iters / 1e6, 4)
  idle = profiling.idle_gaps(events)
  # The last iteration's kernels of >= 20 us in launch order: per-product times.
  t_end = max(t + d for _, _, d, t in events)
  span = idle["span_ns"] / iters
  timeline = [dict(kernel=n[:60], us=round(d / 1e3, 1), op_name=(o or "")[-120:])
              for n, o, d, t in events if t >= t_end - 1.05 * span and d >= 20_000]
  return dict(
      span_ms=round(idle["span_ns"] / iters / 1e6, 4),
      idle_ms=round(idle["idle_ns"] / iters / 1e6, 4),
      top_gaps=[dict(us=round(g / 1e3, 1), after=a[:50], before=b[:50],
                     before_op=(o or "")[-100:]) for g, a, b, o in idle["gaps"][:12]],
      timeline_last_iteration=timeline,
      device_busy_ms=ms(sum(by_stage.values())),
      by_stage={k: ms(v) for k, v in by_stage.most_common()},
      top_kernels=[dict(kernel=n[:120], ms=ms(v[0]), calls=v[1] / iters,
                        op_name=(v[2] or "")[:240])
                   for n, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]])


HEADER = (f"{'case':8s} {'dense ms':>9s} {'moe ms':>9s} {'vs dense':>8s}"
          f" {'experts':>8s} {'dispatch':>9s} {'share':>6s} {'buf/ideal':>9s}"
          f" {'xla vs':>7s} {'rel_err':>8s}")


def fmt(r):
  g = lambda k, f="{:.3f}": (f.format(r[k]) if k in r else "-")
  return (f"{r['case']:8s} {g('dense_ms'):>9s} {g('moe_ms'):>9s}"
          f" {g('moe_vs_dense', '{:.2f}'):>8s} {g('experts_vs_dense', '{:.2f}'):>8s}"
          f" {g('dispatch_ms'):>9s} {g('dispatch_share', '{:.1%}'):>6s}"
          f" {r['dispatch_buffers'].get('vs_ideal', '-')!s:>9s}"
          f" {g('moe_xla_vs_dense', '{:.2f}'):>7s} {r['rel_err']:8.1e}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None)
  p.add_argument("--cases", nargs="*", default=None)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--xla", action="store_true",
                 help="also time moe_ffn with lax.ragged_dot (slow on GPU)")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="a tiny case through the Pallas interpreter (a test of this"
                 " script, not a measurement)")
  p.add_argument("--cpu", action="store_true",
                 help="the CPU cases on the default CPU backend (no GPU needed)")
  p.add_argument("--profile", action="store_true",
                 help="also trace moe, experts, dispatch and dense with jax.profiler:"
                 " device time by layer stage (router, dispatch, experts, combine;"
                 " fwd/bwd) and the top kernels. Turns XLA's command buffers off"
                 " for the whole run (so the timings are without them too)")
  p.add_argument("--methods", nargs="*", default=None,
                 help="time only these (dense, dense_grad_only, moe, experts,"
                 " experts_fused_gate_up, dispatch; default all)")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.profile:
    profiling.disable_command_buffers()
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not (args.cpu_smoke or args.cpu):
    log("no GPU: use --cpu (CPU cases) or --cpu-smoke")
    return 2
  table = SMOKE if args.cpu_smoke else CPU_CASES if args.cpu else CASES
  names = args.cases or list(table)
  meta = dict(device=f"{dev.platform}:{dev.device_kind}", jax_version=jax.__version__,
              jaxlib_version=jaxlib.__version__, python=sys.version.split()[0],
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              argv=sys.argv[1:] if argv is None else list(argv))
  log(json.dumps(meta))
  records = []
  for name in names:
    records.append(run_case(table[name], quick=args.quick,
                            with_xla=args.xla or args.cpu_smoke,
                            smoke=args.cpu_smoke, profile=args.profile,
                            methods=args.methods))
    write_json(args.out, meta, records, t_start)
  log("\n" + HEADER)
  for r in records:
    log(fmt(r))
  for r in records:
    for name, prof in r.get("profile", {}).items():
      log(f"\n[{r['case']}] {name}: device busy {prof['device_busy_ms']:.3f} ms of a"
          f" {prof['span_ms']:.3f} ms span per call (idle {prof['idle_ms']:.3f})")
      for stage, v in prof["by_stage"].items():
        log(f"  {stage:<22} {v:9.3f} ms")
      for k in prof["top_kernels"][:15]:
        log(f"  {k['ms']:8.3f} ms x{k['calls']:<4g} {k['kernel'][:50]:<50}"
            f" {k['op_name'][-90:]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
