"""Tests of the Flax NNX modules (jmoe.nn): thin shells over the pure functions."""

import dataclasses
import re

import flax.linen
from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmoe
import jmoe.nn as jnn
from tests.utils import assert_rel

# One set of sizes everywhere: initializers and ops compile once per shape.
D, F, E, H, KV, V = 16, 16, 4, 4, 2, 32


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------
# MoE / Router.
# ------------------------------------------------------------------------------

MOE_CASES = {
    "swiglu_shared_gate": (jmoe.MoEConfig(),
                           dict(shared_d_ff=F, shared_gate=True)),
    # Capacity ceil(0.5 * 10 * 2 / 4) = 3 rows per expert < 20 pairs: drops.
    "relu_capacity": (jmoe.MoEConfig(activation="relu", capacity_factor=0.5), {}),
    "sigmoid_grouped_bias": (
        jmoe.MoEConfig(router=jmoe.RouterConfig(
            top_k=2, score="sigmoid", num_groups=2, top_groups=1,
            normalize=True, routed_scaling_factor=2.5)),
        dict(router_bias=True)),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_module_matches_moe_ffn(case):
  config, opts = MOE_CASES[case]
  m = jnn.MoE(D, F, E, config=config, rngs=nnx.Rngs(0), **opts)
  if m.router.bias is not None:
    m.router.bias[...] = jnp.array([0.3, -0.2, 0.1, 0.0])
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  (y, aux), (y_ref, aux_ref), params = nnx.jit(
      lambda m, x: (m(x), jmoe.moe_ffn(x, m.params(), config), m.params()))(m, x)
  # The pieces the case is about are really in the params.
  assert (params.shared is not None) == ("shared_d_ff" in opts)
  assert (params.shared_gate is not None) == opts.get("shared_gate", False)
  assert (params.router_bias is not None) == opts.get("router_bias", False)
  assert (params.w_gate is not None) == (config.activation == "swiglu")
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  _tree_equal(aux, aux_ref)
  if config.capacity_factor is not None:
    assert float(aux.dropped_fraction) >= 0.4  # >= 8 of 20 pairs dropped


def test_moe_module_passes_mask_and_deterministic():
  config = jmoe.MoEConfig(capacity_factor=0.5, eval_capacity_factor=None)
  m = jnn.MoE(D, F, E, config=config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  mask = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
  outs, refs = nnx.jit(lambda m, x: (
      (m(x, mask=mask), m(x, deterministic=True)),
      (jmoe.moe_ffn(x, m.params(), config, mask=mask),
       jmoe.moe_ffn(x, m.params(), config, deterministic=True))))(m, x)
  _tree_equal(outs, refs)
  assert float(outs[1][1].dropped_fraction) == 0.0  # eval: dropless
  assert np.all(np.asarray(outs[0][0])[~np.asarray(mask)] == 0)
  routing = m.router(x, mask=mask)
  assert np.all(np.asarray(routing.experts)[~np.asarray(mask).reshape(-1)] == -1)


def test_moe_dtype_and_errors():
  m = jnn.MoE(D, F, E, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert m.w_up[...].dtype == jnp.float32  # stored in param_dtype
  x = jax.random.normal(jax.random.key(1), (3, D))
  y, y_ref = nnx.jit(lambda m, x: (
      m(x)[0], jmoe.moe_ffn(x.astype(jnp.bfloat16), m.params(), m.config)[0]))(m, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y_ref, np.float32))
  with pytest.raises(ValueError, match=r"MoE: `x` must have shape \[..., d_model\]"
                     r" with d_model=16; got shape \(3, 17\)"):
    m(jnp.zeros((3, D + 1)))
  with pytest.raises(TypeError, match="floating"):
    m(jnp.zeros((3, D), jnp.int32))
  with pytest.raises(ValueError, match="top_k"):
    jnn.MoE(D, F, 2, config=jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=3)),
            rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="shared_gate"):
    jnn.MoE(D, F, E, shared_gate=True, rngs=nnx.Rngs(0))


class _RecordingParallel:
  """Stands in for `jmoe.parallel.ExpertParallel`: records its calls."""

  def __init__(self):
    self.calls = []

  def moe_ffn(self, x, params, config, *, key=None):
    self.calls.append((params, config, key))
    return 2.0 * x, None


def test_moe_calls_parallel_when_given():
  par = _RecordingParallel()
  cfg = jmoe.MoEConfig(activation="gelu")
  m = jnn.MoE(D, F, E, config=cfg, parallel=par, rngs=nnx.Rngs(0))
  x = jnp.ones((2, D))
  key = jax.random.key(0)
  y, aux = m(x, key=key)
  assert aux is None and len(par.calls) == 1
  np.testing.assert_array_equal(np.asarray(y), 2.0 * np.ones((2, D)))
  params, config, k = par.calls[0]
  _tree_equal(params, m.params())
  assert config is cfg and k is key
  # A static attribute: the module still goes through nnx.jit.
  y = nnx.jit(lambda m, x: m(x)[0])(m, x)
  np.testing.assert_array_equal(np.asarray(y), 2.0 * np.ones((2, D)))
  assert len(par.calls) == 2


def test_router_bias_is_not_a_param_and_changes_selection_only():
  router = jnn.Router(D, E, config=jmoe.RouterConfig(top_k=1), use_bias=True,
                      rngs=nnx.Rngs(0))
  assert isinstance(router.bias, jnn.ExpertBias)
  assert not isinstance(router.bias, nnx.Param)
  params = nnx.to_flat_state(nnx.state(router, nnx.Param))
  assert [p for p, _ in params] == [("kernel",)]
  biases = nnx.to_flat_state(nnx.state(router, jnn.ExpertBias))
  assert [p for p, _ in biases] == [("bias",)]

  x = jax.random.normal(jax.random.key(1), (4, 6, D))
  route = nnx.jit(lambda r, x: r(x))
  r0 = route(router, x)
  # The update helper steps the bias towards balance by +-rate.
  load = jnp.array([10, 0, 5, 5])
  router.update_bias(load, rate=0.5)
  np.testing.assert_array_equal(np.asarray(router.bias[...]),
                                np.array([-0.5, 0.5, 0.0, 0.0], np.float32))
  router.bias[...] = jnp.array([0.0, 0.0, 0.0, 5.0])
  r1 = route(router, x)
  assert r1.experts.shape == (24, 1)
  assert np.all(np.asarray(r1.experts) == 3)  # the bias moved the selection ...
  assert not np.all(np.asarray(r0.experts) == 3)
  # ... but not the probabilities or the combine weights (unbiased scores).
  np.testing.assert_array_equal(np.asarray(r1.probs), np.asarray(r0.probs))
  np.testing.assert_array_equal(
      np.asarray(r1.weights),
      np.take_along_axis(np.asarray(r0.probs), np.asarray(r1.experts), -1))

  m = jnn.MoE(D, F, E, router_bias=True, rngs=nnx.Rngs(0))
  m.update_bias(load, rate=0.25)
  np.testing.assert_array_equal(np.asarray(m.params().router_bias),
                                np.array([-0.25, 0.25, 0.0, 0.0], np.float32))
  with pytest.raises(ValueError, match="no router bias"):
    jnn.MoE(D, F, E, rngs=nnx.Rngs(0)).update_bias(load)


# ------------------------------------------------------------------------------
# Attention.
# ------------------------------------------------------------------------------


def _attention_reference(attn, x, positions):
  """float64 numpy: explicit projections, HF-style q/k norm, rotate_half RoPE,
  repeated kv heads, masked softmax."""
  g = lambda v: None if v is None else np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  b, s, d = x.shape
  h, kh, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
  eps = attn.norm_eps

  def rms(v, w):  # over the last axis
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

  xt = x.reshape(b * s, d)
  q = xt @ g(attn.q_proj).reshape(d, h * hd) + g(attn.q_bias).ravel()
  k = xt @ g(attn.k_proj).reshape(d, kh * hd) + g(attn.k_bias).ravel()
  v = xt @ g(attn.v_proj).reshape(d, kh * hd) + g(attn.v_bias).ravel()
  if attn.qk_norm == "full":  # OLMoE: the whole projected width
    q, k = rms(q, g(attn.q_norm).ravel()), rms(k, g(attn.k_norm).ravel())
  q = q.reshape(b, s, h, hd)
  k = k.reshape(b, s, kh, hd)
  v = v.reshape(b, s, kh, hd)
  if attn.qk_norm == "per_head":  # Qwen3
    q, k = rms(q, g(attn.q_norm)), rms(k, g(attn.k_norm))
  inv_freq = 1.0 / (attn.rope_theta ** (np.arange(0, hd, 2) / hd))
  ang = np.asarray(positions, np.float64)[..., None] * inv_freq
  ang = np.concatenate([ang, ang], -1)[:, :, None, :]
  rot = lambda t: np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], -1)
  q = q * np.cos(ang) + rot(q) * np.sin(ang)
  k = k * np.cos(ang) + rot(k) * np.sin(ang)
  k = np.repeat(k, h // kh, axis=2)
  v = np.repeat(v, h // kh, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", p, v)
  out = o.reshape(b, s, h * hd) @ g(attn.o_proj).reshape(h * hd, d)
  return out if attn.o_bias is None else out + g(attn.o_bias)


@pytest.mark.parametrize("qk_norm", ["per_head", "full"])
def test_attention_matches_reference(qk_norm):
  attn = jnn.Attention(D, H, num_kv_heads=KV, qkv_bias=True, out_bias=True,
                       qk_norm=qk_norm, rope_theta=500.0, rngs=nnx.Rngs(0))
  assert attn.q_proj.shape == (D, H, 4) and attn.k_proj.shape == (D, KV, 4)
  ks = jax.random.split(jax.random.key(3), 7)
  # Non-trivial biases and norm scales so that every piece matters.
  for i, name in enumerate(["q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
                            "o_bias"]):
    var = getattr(attn, name)
    var[...] = 1.0 + 0.5 * jax.random.normal(ks[i], var.shape)
  x = jax.random.normal(ks[6], (2, 5, D))
  positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
  y = nnx.jit(lambda a, x, p: a(x, positions=p))(attn, x, positions)
  assert y.shape == (2, 5, D)
  assert_rel(y, _attention_reference(attn, x, positions), what="attention")


def test_attention_causal_gqa_and_errors():
  attn = jnn.Attention(D, H, num_kv_heads=1, rngs=nnx.Rngs(0))
  assert attn.k_proj.shape == (D, 1, 4) and attn.o_proj.shape == (H, 4, D)

  @nnx.jit
  def f(a, x, x2):
    default = a(x)
    explicit = a(x, positions=jnp.broadcast_to(jnp.arange(6), (2, 6)))
    return default, explicit, a(x2)

  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  x2 = x.at[:, 4].set(3.0)  # change a "future" token
  y, y_explicit, y2 = f(attn, x, x2)
  np.testing.assert_array_equal(np.asarray(y[:, :4]), np.asarray(y2[:, :4]))
  assert not np.allclose(np.asarray(y[:, 4:]), np.asarray(y2[:, 4:]))
  assert_rel(y_explicit, y, what="default positions are 0..S-1")
  with pytest.raises(ValueError, match="positions"):
    attn(x, positions=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="multiple of `num_kv_heads`"):
    jnn.Attention(D, H, num_kv_heads=3, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------
# Language model.
# ------------------------------------------------------------------------------


def test_lm_layer_pattern_aux_and_heads():
  assert jnn.moe_layer_pattern(4, first_dense=1) == (False, True, True, True)
  assert jnn.moe_layer_pattern(5, first_dense=1, every=2) == (
      False, False, True, False, True)
  cfg = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2))
  lm = jnn.MoETransformerLM(V, D, 3, H, F, num_experts=E, moe_config=cfg,
                            moe_layers=(True, False, True), num_kv_heads=KV,
                            rngs=nnx.Rngs(0))
  assert [b.is_moe for b in lm.blocks] == [True, False, True]
  assert isinstance(lm.blocks[1].mlp, jnn.FeedForward)
  assert lm.blocks[1].mlp.d_ff == F * 2  # dense width = d_ff * top_k
  assert lm.head.shape == (D, V)
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, V)
  key = jax.random.key(7)

  @nnx.jit
  def run(lm, tokens, key):
    logits, aux = lm(tokens, key=key)
    # The stacked aux is the per-layer aux of the MoE blocks, in layer order.
    x, layer_aux = lm.embed(tokens), []
    for block, k in zip(lm.blocks, jax.random.split(key, 3)):
      x, a = block(x, key=k)
      layer_aux.append(a)
    return logits, aux, layer_aux

  logits, aux, layer_aux = run(lm, tokens, key)
  assert logits.shape == (2, 6, V) and logits.dtype == jnp.float32
  assert layer_aux[1] is None
  assert aux.balance_loss.shape == (2,)
  assert aux.tokens_per_expert.shape == (2, E)
  _tree_equal(aux, jax.tree.map(lambda *a: jnp.stack(a), layer_aux[0], layer_aux[2]))
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert.sum(-1)),
                                [2 * 6 * 2] * 2)

  # Tied head (bf16 compute, all dense): no head param, float32 logits, no aux,
  # and logits[..., v] = h . embedding[v]: changing the embedding row of a token
  # absent from the input changes that logit column and nothing else.
  tied = jnn.MoETransformerLM(V, D, 2, H, F, num_experts=0, tie_embeddings=True,
                              num_kv_heads=KV, dtype=jnp.bfloat16,
                              rngs=nnx.Rngs(1))
  assert tied.head is None
  assert "head" not in nnx.state(tied, nnx.Param)
  assert all(not b.is_moe for b in tied.blocks)
  absent = int(np.setdiff1d(np.arange(V), np.asarray(tokens))[0])
  fwd = nnx.jit(lambda m, t: m(t))
  logits, aux = fwd(tied, tokens)
  assert aux is None
  assert logits.shape == (2, 6, V) and logits.dtype == jnp.float32
  tied.embed.embedding[...] = tied.embed.embedding[...].at[absent].multiply(-2.0)
  logits2, _ = fwd(tied, tokens)
  others = np.arange(V) != absent
  np.testing.assert_array_equal(np.asarray(logits2)[..., others],
                                np.asarray(logits)[..., others])
  assert_rel(logits2[..., absent], -2.0 * logits[..., absent], jnp.bfloat16,
             "tied logit column")

  with pytest.raises(ValueError, match="one entry per layer"):
    jnn.MoETransformerLM(V, D, 3, H, F, num_experts=E, moe_layers=(True,),
                         rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="integer"):
    lm(jnp.zeros((2, 6)))


def test_lm_training_step_reduces_loss_and_leaves_bias():
  lm = jnn.MoETransformerLM(V, D, 2, H, F, num_experts=E, first_dense=1,
                            router_bias=True, num_kv_heads=KV,
                            qk_norm="per_head", rngs=nnx.Rngs(0))
  bias = lm.blocks[1].mlp.router.bias
  bias[...] = jnp.array([0.1, -0.1, 0.05, 0.0])
  bias_before = np.asarray(bias[...])
  params_before = jax.tree.map(np.asarray, nnx.state(lm, nnx.Param))
  optimizer = nnx.Optimizer(lm, optax.adamw(1e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, V)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  @nnx.jit
  def train_step(lm, optimizer, inputs, targets, key):
    def loss_fn(lm):
      logits, aux = lm(inputs, key=key)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return ce + 0.01 * aux.balance_loss.sum() + 1e-3 * aux.z_loss.sum(), aux
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(lm)
    optimizer.update(lm, grads)
    return loss, aux

  losses = []
  for i in range(30):
    loss, aux = train_step(lm, optimizer, inputs, targets, jax.random.key(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  np.testing.assert_array_equal(np.asarray(bias[...]), bias_before)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))]
  assert any("'w_up'" in p for p in opt_paths)
  assert not any("'bias'" in p for p in opt_paths)  # no optimizer state for it
  params_after = nnx.state(lm, nnx.Param)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                       params_before, params_after)
  assert all(jax.tree.leaves(moved))

  # The bias moves only through the explicit update helper.
  lm.update_router_biases(aux.tokens_per_expert, rate=0.01)
  load = np.asarray(aux.tokens_per_expert[0], np.float64)
  assert_rel(np.asarray(bias[...]) - bias_before,
             0.01 * np.sign(load.mean() - load), what="bias step")


# ------------------------------------------------------------------------------
# KV-cache decoding and generation.
# ------------------------------------------------------------------------------


def _decode_lm():
  return jnn.MoETransformerLM(V, D, 2, H, F, num_experts=E, moe_layers=(True, False),
                              num_kv_heads=KV, qkv_bias=True, out_bias=True,
                              qk_norm="full", shared_d_ff=F, rngs=nnx.Rngs(0))


def test_decode_with_kv_cache_matches_forward():
  lm = _decode_lm()
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, V)
  full, _ = nnx.jit(lambda m, t: m(t))(lm, tokens)
  cache = lm.init_cache(2, 10)
  assert cache.k.shape == (2, 2, 10, KV, D // H) and int(cache.index) == 0
  decode = nnx.jit(lambda m, t, c: m.decode(t, c))
  # Prefill 5, then one token at a time: positions 0..6 in the cache.
  outs = []
  for lo, hi in [(0, 5), (5, 6), (6, 7)]:
    logits, cache = decode(lm, tokens[:, lo:hi], cache)
    outs.append(logits)
  assert int(cache.index) == 7
  assert_rel(jnp.concatenate(outs, axis=1), full, what="cached decode")
  # Slots past the index are untouched (zero).
  assert not np.asarray(cache.k[:, :, 7:]).any()
  with pytest.raises(ValueError, match="do not fit"):
    lm.decode(tokens, lm.init_cache(2, 5))
  with pytest.raises(ValueError, match="batch"):
    lm.decode(tokens, lm.init_cache(3, 10))


def test_generate_greedy_sampling_and_eos():
  lm = _decode_lm()
  prompt = jax.random.randint(jax.random.key(1), (2, 3), 0, V)
  out = jnn.generate(lm, prompt, 5)
  assert out.shape == (2, 8) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out[:, :3]), np.asarray(prompt))
  # Greedy: each new token is the argmax of a full (uncached) forward pass over
  # the tokens before it.
  logits, _ = nnx.jit(lambda m, t: m(t))(lm, out[:, :-1])
  np.testing.assert_array_equal(np.asarray(out[:, 3:]),
                                np.asarray(jnp.argmax(logits[:, 2:], -1)))
  # A nucleus holding only the top token is greedy; sampling follows the key.
  key = jax.random.key(2)
  np.testing.assert_array_equal(
      np.asarray(jnn.generate(lm, prompt, 5, temperature=1.0, top_p=1e-6,
                              key=key)), np.asarray(out))
  s1 = jnn.generate(lm, prompt, 5, temperature=2.0, top_p=0.9, key=key)
  s2 = jnn.generate(lm, prompt, 5, temperature=2.0, top_p=0.9, key=key)
  s3 = jnn.generate(lm, prompt, 5, temperature=2.0, top_p=0.9,
                    key=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
  assert not np.array_equal(np.asarray(s1), np.asarray(s3))
  # After eos a row keeps emitting eos.
  eos = int(out[0, 4])
  with_eos = np.asarray(jnn.generate(lm, prompt, 5, eos_id=eos))
  np.testing.assert_array_equal(with_eos[0, :5], np.asarray(out[0, :5]))
  assert (with_eos[0, 5:] == eos).all()
  np.testing.assert_array_equal(jnn.generate(lm, prompt, 0), prompt)
  with pytest.raises(ValueError, match="needs a PRNG"):
    jnn.generate(lm, prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    jnn.generate(lm, prompt, 2, top_p=0.0)


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = jax.vmap(lambda k: jnn.sample_logits(logits, k, temperature=1.0,
                                              top_p=0.7))(keys)
  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 only, in proportion 5:3.
  counts = np.bincount(np.asarray(draw).ravel(), minlength=4)
  assert counts[2] == counts[3] == 0
  assert 0.5 < counts[0] / counts.sum() < 0.75
  np.testing.assert_array_equal(jnn.sample_logits(logits, None), [0])


# ------------------------------------------------------------------------------
# Logical axis names and shardings.
# ------------------------------------------------------------------------------

RULES = (("expert", "ep"), ("mlp", "tp"), ("vocab", "tp"), ("q_heads", "tp"),
         ("kv_heads", "tp"))


@pytest.mark.cpu  # a (2, 4) mesh of the default backend's devices
def test_logical_axes_and_partition_specs():
  P = jax.sharding.PartitionSpec
  # Metadata only: the abstract model is enough.
  lm = nnx.eval_shape(lambda: jnn.MoETransformerLM(
      V, D, 2, H, F, num_experts=E, first_dense=1, shared_d_ff=F,
      shared_gate=True, router_bias=True, qkv_bias=True, qk_norm="full",
      num_kv_heads=KV, rngs=nnx.Rngs(0)))
  allowed = set(jnn.LOGICAL_AXES) | {None}
  flat = nnx.to_flat_state(nnx.state(lm, nnx.Variable))
  assert len(flat) > 20
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, path
    assert set(names) <= allowed, (path, names)

  specs = jnn.logical_partition_specs(lm, RULES)
  moe = specs["blocks"][1]["mlp"]
  assert moe["w_up"].get_value() == P("ep", None, "tp")
  assert moe["w_down"].get_value() == P("ep", "tp", None)
  assert moe["router"]["kernel"].get_value() == P(None, "ep")
  assert moe["router"]["bias"].get_value() == P("ep")
  assert moe["shared"]["w_up"].get_value() == P(None, "tp")
  assert moe["shared_gate"].get_value() == P(None, None)
  assert specs["embed"]["embedding"].get_value() == P("tp", None)
  attn = specs["blocks"][0]["attn"]
  assert attn["q_proj"].get_value() == P(None, "tp", None)
  assert attn["k_norm"].get_value() == P("tp", None)
  # No rules: the logical names themselves; flax's own route agrees.
  logical = jnn.logical_partition_specs(nnx.state(lm, nnx.Param))
  assert logical["head"].get_value() == P("embed", "vocab")
  flax_specs = nnx.get_partition_spec(nnx.state(lm, nnx.Param))
  assert jax.tree.leaves(flax_specs) == jax.tree.leaves(logical)
  mesh = jax.make_mesh((2, 4), ("ep", "tp"))
  ours = jnn.logical_shardings(nnx.state(lm, nnx.Param), mesh, RULES)
  theirs = flax.linen.logical_to_mesh_sharding(flax_specs, mesh, RULES)
  assert jax.tree.leaves(ours) == jax.tree.leaves(theirs)
  assert len(jax.tree.leaves(ours)) == len(
      nnx.to_flat_state(nnx.state(lm, nnx.Param)))


@pytest.mark.cpu  # a (2, 4) mesh of the default backend's devices
def test_sharding_a_module_lazily_and_eagerly():
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((2, 4), ("ep", "tp"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  # Lazily: build unsharded (no mesh needed), then place the state.
  m = jnn.MoE(D, F, E, router_bias=True, rngs=nnx.Rngs(0))
  assert len(m.w_up[...].sharding.device_set) == 1
  nnx.update(m, jax.device_put(nnx.state(m), jnn.logical_shardings(m, mesh, RULES)))
  assert m.w_up[...].sharding.spec == P("ep", None, "tp")
  assert m.router.bias[...].sharding.spec == P("ep")
  # Eagerly: created sharded under a mesh and rules naming every logical axis.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(jnn.complete_rules(RULES)):
    r = jnn.Router(D, E, use_bias=True, eager_sharding=True, rngs=nnx.Rngs(0))
  assert r.kernel[...].sharding.spec == P(None, "ep")
  assert r.bias[...].sharding.spec == P("ep")


# ------------------------------------------------------------------------------
# Model configs: one value for every layer of the model.
# ------------------------------------------------------------------------------


def _flat_state(m):
  return [(p, np.asarray(v[...])) for p, v in nnx.to_flat_state(nnx.state(m))]


def test_lm_from_config_equals_the_keyword_form():
  attention = jnn.AttentionConfig(num_heads=H, num_kv_heads=KV, qk_norm="full",
                                  qkv_bias=True)
  config = jnn.TransformerConfig(vocab_size=V, d_model=D, num_layers=3, d_ff=F,
                                 attention=attention, num_experts=E, first_dense=1,
                                 shared_d_ff=F, norm_eps=1e-5)
  made = jnn.TransformerConfig.make(V, D, 3, H, F, num_kv_heads=KV, qk_norm="full",
                                    qkv_bias=True, num_experts=E, first_dense=1,
                                    shared_d_ff=F, norm_eps=1e-5)
  assert made == config and hash(made) == hash(config)
  a = nnx.eval_shape(lambda: jnn.MoETransformerLM(config, rngs=nnx.Rngs(0)))
  b = nnx.eval_shape(lambda: jnn.MoETransformerLM(
      V, D, 3, H, F, num_kv_heads=KV, qk_norm="full", qkv_bias=True,
      num_experts=E, first_dense=1, shared_d_ff=F, norm_eps=1e-5,
      rngs=nnx.Rngs(0)))
  assert a.config == b.config == config
  assert a.moe_layers == (False, True, True) and a.vocab_size == V
  sa = nnx.to_flat_state(nnx.state(a))
  sb = nnx.to_flat_state(nnx.state(b))
  assert [(p, v.shape) for p, v in sa] == [(p, v.shape) for p, v in sb]
  # One epsilon for every RMSNorm unless the attention sets its own.
  attn = a.blocks[0].attn
  assert attn.norm_eps == 1e-5 and a.final_norm.epsilon == 1e-5
  assert attn.head_dim == D // H and attn.num_kv_heads == KV
  own = config.replace(norm_eps=1e-6, attention=dataclasses.replace(
      attention, norm_eps=1e-3))
  assert own.attention_config.norm_eps == 1e-3
  # `replace` and the LM's keywords reach the attention's fields too.
  assert config.replace(num_kv_heads=1).attention.num_kv_heads == 1
  c = nnx.eval_shape(lambda: jnn.MoETransformerLM(config, num_kv_heads=1,
                                                  rngs=nnx.Rngs(0)))
  assert c.blocks[0].attn.k_proj.shape == (D, 1, D // H)


def test_same_values_through_every_constructor():
  config = jnn.TransformerConfig.make(V, D, 2, H, F, num_experts=E, router_bias=True,
                                      moe_layers=(True, False), rope_theta=500.0)
  a = jnn.MoETransformerLM(config, rngs=nnx.Rngs(3))
  b = jnn.MoETransformerLM(V, D, 2, H, F, num_experts=E, router_bias=True,
                           moe_layers=[True, False], rope_theta=500.0,
                           rngs=nnx.Rngs(3))
  for (pa, va), (pb, vb) in zip(_flat_state(a), _flat_state(b)):
    assert pa == pb
    np.testing.assert_array_equal(va, vb)
  attn = jnn.Attention(D, jnn.AttentionConfig(num_heads=H, num_kv_heads=KV),
                       rngs=nnx.Rngs(4))
  attn2 = jnn.Attention(D, H, num_kv_heads=KV, rngs=nnx.Rngs(4))
  assert attn.config == attn2.config
  for (pa, va), (pb, vb) in zip(_flat_state(attn), _flat_state(attn2)):
    assert pa == pb
    np.testing.assert_array_equal(va, vb)


def test_config_errors_name_the_new_call():
  with pytest.raises(TypeError, match=r"TransformerBlock takes the model's"
                     r" TransformerConfig"):
    jnn.TransformerBlock(D, H, F, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="TransformerConfig"):
    jnn.TransformerBlock(jnn.TransformerConfig.make(V, D, 1, H, F), 0,
                         rope_theta=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="TransformerConfig"):
    jnn.MoETransformerLM("mixtral", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of `num_kv_heads`"):
    jnn.AttentionConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="pass `head_dim`"):
    jnn.TransformerConfig.make(V, 18, 1, 4, F)
  with pytest.raises(ValueError, match="shared_gate"):
    jnn.TransformerConfig.make(V, D, 1, H, F, shared_gate=True)
  with pytest.raises(ValueError, match="not both"):
    jnn.TransformerConfig.make(V, D, 2, H, F, moe_layers=(True, True),
                               first_dense=1)


@pytest.mark.parametrize("preset,total,active", [
    # Published totals (model cards): Mixtral 46.7B / 12.9B, Qwen3-30B-A3B
    # 30.5B / 3.3B, OLMoE-1B-7B 6.9B / 1.3B.
    ("mixtral_8x7b", 46.7e9, 12.9e9),
    ("qwen3_30b_a3b", 30.5e9, 3.3e9),
    ("olmoe_1b_7b", 6.9e9, 1.3e9),
])
def test_presets_have_the_published_sizes(preset, total, active):
  config = getattr(jnn.TransformerConfig, preset)()
  lm = nnx.eval_shape(lambda: jnn.MoETransformerLM(config, rngs=nnx.Rngs(0)))
  n_total = n_active = 0
  experts = {s.name for s in jmoe.MOE_PARAMS if s.group == "experts"}
  for path, var in nnx.to_flat_state(nnx.state(lm, nnx.Param)):
    n = int(np.prod(var.shape))
    n_total += n
    per_expert = str(path[-1]) in experts and "mlp" in map(str, path) and (
        len(var.shape) == 3)
    n_active += n * config.moe.top_k / config.num_experts if per_expert else n
  assert abs(n_total / total - 1) < 0.01, n_total
  assert abs(n_active / active - 1) < 0.05, n_active


def test_sizes_as_keywords_still_work():
  a = nnx.eval_shape(lambda: jnn.MoETransformerLM(
      vocab_size=V, d_model=D, num_layers=2, num_heads=H, d_ff=F, num_experts=E,
      num_kv_heads=KV, rngs=nnx.Rngs(0)))
  assert a.config == jnn.TransformerConfig.make(V, D, 2, H, F, num_experts=E,
                                                num_kv_heads=KV)
  attn = nnx.eval_shape(lambda: jnn.Attention(d_model=D, num_heads=H,
                                              num_kv_heads=KV, rngs=nnx.Rngs(0)))
  assert attn.config == jnn.AttentionConfig(num_heads=H, num_kv_heads=KV).resolve(D)


# ------------------------------------------------------------------------------
# Aux the Flax way, router noise from rngs, the moe_config keyword, activations.
# ------------------------------------------------------------------------------


class _TwoMoE(nnx.Module):
  """A user model: two MoE layers (one with a router bias), named out of order."""

  def __init__(self, config=jmoe.MoEConfig(), *, rngs):
    self.zeta = jnn.MoE(D, F, E, config=config, router_bias=True, rngs=rngs)
    self.alpha = jnn.MoE(D, F, E, config=config, rngs=rngs)

  def __call__(self, x):
    y1, a1 = self.zeta(x)
    y2, a2 = self.alpha(x + y1)
    return y2, (a2, a1)  # path order: alpha, zeta


def test_aux_is_sown_collected_weighted_and_steps_biases():
  model = _TwoMoE(rngs=nnx.Rngs(0))
  model.zeta.router.bias[...] = jnp.array([0.3, -0.2, 0.1, 0.0])
  x = jax.random.normal(jax.random.key(1), (3, 4, D))
  (y, returned), inter = nnx.jit(
      lambda m, x: nnx.capture(m, nnx.Intermediate)(x))(model, x)
  aux = jnn.collect_aux(inter)
  assert aux.balance_loss.shape == (2,) and aux.tokens_per_expert.shape == (2, E)
  _tree_equal(aux, jax.tree.map(lambda *a: jnp.stack(a), *returned))
  assert [p for p, _ in jnn.moe_layers(model)] == [("alpha",), ("zeta",)]
  # Outside a capture nothing is recorded: the module's state is unchanged.
  before = nnx.graphdef(model)
  model(x)
  assert nnx.graphdef(model) == before and not nnx.state(model, nnx.Intermediate)
  # The weighted total.
  total = jnn.total_aux_loss(aux, balance_coef=0.5, z_coef=0.25)
  assert_rel(total, 0.5 * (returned[0].balance_loss + returned[1].balance_loss)
             + 0.25 * (returned[0].z_loss + returned[1].z_loss), what="total")
  assert float(jnn.total_aux_loss(None)) == 0.0
  # The bias step, from the intermediates (by path) and from the stacked record.
  b0 = model.zeta.router.bias[...]
  want = jmoe.update_expert_bias(b0, returned[1].tokens_per_expert, rate=0.1)
  assert jnn.update_router_biases(model, inter, rate=0.1) == 1
  np.testing.assert_array_equal(np.asarray(model.zeta.router.bias[...]), want)
  model.zeta.router.bias[...] = b0
  jnn.update_router_biases(model, aux, rate=0.1)
  np.testing.assert_array_equal(np.asarray(model.zeta.router.bias[...]), want)
  with pytest.raises(ValueError, match=r"one row per MoE layer.*\[2, experts\]"):
    jnn.update_router_biases(model, aux.tokens_per_expert[:1])
  with pytest.raises(ValueError, match="no MoE layer with a router bias"):
    jnn.update_router_biases(model.alpha, aux)


def test_router_noise_from_rngs_unless_deterministic():
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2, noise_std=1.0))
  m = jnn.MoE(D, F, E, config=config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, D))
  call = nnx.jit(lambda m, x, **kw: m(x, **kw)[1].tokens_per_expert,
                 static_argnames="deterministic")
  ref = lambda key: jmoe.moe_ffn(x, m.params(), config, key=key)[1].tokens_per_expert
  clean = ref(None)
  # The module's stream: a fresh key each call.
  draws = [np.asarray(call(m, x)) for _ in range(3)]
  assert not all(np.array_equal(draws[0], d) for d in draws[1:])
  assert not all(np.array_equal(np.asarray(clean), d) for d in draws)
  # deterministic: at the call, or through model.eval(); train() turns it back on.
  np.testing.assert_array_equal(call(m, x, deterministic=True), clean)
  m.eval()
  np.testing.assert_array_equal(call(m, x), clean)
  m.train()
  # An explicit key wins over the stream (and is the moe_ffn draw); deterministic
  # (evaluation, as moe_ffn(deterministic=True)) draws no noise even from it.
  key = jax.random.key(5)
  np.testing.assert_array_equal(call(m, x, key=key), ref(key))
  m.eval()
  np.testing.assert_array_equal(call(m, x, key=key), clean)
  # A call's own rngs.
  np.testing.assert_array_equal(call(m, x, deterministic=False, rngs=nnx.Rngs(router=3)),
                                ref(nnx.Rngs(router=3).router()))
  # No noise in the config: no stream kept, nothing drawn.
  assert jnn.MoE(D, F, E, rngs=nnx.Rngs(0)).rngs is None


def test_moe_config_keyword_and_the_old_one():
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=1))
  new = jnn.TransformerConfig.make(V, D, 1, H, F, num_experts=E, moe_config=config)
  with pytest.warns(DeprecationWarning, match="`moe=` is now `moe_config=`"):
    old = jnn.TransformerConfig.make(V, D, 1, H, F, num_experts=E, moe=config)
  assert old == new and new.moe is new.moe_config is config
  with pytest.warns(DeprecationWarning):
    assert jnn.TransformerConfig(vocab_size=V, d_model=D, num_layers=1, d_ff=F,
                                 attention=new.attention, moe=config) == new.replace(
                                     num_experts=8)
  with pytest.raises(TypeError, match="`moe_config` only"):
    new.replace(moe=config, moe_config=config)
  lm = jnn.MoETransformerLM(new, rngs=nnx.Rngs(0))
  assert lm.blocks[0].mlp.config is config


@pytest.mark.cpu  # a (2, 4) mesh of the default backend's devices
def test_activations_take_the_logical_axis_rules():
  mesh = jax.make_mesh((2, 4), ("data", "expert"))
  m = jnn.MoE(D, F, E, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 4, D))
  ref = jmoe.moe_ffn(x, m.params())[0]
  assert jnn.ACTIVATION_AXES == ("activation_batch", "activation_length",
                                 "activation_embed")
  rules = (("activation_batch", "data"), ("activation_length", "expert"))
  forward = lambda: nnx.jit(lambda m, x: m(x)[0])  # rules are read at tracing
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.sharding.PartitionSpec())
    nnx.update(m, jax.device_put(nnx.state(m), jax.sharding.PartitionSpec()))
    y_plain = forward()(m, xs)  # no rules: the layer leaves the layout alone
    with nnx.logical_axis_rules(rules):
      y = forward()(m, xs)
  assert y_plain.sharding.spec == jax.sharding.PartitionSpec(None, None, None)
  assert y.sharding.spec == jax.sharding.PartitionSpec("data", "expert", None)
  assert_rel(y, ref, what="constrained y")
  with nnx.logical_axis_rules(rules), pytest.raises(ValueError, match="set_mesh"):
    m(x)


@pytest.mark.parametrize("vocab", [V, 5000])  # one-hot matmul / scatter-add
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_lookup_gradient_is_the_scatter_add(vocab, dtype):
  """`embed_lookup`'s gradient (one-hot matmul up to ONE_HOT_EMBED_GRAD_MAX_VOCAB,
  scatter-add above) against a numpy scatter-add of the cotangents, repeated
  tokens and unused rows included."""
  from jmoe._src.nn.transformer import ONE_HOT_EMBED_GRAD_MAX_VOCAB, embed_lookup
  assert (vocab <= ONE_HOT_EMBED_GRAD_MAX_VOCAB) == (vocab == V)
  kt, kc, ke = jax.random.split(jax.random.key(11), 3)
  table = jax.random.normal(ke, (vocab, D)).astype(dtype)
  # Few distinct ids (the hot-row case) and a row never used.
  tokens = jax.random.randint(kt, (3, 40), 0, 7) * (vocab // 7)
  ct = jax.random.normal(kc, (3, 40, D)).astype(dtype)
  y, vjp = jax.vjp(lambda t: embed_lookup(t, tokens), table)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(table)[np.asarray(tokens)])
  (grad,) = jax.jit(vjp)(ct)
  assert grad.dtype == dtype and grad.shape == table.shape
  want = np.zeros((vocab, D), np.float64)
  np.add.at(want, np.asarray(tokens).reshape(-1),
            np.asarray(ct, np.float64).reshape(-1, D))
  assert_rel(grad.astype(jnp.float32), want, dtype, what="embedding gradient")
  assert not np.asarray(grad)[1].any()  # an unused row gets zero


def test_lm_backward_products_stay_in_the_compute_dtype():
  """A bf16 LM's projections and FFNs keep bf16 outputs, so none of the step's
  dot_generals outside the scopes that are float32 by design (router logits,
  the combine's weighted sum, the lm head's float32 logits, and XLA's own
  attention on CPU) takes a float32 operand: a float32 cotangent there runs the
  backward GEMMs in float32 (TF32 on an H200). Also checks the named scopes
  reach the backward's equations."""
  cfg = jnn.TransformerConfig.make(32, 24, 1, 2, 20, num_experts=5)
  lm = jnn.MoETransformerLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(lm, nnx.Param)
  tokens = jnp.zeros((2, 8), jnp.int32)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p)(tokens)
    return logits.mean() + aux.balance_loss.sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  f32_dots, scopes = [], set()
  by_design = ("router", "combine", "lm_head", "sdpa")

  def walk(jx):
    for eqn in jx.eqns:
      stack = str(eqn.source_info.name_stack)
      scopes.add(stack)
      if eqn.primitive.name == "dot_general":
        dts = {v.aval.dtype for v in eqn.invars}
        if (jnp.dtype(jnp.float32) in dts
            and not set(re.split(r"[/()]", stack)) & set(by_design)):
          f32_dots.append((stack, [v.aval.shape for v in eqn.invars]))
    for sub in jax.extend.core.subjaxprs(jx):
      walk(sub)

  walk(jaxpr.jaxpr)
  assert not f32_dots, f32_dots
  for name in ("qkv_proj", "out_proj", "experts", "router", "lm_head"):
    assert any(name in s and "transpose" in s for s in scopes), (name, scopes)
