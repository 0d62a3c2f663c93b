"""route() against a plain numpy re-implementation of each gating rule; the losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from tests.utils import assert_rel


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_route(logits, cfg: jmoe.RouterConfig, bias=None):
  """Token by token, the way a paper would describe it."""
  logits = np.asarray(logits, np.float64)
  t, e = logits.shape
  experts = np.zeros((t, cfg.top_k), int)
  weights = np.zeros((t, cfg.top_k))
  for i in range(t):
    z = logits[i]
    if cfg.score == "softmax":
      s = np_softmax(z)
    else:
      s = 1 / (1 + np.exp(-z))
    topk_softmax = cfg.score == "softmax" and cfg.order == "topk_softmax"
    sel = (z if topk_softmax else s) + (0 if bias is None else bias)
    if cfg.num_groups > 1:
      g = sel.reshape(cfg.num_groups, -1)
      gs = g.max(-1) if cfg.group_score == "max" else np.sort(g, -1)[:, -2:].sum(-1)
      best = np.argsort(-gs, kind="stable")[: cfg.top_groups]
      allowed = np.zeros(e, bool)
      for b in best:
        allowed[b * (e // cfg.num_groups):(b + 1) * (e // cfg.num_groups)] = True
      sel = np.where(allowed, sel, -np.inf)
    idx = np.argsort(-sel, kind="stable")[: cfg.top_k]
    experts[i] = idx
    if topk_softmax:
      w = np_softmax(z[idx])
    else:
      w = s[idx]
      if cfg.normalize:
        w = w / w.sum()
    weights[i] = w * cfg.routed_scaling_factor
  return experts, weights


CONFIGS = [
    jmoe.RouterConfig(top_k=1),
    jmoe.RouterConfig(top_k=2),
    jmoe.RouterConfig(top_k=2, normalize=True),
    jmoe.RouterConfig(top_k=2, order="topk_softmax"),
    jmoe.RouterConfig(top_k=4, score="sigmoid"),
    jmoe.RouterConfig(top_k=4, score="sigmoid", normalize=True, routed_scaling_factor=2.5),
    jmoe.RouterConfig(top_k=3, num_groups=4, top_groups=2),
    jmoe.RouterConfig(top_k=4, score="sigmoid", num_groups=8, top_groups=3,
                      group_score="top2_sum", normalize=True),
    jmoe.RouterConfig(top_k=16),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_numpy(cfg, with_bias):
  logits = jax.random.normal(jax.random.key(0), (40, 16)) * 2
  bias = np.asarray(jax.random.normal(jax.random.key(1), (16,))) * 0.2 if with_bias else None
  r = jmoe.route(logits, cfg, bias=bias)
  e_ref, w_ref = np_route(np.asarray(logits), cfg, bias)
  np.testing.assert_array_equal(np.asarray(r.experts), e_ref)
  assert_rel(r.weights, w_ref, what="weights")
  assert r.experts.dtype == jnp.int32 and r.weights.dtype == jnp.float32
  assert r.probs.shape == (40, 16)
  assert_rel(np.asarray(r.probs).sum(-1), np.ones(40), what="probs sum to 1")


def test_topk_softmax_equals_renormalised_softmax_topk():
  logits = jax.random.normal(jax.random.key(3), (32, 8))
  a = jmoe.route(logits, top_k=2, order="topk_softmax")
  b = jmoe.route(logits, top_k=2, normalize=True)
  np.testing.assert_array_equal(np.asarray(a.experts), np.asarray(b.experts))
  assert_rel(a.weights, b.weights, what="weights")


def test_router_math_is_float32_for_bfloat16_logits():
  logits = (jax.random.normal(jax.random.key(3), (16, 8)) * 3).astype(jnp.bfloat16)
  r = jmoe.route(logits, top_k=2)
  assert r.weights.dtype == jnp.float32 and r.probs.dtype == jnp.float32
  ref = jmoe.route(logits.astype(jnp.float32), top_k=2)
  np.testing.assert_array_equal(np.asarray(r.weights), np.asarray(ref.weights))


def test_expert_choice():
  t, e, c = 20, 4, 6
  logits = jax.random.normal(jax.random.key(5), (t, e))
  r = jmoe.route(logits, kind="expert_choice", capacity=c)
  assert isinstance(r, jmoe.ExpertChoiceRouting)
  p = np_softmax(np.asarray(logits, np.float64))
  for ex in range(e):
    want = np.sort(np.argsort(-p[:, ex], kind="stable")[:c])
    np.testing.assert_array_equal(np.asarray(r.tokens[ex]), want)
    assert_rel(r.weights[ex], p[want, ex], what=f"expert {ex} weights")


def test_nonfinite_logits_do_not_route_silently():
  logits = jax.random.normal(jax.random.key(0), (6, 4))
  logits = logits.at[1, 2].set(jnp.nan).at[3, 0].set(jnp.inf).at[4, 1].set(-jnp.inf)
  r = jmoe.route(logits, top_k=2)
  w = np.asarray(r.weights)
  assert np.isnan(w[1]).all() and np.isnan(w[3]).all()
  # -inf is a legal mask: that expert is never chosen while others remain.
  assert np.isfinite(w[4]).all() and 1 not in np.asarray(r.experts[4])
  for i in (0, 2, 5):
    assert np.isfinite(w[i]).all()
  # Through the layer: NaN output for those tokens only, and they are counted.
  d = 8
  params = jmoe.init_params(jax.random.key(1), d, 16, 4)
  x = jax.random.normal(jax.random.key(2), (6, d)).at[1, 0].set(jnp.nan)
  y, aux = jmoe.moe_ffn(x, params)
  y = np.asarray(y)
  assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, 0)).all()
  assert int(aux.nonfinite_tokens) == 1


def test_load_balancing_loss_uniform_and_skewed():
  t, e, k = 64, 8, 2
  probs = jnp.full((t, e), 1.0 / e)
  experts = jnp.stack([jnp.arange(t) % e, (jnp.arange(t) + 1) % e], -1)
  assert_rel(jmoe.load_balancing_loss(probs, experts), 1.0, what="uniform")
  skew_p = jnp.zeros((t, e)).at[:, 0].set(0.9).at[:, 1].set(0.1)
  skew_e = jnp.stack([jnp.zeros(t, int), jnp.ones(t, int)], -1)
  # f = [.5, .5, 0...], P = [.9, .1, 0...] -> E * (.45 + .05) = 4
  assert_rel(jmoe.load_balancing_loss(skew_p, skew_e), 4.0, what="skewed")
  # Gradient flows through P only.
  g = jax.grad(lambda p: jmoe.load_balancing_loss(p, skew_e))(skew_p)
  assert_rel(g[0], e * np.array([.5, .5, 0, 0, 0, 0, 0, 0]) / t, what="dloss/dprobs")


def test_router_z_loss():
  logits = jax.random.normal(jax.random.key(9), (10, 5))
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  assert_rel(jmoe.router_z_loss(logits), np.mean(lse**2), what="z-loss")


def test_update_expert_bias():
  bias = jnp.zeros(4)
  load = jnp.array([10, 30, 20, 20])
  new = jmoe.update_expert_bias(bias, load, rate=0.1)
  assert_rel(new, [0.1, -0.1, 0.0, 0.0], what="bias step")
  # Iterating the rule on a fixed skewed router moves load towards balance.
  logits = jax.random.normal(jax.random.key(0), (512, 8)) + jnp.arange(8) * 0.3
  cfg = jmoe.RouterConfig(top_k=2, score="sigmoid")
  b = jnp.zeros(8)
  spread = []
  for _ in range(60):
    r = jmoe.route(logits, cfg, bias=b)
    load = jnp.bincount(r.experts.ravel(), length=8)
    spread.append(int(load.max() - load.min()))
    b = jmoe.update_expert_bias(b, load, rate=0.02)
  assert spread[-1] < spread[0] / 2, spread


def test_noise_only_with_key():
  logits = jax.random.normal(jax.random.key(0), (32, 8))
  cfg = jmoe.RouterConfig(top_k=2, jitter_eps=0.5, noise_std=1.0)
  a = jmoe.route(logits, cfg)
  b = jmoe.route(logits, top_k=2)
  np.testing.assert_array_equal(np.asarray(a.weights), np.asarray(b.weights))
  c = jmoe.route(logits, cfg, key=jax.random.key(1))
  assert not np.array_equal(np.asarray(c.logits), np.asarray(a.logits))
