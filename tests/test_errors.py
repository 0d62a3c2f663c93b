"""Bad input gets a ValueError/TypeError that names the argument."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jmoe

D, F, E = 8, 16, 4
PARAMS = jmoe.init_params(jax.random.key(0), D, F, E)
X = jnp.ones((6, D))


def raises(exc, match):
  return pytest.raises(exc, match=match)


def test_top_k_out_of_range():
  with raises(ValueError, "top_k"):
    jmoe.route(jnp.ones((4, E)), top_k=E + 1)
  with raises(ValueError, "top_k"):
    jmoe.RouterConfig(top_k=0)
  with raises(ValueError, "top_k"):
    jmoe.RouterConfig(top_k=-2)
  with raises(ValueError, "top_k"):
    jmoe.moe_ffn(X, PARAMS, jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=5)))


def test_d_model_mismatch():
  with raises(ValueError, "d_model"):
    jmoe.moe_ffn(jnp.ones((6, D + 1)), PARAMS)
  bad = dataclasses.replace(PARAMS, w_down=jnp.ones((E, F, D + 1)))
  with raises(ValueError, "w_down"):
    jmoe.moe_ffn(X, bad)
  with raises(ValueError, "w_gate"):
    jmoe.moe_ffn(X, dataclasses.replace(PARAMS, w_gate=None))


def test_wrong_ranks():
  with raises(ValueError, "`x`"):
    jmoe.moe_ffn(jnp.ones((D,)), PARAMS)
  with raises(ValueError, "logits"):
    jmoe.route(jnp.ones((2, 3, E)), top_k=1)
  with raises(ValueError, "rhs"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((D, F)), jnp.array([4]))
  with raises(ValueError, "lhs"):
    jmoe.gmm(jnp.ones((4, 2, D)), jnp.ones((1, D, F)), jnp.array([4]))
  with raises(ValueError, "experts"):
    jmoe.permute(X, jnp.zeros((6,), jnp.int32), num_experts=E)


def test_integer_inputs():
  with raises(TypeError, "`x`"):
    jmoe.moe_ffn(jnp.ones((6, D), jnp.int32), PARAMS)
  with raises(TypeError, "lhs"):
    jmoe.gmm(jnp.ones((4, D), jnp.int32), jnp.ones((1, D, F)), jnp.array([4]))
  with raises(TypeError, "group_sizes"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((1, D, F)), jnp.array([4.0]))
  with raises(TypeError, "experts"):
    jmoe.permute(X, jnp.zeros((6, 2)), num_experts=E)


def test_group_sizes_wrong_length():
  with raises(ValueError, "group_sizes"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((3, D, F)), jnp.array([2, 2]))
  with raises(ValueError, "contracting"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((2, D + 1, F)), jnp.array([2, 2]))


def test_capacity_factor_must_be_positive():
  with raises(ValueError, "capacity_factor"):
    jmoe.MoEConfig(capacity_factor=0.0)
  with raises(ValueError, "capacity_factor"):
    jmoe.MoEConfig(capacity_factor=-1.0)
  with raises(ValueError, "capacity"):
    jmoe.permute(X, jnp.zeros((6, 1), jnp.int32), num_experts=E, capacity=0)


def test_unknown_names():
  with raises(ValueError, "activation"):
    jmoe.MoEConfig(activation="swish")
  with raises(ValueError, "score"):
    jmoe.RouterConfig(score="softplus")
  with raises(ValueError, "order"):
    jmoe.RouterConfig(order="whatever")
  with raises(ValueError, "kind"):
    jmoe.RouterConfig(kind="hash")
  with raises(ValueError, "implementation"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((1, D, F)), jnp.array([4]), implementation="cuda")


def test_grouping_errors():
  with raises(ValueError, "num_groups"):
    jmoe.route(jnp.ones((4, 6)), top_k=1, num_groups=4, top_groups=1)
  with raises(ValueError, "top_groups"):
    jmoe.RouterConfig(num_groups=2, top_groups=3)
  with raises(ValueError, "bias"):
    jmoe.route(jnp.ones((4, E)), top_k=1, bias=jnp.zeros(E + 1))


def test_update_expert_bias_shape():
  with raises(ValueError, "tokens_per_expert"):
    jmoe.update_expert_bias(jnp.zeros(4), jnp.ones((2, 4)))


def test_upcycle_errors():
  ffn = jmoe.FFNParams(w_up=jnp.ones((D, F)), w_down=jnp.ones((F, D)))
  with raises(ValueError, "pass `key`"):
    jmoe.upcycle_ffn(ffn, E)
  with raises(ValueError, "num_experts"):
    jmoe.upcycle_ffn(ffn, 0, key=jax.random.key(0))
  with raises(ValueError, r"`w_down` must have shape \(16, 8\)"):
    jmoe.upcycle_ffn({"w_up": jnp.ones((D, F)), "w_down": jnp.ones((D, F))}, E,
                     key=jax.random.key(0))
  with raises(ValueError, "unknown weight"):
    jmoe.upcycle_ffn({"w_up": jnp.ones((D, F)), "w_out": 1}, E)
  with raises(ValueError, r"`router` must have shape"):
    jmoe.upcycle_ffn(ffn, E, router=jnp.ones((E, D)))
  with raises(TypeError, "`ffn`"):
    jmoe.upcycle_ffn((jnp.ones((D, F)), jnp.ones((F, D))), E)
