"""How far bf16 training on a mesh drifts from one device: expert parallel vs dense.

The same small LM (bf16 activations, float32 parameters, as examples/train_lm.py)
trains the same optax steps on one device and on a (2, 4) ("data", "expert") mesh of
8 fake CPU devices. Printed per run: the largest |loss difference| over the steps
and the step-0 logits' largest difference (forward only). Runs:

  dense       num_experts=0, batch over all 8 devices (data parallel)
  moe-dp      the MoE LM without ExpertParallel, batch over all 8 devices (GSPMD)
  ep-<disp>   the MoE LM with ExpertParallel(dispatcher=<disp>)

Run: python -m benchmarks.ep_bf16_drift [--steps 6] [--json out.json]
"""

import argparse
import json

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jmoe  # noqa: E402
import jmoe.nn as jnn  # noqa: E402
from jmoe import parallel  # noqa: E402

V, D, L, H, F, E, K = 256, 64, 2, 4, 64, 8, 2
B, S = 16, 32


def build(kind, ep, dtype):
  moe = kind != "dense"
  return jnn.MoETransformerLM(
      V, D, L, H, F, num_experts=E if moe else 0, dense_d_ff=F * K,
      moe_config=jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=K)),
      parallel=ep, dtype=dtype, rngs=nnx.Rngs(0))


@nnx.jit
def step(model, opt, tokens):
  def loss_fn(model):
    logits, aux = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce.mean() + jnn.total_aux_loss(aux)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def run(kind, mesh, dispatcher, batches, dtype):
  ep = (parallel.ExpertParallel(mesh, dispatcher=dispatcher)
        if dispatcher else None)
  model = build(kind, ep, dtype)
  put = lambda t: t
  if mesh is not None:
    nnx.update(model, jax.device_put(nnx.state(model), jnn.logical_shardings(
        model, mesh, (("expert", "expert"),) if ep else ())))
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "expert")))
    put = lambda t: jax.device_put(t, sharding)
  logits0 = nnx.jit(lambda m, t: m(t)[0])(model, put(batches[0][:, :-1]))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  losses = np.array([float(step(model, opt, put(t))) for t in batches])
  return np.asarray(logits0, np.float32), losses


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--runs", default="dense,moe-dp,ep-dropless,ep-all_gather")
  p.add_argument("--json", default=None)
  args = p.parse_args()
  dtype = jnp.dtype(args.dtype)
  mesh = jax.make_mesh((2, 4), ("data", "expert"))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, V, (B, S + 1)), jnp.int32)
             for _ in range(args.steps)]
  out = {"dtype": args.dtype, "steps": args.steps, "jax": jax.__version__,
         "runs": {}}
  single = {}
  for name in args.runs.split(","):
    kind = "dense" if name == "dense" else "moe"
    dispatcher = name[3:] if name.startswith("ep-") else None
    if kind not in single:
      single[kind] = run(kind, None, None, batches, dtype)
    logits1, losses1 = single[kind]
    logits, losses = run(kind, mesh, dispatcher, batches, dtype)
    r = {"max_loss_diff": float(np.max(np.abs(losses - losses1))),
         "loss_diff_per_step": np.abs(losses - losses1).tolist(),
         "logits0_max_diff": float(np.max(np.abs(logits - logits1))),
         "losses_1dev": losses1.tolist()}
    out["runs"][name] = r
    print(f"{name:14s} max|dloss| {r['max_loss_diff']:.2e}  step-0 max|dlogit|"
          f" {r['logits0_max_diff']:.2e}  per step"
          f" {np.round(r['loss_diff_per_step'], 5).tolist()}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
