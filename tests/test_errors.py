"""Bad input gets a ValueError/TypeError that names the argument."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
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
  with raises(TypeError, "lhs"):  # integer lhs is fine (as for lax); text is not
    jmoe.gmm(np.full((4, D), "a"), jnp.ones((1, D, F)), jnp.array([4]))
  with raises(TypeError, "group_sizes"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((1, D, F)), jnp.array([4.0]))
  with raises(TypeError, "experts"):
    jmoe.permute(X, jnp.zeros((6, 2)), num_experts=E)


def test_group_sizes_wrong_length():
  with raises(ValueError, "group_sizes"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((3, D, F)), jnp.array([2, 2]))
  with raises(ValueError, "contracting"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((2, D + 1, F)), jnp.array([2, 2]))


GMM_SHAPE_MISTAKES = {
    "rhs": ((4, D), (D, F), [4]),
    "lhs": ((4, 2, D), (1, D, F), [4]),
    "group_sizes": ((4, D), (3, D, F), [2, 2]),
    "contracting": ((4, D), (2, D + 1, F), [2, 2]),
}


@pytest.mark.parametrize("name", list(GMM_SHAPE_MISTAKES))
def test_gmm_shape_errors_are_type_errors_as_in_lax(name):
  """lax.ragged_dot raises TypeError for these; jmoe.gmm raises its clearer
  ShapeDtypeError, caught by `except TypeError` and `except ValueError` alike,
  eager and under jit."""
  lhs_shape, rhs_shape, sizes = GMM_SHAPE_MISTAKES[name]
  lhs, rhs, gs = jnp.ones(lhs_shape), jnp.ones(rhs_shape), jnp.array(sizes)
  with pytest.raises(TypeError):
    jax.lax.ragged_dot(lhs, rhs, gs)
  for f in (jmoe.gmm, jax.jit(jmoe.gmm)):
    with raises(jmoe.ShapeDtypeError, name) as e:
      f(lhs, rhs, gs)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
  with raises(TypeError, "group_sizes"):
    jmoe.gmm(jnp.ones((4, D)), jnp.ones((1, D, F)), jnp.array([4.0]))


def test_gmm_bad_precision_and_dtype_arguments():
  lhs, rhs, gs = jnp.ones((4, D)), jnp.ones((1, D, F)), jnp.array([4])
  with raises(ValueError, "precision"):
    jmoe.gmm(lhs, rhs, gs, precision="bogus")
  with raises(TypeError, "preferred_element_type"):
    jmoe.gmm(lhs, rhs, gs, preferred_element_type="not a dtype")
  with raises(TypeError, "group_offset"):
    jmoe.gmm(lhs, rhs, gs, group_offset=jnp.float32(0))
  with raises(ValueError, "group_offset"):
    jmoe.gmm(lhs, rhs, gs, group_offset=jnp.zeros(2, jnp.int32))


def test_tgmm_shape_errors():
  from jmoe._src.gmm import ops  # noqa: PLC0415  (internal: the weight gradient)
  lhs, dy, gs = jnp.ones((4, D)), jnp.ones((4, F)), jnp.array([4])
  for bad, name in (((jnp.ones((4, 1, D)), dy, gs), "lhs"),
                    ((lhs, jnp.ones((3, F)), gs), "dy"),
                    ((lhs, dy, jnp.array([2, 2])), "group_sizes"),
                    ((lhs, dy, jnp.array([4.0])), "group_sizes")):
    with raises(jmoe.ShapeDtypeError, name):
      ops.tgmm(*bad, num_local=1)


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


# ------------------------------------------------ empty, non-finite, zero-width

_moe_jit = jax.jit(jmoe.moe_ffn, static_argnums=2)


@pytest.mark.parametrize("config", [
    jmoe.MoEConfig(), jmoe.MoEConfig(capacity_factor=1.0),
    jmoe.MoEConfig(kind="expert_choice")], ids=["dropless", "capacity", "ec"])
def test_empty_batch_gives_zeros(config):
  """x [0, D] (and [2, 0, D]): an empty y and an aux of zeros, eager and jitted,
  with gradients."""
  params = jmoe.init_params(jax.random.key(0), D, F, E, shared_d_ff=8)
  for fn in (jmoe.moe_ffn, _moe_jit):
    for shape in ((0, D), (2, 0, D)):
      y, aux = fn(jnp.zeros(shape), params, config)
      assert y.shape == shape
      for v in jax.tree.leaves(aux):
        assert np.all(np.asarray(v) == 0), aux
  g = jax.jit(jax.grad(lambda p: jnp.sum(jmoe.moe_ffn(jnp.zeros((0, D)), p, config)[0])))(params)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g))


def test_empty_permute_route_and_losses():
  x = jnp.zeros((0, D))
  rows, plan = jmoe.permute(x, jnp.zeros((0, 2), jnp.int32), num_experts=E,
                            capacity=jmoe.expert_capacity(0, E, 2, 1.0))
  assert rows.shape == (0, D) and plan.group_sizes.tolist() == [0] * E
  assert jmoe.unpermute(rows, plan, jnp.zeros((0, 2))).shape == (0, D)
  r = jax.jit(lambda l: jmoe.route(l, top_k=2))(jnp.zeros((0, E)))
  assert r.experts.shape == (0, 2)
  assert float(jmoe.load_balancing_loss(r.probs, r.experts)) == 0.0
  assert float(jmoe.router_z_loss(jnp.zeros((0, E)))) == 0.0
  assert jmoe.expert_capacity(0, E, 2, 1.0) == 1  # buffers of min(E*1, 0) rows


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, 0.0, "1"])
def test_bad_capacity_factors_name_the_argument(bad):
  with raises(ValueError, "`capacity_factor` must be a finite number > 0"):
    jmoe.MoEConfig(capacity_factor=bad)
  with raises(ValueError, "`eval_capacity_factor`"):
    jmoe.MoEConfig(eval_capacity_factor=bad)
  with raises(ValueError, "expert_capacity: `capacity_factor`"):
    jmoe.expert_capacity(8, E, 2, bad)
  from jmoe import parallel
  with raises(ValueError, "`capacity_factor`"):
    parallel.ExpertParallel(jax.make_mesh((8,), ("expert",)),
                            dispatcher="all_to_all", capacity_factor=bad)


def test_bad_config_values():
  for bad in (0, -3, 1.5, True):
    with raises(ValueError, "min_capacity"):
      jmoe.MoEConfig(min_capacity=bad)
  with raises(ValueError, "balance_convention"):
    jmoe.MoEConfig(balance_convention="deepseek")
  with raises(ValueError, "convention"):
    jmoe.load_balancing_loss(jnp.ones((4, E)) / E, jnp.zeros((4, 2), jnp.int32),
                             convention="HF")
  with raises(TypeError, "activation"):
    jmoe.MoEConfig(activation=3)
  with raises(ValueError, "activation"):
    jmoe.MoEConfig(activation="gelu_approx")


def test_all_minus_inf_logits_are_counted_nonfinite():
  """A token with no available expert: NaN output (like NaN logits), counted in
  `nonfinite_tokens`; one -inf alone is a legal "unavailable" mark."""
  logits = jnp.zeros((4, E)).at[1].set(-jnp.inf).at[2, 0].set(-jnp.inf)
  for fn in (jmoe.route, jax.jit(jmoe.route)):
    r = fn(logits)
    assert np.isnan(np.asarray(r.weights)[1]).all()
    assert np.isfinite(np.asarray(r.weights)[[0, 2, 3]]).all()
  assert 0 not in np.asarray(jmoe.route(logits).experts)[2]
  # In the layer: x[0, 0] * router[0] overflows to -inf for every expert.
  params = dataclasses.replace(PARAMS, router=jnp.zeros((D, E)).at[0].set(-1e38))
  x = jnp.ones((3, D)).at[:, 0].set(0.0).at[0, 0].set(1e10)
  config = jmoe.MoEConfig()
  y, aux = _moe_jit(x, params, config)
  assert int(aux.nonfinite_tokens) == 1
  assert np.isnan(np.asarray(y)[0]).all() and np.isfinite(np.asarray(y)[1:]).all()
  _, aux = _moe_jit(x, params, config, mask=jnp.array([False, True, True]))
  assert int(aux.nonfinite_tokens) == 0  # masked out: not counted


def test_zero_width_sizes():
  for d, f, e in ((0, F, E), (D, 0, E), (D, F, 0)):
    with raises(ValueError, "must be a positive int"):
      jmoe.init_params(jax.random.key(0), d, f, e)
  zero_d = jmoe.MoEParams(router=jnp.zeros((0, E)), w_up=jnp.zeros((E, 0, F)),
                          w_down=jnp.zeros((E, F, 0)), w_gate=jnp.zeros((E, 0, F)))
  with raises(ValueError, "d_model"):
    jmoe.moe_ffn(jnp.zeros((4, 0)), zero_d)
  no_experts = jmoe.MoEParams(router=jnp.zeros((D, 0)), w_up=jnp.zeros((0, D, F)),
                              w_down=jnp.zeros((0, F, D)), w_gate=jnp.zeros((0, D, F)))
  with raises(ValueError, "experts"):
    jmoe.moe_ffn(X, no_experts)


def test_mask_errors():
  with raises(ValueError, r"`mask` must have shape x.shape\[:-1\]=\(6,\)"):
    jmoe.moe_ffn(X, PARAMS, mask=jnp.ones((5,), bool))
  with raises(TypeError, "`mask` must be boolean"):
    jmoe.moe_ffn(X, PARAMS, mask=jnp.ones((6,)))
  with raises(ValueError, r"`mask` must have shape \[tokens\]"):
    jmoe.route(jnp.ones((4, E)), mask=jnp.ones((4, 1), bool))


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
