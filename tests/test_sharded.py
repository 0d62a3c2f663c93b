"""The single-device layer jits with inputs sharded over 8 (fake CPU) devices.

This is plain GSPMD over a data axis: XLA partitions the same program. The
expert-parallel layer with explicit all-to-all exchanges is `jmoe.parallel`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jmoe
from tests.utils import assert_rel, assert_tree_rel

D, F, E = 16, 32, 8


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_layer_jits_with_sharded_tokens(axis_type):
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  params = jmoe.init_params(jax.random.key(0), D, F, E, shared_d_ff=16, shared_gate=True)
  x = jax.random.normal(jax.random.key(1), (8, 12, D))
  config = jmoe.MoEConfig(capacity_factor=1.5)
  y_ref, aux_ref = jax.jit(jmoe.moe_ffn, static_argnums=2)(x, params, config)
  g_ref = jax.jit(jax.grad(lambda x, p: jnp.sum(jmoe.moe_ffn(x, p, config)[0] ** 2),
                           argnums=(0, 1)))(x, params)

  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    y, aux = jax.jit(jmoe.moe_ffn, static_argnums=2)(xs, ps, config)
    g = jax.jit(jax.grad(lambda x, p: jnp.sum(jmoe.moe_ffn(x, p, config)[0] ** 2),
                         argnums=(0, 1)))(xs, ps)
  assert len(y.sharding.device_set) == 8
  assert_rel(np.asarray(y), y_ref, jnp.float32, "sharded output")
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert),
                                np.asarray(aux_ref.tokens_per_expert))
  assert_rel(aux.balance_loss, aux_ref.balance_loss, jnp.float32, "sharded balance")
  assert_tree_rel(jax.tree.map(np.asarray, g), g_ref, jnp.float32, "sharded grads ")


def test_an_embedding_runs_on_explicit_axes_with_the_tokens_sharding():
  """nnx.Embed on batch-sharded tokens of an Explicit mesh needs `out_sharding`
  (the README's recipe and MoETransformerLM pass the tokens' own sharding)."""
  from flax import nnx
  tokens = jnp.arange(8 * 3, dtype=jnp.int32).reshape(8, 3) % 5
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  ts = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  embed = nnx.Embed(5, 4, rngs=nnx.Rngs(0))
  with jax.set_mesh(mesh):
    with pytest.raises(Exception, match="out_sharding"):
      jax.jit(lambda t: embed(t))(ts)
    y = jax.jit(lambda t: embed(t, out_sharding=jax.typeof(t).sharding))(ts)
  assert y.sharding.spec[0] == "data"
  np.testing.assert_array_equal(np.asarray(y), np.asarray(embed(tokens)))
