"""Expert parallelism: train a small MoE language model with its experts sharded.

The same `jmoe.nn.MoETransformerLM` is built twice from one seed: once with
`parallel=ExpertParallel(mesh)` (experts split over the mesh's "expert" axis, the
batch over every device) and once plain, on a single device. Both take the same
jitted optax steps; the script prints the losses and the largest difference of the
losses and of the trained parameters.

Run:
  python examples/expert_parallel.py                  # 8 fake CPU devices
  python examples/expert_parallel.py --devices 4 --dispatcher all_gather
  python examples/expert_parallel.py --gpu            # every local GPU
"""

import argparse


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpu", action="store_true", help="run on the real GPUs")
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices")
  p.add_argument("--expert-axis", type=int, default=None,
                 help="devices on the expert axis (default: half of them, >= 1)")
  p.add_argument("--dispatcher", default="dropless",
                 choices=("dropless", "all_to_all", "all_gather"))
  p.add_argument("--steps", type=int, default=5)
  return p.parse_args()


ARGS = parse_args()

import jax  # noqa: E402  (the device count must be set before JAX starts)

if not ARGS.gpu:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", ARGS.devices)
jax.config.update("jax_default_matmul_precision", "highest")  # a fair comparison

import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jmoe  # noqa: E402
from jmoe import nn as jnn  # noqa: E402
from jmoe import parallel  # noqa: E402

VOCAB, D_MODEL, LAYERS, HEADS, D_FF, EXPERTS = 256, 64, 2, 4, 128, 8
BATCH, SEQ = 16, 32


def build(ep):
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2),
                          capacity_factor=1.5 if ep and ep.dispatcher == "all_to_all"
                          else None)
  model = jnn.MoETransformerLM(VOCAB, D_MODEL, LAYERS, HEADS, D_FF,
                               num_experts=EXPERTS, moe_config=config, shared_d_ff=32,
                               parallel=ep, rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)


def loss_fn(model, tokens):
  logits, aux = model(tokens[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return ce.mean() + 0.01 * aux.balance_loss.sum(), aux


@nnx.jit
def train_step(model, optimizer, tokens):
  (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens)
  optimizer.update(model, grads)
  return loss, aux.dropped_fraction.mean()


def train(model, optimizer, batches):
  losses = []
  for tokens in batches:
    loss, dropped = train_step(model, optimizer, tokens)
    losses.append(float(loss))
  return np.array(losses), float(dropped)


def main():
  n = jax.device_count()
  ep_size = ARGS.expert_axis or max(1, n // 2)
  if n % ep_size or EXPERTS % ep_size:
    raise SystemExit(f"--expert-axis {ep_size} must divide the {n} devices and"
                     f" the {EXPERTS} experts")
  # jax's default mesh: Explicit axes (sharding in types). The LM's embedding
  # lookup takes the tokens' sharding; the MoE layers pin their own layouts.
  mesh = jax.make_mesh((n // ep_size, ep_size), ("data", "expert"))
  ep = parallel.ExpertParallel(mesh, dispatcher=ARGS.dispatcher)
  print(f"{n} x {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)};"
        f" {EXPERTS} experts -> {EXPERTS // ep_size} per device; dispatcher"
        f" {ep.dispatcher!r}; batch {BATCH} x {SEQ} tokens over"
        f" {ep.batch_axes(BATCH)}")

  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)
             for _ in range(ARGS.steps)]

  # Expert parallel: every parameter placed by its logical axis names (experts
  # over "expert", everything else replicated); the batch over the axes that
  # fit it (every device here).
  model, optimizer = build(ep)
  rules = (("expert", ep.expert_axis),)
  nnx.update(model, jax.device_put(nnx.state(model),
                                   jnn.logical_shardings(model, mesh, rules)))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  sharded = [parallel.shard_inputs(b, ep) for b in batches]
  t0 = time.time()
  losses_ep, dropped = train(model, optimizer, sharded)
  t_ep = time.time() - t0
  w_up = model.blocks[0].mlp.w_up[...]
  print(f"expert parallel: losses {np.round(losses_ep, 4).tolist()}"
        f" ({t_ep:.1f} s with compilation); w_up {w_up.shape} as"
        f" {w_up.addressable_shards[0].data.shape} per device")
  if ep.dispatcher == "all_to_all":
    print(f"  (per-shard capacity mode: {dropped:.1%} of pairs dropped in the"
          " last step, so it differs from the dropless single-device run)")

  # The same steps on one device.
  ref_model, ref_optimizer = build(None)
  device0 = jax.devices()[0]
  nnx.update(ref_model, jax.device_put(nnx.state(ref_model), device0))
  ref_optimizer = nnx.Optimizer(ref_model, optax.adam(3e-3), wrt=nnx.Param)
  losses_1, _ = train(ref_model, ref_optimizer,
                      [jax.device_put(b, device0) for b in batches])
  print(f"single device:   losses {np.round(losses_1, 4).tolist()}")

  loss_diff = float(np.max(np.abs(losses_ep - losses_1)))
  params_ep = jax.tree.leaves(nnx.state(model, nnx.Param))
  params_1 = jax.tree.leaves(nnx.state(ref_model, nnx.Param))
  param_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(params_ep, params_1))
  print(f"max |loss difference| {loss_diff:.2e}; max |parameter difference|"
        f" after {ARGS.steps} steps {param_diff:.2e}")
  if ep.dispatcher != "all_to_all":
    assert loss_diff < 1e-4 and param_diff < 1e-3, "expert parallel run diverged"


if __name__ == "__main__":
  main()
