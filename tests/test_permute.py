"""The prefix-sum dispatch plan, permute/unpermute, and hypothesis-fuzzed routings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jmoe
from tests import oracle
from tests.utils import assert_rel, assert_tree_rel


def np_plan(experts, num_experts, capacity=None):
  """Stable argsort by expert: the textbook dispatch, for comparison."""
  experts = np.asarray(experts)
  t, k = experts.shape
  keep = oracle.capacity_keep(experts, num_experts, capacity)
  flat = experts.ravel()
  slots = np.arange(t * k)[keep.ravel()]
  order = slots[np.argsort(flat[keep.ravel()], kind="stable")]
  sizes = np.bincount(flat[keep.ravel()], minlength=num_experts)
  return order, sizes, keep


def check_plan(experts, num_experts, capacity=None):
  plan = jmoe.dispatch_plan(jnp.asarray(experts, jnp.int32), num_experts,
                            capacity=capacity)
  order, sizes, keep = np_plan(experts, num_experts, capacity)
  t, k = np.shape(experts)
  n = len(order)
  np.testing.assert_array_equal(np.asarray(plan.group_sizes), sizes)
  np.testing.assert_array_equal(np.asarray(plan.indptr), np.concatenate([[0], np.cumsum(sizes)]))
  np.testing.assert_array_equal(np.asarray(plan.row_slot)[:n], order)
  np.testing.assert_array_equal(np.asarray(plan.row_slot)[n:], t * k)
  np.testing.assert_array_equal(np.asarray(plan.row_token)[:n], order // k)
  np.testing.assert_array_equal(np.asarray(plan.row_token)[n:], t)
  slot_row = np.asarray(plan.slot_row).ravel()
  R = plan.num_rows
  np.testing.assert_array_equal(slot_row[order], np.arange(n))
  assert np.all(slot_row[~keep.ravel()] == R)
  np.testing.assert_array_equal(np.asarray(plan.expert_load),
                                np.bincount(np.ravel(experts), minlength=num_experts))
  assert int(plan.num_dropped) == int((~keep).sum())
  return plan


def test_plan_small_example():
  experts = [[1, 0], [1, 2], [0, 1], [3, 1]]
  plan = check_plan(experts, 4)
  # Expert 0: slots (0,1),(2,0); expert 1: (0,0),(1,0),(2,1),(3,1); 2: (1,1); 3: (3,0).
  np.testing.assert_array_equal(np.asarray(plan.row_token), [0, 2, 0, 1, 2, 3, 1, 3])
  np.testing.assert_array_equal(np.asarray(plan.group_sizes), [2, 4, 1, 1])
  capped = check_plan(experts, 4, capacity=2)
  np.testing.assert_array_equal(np.asarray(capped.group_sizes), [2, 2, 1, 1])
  assert int(capped.num_dropped) == 2 and capped.num_rows == 8


def test_plan_ignores_out_of_range_ids():
  experts = jnp.array([[0, -1], [1, 0], [-1, -1]], jnp.int32)
  plan = jmoe.dispatch_plan(experts, 2)
  np.testing.assert_array_equal(np.asarray(plan.group_sizes), [2, 1])
  assert int(plan.num_dropped) == 0
  assert np.asarray(plan.slot_row)[0, 1] == plan.num_rows
  x = jnp.arange(6.0).reshape(3, 2)
  rows, plan = jmoe.permute(x, experts, num_experts=2)
  y = jmoe.unpermute(rows, plan, jnp.ones((3, 2)))
  np.testing.assert_array_equal(np.asarray(y), [[0, 1], [4, 6], [0, 0]])


@functools.lru_cache(maxsize=None)
def _layer_fn(k, capacity):
  """Jitted permute -> expert FFN -> unpermute for given (k, capacity)."""

  def f(x, params, experts, weights):
    rows, plan = jmoe.permute(x, experts, num_experts=params.num_experts,
                              capacity=capacity)
    out = jmoe.expert_ffn(rows, params.w_up, params.w_down, params.w_gate,
                          plan.group_sizes, "swiglu")
    return jmoe.unpermute(out, plan, weights)

  return jax.jit(f)


def _ref_fn(x, params, experts, weights, keep):
  h = oracle.all_experts(x, params, "swiglu")
  w = jnp.where(keep, weights, 0.0)
  comb = jnp.einsum("tke,tk->te", jax.nn.one_hot(experts, params.num_experts), w)
  return jnp.einsum("te,etd->td", comb, h)


T, D, F, E = 16, 8, 12, 4
PARAMS = jmoe.init_params(jax.random.key(0), D, F, E)
X = jax.random.normal(jax.random.key(1), (T, D))


@st.composite
def routings(draw):
  """Token-choice assignments with distinct experts per token, from skewed choices:
  experts with no tokens, all tokens on one expert, any k in 1..E."""
  k = draw(st.integers(1, E))
  mode = draw(st.sampled_from(["uniform", "one_hot_expert", "skewed"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  experts = np.zeros((T, k), np.int32)
  for t in range(T):
    if mode == "uniform":
      experts[t] = rng.permutation(E)[:k]
    elif mode == "one_hot_expert":  # expert 0 always first: it gets every token
      experts[t] = np.concatenate([[0], 1 + rng.permutation(E - 1)])[:k]
    else:
      p = np.array([0.7, 0.2, 0.1, 0.0])[:E]
      p = p + 1e-3
      experts[t] = rng.choice(E, size=k, replace=False, p=p / p.sum())
  weights = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
  cap = draw(st.sampled_from([None, 1, 3, T]))
  return experts, weights, cap


@functools.cache
def _fuzz_grads(k, cap):
  """Jitted gradients (w.r.t. input, expert weights, combine weights) of the
  layer and of the oracle, one compile per (k, capacity)."""
  f = _layer_fn(k, cap)

  def grads(fn):
    def loss(x, p, e, w, c, *rest):
      return jnp.sum(fn(x, p, e, w, *rest) * c)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 3)))

  return grads(f), grads(_ref_fn)


@settings(max_examples=25, deadline=None)
@given(routings())
def test_fuzzed_routings_match_oracle(r):
  experts, weights, cap = r
  k = experts.shape[1]
  check_plan(experts, E, cap)
  keep = oracle.capacity_keep(experts, E, cap)
  f = _layer_fn(k, cap)
  e, w = jnp.asarray(experts), jnp.asarray(weights)
  y = f(X, PARAMS, e, w)
  y_ref = _ref_fn(X, PARAMS, e, w, keep)
  assert_rel(y, y_ref, jnp.float32, "fuzzed layer")
  # Gradients w.r.t. input, expert weights and combine weights.
  c = jax.random.normal(jax.random.key(k), (T, D))
  grad_f, grad_ref = _fuzz_grads(k, cap)
  g = grad_f(X, PARAMS, e, w, c)
  g_ref = grad_ref(X, PARAMS, e, w, c, jnp.asarray(keep))
  assert_tree_rel(g, g_ref, jnp.float32, "fuzzed grads ")


def test_permute_unpermute_roundtrip_and_gradients():
  k = 3
  experts = jnp.asarray(np.stack([np.random.default_rng(t).permutation(E)[:k]
                                  for t in range(T)]), jnp.int32)
  rows, plan = jmoe.permute(X, experts, num_experts=E)
  assert rows.shape == (T * k, D)
  # Every row holds its token, and unpermute with unit weights gives k * x.
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(X)[np.asarray(plan.row_token)])
  y = jmoe.unpermute(rows, plan, jnp.ones((T, k)))
  assert_rel(y, k * np.asarray(X), what="unit-weight combine")
  # permute's VJP: each token collects the cotangents of its k rows.
  dr = jax.random.normal(jax.random.key(3), rows.shape)
  _, vjp = jax.vjp(lambda x: jmoe.permute(x, experts, num_experts=E)[0], X)
  (dx,) = vjp(dr)
  want = np.zeros((T, D))
  np.add.at(want, np.asarray(plan.row_token), np.asarray(dr))
  assert_rel(dx, want, what="permute VJP")


def test_expert_choice_permute_unpermute():
  logits = jax.random.normal(jax.random.key(4), (T, E))
  r = jmoe.route(logits, kind="expert_choice", capacity=5)
  rows, plan = jmoe.permute(X, r)
  assert rows.shape == (E * 5, D)
  np.testing.assert_array_equal(np.asarray(plan.group_sizes), [5] * E)
  y = jmoe.unpermute(rows, plan, r.weights)
  comb = oracle.combine_matrix(r, T)
  assert_rel(y, comb.sum(-1)[:, None] * X, what="expert-choice combine")
