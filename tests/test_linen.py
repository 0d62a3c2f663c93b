"""Tests of the flax.linen wrapper (jmoe.linen.MoE): a thin shell over moe_ffn."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmoe
import jmoe.linen as jlinen
import jmoe.nn

D, F, E = 16, 16, 4


class Model(nn.Module):
  """Dense -> MoE -> Dense."""

  config: jmoe.MoEConfig = jmoe.MoEConfig()

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D, name="dense_in")(x)
    h, aux = jlinen.MoE(F, E, config=self.config, shared_d_ff=F,
                        shared_gate=True, router_bias=True, name="moe")(h)
    return nn.Dense(4, name="dense_out")(h), aux


def test_linen_moe_matches_moe_ffn_and_has_logical_axes():
  moe = jlinen.MoE(F, E, shared_d_ff=F, shared_gate=True, router_bias=True)
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  variables = jax.jit(moe.init)(jax.random.key(1), x)
  assert set(variables) == {"params", jlinen.EXPERT_BIAS}
  assert set(variables["params"]) == {"router", "w_gate", "w_up", "w_down",
                                      "shared", "shared_gate"}
  # A non-zero router bias, so the comparison covers it.
  bias = jnp.array([0.2, -0.1, 0.0, 0.05])
  variables = {**variables, jlinen.EXPERT_BIAS: {
      "router_bias": nn.LogicallyPartitioned(bias, ("expert",))}}
  params = jlinen.moe_params(variables)
  assert params.shared is not None and params.shared.w_gate is not None
  np.testing.assert_array_equal(np.asarray(params.router_bias), np.asarray(bias))

  (y, aux), (y_ref, aux_ref) = jax.jit(lambda v, x: (
      moe.apply(v, x), jmoe.moe_ffn(x, jlinen.moe_params(v), moe.config)))(
          variables, x)
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(aux_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  P = jax.sharding.PartitionSpec
  specs = nn.get_partition_spec(variables)
  assert specs["params"]["router"] == P("embed", "expert")
  assert specs["params"]["w_up"] == P("expert", "embed", "mlp")
  assert specs["params"]["w_down"] == P("expert", "mlp", "embed")
  assert specs["params"]["shared"]["w_down"] == P("mlp", "embed")
  assert specs["params"]["shared_gate"] == P("embed", None)
  assert specs[jlinen.EXPERT_BIAS]["router_bias"] == P("expert")
  mesh = jax.make_mesh((2, 4), ("ep", "tp"))
  shardings = nn.logical_to_mesh_sharding(specs, mesh, (("expert", "ep"),
                                                        ("mlp", "tp")))
  assert shardings["params"]["w_up"].spec == P("ep", None, "tp")

  with pytest.raises(ValueError, match="shared_gate"):
    jlinen.MoE(F, E, shared_gate=True).init(jax.random.key(1), x)


def test_linen_model_trains_with_optax():
  model = Model()
  x = jax.random.normal(jax.random.key(0), (8, D))
  target = jax.random.normal(jax.random.key(1), (8, 4))
  variables = jax.jit(model.init)(jax.random.key(2), x)
  params, bias = variables["params"], variables[jlinen.EXPERT_BIAS]
  assert set(params) == {"dense_in", "moe", "dense_out"}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      y, aux = model.apply({"params": params, jlinen.EXPERT_BIAS: bias}, x)
      return jnp.mean((y - target) ** 2) + 0.01 * aux.balance_loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  new_params, opt_state, loss0 = step(params, opt_state)
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a),
                                                         np.asarray(b)),
                         nn.unbox(params), nn.unbox(new_params))
  assert all(jax.tree.leaves(changed))
  losses = [float(loss0)]
  params = new_params
  for _ in range(9):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  # Boxes (logical names) survive the optimizer update.
  spec = nn.get_partition_spec(params)["moe"]["w_gate"]
  assert spec == jax.sharding.PartitionSpec("expert", "embed", "mlp")


def test_linen_moe_passes_mask_and_deterministic():
  config = jmoe.MoEConfig(capacity_factor=0.5, eval_capacity_factor=None)
  moe = jlinen.MoE(F, E, config=config)
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  mask = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
  variables = moe.init(jax.random.key(1), x)
  outs, refs = jax.jit(lambda v, x: (
      (moe.apply(v, x, mask=mask), moe.apply(v, x, deterministic=True)),
      (jmoe.moe_ffn(x, jlinen.moe_params(v), config, mask=mask),
       jmoe.moe_ffn(x, jlinen.moe_params(v), config, deterministic=True))))(
          variables, x)
  for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(refs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(outs[1][1].dropped_fraction) == 0.0


class TwoMoE(nn.Module):
  """Layers named so that call order, path order and creation differ."""

  config: jmoe.MoEConfig = jmoe.MoEConfig()

  @nn.compact
  def __call__(self, x, deterministic=None):
    y1, a1 = jlinen.MoE(F, E, config=self.config, router_bias=True,
                        name="zeta")(x, deterministic=deterministic)
    y2, a2 = jlinen.MoE(F, E, config=self.config, name="alpha")(x + y1)
    y3, a3 = jlinen.MoE(F, E, config=self.config, router_bias=True,
                        name="beta")(x + y2)
    return y3, (a2, a3, a1)  # path order: alpha, beta, zeta


def test_linen_aux_is_sown_collected_and_steps_biases():
  model = TwoMoE()
  x = jax.random.normal(jax.random.key(1), (6, D))
  variables = model.init(jax.random.key(0), x)
  assert "intermediates" not in variables  # init keeps only params / biases
  (y, returned), state = jax.jit(
      lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  aux = jmoe.nn.collect_aux(state["intermediates"])
  for got, want in zip(jax.tree.leaves(aux),
                       jax.tree.leaves(jax.tree.map(lambda *a: jnp.stack(a),
                                                    *returned))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert_total = jmoe.nn.total_aux_loss(aux, balance_coef=1.0, z_coef=0.0)
  np.testing.assert_allclose(assert_total, sum(a.balance_loss for a in returned),
                             rtol=1e-6)
  # The biases (beta, zeta) stepped from their own layers' loads, by path.
  new = jlinen.update_router_biases(variables, state, rate=0.1)
  for name, a in (("beta", returned[1]), ("zeta", returned[2])):
    before = nn.meta.unbox(variables)[jlinen.EXPERT_BIAS][name]["router_bias"]
    want = jmoe.update_expert_bias(before, a.tokens_per_expert, rate=0.1)
    np.testing.assert_array_equal(new[jlinen.EXPERT_BIAS][name]["router_bias"], want)
  assert new["params"] is not variables["params"]
  # A stacked record needs one row per bias.
  stacked = jax.tree.map(lambda *a: jnp.stack(a), returned[1], returned[2])
  again = jlinen.update_router_biases(variables, stacked, rate=0.1)
  np.testing.assert_array_equal(again[jlinen.EXPERT_BIAS]["zeta"]["router_bias"],
                                new[jlinen.EXPERT_BIAS]["zeta"]["router_bias"])
  with pytest.raises(ValueError, match=r"one row per MoE layer.*\[2, experts\]"):
    jlinen.update_router_biases(variables, aux)  # 3 rows, 2 biases
  with pytest.raises(ValueError, match="no router bias"):
    jlinen.update_router_biases({"params": variables["params"]}, aux)


def test_linen_router_noise_stream_and_deterministic():
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2, noise_std=1.0))
  moe = jlinen.MoE(F, E, config=config)
  x = jax.random.normal(jax.random.key(1), (16, D))
  variables = moe.init(jax.random.key(0), x)
  params = jlinen.moe_params(variables)
  load = lambda key: jmoe.moe_ffn(x, params, config, key=key)[1].tokens_per_expert
  run = jax.jit(lambda k, det: moe.apply(variables, x, rngs={"router": k},
                                         deterministic=det)[1].tokens_per_expert,
                static_argnums=1)
  key = jax.random.key(3)
  assert not np.array_equal(run(key, False), load(None))  # noise drawn
  np.testing.assert_array_equal(run(key, True), load(None))  # switched off
  det = jlinen.MoE(F, E, config=config, deterministic=True)
  np.testing.assert_array_equal(
      det.apply(variables, x, rngs={"router": key})[1].tokens_per_expert, load(None))
