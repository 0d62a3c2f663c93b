"""Train a byte-level MoE language model on Python source, and its dense twin.

    python examples/train_lm.py                         # cpu-tiny: ~2-3 min on 2 cores
    python examples/train_lm.py --dense                 # its dense twin
    python examples/train_lm.py --run-dir /tmp/r --resume   # continue a killed run
    python examples/train_lm.py --run-dir /tmp/r --resume --steps 1200  # train on
    python examples/train_lm.py --preset h200 --compare --run-dir /tmp/h200 \\
        --out-json $OUT/h200.json                       # MoE vs dense on one H200

Presets are `Config` values in `PRESETS` (ci-smoke, cpu-tiny, h200); flags override
single fields. Each run writes to its run dir: metrics.jsonl, results.json, loss.png
(train and held-out bits per byte, with the held-out unigram entropy), experts.png
(share of tokens per expert and layer over training) and ckpt/ (orbax).

Data (examples/lm_data.py): the interpreter's own `.py` files as bytes (vocab 256),
a fixed held-out split by file hash, packed into windows of seq_len + 1 bytes. Nothing
is downloaded.

Model: `jmoe.nn.MoETransformerLM` of the run's `jmoe.nn.TransformerConfig`
(`Config.model_config`), bf16 activations, float32 parameters and router.
`--dense` swaps every MoE FFN for a dense FFN of width d_ff * top_k + shared_d_ff: the
same active parameters and FLOPs per token (up to the router's 2*D*E).

Objective (per step, summed over MoE layers as in Switch / ST-MoE):

    loss = CE_next_byte + 1e-2 * sum_l balance_loss_l + 1e-3 * sum_l z_loss_l

balance_loss is the Switch/GShard loss (1.0 when perfectly balanced), z_loss the
ST-MoE router z-loss. CE is reported in bits per byte (nats / ln 2).

Optimizer: AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices only), global-norm
clipping at 1.0, linear warm-up then cosine decay to 10% of the peak rate.

One jitted step does forward, loss, gradients, the optimizer update and the MoE
metrics (tokens per expert per layer, dropped fraction, balance and z losses). The
host reads metrics back only every `log_every` steps. Evaluation (held-out bits per
byte on a fixed subset of held-out windows) is jitted too.

Checkpoints (orbax): params, optimizer state, step, PRNG key and data position. The
data order is a pure function of (seed, step), so `--resume` continues a killed run
exactly (tests/test_train_lm.py checks bitwise equality). `--resume` without
`--steps` trains to the run's saved total; `--resume --steps N` trains on from the
checkpoint to a new total N (at least the checkpoint's step). The learning rate is
always the warm-up + cosine schedule of the current total, read at the current step:
after an extension the remaining steps follow the schedule of N, so a finished run
(at its floor of 10% of the peak rate) resumes at that schedule's higher rate for its
step, and decays to the floor again at step N. Besides the schedule's length, only
the loop options (log, eval and checkpoint intervals, time budget) and --gmm may
change on resumption; any other change of the model or optimisation is refused.

The run directory (default: a fresh /tmp/jmoe_train_lm/<preset>-<time>) is printed
at the start and the end. Mistakes in the command (a bad value, --resume with no
checkpoint or a different configuration, a fresh run into a used run directory, a
run dir or --out-json that cannot be written, windows longer than the data) end in
one line on stderr and exit code 2, not a traceback.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):

    6 * N_active + 12 * n_layers * n_heads * head_dim * seq_len

N_active: parameters touched per token, i.e. all but the embedding table, with each
MoE layer's expert weights counted top_k / num_experts (the router counted in full).
The attention term counts the full S x S score matrix (no causal halving), forward
and backward. MFU = tokens/s * FLOPs per token / ceiling, against two ceilings of the
device the run used: its datasheet dense peak for the run's dtype where `PEAK_TFLOPS`
knows the device (H100/H200 bf16: 989 TFLOP/s; none for CPUs, so no such MFU there),
and a dense matmul in the run's dtype measured in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings

# Let XLA take 90% of GPU memory (the default is 75%); a no-op on CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import lm_data  # noqa: E402

try:
  import jmoe  # noqa: E402
except ImportError:  # not installed: run from a checkout
  sys.path.insert(0, os.path.dirname(_HERE))
  import jmoe  # noqa: E402
import jmoe.nn as jnn  # noqa: E402
from jmoe import parallel as jpar  # noqa: E402

# Datasheet dense (no sparsity) bf16/f16 tensor-core peaks, TFLOP/s, by exact
# `device_kind`. Devices not listed (CPUs included) get no datasheet MFU, only the
# one against the matmul measured in the run.
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------
# Configuration: presets are values.
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Everything a run depends on. A preset is one value of this class."""

  # Model.
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None
  qk_norm: str | None = None      # None, "per_head" (Qwen3) or "full"
  d_ff: int = 256                 # each expert's hidden width
  num_experts: int = 8
  top_k: int = 2
  shared_d_ff: int = 0            # always-on shared expert width (0: none)
  first_dense: int = 0            # leading dense layers (DeepSeek style)
  capacity_factor: float | None = None  # None: dropless
  dense: bool = False             # the dense baseline at equal active FLOPs
  dtype: str = "bfloat16"         # activations; params and router stay float32
  gmm_implementation: str | None = None  # None: jmoe's default for the backend
  # Devices on the expert axis of a ("data", "expert") mesh over every local
  # device (experts split over it, the batch over all devices; the dense twin runs
  # data parallel on the same mesh). 0: one device, no mesh.
  expert_parallel: int = 0
  # Data.
  seq_len: int = 128
  batch_size: int = 32
  sources: tuple[str, ...] = ("stdlib",)
  max_bytes: int = 1 << 40
  heldout_frac: float = 0.05
  # Optimisation.
  steps: int = 600
  lr: float = 3e-3
  warmup_steps: int = 60
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  balance_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  # Loop.
  seed: int = 0
  log_every: int = 20
  eval_every: int = 100
  eval_batches: int = 8
  ckpt_every: int = 200           # 0: only a final checkpoint; < 0: none
  time_budget_s: float | None = None  # stop at the first log step past this

  @property
  def moe_config(self) -> jmoe.MoEConfig:
    return jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=self.top_k),
                          capacity_factor=self.capacity_factor,
                          gmm_implementation=self.gmm_implementation)

  @property
  def model_config(self) -> jnn.TransformerConfig:
    """The model of this run (its dense twin when `dense`): the run's knobs mapped
    onto the library's config, once."""
    return jnn.TransformerConfig(
        vocab_size=lm_data.VOCAB_SIZE, d_model=self.d_model,
        num_layers=self.num_layers, d_ff=self.d_ff,
        attention=jnn.AttentionConfig(num_heads=self.num_heads,
                                      num_kv_heads=self.num_kv_heads,
                                      qk_norm=self.qk_norm),
        num_experts=0 if self.dense else self.num_experts, moe_config=self.moe_config,
        first_dense=0 if self.dense else self.first_dense,
        dense_d_ff=self.dense_d_ff, shared_d_ff=0 if self.dense else self.shared_d_ff)

  @property
  def dense_d_ff(self) -> int:
    """Width of a dense FFN with an MoE layer's active FLOPs."""
    return self.d_ff * self.top_k + self.shared_d_ff


# Fields that may change between a run and its resumption (see the module
# docstring for `steps`), and those the compiled steps do not read: the loop
# fields, the seed and the data (`steps` reaches the step as an argument, so one
# compile serves any schedule length; the seed changes only the initial values).
_LOOP_FIELDS = ("steps", "log_every", "eval_every", "eval_batches", "ckpt_every",
                "time_budget_s")
_RESUMABLE_FIELDS = _LOOP_FIELDS + ("gmm_implementation",)
_UNCOMPILED_FIELDS = _LOOP_FIELDS + ("seed", "sources", "max_bytes", "heldout_frac")


class UsageError(ValueError):
  """A mistake in how a run was asked for; `main` prints it in one line, exit 2."""

PRESETS: dict[str, Config] = {
    # A few steps of a tiny model: tests (one compile of each model per process).
    "ci-smoke": Config(
        d_model=32, num_layers=2, num_heads=2, d_ff=32, num_experts=4, top_k=2,
        seq_len=32, batch_size=8, max_bytes=1 << 20, steps=8, lr=3e-3,
        warmup_steps=2, log_every=2, eval_every=4, eval_batches=2,
        ckpt_every=4),
    # 2 CPU cores: ~2 minutes per model, held-out <= 3.0 bits per byte. Narrow experts
    # (d_ff 128; the dense twin's FFN is 256 = 2 * d_model) and a small batch:
    # 600 steps x 2048 bytes = 1.2M bytes, 0.11 epochs of the stdlib. (The sizes
    # date from XLA's ragged_dot, ~num_experts times the routed FLOPs on CPU; the
    # "cpu" gmm backend, the CPU default since, costs about the routed FLOPs.)
    "cpu-tiny": Config(
        d_model=128, num_layers=4, num_heads=4, d_ff=128, num_experts=8,
        top_k=2, seq_len=128, batch_size=16, steps=600, lr=3e-3,
        warmup_steps=60, log_every=20, eval_every=100, eval_batches=16,
        ckpt_every=200, time_budget_s=540.0),
    # One H200, a small MoE of Mixtral's shape: d_model 2048, 16 heads of 128,
    # 8 layers, 8 experts of width 4096, top-2: 1.75B total / 538M active
    # parameters (the dense twin 538M, FFN 8192 wide), 32K tokens per step, 700
    # steps = 23M bytes (< 1 epoch of stdlib + its tests + site-packages, capped at
    # 160 MB). Measured on an H200 (benchmarks/train_step_profile.py): 218 ms per
    # MoE step, 197 ms dense, peak memory 49 / 30 GB; 3-4 minutes per run
    # including compile. The time budget is a safety stop (--compare then trains
    # the dense twin for the steps the MoE run made). No checkpoints (a 21 GB MoE
    # state takes tens of seconds to write): pass --ckpt-every N to have them.
    "h200": Config(
        d_model=2048, num_layers=8, num_heads=16, d_ff=4096, num_experts=8,
        top_k=2, qk_norm="per_head", seq_len=1024, batch_size=32,
        sources=("stdlib", "stdlib-tests", "site-packages"),
        max_bytes=160 << 20, steps=700, lr=4e-4, warmup_steps=70,
        log_every=50, eval_every=175, eval_batches=16, ckpt_every=-1,
        time_budget_s=240.0),
}


# ------------------------------------------------------------------------------
# Model, optimizer, FLOPs.
# ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def expert_parallel(cfg_ep: int) -> jpar.ExpertParallel | None:
  """The run's `ExpertParallel` (`Config.expert_parallel` devices on the expert
  axis of a ("data", "expert") mesh over every local device), or None."""
  if not cfg_ep:
    return None
  n = jax.device_count()
  if n % cfg_ep:
    raise UsageError(f"--expert-parallel {cfg_ep} must divide the {n} local"
                     " devices.")
  return jpar.ExpertParallel(jax.make_mesh((n // cfg_ep, cfg_ep),
                                           ("data", "expert")))


def build_model(cfg: Config, rngs: nnx.Rngs) -> jnn.MoETransformerLM:
  return jnn.MoETransformerLM(cfg.model_config, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.float32, rngs=rngs,
                              parallel=expert_parallel(cfg.expert_parallel))


def place_batch(cfg: Config, batch) -> jax.Array:
  """A batch of windows on the run's devices: split over the mesh's batch axes
  under expert parallelism, else on the default device."""
  ep = expert_parallel(cfg.expert_parallel)
  return jnp.asarray(batch) if ep is None else jpar.shard_inputs(
      jnp.asarray(batch), ep)


# The routed experts' weights (group "experts" of the parameter table) by name and
# rank; a dense layer's FFN has the same names at rank 2.
_EXPERT_WEIGHTS = {s.name: len(s.shape) for s in jmoe.MOE_PARAMS
                   if s.group == "experts"}


def _is_expert_weight(path: tuple, leaf) -> bool:
  names = [str(getattr(k, "key", k)) for k in path]
  return (_EXPERT_WEIGHTS.get(names[-1]) == np.ndim(leaf)
          and "shared" not in names)


def param_counts(cfg: Config, params) -> dict:
  """Total and active (per token, embedding excluded) parameter counts."""
  total = active = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    n = int(np.prod(np.shape(leaf)))
    total += n
    names = [str(getattr(k, "key", k)) for k in path]
    if "embedding" in names:
      continue
    active += n * cfg.top_k / cfg.num_experts if _is_expert_weight(path, leaf) else n
  return dict(params_total=total, params_active=int(active))


def flops_per_token(cfg: Config, params_active: int) -> float:
  """6 * N_active + 12 * L * H * hd * S (forward + backward, full attention)."""
  head_dim = cfg.model_config.attention_config.head_dim
  return 6.0 * params_active + 12.0 * cfg.num_layers * cfg.num_heads * head_dim * cfg.seq_len


def lr_schedule(cfg: Config, total_steps=None) -> optax.Schedule:
  """Linear warm-up from 0 to `cfg.lr` over `cfg.warmup_steps`, then cosine decay
  to `cfg.min_lr_ratio * cfg.lr` at `total_steps` (default `cfg.steps`; an int or
  a traced scalar), constant after. optax's warmup_cosine_decay_schedule, with a
  length that may be traced."""
  total = cfg.steps if total_steps is None else total_steps
  warmup, peak, floor = cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    decay_len = jnp.maximum(jnp.asarray(total, jnp.float32) - warmup, 1.0)
    t = jnp.clip((count - warmup) / decay_len, 0.0, 1.0)
    decayed = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
    return jnp.where(count < warmup, peak * count / max(warmup, 1), decayed)

  return schedule


def make_optimizer(cfg: Config, total_steps=None) -> optax.GradientTransformation:
  """AdamW on `lr_schedule(cfg, total_steps)`; the state's structure does not
  depend on the schedule's length."""
  decay_mask = lambda params: jax.tree.map(lambda p: np.ndim(p) >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=1e-8,
                  weight_decay=cfg.weight_decay, mask=decay_mask))


def init_state(cfg: Config):
  """(graphdef, train state). The state is a plain pytree of arrays:

  params (pure dict), opt_state, step (int32), data_position (int32: training
  windows consumed), key (uint32 PRNG key data).
  """
  model = build_model(cfg, nnx.Rngs(params=cfg.seed))
  ep = expert_parallel(cfg.expert_parallel)
  if ep is not None:  # experts over "expert", the rest replicated
    if cfg.num_experts % ep.num_expert_shards:
      raise UsageError(f"--expert-parallel {ep.num_expert_shards} must divide the"
                       f" {cfg.num_experts} experts.")
    nnx.update(model, jax.device_put(nnx.state(model), jnn.logical_shardings(
        model, ep.mesh, (("expert", ep.expert_axis),))))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  opt_state = make_optimizer(cfg).init(params)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  state = dict(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
               data_position=jnp.zeros((), jnp.int32),
               key=jax.random.key_data(key))
  return graphdef, state


# ------------------------------------------------------------------------------
# The jitted steps.
# ------------------------------------------------------------------------------


# optax >= 0.2.5 has optax.tree.norm; older ones optax.global_norm.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def make_steps(cfg: Config, graphdef):
  """(train_step, eval_step), both `jax.jit`ed; train_step donates the state.

  train_step(state, batch, total_steps): `total_steps` (int32 scalar) is the
  schedule's length, an argument so that one compile serves every length.
  """

  def forward(params, inputs, key):
    return nnx.merge(graphdef, params)(inputs, key=key)

  def loss_fn(params, inputs, targets, key):
    logits, aux = forward(params, inputs, key)
    with jax.named_scope("loss"):
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    if aux is None:  # dense baseline
      zero = jnp.zeros((), jnp.float32)
      moe = dict(balance=zero, z=zero, dropped=zero,
                 tokens_per_expert=jnp.zeros((0, cfg.num_experts), jnp.int32))
      return ce, dict(ce=ce, **moe)
    loss = (ce + cfg.balance_weight * aux.balance_loss.sum()
            + cfg.z_loss_weight * aux.z_loss.sum())
    return loss, dict(ce=ce, balance=aux.balance_loss.mean(), z=aux.z_loss.mean(),
                      dropped=aux.dropped_fraction.mean(),
                      tokens_per_expert=aux.tokens_per_expert)

  def train_step(state, batch, total_steps):
    tx = make_optimizer(cfg, total_steps)
    schedule = lr_schedule(cfg, total_steps)
    batch = batch.astype(jnp.int32)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    key, sub = jax.random.split(jax.random.wrap_key_data(state["key"]))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], inputs, targets, sub)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    metrics.update(loss=loss, grad_norm=_tree_norm(grads),
                   lr=schedule(state["step"]))
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1,
                     data_position=state["data_position"] + batch.shape[0],
                     key=jax.random.key_data(key))
    return new_state, metrics

  def eval_step(params, batch):
    batch = batch.astype(jnp.int32)
    logits, _ = forward(params, batch[:, :-1], None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    return ce.sum()

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


# ------------------------------------------------------------------------------
# Checkpoints, history, plots.
# ------------------------------------------------------------------------------


def _checkpoint_manager(run_dir: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(run_dir, "ckpt")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _save(mngr, state, cfg: Config, preset: str) -> None:
  import orbax.checkpoint as ocp
  step = int(state["step"])
  meta = dict(step=step, data_position=int(state["data_position"]),
              config=_config_dict(cfg), preset=preset)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def saved_meta(run_dir: str) -> dict | None:
  """The latest checkpoint's metadata in `run_dir` (step, data_position, config,
  preset), or None when it holds no checkpoint."""
  ckpt_dir = os.path.join(run_dir, "ckpt")
  if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    return None
  import orbax.checkpoint as ocp
  mngr = _checkpoint_manager(run_dir)
  try:
    step = mngr.latest_step()
    if step is None:
      return None
    return mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mngr.close()


def _check_resumable(meta: dict, cfg: Config, preset: str) -> None:
  """Raises UsageError unless `cfg` may continue the checkpoint of `meta`."""
  step = meta["step"]
  # A field the checkpoint predates counts as its default (a run saved before the
  # field existed ran with it).
  saved = {**_config_dict(Config()), **meta["config"]}
  now = _config_dict(cfg)
  diff = sorted(k for k in set(saved) | set(now)
                if k not in _RESUMABLE_FIELDS and saved.get(k) != now.get(k))
  if diff:
    was = meta.get("preset")
    hint = (f" (the run began as --preset {was})" if was and was != preset else "")
    changes = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
                        for k in diff)
    raise UsageError(
        f"--resume with a different configuration{hint}: {changes}. Only --steps"
        " and the loop options may change on resumption.")
  if cfg.steps < step:
    raise UsageError(
        f"--steps {cfg.steps} ends before the checkpoint at step {step}; pass"
        f" --steps {step} or more to resume.")


def _restore(mngr, state):
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return out["state"]


def _config_dict(cfg: Config) -> dict:
  d = dataclasses.asdict(cfg)
  d["sources"] = list(d["sources"])
  return d


def _read_history(path: str, upto: int) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["step"] <= upto]


def _write_history(path: str, records: list[dict]) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _fit_ylim(values) -> tuple[float, float]:
  """y-limits that hold every finite value, with 5% of the range as margin."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
  if not v.size:
    return 0.0, 1.0
  lo, hi = float(v.min()), float(v.max())
  pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1.0)
  bottom = max(lo - pad, 0.0) if lo >= 0 else lo - pad  # bits are never negative
  return bottom, hi + pad


def _bpb_values(history: list[dict]) -> list[float]:
  return [r[k] for r in history for k in ("train_bpb", "heldout_bpb") if k in r]


def plot_run(history: list[dict], run_dir: str, *, baseline: float,
             title: str) -> list[str]:
  """loss.png (train and held-out bits/byte) and, for MoE, experts.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  train = [r for r in history if "train_bpb" in r]
  evals = [r for r in history if "heldout_bpb" in r]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if train:
    ax.plot([r["step"] for r in train], [r["train_bpb"] for r in train],
            label="train (next-byte CE)")
  if evals:
    ax.plot([r["step"] for r in evals], [r["heldout_bpb"] for r in evals], "o-",
            label="held-out")
  ax.axhline(baseline, color="gray", ls="--",
             label=f"held-out unigram entropy {baseline:.2f}")
  ax.set(xlabel="step", ylabel="bits per byte", title=title,
         ylim=_fit_ylim(_bpb_values(history) + [baseline]))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(run_dir, "loss.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  shares = [r for r in train if r.get("expert_share")]
  if shares:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator
    steps = np.array([r["step"] for r in shares])
    share = np.array([r["expert_share"] for r in shares])  # [n, layers, E]
    layers, experts = share.shape[1], share.shape[2]
    cols = 1 if layers <= 4 else 2
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 1.5 * rows + 1.2),
                             squeeze=False, sharex=True, constrained_layout=True)
    uniform = 1.0 / experts
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0,
                        vmax=max(float(share.max()), 2.0 * uniform))
    for i in range(rows * cols):
      ax = axes[i % rows][i // rows]
      if i >= layers:
        ax.axis("off")
        continue
      mesh = ax.pcolormesh(steps, np.arange(experts), share[:, i, :].T,
                           shading="nearest", norm=norm, cmap="RdBu_r")
      ax.set_ylabel(f"layer {i}\nexpert", fontsize=8)
      ax.yaxis.set_major_locator(MaxNLocator(integer=True))
      ax.tick_params(labelsize=7)
    for c in range(cols):
      axes[rows - 1][c].set_xlabel("step")
    fig.colorbar(mesh, ax=axes, label="share of routed tokens")
    fig.suptitle(f"{title}: share of tokens per expert and MoE layer (white ="
                 f" uniform {uniform:.3f})", fontsize=10)
    paths.append(os.path.join(run_dir, "experts.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def plot_compare(runs: dict[str, list[dict]], path: str, *, baseline: float,
                 title: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (name, history), color in zip(runs.items(), ("C0", "C1", "C2")):
    train = [r for r in history if "train_bpb" in r]
    evals = [r for r in history if "heldout_bpb" in r]
    ax.plot([r["step"] for r in train], [r["train_bpb"] for r in train],
            color=color, alpha=0.5, label=f"{name} train")
    ax.plot([r["step"] for r in evals], [r["heldout_bpb"] for r in evals], "o-",
            color=color, label=f"{name} held-out")
  ax.axhline(baseline, color="gray", ls="--", label=f"unigram {baseline:.2f}")
  values = [v for history in runs.values() for v in _bpb_values(history)]
  ax.set(xlabel="step", ylabel="bits per byte", title=title,
         ylim=_fit_ylim(values + [baseline]))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------------
# Measurements.
# ------------------------------------------------------------------------------


def peak_tflops(device_kind: str, dtype) -> float | None:
  """The device's datasheet dense peak for `dtype` (TFLOP/s), or None if unknown
  (CPUs, unlisted GPUs, dtypes other than bf16 / f16)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return None
  return PEAK_TFLOPS.get(device_kind)


@functools.lru_cache(maxsize=4)
def matmul_tflops(dtype, n: int | None = None, reps: int = 10) -> dict:
  """Dense matmul rate measured here: n^3 in `dtype` (8192 on GPU, 1024 else),
  median of `reps` timed runs after a warm-up."""
  if n is None:
    n = 8192 if jax.devices()[0].platform == "gpu" else 1024
  ka, kb = jax.random.split(jax.random.key(123))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b))
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return dict(n=n, dtype=str(jnp.dtype(dtype)), median_s=med,
              tflops=2.0 * n ** 3 / med / 1e12)


def _memory_report(compiled) -> dict:
  """Argument and temporary bytes of a compiled step (GB), where XLA says."""
  try:
    ma = compiled.memory_analysis()
    return dict(step_arguments_gb=round(ma.argument_size_in_bytes / 2**30, 2),
                step_temporaries_gb=round(ma.temp_size_in_bytes / 2**30, 2))
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return {}


def _device_memory() -> dict:
  """Peak and limit of device memory (GB), on backends that report them (GPU)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    stats = {}
  return {k.replace("bytes", "gb"): round(stats[k] / 2**30, 2)
          for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


class _Bar:
  """tqdm on a terminal; elsewhere (logs, no tqdm) one line per postfix update."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str):
    self._bar = None
    self.enabled = enabled
    self.total = total
    self.desc = desc
    if enabled and sys.stderr.isatty():
      try:
        from tqdm import tqdm
        self._bar = tqdm(total=total, initial=initial, desc=desc,
                         dynamic_ncols=True, mininterval=0.5)
      except ImportError:
        pass
    self.n = initial

  def update(self, n: int = 1):
    self.n += n
    if self._bar is not None:
      self._bar.update(n)

  def postfix(self, text: str):
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=True)
    elif self.enabled:
      print(f"[{self.desc}] step {self.n}/{self.total}: {text}", flush=True)

  def write(self, text: str):
    if self._bar is not None:
      self._bar.write(text)
    elif self.enabled:
      print(text, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


# ------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """What `train` returns: the final train state, results and metric history."""

  state: dict
  results: dict
  history: list[dict]


def check_gmm(cfg: Config, implementation: str, *, tol: float = 5e-2) -> dict:
  """One MoE layer at the run's shapes, forward and gradients, through
  `implementation` and through XLA's ragged_dot: relative errors (bf16 inputs).

  Raises FloatingPointError when an error exceeds `tol` (a broken kernel is off
  by O(1); bf16 rounding by ~1e-2).
  """
  tokens = cfg.batch_size * cfg.seq_len
  kp, kx, kg = jax.random.split(jax.random.key(0), 3)
  params = jmoe.init_params(kp, cfg.d_model, cfg.d_ff, cfg.num_experts,
                            activation=cfg.moe_config.activation,
                            shared_d_ff=cfg.shared_d_ff)
  x = jax.random.normal(kx, (tokens, cfg.d_model), jnp.float32).astype(cfg.dtype)
  dy = jax.random.normal(kg, (tokens, cfg.d_model), jnp.float32).astype(cfg.dtype)

  def run(impl):
    config = dataclasses.replace(cfg.moe_config, gmm_implementation=impl)

    def f(params, x):
      y, _ = jmoe.moe_ffn(x, params, config)
      return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32)), y

    (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        params, x)
    return y, grads

  y, (gp, gx) = run(implementation)
  y_ref, (gp_ref, gx_ref) = run("xla")

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

  errors = dict(y=rel(y, y_ref), dx=rel(gx, gx_ref), dw_up=rel(gp.w_up, gp_ref.w_up),
                dw_down=rel(gp.w_down, gp_ref.w_down))
  errors = {k: float(f"{v:.3g}") for k, v in errors.items()}
  if not all(math.isfinite(v) and v <= tol for v in errors.values()):
    raise FloatingPointError(f"gmm {implementation!r} disagrees with XLA: {errors}")
  return errors


# Compiled steps of this process, by everything that shapes them: tests and
# resumed runs in one process compile once.
_COMPILED: dict = {}


def _total(cfg: Config) -> jax.Array:
  return jnp.asarray(cfg.steps, jnp.int32)


def _first_call_ok(cfg, graphdef, state, batch, eval_batch):
  """Compiles both steps (ahead of time) and runs each once on a copy of the state.

  Returns (train_step, eval_step, compile_s, first_run_s); compile_s is 0.0 when
  this process compiled them already. Raises on failure or a non-finite loss.
  """
  defaults = Config()
  key = (dataclasses.replace(cfg, **{f: getattr(defaults, f)
                                     for f in _UNCOMPILED_FIELDS}),
         batch.shape, eval_batch.shape)
  t0 = time.perf_counter()
  if key not in _COMPILED:
    train_step, eval_step = make_steps(cfg, graphdef)
    _COMPILED[key] = (train_step.lower(state, batch, _total(cfg)).compile(),
                      eval_step.lower(state["params"], eval_batch).compile())
  train_c, eval_c = _COMPILED[key]
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  _, metrics = train_c(jax.tree.map(jnp.copy, state), batch, _total(cfg))
  loss = float(metrics["loss"])
  float(eval_c(state["params"], eval_batch))
  first_run_s = time.perf_counter() - t0
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} on the first step")
  return train_c, eval_c, compile_s, first_run_s


def run_files(run_dir: str) -> list[str]:
  """The files of an earlier run in `run_dir` (checkpoints, metrics, results)."""
  found = []
  if os.path.isdir(os.path.join(run_dir, "ckpt")) and os.listdir(
      os.path.join(run_dir, "ckpt")):
    found.append("ckpt/")
  found += [n for n in ("metrics.jsonl", "results.json")
            if os.path.exists(os.path.join(run_dir, n))]
  return found


def train(cfg: Config, run_dir: str, *, resume: bool = False,
          stop_at: int | None = None, progress: bool = True, plots: bool = True,
          measure_matmul: bool = True, preset: str = "custom") -> Run:
  """Trains (or resumes) a run in `run_dir`; returns the final state and results.

  Args:
    cfg: the configuration; `cfg.steps` is the schedule's length.
    run_dir: checkpoints (ckpt/), metrics.jsonl, results.json and the plots.
    resume: continue from the latest checkpoint in run_dir (fresh if none).
      `cfg.steps` may differ from the checkpoint's (not be below its step): the
      run goes on to the new total on that total's schedule. Without `resume`, a
      run_dir holding an earlier run is refused (UsageError).
    stop_at: stop (with a checkpoint) after this global step instead of
      cfg.steps, as if killed there; the schedule still spans cfg.steps.
    progress: show the progress bar and messages.
    plots: write the PNG plots.
    measure_matmul: time a dense matmul for the MFU ceiling (cached per process).
    preset: a name recorded in the results.
  """
  t_start = time.perf_counter()
  say = print if progress else (lambda *a, **k: None)
  os.makedirs(run_dir, exist_ok=True)
  history_path = os.path.join(run_dir, "metrics.jsonl")
  mode = "dense" if cfg.dense else "moe"
  meta = saved_meta(run_dir) if resume else None
  if meta is not None:
    _check_resumable(meta, cfg, preset)
  elif not resume and (used := run_files(run_dir)):
    raise UsageError(
        f"{run_dir} holds an earlier run ({', '.join(used)}); pass --resume to"
        " continue it, or choose a fresh --run-dir (or delete that one).")

  # Data.
  try:
    corpus = lm_data.load_corpus(cfg.seq_len, sources=tuple(cfg.sources),
                                 max_bytes=cfg.max_bytes,
                                 heldout_frac=cfg.heldout_frac)
  except RuntimeError as e:  # no window of seq_len + 1 bytes in a split
    raise UsageError(f"{e} Each split needs a window of --seq-len + 1 ="
                     f" {cfg.seq_len + 1} bytes; try a smaller --seq-len.") from None
  n_train = len(corpus.train)
  eval_bs = min(cfg.batch_size, len(corpus.heldout))
  n_eval_batches = max(1, min(cfg.eval_batches, len(corpus.heldout) // eval_bs))
  eval_windows = corpus.heldout[lm_data.eval_indices(
      len(corpus.heldout), n_eval_batches * eval_bs)]
  eval_set = [place_batch(cfg, b) for b in eval_windows.reshape(
      n_eval_batches, eval_bs, cfg.seq_len + 1)]
  baseline = lm_data.unigram_bits_per_byte(eval_windows[:, 1:])
  info = corpus.info
  say(f"[{mode}] data: {info['train_files']} train / {info['heldout_files']}"
      f" held-out files, {info['train_bytes'] / 1e6:.1f} / "
      f"{info['heldout_bytes'] / 1e6:.2f} MB ({', '.join(info['sources'])}),"
      f" built in {info['build_s']:.1f}s; {n_train} training windows of"
      f" {cfg.seq_len + 1} bytes")
  say(f"[{mode}] held-out unigram baseline: {baseline:.3f} bits/byte"
      f" ({eval_windows[:, 1:].size} bytes evaluated)")

  def batch_at(step: int):
    idx = lm_data.batch_indices(cfg.seed, step, cfg.batch_size, n_train)
    return place_batch(cfg, corpus.train[idx])

  # Model and state.
  t0 = time.perf_counter()
  graphdef, state = init_state(cfg)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  counts = param_counts(cfg, state["params"])
  fpt = flops_per_token(cfg, counts["params_active"])
  say(f"[{mode}] params: {counts['params_total'] / 1e6:.2f}M total,"
      f" {counts['params_active'] / 1e6:.2f}M active (non-embedding);"
      f" {fpt / 1e6:.1f} MFLOP per token; initialised in {init_s:.1f}s")
  mngr = _checkpoint_manager(run_dir)
  history: list[dict] = []
  if meta is not None:
    state = _restore(mngr, state)
    history = _read_history(history_path, int(state["step"]))
    extended = (f"; --steps {cfg.steps} (the run had {meta['config']['steps']}):"
                f" the learning rate follows the schedule of {cfg.steps} steps"
                if cfg.steps != meta["config"]["steps"] else "")
    say(f"[{mode}] resumed at step {int(state['step'])} of {cfg.steps} (data"
        f" position {int(state['data_position'])}){extended}")
  _write_history(history_path, history)
  start = int(state["step"])
  end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)

  # Compile (ahead of time) and check the first step on a copy of the state. On a
  # GPU, if jmoe's default grouped matmul (Pallas-Triton) fails here, fall back to
  # XLA's ragged_dot (slower, same maths) and say so in the results.
  gmm_used = cfg.gmm_implementation or jmoe.default_gmm_implementation()
  gmm_check = None
  try:
    if not cfg.dense and gmm_used not in ("xla", "reference"):
      gmm_check = check_gmm(cfg, gmm_used)
      say(f"[{mode}] gmm check, {gmm_used!r} vs 'xla' on one MoE layer at the run's"
          f" shapes: relative error {gmm_check}")
    train_c, eval_c, compile_s, first_run_s = _first_call_ok(
        cfg, graphdef, state, batch_at(start), eval_set[0])
  except Exception as e:  # noqa: BLE001
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      raise UsageError(
          f"the {mode} step does not fit in device memory at batch"
          f" {cfg.batch_size} x {cfg.seq_len}; try --batch-size"
          f" {max(cfg.batch_size // 2, 1)}.") from e
    if (not cfg.dense and cfg.gmm_implementation is not None
        and gmm_used not in ("xla", "reference")):
      first_line = (str(e).strip().splitlines() or [""])[0][:300]
      raise UsageError(
          f"--gmm {gmm_used} failed on the first step on"
          f" {jax.devices()[0].platform} ({type(e).__name__}: {first_line});"
          " choose another --gmm (xla runs everywhere).") from e
    if cfg.dense or cfg.gmm_implementation is not None or gmm_used == "xla":
      raise
    say(f"[{mode}] WARNING: gmm implementation {gmm_used!r} failed on the first"
        f" step ({type(e).__name__}: {str(e)[:400]}); retrying with 'xla'.")
    cfg = dataclasses.replace(cfg, gmm_implementation="xla")
    gmm_used = "xla (fallback)"
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(params=0))), nnx.Param)
    train_c, eval_c, compile_s, first_run_s = _first_call_ok(
        cfg, graphdef, state, batch_at(start), eval_set[0])
  memory = _memory_report(train_c)
  say(f"[{mode}] compiled in {compile_s:.1f}s; first step + eval"
      f" {first_run_s:.2f}s; step memory (XLA): "
      + ", ".join(f"{k} {v}" for k, v in memory.items()))

  def evaluate(params) -> float:
    total = jnp.zeros((), jnp.float32)
    for b in eval_set:
      total = total + eval_c(params, b)
    return float(total) / (eval_windows[:, 1:].size * LN2)

  tokens_per_step = cfg.batch_size * cfg.seq_len
  total = _total(cfg)
  bar = _Bar(end, start, progress, f"{mode}")
  pending: list[dict] = []
  intervals: list[tuple[int, float]] = []  # (steps, seconds) between log syncs
  stopped_early = False
  last_train = None
  ckpt_s = 0.0
  if start == 0 and cfg.eval_every > 0 and end > 0:
    history.append(dict(step=0, heldout_bpb=evaluate(state["params"])))
  t_interval, steps_interval = time.perf_counter(), 0
  for step in range(start, end):
    state, metrics = train_c(state, batch_at(step), total)
    pending.append(metrics)
    steps_interval += 1
    bar.update()
    s = step + 1
    is_last = s == end
    if s % cfg.log_every and not is_last:
      continue
    # Log: the only host sync of the loop (besides evaluation and checkpoints).
    fetched = jax.device_get(pending)
    dt = time.perf_counter() - t_interval
    pending = []
    mean = lambda k: float(np.mean([m[k] for m in fetched]))
    tok_s = steps_interval * tokens_per_step / dt
    intervals.append((steps_interval, dt))
    record = dict(step=s, loss=mean("loss"), train_bpb=mean("ce") / LN2,
                  balance=mean("balance"), z=mean("z"), dropped=mean("dropped"),
                  grad_norm=mean("grad_norm"), lr=float(fetched[-1]["lr"]),
                  tokens_per_s=tok_s)
    if not cfg.dense:
      tpe = np.sum([m["tokens_per_expert"] for m in fetched], axis=0)
      record["expert_share"] = (tpe / tpe.sum(-1, keepdims=True)).round(5).tolist()
    last_train = record
    text = (f"loss {record['train_bpb']:.3f} b/B, {tok_s / 1e3:.1f}k tok/s")
    stopped_early = (not is_last and cfg.time_budget_s is not None
                     and time.perf_counter() - t_start > cfg.time_budget_s)
    if (cfg.eval_every > 0 and s % cfg.eval_every == 0) or is_last or stopped_early:
      record["heldout_bpb"] = evaluate(state["params"])
      text += f", held-out {record['heldout_bpb']:.3f} (unigram {baseline:.2f})"
    history.append(record)
    with open(history_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    bar.postfix(text)
    if stopped_early:
      bar.write(f"[{mode}] time budget {cfg.time_budget_s}s reached at step {s};"
                " stopping")
    if cfg.ckpt_every >= 0 and ((cfg.ckpt_every > 0 and s % cfg.ckpt_every == 0)
                                or is_last or stopped_early):
      t0 = time.perf_counter()
      _save(mngr, state, cfg, preset)  # async: blocks only for the device-to-host copy
      ckpt_s += time.perf_counter() - t0
    t_interval, steps_interval = time.perf_counter(), 0
    if stopped_early:
      break
  bar.close()
  t0 = time.perf_counter()
  mngr.wait_until_finished()
  mngr.close()
  ckpt_s += time.perf_counter() - t0
  _write_history(history_path, history)

  final_step = int(state["step"])
  evals = [r for r in history if "heldout_bpb" in r]
  heldout = evals[-1]["heldout_bpb"] if evals else evaluate(state["params"])
  title = f"{preset} {mode}"
  plot_paths = plot_run(history, run_dir, baseline=baseline, title=title) if plots else []
  # Throughput after warm-up: every log interval but the first (unless it is the
  # only one); evaluation and checkpoint time are outside the intervals.
  steady = intervals[1:] or intervals
  tokens_per_s = (sum(n for n, _ in steady) * tokens_per_step
                  / max(sum(t for _, t in steady), 1e-9) if steady else float("nan"))
  mm = matmul_tflops(jnp.dtype(cfg.dtype)) if measure_matmul else None
  ep = expert_parallel(cfg.expert_parallel)
  devices_used = 1 if ep is None else ep.mesh.size
  achieved = tokens_per_s * fpt / devices_used  # per device
  dev = jax.devices()[0]
  peak = peak_tflops(dev.device_kind, cfg.dtype)
  results = dict(
      device_kind=dev.device_kind, platform=dev.platform,
      num_devices=jax.device_count(), devices_used=devices_used,
      mesh=None if ep is None else dict(ep.mesh.shape), jax_version=jax.__version__,
      python=sys.version.split()[0],
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      preset=preset, mode=mode, gmm_implementation=gmm_used if not cfg.dense else None,
      config=_config_dict(cfg), data=info, steps=final_step,
      stopped_early=stopped_early, tokens_seen=final_step * tokens_per_step,
      epochs=final_step * cfg.batch_size / n_train,
      final_train_loss=last_train["loss"] if last_train else None,
      final_train_bits_per_byte=last_train["train_bpb"] if last_train else None,
      heldout_bits_per_byte=heldout, unigram_bits_per_byte=baseline,
      final_balance_loss=last_train["balance"] if last_train else None,
      final_z_loss=last_train["z"] if last_train else None,
      final_dropped_fraction=last_train["dropped"] if last_train else None,
      max_expert_share=(float(np.max(last_train["expert_share"]))
                        if last_train and "expert_share" in last_train else None),
      wall_clock_s=time.perf_counter() - t_start, compile_s=compile_s,
      init_s=init_s, gmm_check=gmm_check, checkpoint_s=ckpt_s, memory=dict(memory, **_device_memory()),
      first_step_s=first_run_s, tokens_per_s=tokens_per_s,
      tokens_per_s_per_device=tokens_per_s / devices_used,
      **counts, flops_per_token=fpt,
      flops_formula="6*params_active + 12*num_layers*num_heads*head_dim*seq_len",
      achieved_tflops=achieved / 1e12,  # per device
      peak_tflops=peak,
      mfu_vs_peak=achieved / (peak * 1e12) if peak else None,
      matmul=mm,
      mfu_vs_measured_matmul=achieved / (mm["tflops"] * 1e12) if mm else None,
      plots=plot_paths)
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  ceilings = []
  if peak:
    ceilings.append(f"{results['mfu_vs_peak'] * 100:.3g}% of the {dev.device_kind}'s"
                    f" {peak:.0f} TFLOP/s {cfg.dtype} peak")
  if mm:
    ceilings.append(f"{results['mfu_vs_measured_matmul'] * 100:.3g}% of the"
                    f" {mm['tflops']:.3g} TFLOP/s {mm['dtype']} matmul measured here")
  mfu = ("MFU " + ", ".join(ceilings) if ceilings else
         f"no MFU (no datasheet peak for {dev.device_kind}, no matmul measured)")
  say(f"[{mode}] done: step {final_step}, held-out {heldout:.3f} bits/byte"
      f" (unigram {baseline:.3f}), {tokens_per_s / 1e3:.1f}k tok/s"
      f" ({achieved / 1e12:.3g} TFLOP/s), {mfu}; wall"
      f" {results['wall_clock_s']:.0f}s (compile {compile_s:.0f}s)")
  return Run(state=state, results=results, history=history)


# ------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------


def _copy_plots(paths: list[str], out_json: str, prefix: str) -> list[str]:
  out_dir = os.path.dirname(os.path.abspath(out_json))
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(out_json))[0]
  copied = []
  for p in paths:
    dst = os.path.join(out_dir, f"{stem}_{prefix}{os.path.basename(p)}")
    shutil.copyfile(p, dst)
    copied.append(dst)
  return copied


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes raise UsageError (one line, exit 2) instead of
  printing the usage block."""

  def error(self, message):
    raise UsageError(f"{message} (see --help)")


def _int_at_least(lo: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < lo:
      raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
    return value
  parse.__name__ = f"integer >= {lo}"
  return parse


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
  return value


def _make_dir(path: str, what: str) -> None:
  """Creates directory `path` (if missing), or raises UsageError naming `what`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{what} {path} is a file, not a directory.")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f"{what} {path} cannot be created: {e.strerror}.") from None
  if not os.access(path, os.W_OK):
    raise UsageError(f"{what} {path} is not writable.")


def main(argv: list[str] | None = None) -> dict:
  """The command line; returns the results. Mistakes raise UsageError (the
  script prints it in one line and exits with code 2)."""
  p = _Parser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS),
                 help="default: cpu-tiny, or on --resume the run's own")
  p.add_argument("--steps", type=_int_at_least(1),
                 help="total steps, the schedule's length; on --resume default the"
                 " run's own, and a larger N trains on to N (the learning rate then"
                 " follows the schedule of N)")
  p.add_argument("--run-dir",
                 help="default: a new /tmp/jmoe_train_lm/<preset>[-dense|-compare]-<time>;"
                 " --resume needs the run's --run-dir")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --run-dir from its latest checkpoint")
  p.add_argument("--dense", action="store_true",
                 help="dense baseline: FFN width d_ff*top_k (+shared)")
  p.add_argument("--compare", action="store_true",
                 help="MoE then dense, same steps/tokens, in run-dir/{moe,dense}")
  p.add_argument("--eval-every", type=_int_at_least(0), help="0: only at the end")
  p.add_argument("--ckpt-every", type=int, help="0: only at the end; < 0: none")
  p.add_argument("--log-every", type=_int_at_least(1))
  p.add_argument("--seed", type=_int_at_least(0))
  p.add_argument("--batch-size", type=_int_at_least(1), help="sequences per step")
  p.add_argument("--seq-len", type=_int_at_least(1), help="bytes per sequence")
  p.add_argument("--lr", type=_positive_float, help="peak learning rate")
  p.add_argument("--time-budget", type=_positive_float,
                 help="seconds per run (safety stop)")
  p.add_argument("--expert-parallel", type=_int_at_least(1), metavar="N",
                 help="experts over N devices of a (data, expert) mesh of every"
                 " local device (the batch over all of them)")
  p.add_argument("--gmm", choices=jmoe.GMM_IMPLEMENTATIONS,
                 help="grouped-matmul backend (default: jmoe's for the device)")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--out-json", help="results JSON; plots are copied beside it")
  args = p.parse_args(argv)

  if args.dense and args.compare:
    raise UsageError("--dense and --compare exclude each other (--compare trains"
                     " both models).")
  # On --resume, the run's own configuration (preset, mode, length and any flags
  # it was started with) is the default.
  meta = None
  if args.resume:
    if not args.run_dir:
      raise UsageError("--resume needs --run-dir: the directory of the run to"
                       " continue.")
    if not os.path.isdir(args.run_dir):
      raise UsageError(f"--run-dir {args.run_dir} does not exist: no run to resume.")
    first = os.path.join(args.run_dir, "moe") if args.compare else args.run_dir
    meta = saved_meta(first)
    if meta is None:
      raise UsageError(
          f"{first} holds no checkpoint to resume from (no ckpt/ or an empty one);"
          " drop --resume to start a fresh run in a fresh --run-dir.")
  preset = args.preset or (meta or {}).get("preset") or "cpu-tiny"
  if preset not in PRESETS:  # a checkpoint of a preset this file no longer has
    raise UsageError(f"the run in {args.run_dir} used --preset {preset}, which this"
                     f" train_lm lacks; pass one of {', '.join(sorted(PRESETS))}.")
  overrides = dict(steps=args.steps, eval_every=args.eval_every,
                   ckpt_every=args.ckpt_every, log_every=args.log_every,
                   seed=args.seed, time_budget_s=args.time_budget,
                   batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                   gmm_implementation=args.gmm, expert_parallel=args.expert_parallel)
  base = PRESETS[preset]
  if meta is not None and preset == meta.get("preset", preset):
    # The saved fields over the preset's (a field the checkpoint lacks keeps the
    # preset's value).
    fields = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in meta["config"].items() if k in fields}
    if "sources" in saved:
      saved["sources"] = tuple(saved["sources"])
    base = dataclasses.replace(base, **saved)
  is_dense = args.dense or (base.dense and not args.compare)
  cfg = dataclasses.replace(base,
                            **{k: v for k, v in overrides.items() if v is not None})
  suffix = "-compare" if args.compare else "-dense" if is_dense else ""
  # A fresh default directory per run: running the command twice never collides
  # with an earlier run (which a fresh run refuses to reuse).
  stamp = time.strftime("%Y%m%d-%H%M%S")
  run_dir = args.run_dir or os.path.join("/tmp/jmoe_train_lm",
                                         f"{preset}{suffix}-{stamp}")
  _make_dir(run_dir, "--run-dir")
  if args.out_json:
    if os.path.isdir(args.out_json):
      raise UsageError(f"--out-json {args.out_json} is a directory; name a file in"
                       " it, e.g. results.json.")
    _make_dir(os.path.dirname(os.path.abspath(args.out_json)), "--out-json's folder")
  kw = dict(progress=not args.no_progress, plots=not args.no_plots, preset=preset)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
        f" ({jax.device_count()} device(s)); preset {preset}")
  print(f"run dir: {run_dir}", flush=True)
  try:
    out = _run(args, cfg, run_dir, is_dense, kw)
  except KeyboardInterrupt:
    print(f"\ntrain_lm: interrupted; {run_dir} keeps the checkpoints written so"
          f" far: continue with --run-dir {run_dir} --resume", file=sys.stderr)
    raise SystemExit(130) from None
  resume_hint = (f" (continue or extend: --run-dir {run_dir} --resume [--steps N])"
                 if cfg.ckpt_every >= 0 else "")
  print(f"run dir: {run_dir}{resume_hint}", flush=True)
  return out


def _run(args, cfg: Config, run_dir: str, is_dense: bool, kw: dict) -> dict:
  """The run(s) that `main` asked for; returns the results."""

  def write(out: dict) -> None:
    if args.out_json:
      os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
      with open(args.out_json, "w") as f:
        json.dump(out, f, indent=1)
      print(f"wrote {args.out_json}", flush=True)

  if not args.compare:
    run = train(dataclasses.replace(cfg, dense=is_dense), run_dir,
                resume=args.resume, **kw)
    out = run.results
    if args.out_json:
      out = dict(out, plots=_copy_plots(out["plots"], args.out_json, ""))
    write(out)
    return out

  moe = train(dataclasses.replace(cfg, dense=False), os.path.join(run_dir, "moe"),
              resume=args.resume, **kw)
  write(dict(moe=moe.results))  # partial results, in case the dense run fails
  moe.state = None  # free the MoE parameters and optimizer state on the device
  # Same schedule, same steps and tokens as the MoE run actually made (the time
  # budget stays as a safety stop; `same_steps` says if it cut the dense run).
  dense = train(dataclasses.replace(cfg, dense=True), os.path.join(run_dir, "dense"),
                resume=args.resume, stop_at=moe.results["steps"], **kw)
  r_m, r_d = moe.results, dense.results
  out = dict(moe=r_m, dense=r_d, comparison=dict(
      steps=r_m["steps"], tokens=r_m["tokens_seen"],
      same_steps=r_m["steps"] == r_d["steps"],
      flops_per_token_moe=r_m["flops_per_token"],
      flops_per_token_dense=r_d["flops_per_token"],
      params_total_moe=r_m["params_total"], params_total_dense=r_d["params_total"],
      heldout_bpb_moe=r_m["heldout_bits_per_byte"],
      heldout_bpb_dense=r_d["heldout_bits_per_byte"],
      heldout_bpb_gain=r_d["heldout_bits_per_byte"] - r_m["heldout_bits_per_byte"],
      unigram_bits_per_byte=r_m["unigram_bits_per_byte"],
      tokens_per_s_moe=r_m["tokens_per_s"], tokens_per_s_dense=r_d["tokens_per_s"],
      mfu_moe=r_m["mfu_vs_peak"], mfu_dense=r_d["mfu_vs_peak"],
      mfu_vs_measured_matmul_moe=r_m["mfu_vs_measured_matmul"],
      mfu_vs_measured_matmul_dense=r_d["mfu_vs_measured_matmul"]))
  print(json.dumps(out["comparison"], indent=1))
  if not args.no_plots:
    compare_png = plot_compare(
        {"MoE": moe.history, "dense": dense.history},
        os.path.join(run_dir, "compare.png"),
        baseline=r_m["unigram_bits_per_byte"],
        title=f"{kw['preset']}: MoE vs dense at equal active FLOPs")
    out["plots"] = [compare_png]
    if args.out_json:
      out["plots"] = (_copy_plots(r_m["plots"], args.out_json, "moe_")
                      + _copy_plots(r_d["plots"], args.out_json, "dense_")
                      + _copy_plots([compare_png], args.out_json, ""))
  write(out)
  return out


def _cli() -> int:
  try:
    main()
  except UsageError as e:
    print(f"train_lm: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
  sys.exit(_cli())
