"""moe_ffn against the dense oracle: values and gradients, every variant."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from tests import oracle
from tests.utils import assert_rel, assert_tree_rel, rel_err

T, D, F, E = 24, 16, 32, 8

ROUTERS = {
    "softmax_topk": jmoe.RouterConfig(top_k=2),
    "softmax_topk_norm": jmoe.RouterConfig(top_k=3, normalize=True),
    "topk_softmax": jmoe.RouterConfig(top_k=2, order="topk_softmax"),
    "sigmoid_bias_scaled": jmoe.RouterConfig(
        top_k=2, score="sigmoid", normalize=True, routed_scaling_factor=2.5),
    "grouped_max": jmoe.RouterConfig(top_k=2, num_groups=4, top_groups=2),
    "grouped_top2_sigmoid": jmoe.RouterConfig(
        top_k=3, score="sigmoid", num_groups=4, top_groups=2,
        group_score="top2_sum", normalize=True),
    "top1": jmoe.RouterConfig(top_k=1),
    "all_experts": jmoe.RouterConfig(top_k=E),
    "expert_choice": jmoe.RouterConfig(top_k=2, kind="expert_choice"),
}


def make(key, activation="swiglu", shared=False, gate=False, bias=False,
         dtype=jnp.float32):
  kp, kx, kb = jax.random.split(key, 3)
  params = jmoe.init_params(kp, D, F, E, activation=activation,
                            shared_d_ff=8 if shared else 0, shared_gate=gate,
                            router_bias=bias, dtype=dtype)
  if bias:
    params = dataclasses.replace(
        params, router_bias=0.3 * jax.random.normal(kb, (E,)))
  x = jax.random.normal(kx, (2, T // 2, D), dtype)
  return x, params


def check_against_oracle(x, params, config, grads=True):
  keep = oracle.oracle_keep(x, params, config)
  y, aux = jax.jit(jmoe.moe_ffn, static_argnums=2)(x, params, config)
  y_ref = jax.jit(lambda x, p: oracle.oracle_moe(x, p, config, keep=keep)[0])(
      x, params)
  assert_rel(y, y_ref, x.dtype, "moe_ffn vs oracle")
  if not grads:
    return aux

  def loss(fn, x, params):
    y = fn(x, params)
    # A fixed random cotangent so every output element matters.
    c = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
    return jnp.sum(y.astype(jnp.float32) * c)

  ours = lambda x, p: jmoe.moe_ffn(x, p, config)[0]
  ref = lambda x, p: oracle.oracle_moe(x, p, config, keep=keep)[0]
  g = jax.jit(jax.grad(lambda x, p: loss(ours, x, p), argnums=(0, 1)))(x, params)
  g_ref = jax.jit(jax.grad(lambda x, p: loss(ref, x, p), argnums=(0, 1)))(x, params)
  g = (g[0], dataclasses.replace(g[1], router_bias=None))
  g_ref = (g_ref[0], dataclasses.replace(g_ref[1], router_bias=None))
  assert_tree_rel(g, g_ref, x.dtype, "grad ")
  return aux


@pytest.mark.parametrize("name", list(ROUTERS))
def test_routing_variants_match_oracle(name):
  router = ROUTERS[name]
  bias = name == "sigmoid_bias_scaled"
  x, params = make(jax.random.key(hash(name) % 1000), bias=bias)
  check_against_oracle(x, params, jmoe.MoEConfig(router=router))


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("shared,gate", [(False, False), (True, False), (True, True)])
def test_activations_and_shared_experts(activation, shared, gate):
  x, params = make(jax.random.key(3), activation=activation, shared=shared, gate=gate)
  check_against_oracle(x, params, jmoe.MoEConfig(activation=activation),
                       grads=(activation == "swiglu" or shared))


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 2.0])
def test_capacity_mode_drops_like_the_oracle(capacity_factor):
  x, params = make(jax.random.key(11))
  config = jmoe.MoEConfig(capacity_factor=capacity_factor)
  aux = check_against_oracle(x, params, config)
  keep = oracle.oracle_keep(x, params, config)
  expected = 1.0 - keep.mean()
  assert_rel(aux.dropped_fraction, expected, what="dropped fraction")
  if capacity_factor <= 0.5:
    assert expected > 0, "this case must actually drop tokens"


def test_expert_choice_with_capacity_factor():
  x, params = make(jax.random.key(5))
  config = jmoe.MoEConfig(router=ROUTERS["expert_choice"], capacity_factor=0.5)
  aux = check_against_oracle(x, params, config)
  cap = config.capacity(T, E)
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert), [cap] * E)


def test_bfloat16_activations():
  x, params = make(jax.random.key(9), dtype=jnp.bfloat16)
  check_against_oracle(x, params, jmoe.MoEConfig(), grads=False)


@pytest.mark.parametrize("t,d,e", [(64, 128, 8), (33, 96, 5)])
@pytest.mark.parametrize("router_dtype", [jnp.float32, jnp.bfloat16])
def test_router_logits_are_float32_exact_for_bfloat16_tokens(t, d, e, router_dtype):
  # bfloat16 tokens take the split-bfloat16 path (`_router_dot_bf16`): against a
  # float64 oracle, logits and the router gradient to float32 rounding (what a
  # float32 HIGHEST matmul gives), the token gradient to bfloat16 rounding.
  kx, kw, kg = jax.random.split(jax.random.key(t), 3)
  x = jax.random.normal(kx, (t, d), jnp.bfloat16)
  w = (jax.random.normal(kw, (d, e)) * d ** -0.5).astype(router_dtype)
  g = jax.random.normal(kg, (t, e), jnp.float32)
  y, vjp = jax.vjp(jax.jit(jmoe._src.moe.router_logits), x, w)
  dx, dw = vjp(g)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, x.dtype, w.dtype)
  X, W, G = (np.asarray(a, np.float64) for a in (x, w, g))
  assert rel_err(y, X @ W) < 1e-6, "logits"
  # A bfloat16 router's gradient is rounded to bfloat16 (2^-9 relative).
  assert rel_err(dw, X.T @ G) < (1e-6 if router_dtype == jnp.float32 else 4e-3)
  assert rel_err(dx, G @ W.T) < 4e-3, "d x: bfloat16 rounding"
  # The float32 path (float32 tokens) agrees with it.
  y32 = jmoe._src.moe.router_logits(x.astype(jnp.float32), w)
  assert rel_err(y32, X @ W) < 1e-6, "float32-token logits"


def test_aux_metrics():
  x, params = make(jax.random.key(1))
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2))
  y, aux = jmoe.moe_ffn(x, params, config)
  xt = x.reshape(-1, D)
  logits = np.asarray(xt, np.float64) @ np.asarray(params.router, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1)[:, :2]
  counts = np.bincount(top.ravel(), minlength=E)
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert), counts)
  f = counts / top.size
  assert_rel(aux.balance_loss, E * np.sum(f * p.mean(0)), what="balance loss")
  lse = np.log(np.exp(logits).sum(-1))
  assert_rel(aux.z_loss, np.mean(lse**2), what="z-loss")
  assert_rel(aux.router_entropy, -np.mean(np.sum(p * np.log(p), -1)),
             what="router entropy")
  assert float(aux.dropped_fraction) == 0.0
  assert int(aux.nonfinite_tokens) == 0


def test_bitwise_determinism():
  x, params = make(jax.random.key(2), shared=True, gate=True)
  config = jmoe.MoEConfig(capacity_factor=1.0)
  f = jax.jit(jax.value_and_grad(
      lambda x, p: jnp.sum(jmoe.moe_ffn(x, p, config)[0] ** 2), argnums=(0, 1)))
  a = f(x, params)
  b = f(x, params)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(u).tobytes() == np.asarray(v).tobytes()
  # A second trace of the same function gives the same bits too.
  c = jax.jit(jax.value_and_grad(
      lambda x, p: jnp.sum(jmoe.moe_ffn(x, p, config)[0] ** 2), argnums=(0, 1)))(x, params)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
    assert np.asarray(u).tobytes() == np.asarray(v).tobytes()


def test_router_noise_needs_a_key_and_changes_routing():
  x, params = make(jax.random.key(4))
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2, noise_std=5.0))
  y0, _ = jmoe.moe_ffn(x, params, config)  # no key: evaluation, no noise
  y_clean, _ = jmoe.moe_ffn(x, params, jmoe.MoEConfig())
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y_clean))
  y1, _ = jmoe.moe_ffn(x, params, config, key=jax.random.key(0))
  y2, _ = jmoe.moe_ffn(x, params, config, key=jax.random.key(0))
  y3, _ = jmoe.moe_ffn(x, params, config, key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
  assert not np.allclose(np.asarray(y1), np.asarray(y0))
  assert not np.allclose(np.asarray(y1), np.asarray(y3))
  # With the same key, the oracle sees the same noisy routing.
  y_ref, _ = oracle.oracle_moe(x, params, config, key=jax.random.key(0))
  assert_rel(y1, y_ref, jnp.float32, "noisy moe vs oracle")


def test_router_bias_changes_selection_not_weights():
  x, params = make(jax.random.key(6), bias=True)
  config = jmoe.MoEConfig(router=ROUTERS["sigmoid_bias_scaled"])
  xt = x.reshape(-1, D)
  logits = jmoe._src.moe.router_logits(xt, params.router)
  r_bias = jmoe.route(logits, config.router, bias=params.router_bias)
  r_none = jmoe.route(logits, config.router)
  assert not np.array_equal(np.asarray(r_bias.experts), np.asarray(r_none.experts))
  # Weights are the unbiased scores of the chosen experts, renormalised and scaled.
  s = jax.nn.sigmoid(logits)
  w = jnp.take_along_axis(s, r_bias.experts, -1)
  w = 2.5 * w / w.sum(-1, keepdims=True)
  assert_rel(r_bias.weights, w, jnp.float32, "biased weights")
  # No gradient flows into the bias.
  g = jax.grad(lambda p: jnp.sum(jmoe.moe_ffn(x, p, config)[0]))(params)
  assert float(jnp.abs(g.router_bias).sum()) == 0.0


# ----------------------------------------------------------------- token mask

MASK = np.array([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                 [0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]], bool)  # 15 of 24 tokens


@pytest.mark.parametrize("name,cf,shared", [
    ("softmax_topk", None, True), ("softmax_topk", 0.5, False),
    ("expert_choice", None, False)])
def test_mask_equals_the_oracle_without_the_masked_tokens(name, cf, shared):
  """Masked tokens (NaN here: never read) give zeros and zero gradients; the kept
  ones equal the oracle run on the kept tokens alone (at the capacity of the
  full batch, which sizes the buffers); the aux counts only kept tokens."""
  config = jmoe.MoEConfig(router=ROUTERS[name], capacity_factor=cf)
  x, params = make(jax.random.key(21), shared=shared, gate=shared)
  x = jnp.where(MASK[..., None], x, jnp.nan)
  kept = x[MASK]  # [15, D]
  cap = config.capacity(T, E)
  keep = oracle.oracle_keep(kept, params, config, capacity=cap)
  ct = jax.random.normal(jax.random.key(7), x.shape)

  def ours(x, p):
    y, aux = jmoe.moe_ffn(x, p, config, mask=MASK)
    return jnp.sum(y * ct), (y, aux)

  def ref(kept, p):
    y, _ = oracle.oracle_moe(kept, p, config, keep=keep, capacity=cap)
    return jnp.sum(y * ct[MASK]), y

  (_, (y, aux)), (gx, gp) = jax.jit(jax.value_and_grad(
      ours, argnums=(0, 1), has_aux=True))(x, params)
  (_, y_ref), (gx_ref, gp_ref) = jax.jit(jax.value_and_grad(
      ref, argnums=(0, 1), has_aux=True))(kept, params)
  assert np.all(np.asarray(y)[~MASK] == 0)
  assert np.all(np.asarray(gx)[~MASK] == 0)
  assert_rel(y[MASK], y_ref, what="masked y vs oracle")
  assert_rel(gx[MASK], gx_ref, what="masked dx vs oracle")
  assert_tree_rel(gp, gp_ref, what="masked dparams ")

  if name == "softmax_topk":
    # The aux of the masked call is the aux of the kept tokens alone (dropless:
    # independent of T), and so are the aux losses' gradients.
    kept_config = jmoe.MoEConfig(router=ROUTERS[name])
    def aux_loss(x, p, **kw):
      a = jmoe.moe_ffn(x, p, kw.pop("config"), **kw)[1]
      return a.balance_loss + a.z_loss + a.router_entropy, a
    grad = lambda **kw: jax.jit(jax.grad(
        functools.partial(aux_loss, **kw), argnums=(0, 1), has_aux=True))
    g, _ = grad(config=config, mask=MASK)(x, params)
    g_ref, aux_ref = grad(config=kept_config)(kept, params)
    fields = dict(vars(aux_ref))
    if cf is not None:  # drops follow the full batch's capacity: the oracle's
      fields["dropped_fraction"] = 1.0 - keep.mean()
    assert_tree_rel(aux, type(aux)(**fields), what="masked aux ")
    assert np.all(np.asarray(g[0])[~MASK] == 0)
    assert_rel(g[0][MASK], g_ref[0], what="aux dx")
    assert_rel(g[1].router, g_ref[1].router, what="aux drouter")
  else:  # expert choice: every pick is a kept token
    assert int(jnp.sum(aux.tokens_per_expert)) == E * cap
    assert float(aux.balance_loss) == 0.0
  assert int(aux.nonfinite_tokens) == 0  # the NaN padding is not counted


def test_mask_expert_choice_with_fewer_tokens_than_picks():
  """Only 3 tokens kept, capacity 6: the empty picks hold no token, add nothing."""
  config = jmoe.MoEConfig(router=ROUTERS["expert_choice"])
  x, params = make(jax.random.key(22))
  mask = np.zeros((2, T // 2), bool)
  mask[0, [1, 5]] = mask[1, 7] = True
  y, aux = jmoe.moe_ffn(x, params, config, mask=mask)
  xt = x.reshape(-1, D)
  h = oracle.all_experts(x[mask], params, "swiglu")  # [E, 3, D]
  logits = x[mask] @ params.router
  w = jax.nn.softmax(logits, axis=-1)  # every expert picks all 3 tokens
  y_ref = jnp.einsum("te,etd->td", w, h)
  assert_rel(y[mask], y_ref, what="expert choice, few tokens")
  assert np.all(np.asarray(y)[~mask] == 0)
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert), [3] * E)
  del xt


def test_mask_all_false_and_integer_masks():
  x, params = make(jax.random.key(23))
  y, aux = jmoe.moe_ffn(x, params, mask=np.zeros(x.shape[:-1], bool))
  assert np.all(np.asarray(y) == 0)
  for v in (aux.balance_loss, aux.z_loss, aux.router_entropy,
            aux.dropped_fraction, aux.tokens_per_expert, aux.mean_router_probs):
    assert np.all(np.asarray(v) == 0)
  y1, _ = jmoe.moe_ffn(x, params, mask=MASK)
  y2, _ = jmoe.moe_ffn(x, params, mask=MASK.astype(np.int32) * 3)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_routing_losses_take_a_mask():
  x, params = make(jax.random.key(24))
  logits = jmoe._src.moe.router_logits(x.reshape(-1, D), params.router)
  m = MASK.reshape(-1)
  r = jmoe.route(logits, top_k=2, mask=m)
  r_kept = jmoe.route(logits[m], top_k=2)
  assert np.all(np.asarray(r.experts)[~m] == -1)
  assert np.all(np.asarray(r.weights)[~m] == 0)
  np.testing.assert_array_equal(np.asarray(r.experts)[m], np.asarray(r_kept.experts))
  assert_rel(jmoe.load_balancing_loss(r.probs, r.experts, mask=m),
             jmoe.load_balancing_loss(r_kept.probs, r_kept.experts), what="lb")
  assert_rel(jmoe.router_z_loss(logits, m), jmoe.router_z_loss(logits[m]),
             what="z")


# ------------------------------------------------- capacity: train, eval, min


def test_eval_capacity_factor_and_min_capacity():
  x, params = make(jax.random.key(25))
  key = jax.random.key(3)
  dropless = jmoe.moe_ffn(x, params)[0]
  config = jmoe.MoEConfig(capacity_factor=0.25, eval_capacity_factor=None,
                          noise_std=3.0)
  y_train, aux_train = jmoe.moe_ffn(x, params, config, key=key)
  y_eval, aux_eval = jmoe.moe_ffn(x, params, config, key=key, deterministic=True)
  assert float(aux_train.dropped_fraction) > 0
  assert float(aux_eval.dropped_fraction) == 0.0  # dropless, and no noise
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(dropless))
  # "train" (the default) uses the training factor in evaluation too.
  same = dataclasses.replace(config, eval_capacity_factor="train", noise_std=0.0)
  assert same.capacity(T, E, deterministic=True) == same.capacity(T, E) == 2
  # min_capacity lifts C = ceil(0.25 * 24 * 2 / 8) = 2 to 5: as the oracle.
  lifted = dataclasses.replace(same, min_capacity=5)
  assert lifted.capacity(T, E) == 5 and lifted.capacity(T, E, deterministic=True) == 5
  aux = check_against_oracle(x, params, lifted, grads=False)
  assert float(aux.dropped_fraction) < float(aux_train.dropped_fraction)
  assert jmoe.expert_capacity(24, 8, 2, 0.25, min_capacity=100) == 24  # <= T


def test_aux_mean_router_probs_and_hf_convention():
  x, params = make(jax.random.key(26))
  config = jmoe.MoEConfig(router=ROUTERS["softmax_topk_norm"])  # k = 3
  _, aux = jmoe.moe_ffn(x, params, config)
  logits = jmoe._src.moe.router_logits(x.reshape(-1, D), params.router)
  assert_rel(aux.mean_router_probs, jax.nn.softmax(logits).mean(0), what="P")
  f = np.asarray(aux.tokens_per_expert) / (T * 3)
  assert_rel(aux.balance_loss, E * np.sum(f * np.asarray(aux.mean_router_probs)),
             what="balance from P")
  _, aux_hf = jmoe.moe_ffn(x, params, dataclasses.replace(
      config, balance_convention="hf"))
  assert_rel(aux_hf.balance_loss, 3 * aux.balance_loss, what="hf = k * switch")
  r = jmoe.route(logits, config.router)
  assert_rel(jmoe.load_balancing_loss(r.probs, r.experts, convention="hf"),
             aux_hf.balance_loss, what="hf load_balancing_loss")
  # Hugging Face's formula (load_balancing_loss_func), written out.
  onehot = jax.nn.one_hot(r.experts, E)  # [T, k, E]
  hf = E * jnp.sum(onehot.mean(0).sum(0) * r.probs.mean(0))
  assert_rel(aux_hf.balance_loss, hf, what="hf formula")


def test_moe_config_takes_router_options():
  c = jmoe.MoEConfig(top_k=1, score="sigmoid", capacity_factor=1.0)
  assert c.router == jmoe.RouterConfig(top_k=1, score="sigmoid") and c.top_k == 1
  assert dataclasses.replace(c, top_k=3).router == jmoe.RouterConfig(
      top_k=3, score="sigmoid")
  both = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=4, normalize=True), top_k=2)
  assert both.router == jmoe.RouterConfig(top_k=2, normalize=True)
  assert hash(c) == hash(jmoe.MoEConfig(top_k=1, score="sigmoid",
                                        capacity_factor=1.0))
  with pytest.raises(TypeError, match=r"topk.*RouterConfig fields.*top_k"):
    jmoe.MoEConfig(topk=2)


# --------------------------------------------------------------- activations


def test_tanh_gelu_activations_and_callables():
  kx, ku, kg, kd = jax.random.split(jax.random.key(27), 4)
  x = jax.random.normal(kx, (5, D))
  p = jmoe.FFNParams(w_up=jax.random.normal(ku, (D, F)) / 4,
                     w_down=jax.random.normal(kd, (F, D)) / 6,
                     w_gate=jax.random.normal(kg, (D, F)) / 4)
  # gemma's GeGLU: gelu(x W_gate, approximate=True) * (x W_up), then W_down.
  gemma = (jax.nn.gelu(x @ p.w_gate, approximate=True) * (x @ p.w_up)) @ p.w_down
  assert_rel(jmoe.ffn(x, p, "geglu_tanh"), gemma, what="geglu_tanh")
  assert float(jnp.max(jnp.abs(jmoe.ffn(x, p, "geglu") - gemma))) > 1e-5
  plain = dataclasses.replace(p, w_gate=None)
  assert_rel(jmoe.ffn(x, plain, "gelu_tanh"),
             jax.nn.gelu(x @ p.w_up, approximate=True) @ p.w_down, what="gelu_tanh")
  assert_rel(jmoe.ffn(x, plain, jnp.tanh), jnp.tanh(x @ p.w_up) @ p.w_down,
             what="callable")
  glu = jmoe.Activation(jnp.tanh, glu=True)
  assert_rel(jmoe.ffn(x, p, glu),
             (jnp.tanh(x @ p.w_gate) * (x @ p.w_up)) @ p.w_down, what="glu")
  # In the layer: the dispatch against the oracle, with its own parameters.
  for act in ("geglu_tanh", glu, jnp.tanh):
    xm, params = make(jax.random.key(28), activation=act)
    assert (params.w_gate is not None) == jmoe._src.params.is_glu(act)
    check_against_oracle(xm, params, jmoe.MoEConfig(activation=act), grads=False)


# ------------------------------------------------------------------ upcycling


@pytest.mark.parametrize("router", [
    jmoe.RouterConfig(top_k=2, order="topk_softmax"),
    jmoe.RouterConfig(top_k=3, normalize=True),
    jmoe.RouterConfig(top_k=2, score="sigmoid", normalize=True)])
def test_upcycled_layer_equals_the_dense_ffn(router):
  from flax import nnx
  import jmoe.nn as jnn
  x = jax.random.normal(jax.random.key(29), (2, 6, D))
  dense = jnn.FeedForward(D, F, activation="geglu_tanh", rngs=nnx.Rngs(0))
  config = jmoe.MoEConfig(router=router, activation="geglu_tanh")
  want = dense(x)
  layer = jax.jit(lambda x, p: jmoe.moe_ffn(x, p, config)[0])
  for source in (dense, dense.params(), dict(vars(dense.params()))):
    params = jmoe.upcycle_ffn(source, E, key=jax.random.key(1))
    assert_rel(layer(x, params), want, what="upcycled")
  assert params.w_up.shape == (E, D, F) and params.router.shape == (D, E)
  # Into a module.
  moe = jnn.MoE(D, F, E, config=config, router_bias=True, rngs=nnx.Rngs(1))
  moe.set_params(jmoe.upcycle_ffn(dense, E, key=jax.random.key(2),
                                  router_bias=True))
  assert_rel(moe(x)[0], want, what="upcycled module")
  with pytest.raises(ValueError, match="router_bias.*missing"):
    moe.set_params(jmoe.upcycle_ffn(dense, E, key=jax.random.key(2)))
