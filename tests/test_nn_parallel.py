"""Whole NNX models with expert parallelism on jax.make_mesh's default mesh.

`jax.make_mesh((2, 4), ("data", "expert"))` has Explicit axes (sharding in types):
every array carries its sharding, and a token-embedding lookup on sharded tokens
must say its output sharding. Oracle: the same model, same seed, same steps on one
device. jmoe's `MoETransformerLM` and a user-written NNX model (nnx.Embed,
jmoe.nn.MoE, nnx.Linear) train two optax steps with their parameters sharded by
their logical names; losses, router biases and parameters must match one device
at float32 tolerance. Aux is collected the Flax way (nnx.capture ->
collect_aux -> total_aux_loss, update_router_biases).
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmoe
import jmoe.nn as jnn
from jmoe import parallel
from tests.utils import assert_rel, assert_tree_rel

V, D, H, F, E = 32, 16, 4, 16, 8
RULES = (("expert", "expert"),)  # logical name -> mesh axis; the rest replicated
TOKENS = [jax.random.randint(jax.random.key(i), (8, 9), 0, V) for i in range(2)]


@functools.cache
def mesh():
  return jax.make_mesh((2, 4), ("data", "expert"))  # Explicit axes (the default)


def shard_model(model):
  """The README recipe: every parameter placed by its logical axis names."""
  nnx.update(model, jax.device_put(
      nnx.state(model), jnn.logical_shardings(model, mesh(), RULES)))
  return model


class UserLM(nnx.Module):
  """An NNX model as a user writes it, with jmoe's MoE as its FFN."""

  def __init__(self, parallel_=None, *, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.moe = jnn.MoE(D, F, E, parallel=parallel_, router_bias=True,
                       shared_d_ff=8, rngs=rngs)
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    # The one change sharded tokens need: the lookup's output sharding.
    x = self.embed(tokens, out_sharding=jax.typeof(tokens).sharding)
    y, _ = self.moe(x)
    return self.head(x + y)


def lm(ep):
  return jnn.MoETransformerLM(V, D, 1, H, F, num_experts=E, router_bias=True,
                              shared_d_ff=8, parallel=ep, rngs=nnx.Rngs(0))


@nnx.jit
def train_step(model, optimizer, tokens):
  def loss_fn(model):
    out, inter = nnx.capture(model, nnx.Intermediate)(tokens[:, :-1])
    logits = out[0] if isinstance(out, tuple) else out
    aux = jnn.collect_aux(inter)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce.mean() + jnn.total_aux_loss(aux), aux
  (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  jnn.update_router_biases(model, aux, rate=0.01)
  return loss


@functools.cache
def trained(kind, dispatcher):
  """(model, losses) after two steps; dispatcher None: one device."""
  ep = None
  if dispatcher is not None:
    ep = parallel.ExpertParallel(mesh(), dispatcher=dispatcher)
  model = lm(ep) if kind == "lm" else UserLM(ep, rngs=nnx.Rngs(0))
  if ep is not None:
    shard_model(model)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  put = (lambda t: parallel.shard_inputs(t, ep)) if ep else (lambda t: t)
  losses = [float(train_step(model, optimizer, put(t))) for t in TOKENS]
  return model, np.array(losses)


def _check_matches_one_device(kind, dispatcher):
  model, losses = trained(kind, dispatcher)
  ref, ref_losses = trained(kind, None)
  assert_rel(losses, ref_losses, jnp.float32, f"{kind} losses")
  assert_tree_rel(nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param),
                  jnp.float32, f"{kind} params after 2 steps")
  bias, ref_bias = (jax.tree.leaves(nnx.state(m, jnn.ExpertBias))
                    for m in (model, ref))
  np.testing.assert_array_equal(np.asarray(bias[0]), np.asarray(ref_bias[0]))
  assert np.any(np.asarray(ref_bias[0]) != 0)  # the biases did move
  (_, moe), = jnn.moe_layers(model)
  for w in (moe.w_gate[...], moe.w_up[...], moe.w_down[...]):
    assert w.sharding.spec[0] == "expert"
    assert w.addressable_shards[0].data.shape[0] == E // 4
  assert moe.router.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "expert")


def test_jmoe_lm_on_the_default_mesh_matches_one_device():
  _check_matches_one_device("lm", "all_gather")


def test_user_nnx_model_on_the_default_mesh_matches_one_device():
  _check_matches_one_device("user", "dropless")


def test_small_batch_on_the_mesh():
  """A batch of 2 on 8 devices (decoding-sized): split over "data" only, the
  tokens replicated over the expert axis; logits equal one device's."""
  model, _ = trained("lm", "all_gather")
  ref, _ = trained("lm", None)
  ep = model.blocks[0].mlp.parallel
  tokens = TOKENS[0][:2, :3]
  sharded = parallel.shard_inputs(tokens, ep)
  assert sharded.sharding.spec == jax.sharding.PartitionSpec("data")
  forward = nnx.jit(lambda m, t: m(t))
  logits, aux = forward(model, sharded)
  ref_logits, ref_aux = forward(ref, tokens)
  assert_rel(logits, ref_logits, jnp.float32, "B=2 logits")
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert),
                                np.asarray(ref_aux.tokens_per_expert))


def test_moe_without_expert_parallelism_on_the_mesh():
  """Data parallel only: jmoe.nn.MoE on tokens sharded over an Explicit mesh (no
  jax.set_mesh needed) equals one device and keeps x's sharding."""
  moe = jnn.MoE(D, F, E, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 3, D))
  ref, ref_aux = moe(x)
  nnx.update(moe, jax.device_put(nnx.state(moe), jnn.logical_shardings(
      moe, mesh(), ())))
  xs = jax.device_put(x, jax.sharding.NamedSharding(
      mesh(), jax.sharding.PartitionSpec(("data", "expert"))))
  y, aux = nnx.jit(lambda m, x: m(x))(moe, xs)
  assert y.sharding.is_equivalent_to(xs.sharding, y.ndim)
  assert_rel(y, ref, jnp.float32, "y")
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert),
                                np.asarray(ref_aux.tokens_per_expert))
