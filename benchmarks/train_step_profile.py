"""Where a training step's time goes: examples/train_lm.py's jitted step, profiled.

    python -m benchmarks.train_step_profile --preset h200 --out $OUT/profile.json
    python -m benchmarks.train_step_profile --preset h200 --dense --set d_model=2048

Builds the preset's model and optimizer exactly as `train_lm` does (its `init_state`
and `make_steps`, on a real batch of its data), compiles the step, times `--steps`
steps (median of per-step wall times after a warm-up, each blocked), then traces
`--trace-steps` more with `jax.profiler` and reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed).

Attribution: every device event (a GPU kernel; on CPU an HLO op of the host's XLA
thunks) names its HLO instruction; the compiled step's HLO gives that instruction's
`op_name` metadata, which holds the `jax.named_scope`s of jmoe's modules
("attention/qkv_proj", "attention/sdpa", "moe/router", "moe/dispatch",
"moe/experts", "moe/combine", "mlp", "embed", "lm_head") and train_lm's ("loss",
"optimizer"). The table is device busy time per scope, forward and backward
together (the backward's op_names carry the same scopes under `transpose(...)`),
as a fraction of the summed device time, plus the step's wall time and MFU against
the device's datasheet peak and against a dense matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import tempfile
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples"))
import lm_data  # noqa: E402
import train_lm  # noqa: E402

from benchmarks.profiling import (  # noqa: E402
    device_events, disable_command_buffers, hlo_op_names, idle_gaps, op_name_of)

# Scope -> table row, first match wins (most specific first).
CATEGORIES = (
    ("attention/sdpa", "attention core (sdpa)"),
    ("attention/qkv_proj", "attention qkv projection + rope + qk-norm"),
    ("attention/out_proj", "attention output projection"),
    ("attention", "attention norm + residual"),
    ("moe/router", "moe router (logits, top-k, aux)"),
    ("moe/dispatch", "moe dispatch (plan + permute)"),
    ("moe/experts", "moe expert FFNs (grouped matmuls + act)"),
    ("moe/combine", "moe combine (unpermute)"),
    ("moe/shared_expert", "moe shared expert"),
    ("moe", "moe norm + residual"),
    ("mlp", "dense FFN (+ norm, residual)"),
    ("embed", "embedding"),
    ("lm_head", "final norm + lm head"),
    ("loss", "loss"),
    ("optimizer", "optimizer (clip + AdamW)"),
)

def category(op_name: str | None) -> str:
  if not op_name:
    return "unattributed"
  # The scopes sit between "/"; layer scopes ("layer3") are dropped.
  parts = [p for p in re.split(r"[/()]", op_name)
           if p and not re.fullmatch(r"layer\d+", p)]
  path = "/".join(parts)
  for scope, label in CATEGORIES:
    if re.search(r"(^|/)" + re.escape(scope) + r"(/|$)", path):
      return label
  return "other (unscoped)"


def idle_by_kernel(events, names, top: int = 15) -> dict:
  """Device idle time in the trace (`idle_gaps`: the traced steps run back to
  back, unblocked), each gap charged to the kernel that follows it, so a
  launch-bound or host-synchronised stretch shows as the ops it stalls."""
  idle = idle_gaps([(n, op_name_of(n, h, names), d, t) for n, h, d, _, t in events])
  after = collections.defaultdict(lambda: [0, 0])
  for gap, _, name, op_name in idle["gaps"]:
    k = after[f"{category(op_name)} | {name}"]
    k[0] += gap
    k[1] += 1
  ranked = sorted(after.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(idle_ns=idle["idle_ns"], span_ns=idle["span_ns"],
              top=[(k, tuple(v)) for k, v in ranked])


def _parse_value(current, text: str):
  """A --set value in the type of the field's current value (a None field: an
  int, else a float, else the string)."""
  if current is None:
    for kind in (int, float):
      try:
        return kind(text)
      except ValueError:
        pass
    return text
  if isinstance(current, bool):
    return text.lower() in ("1", "true", "yes")
  return type(current)(text)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="h200", choices=sorted(train_lm.PRESETS))
  p.add_argument("--dense", action="store_true")
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                 help="override Config fields (ints, floats, strings)")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--trace-steps", type=int, default=3)
  p.add_argument("--trace-dir", help="keep the trace here (default: a temp dir)")
  p.add_argument("--top", type=int, default=25, help="kernels listed by time")
  p.add_argument("--out", help="results JSON")
  p.add_argument("--command-buffers", action="store_true",
                 help="keep XLA's CUDA-graph command buffers (default: off, so that"
                 " each kernel in the trace names its HLO op)")
  args = p.parse_args(argv)
  if not args.command_buffers:
    # Must precede the backend's start (the first jax.devices()).
    disable_command_buffers()

  cfg = train_lm.PRESETS[args.preset]
  fields = {f.name: f for f in dataclasses.fields(train_lm.Config)}
  over = {}
  for item in args.set:
    if "=" not in item:
      raise SystemExit(f"--set {item}: expected FIELD=VALUE")
    k, v = item.split("=", 1)
    if k not in fields:
      raise SystemExit(f"--set: unknown Config field {k!r}")
    try:
      over[k] = _parse_value(getattr(cfg, k), v)
    except ValueError:
      raise SystemExit(f"--set {item}: expected a {type(getattr(cfg, k)).__name__}"
                       f" for {k!r}") from None
  cfg = dataclasses.replace(cfg, dense=args.dense, **over)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.device_kind}; {args.preset}"
        f" {'dense' if cfg.dense else 'moe'} {over}", flush=True)

  corpus = lm_data.load_corpus(cfg.seq_len, sources=tuple(cfg.sources),
                               max_bytes=min(cfg.max_bytes, 32 << 20),
                               heldout_frac=cfg.heldout_frac)
  n = len(corpus.train)
  batch_at = lambda step: train_lm.place_batch(
      cfg, corpus.train[lm_data.batch_indices(cfg.seed, step, cfg.batch_size, n)])
  graphdef, state = train_lm.init_state(cfg)
  counts = train_lm.param_counts(cfg, state["params"])
  fpt = train_lm.flops_per_token(cfg, counts["params_active"])
  train_step, _ = train_lm.make_steps(cfg, graphdef)
  total = jnp.asarray(cfg.steps, jnp.int32)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch_at(0), total).compile()
  compile_s = time.perf_counter() - t0
  names = hlo_op_names(compiled.as_text())

  step = 0
  for _ in range(3):  # warm-up
    state, m = compiled(state, batch_at(step), total)
    step += 1
  jax.block_until_ready(state)
  times = []
  for _ in range(args.steps):
    b = batch_at(step)
    jax.block_until_ready(b)
    t = time.perf_counter()
    state, m = compiled(state, b, total)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
    step += 1
  step_s = float(np.median(times))
  tokens = cfg.batch_size * cfg.seq_len

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jmoe_profile_")
  batches = [batch_at(step + i) for i in range(args.trace_steps)]
  jax.block_until_ready(batches)
  with jax.profiler.trace(trace_dir):
    for b in batches:
      state, m = compiled(state, b, total)
    jax.block_until_ready(state)
  events, lines = device_events(trace_dir)

  by_cat = collections.defaultdict(float)
  by_kernel = collections.defaultdict(lambda: [0.0, 0, None])
  unattributed = collections.Counter()
  for name, hlo_op, dur, _, _ in events:
    op_name = op_name_of(name, hlo_op, names)
    cat = category(op_name)
    if cat == "unattributed":
      unattributed[f"{name} | hlo_op={hlo_op}"] += dur
    by_cat[cat] += dur
    k = by_kernel[(name, cat)]
    k[0] += dur
    k[1] += 1
    k[2] = k[2] or op_name
  busy = sum(by_cat.values())
  per = args.trace_steps
  gaps = idle_by_kernel(events, names)
  table = sorted(((c, v / per / 1e6, v / busy) for c, v in by_cat.items()),
                 key=lambda r: -r[1])
  kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]

  peak = train_lm.peak_tflops(dev.device_kind, jnp.dtype(cfg.dtype))
  mm = train_lm.matmul_tflops(jnp.dtype(cfg.dtype))
  rate = tokens * fpt / step_s / 1e12
  mem = train_lm._device_memory()
  out = dict(
      benchmark="train_step_profile", preset=args.preset, overrides=over,
      mode="dense" if cfg.dense else "moe", device=dev.device_kind,
      jax=jax.__version__, jaxlib=jaxlib.__version__,
      date=datetime.date.today().isoformat(),
      config=train_lm._config_dict(cfg), **counts, flops_per_token=fpt,
      tokens_per_step=tokens, compile_s=round(compile_s, 1),
      step_ms_median=round(step_s * 1e3, 2),
      step_ms_all=[round(t * 1e3, 2) for t in times],
      tokens_per_s=round(tokens / step_s),
      model_tflops=round(rate, 1),
      mfu_vs_peak=round(rate / peak, 4) if peak else None, peak_tflops=peak,
      matmul=mm, mfu_vs_measured_matmul=round(rate / mm["tflops"], 4),
      device_busy_ms_per_step=round(busy / per / 1e6, 2),
      device_busy_fraction_of_step=round(busy / per / 1e9 / step_s, 3),
      memory_gb=mem, trace_lines=lines,
      trace_span_ms_per_step=round(gaps["span_ns"] / per / 1e6, 2),
      idle_ms_per_step=round(gaps["idle_ns"] / per / 1e6, 2),
      idle_top=[dict(before=k[:160], ms_per_step=round(v / per / 1e6, 3),
                     gaps_per_step=c / per)
                for k, (v, c) in gaps["top"]],
      unattributed_top=[dict(event=k[:160], ms_per_step=round(v / per / 1e6, 3))
                        for k, v in unattributed.most_common(10)],
      time_by_scope=[dict(scope=c, ms_per_step=round(ms, 3),
                          fraction=round(f, 4)) for c, ms, f in table],
      top_kernels=[dict(kernel=n[:120], scope=c, ms_per_step=round(v[0] / per / 1e6, 3),
                        calls_per_step=v[1] / per, op_name=(v[2] or "")[:200])
                   for (n, c), v in kernels])
  print(f"step {out['step_ms_median']} ms, {out['tokens_per_s']} tokens/s,"
        f" MFU {out['mfu_vs_peak']} of peak, {out['mfu_vs_measured_matmul']} of"
        f" the measured matmul ({mm['tflops']:.0f} TFLOP/s); device busy"
        f" {out['device_busy_fraction_of_step']:.0%} of the step; traced steps:"
        f" {out['trace_span_ms_per_step']} ms span, {out['idle_ms_per_step']} ms idle")
  for r in out["idle_top"][:8]:
    print(f"  idle {r['ms_per_step']:8.3f} ms x{r['gaps_per_step']:<6g} before {r['before']}")
  for r in out["time_by_scope"]:
    print(f"  {r['scope']:<46} {r['ms_per_step']:9.3f} ms  {r['fraction']:6.1%}")
  print("top kernels:")
  for r in out["top_kernels"][:12]:
    print(f"  {r['ms_per_step']:8.3f} ms x{r['calls_per_step']:<5g} {r['scope'][:28]:<28}"
          f" {r['kernel'][:70]}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
