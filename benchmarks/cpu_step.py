"""The cpu-tiny training step under CPU grouped-matmul settings, interleaved runs.

    python -m benchmarks.cpu_step --variants dense base buckets_1.25 --repeats 3 \\
        --base-tree /tmp/jmoe_base --out benchmarks/results/cpu_tiny_step_overflow_loops.json

Each run is `examples/train_lm.py --preset cpu-tiny` in its own process (no
evaluation, no checkpoints) with `jmoe._src.gmm.cpu.DEFAULT_CONFIG` set for the
variant; the runs go round-robin over the variants so that a drift of the machine
touches all alike. A run's figure is the median ms per step over the log intervals
past the first half of its steps (the routing has balanced by then; compile and
warm-up excluded). Variants:

  dense            the dense twin (`--dense`)
  loops            the tile loops only (bucket_factor None)
  buckets_F        buckets of F x the mean group size, the tile loops for the
                   rows past them (F a float, e.g. buckets_1.5)
  base             the default config of the checkout given by --base-tree (say a
                   `git worktree` of an earlier commit): before/after in one run

Each run also reports the median over the first half of its steps (`early`:
routing still far from balanced, so the buckets overflow most).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RUN = """
import sys
sys.path[:0] = [{root!r}, {examples!r}]
from jmoe._src.gmm import cpu
if {factor!r} not in ("dense", "base"):
  cpu.DEFAULT_CONFIG = cpu.CpuConfig(bucket_factor={factor!r})
import train_lm
train_lm.main({argv!r})
"""


def _factor(variant: str):
  if variant == "dense":
    return "dense"
  if variant == "loops":
    return None
  if variant == "base":
    return "base"
  if variant.startswith("buckets_"):
    return float(variant.split("_", 1)[1])
  raise SystemExit(f"unknown variant {variant!r}: dense, loops or buckets_F")


def run_one(variant: str, steps: int, log_every: int,
            base_tree: str | None = None) -> dict:
  factor = _factor(variant)
  root = ROOT
  if factor == "base":
    if not base_tree:
      raise SystemExit("variant 'base' needs --base-tree")
    root = os.path.abspath(base_tree)
  run_dir = tempfile.mkdtemp(prefix=f"jmoe_cpu_step_{variant}_")
  argv = ["--preset", "cpu-tiny", "--steps", str(steps), "--eval-every", "0",
          "--ckpt-every", "-1", "--log-every", str(log_every), "--run-dir", run_dir]
  if factor == "dense":
    argv.append("--dense")
  code = _RUN.format(root=root, examples=os.path.join(root, "examples"),
                     factor=factor, argv=argv)
  subprocess.run([sys.executable, "-c", code], check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  sub = os.path.join(run_dir, "dense" if factor == "dense" else "moe")
  path = next(os.path.join(d, "metrics.jsonl") for d in (run_dir, sub)
              if os.path.exists(os.path.join(d, "metrics.jsonl")))
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(os.path.dirname(path), "results.json")) as f:
    res = json.load(f)
  tokens = res["config"]["batch_size"] * res["config"]["seq_len"]
  ms = {r["step"]: tokens / r["tokens_per_s"] * 1e3 for r in rows
        if "tokens_per_s" in r}
  late = [v for s, v in ms.items() if s > steps // 2]
  early = [v for s, v in ms.items() if log_every < s <= steps // 2]  # no 1st interval
  return dict(variant=variant, steps=steps,
              ms_per_step=round(statistics.median(late), 2),
              ms_per_step_early=round(statistics.median(early), 2) if early else None,
              ms_per_interval={s: round(v, 2) for s, v in ms.items()})


def _git(tree: str, *args: str) -> str | None:
  """`git -C tree args...`'s output, None where git or the repository is absent."""
  try:
    return subprocess.run(["git", "-C", tree, *args], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", nargs="+", required=True)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--steps", type=int, default=240)
  p.add_argument("--log-every", type=int, default=20)
  p.add_argument("--base-tree", help="checkout the 'base' variant runs from")
  p.add_argument("--out")
  args = p.parse_args(argv)
  for v in args.variants:
    _factor(v)
  import jax  # noqa: PLC0415
  runs = []
  for rep in range(args.repeats):
    for v in args.variants:
      r = run_one(v, args.steps, args.log_every, args.base_tree)
      r.update(repeat=rep, date=datetime.datetime.now(datetime.timezone.utc)
               .isoformat(timespec="seconds"))
      runs.append(r)
      print(f"{v:>14s} #{rep}: {r['ms_per_step']:8.2f} ms/step (early"
            f" {r['ms_per_step_early']})", flush=True)
  def med(v, key):  # over the variant's runs; None where no run has the figure
    xs = [r[key] for r in runs if r["variant"] == v and r[key] is not None]
    return round(statistics.median(xs), 2) if xs else None

  ratio = lambda a, b: round(a / b, 4) if a is not None and b else None
  summary = {v: dict(ms_per_step=med(v, "ms_per_step"),
                     ms_per_step_early=med(v, "ms_per_step_early"))
             for v in args.variants}
  if "dense" in summary:
    d = summary["dense"]
    for v in args.variants:
      summary[v]["vs_dense"] = ratio(summary[v]["ms_per_step"], d["ms_per_step"])
      summary[v]["vs_dense_early"] = ratio(summary[v]["ms_per_step_early"],
                                           d["ms_per_step_early"])
  out = dict(benchmark="cpu-tiny training step, CPU gmm settings (benchmarks.cpu_step)",
             python=sys.version.split()[0], jax_version=jax.__version__,
             device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(),
             argv=sys.argv[1:] if argv is None else list(argv),
             base_tree_commit=(_git(args.base_tree, "rev-parse", "HEAD")
                               if args.base_tree else None),
             tree_commit=_git(ROOT, "rev-parse", "HEAD"),
             tree_dirty=bool(_git(ROOT, "status", "--porcelain",
                                  "--untracked-files=no")),
             summary=summary,
             runs=runs)
  for v, s in summary.items():
    print(f"{v:>14s}: {s}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
