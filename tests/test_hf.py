"""jmoe.hf against transformers: logits, MoE blocks, routing, export, generation.

Tiny random models (2 layers, hidden 32, 4-8 experts, vocab 100) built from
configs in float32; no download. Tests that need torch and transformers (the
`hf` extra) skip where either is absent; the safetensors round trip of a
jmoe-native model needs only the `safetensors` package. Weights are re-drawn
with unit-scale fan-in normals (HF's 0.02 init would make attention uniform and
routing near-random ties) so that every piece matters.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
import jmoe.hf
import jmoe.nn as jnn
from tests.utils import assert_rel

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

requires_hf = pytest.mark.skipif(
    torch is None or transformers is None,
    reason="needs torch and transformers (pip install 'jmoe[hf]')")

# max|jmoe - hf| / max|hf| of float32 logits / block outputs.
PARITY = 1e-4
V, D = 100, 32
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
              attn_implementation="eager")


def _configs():
  tf = transformers
  return {
      # Mixtral: top-k of the softmax, renormalised; rope_theta from the config.
      "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(
          intermediate_size=32, num_local_experts=4,
          rope_parameters={"rope_type": "default", "rope_theta": 500.0},
          **COMMON)),
      # Qwen2-MoE: qkv bias, gated shared expert, a dense layer (mlp_only_layers),
      # no renormalisation.
      "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
          intermediate_size=48, moe_intermediate_size=32,
          shared_expert_intermediate_size=40, num_experts=4, mlp_only_layers=[1],
          norm_topk_prob=False, **COMMON)),
      # Qwen3-MoE: per-head q/k norm, head_dim != hidden/heads, attention_bias
      # (q/k/v and o), tied embeddings, 8 experts renormalised.
      "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(
          intermediate_size=48, moe_intermediate_size=32, head_dim=16,
          num_experts=8, norm_topk_prob=True, attention_bias=True,
          tie_word_embeddings=True, **COMMON)),
      # OLMoE: q/k norm over the full projection, rms_norm_eps 1e-5.
      "olmoe": (tf.OlmoeForCausalLM, tf.OlmoeConfig(
          intermediate_size=32, num_experts=4, norm_topk_prob=True,
          eos_token_id=None, pad_token_id=None, **COMMON)),
  }


def _deepseek_config():
  # 8 experts in 4 groups of 2, 2 groups per token, top-3, 2 shared experts.
  return transformers.DeepseekV3Config(
      hidden_size=D, moe_intermediate_size=16, n_routed_experts=8, n_group=4,
      topk_group=2, num_experts_per_tok=3, n_shared_experts=2,
      norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=V,
      num_hidden_layers=1, num_attention_heads=4)


def _redraw(module, seed):
  """Unit-scale weights: fan-in normals, norm scales ~1, small biases."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
      elif "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return module


@pytest.fixture(scope="module")
def hf_models():
  out = {}
  assert list(_configs()) == FAMILIES
  for i, (name, (cls, config)) in enumerate(_configs().items()):
    torch.manual_seed(i)
    out[name] = _redraw(cls(config).eval(), seed=i)
  return out


@pytest.fixture(scope="module")
def jmoe_models(hf_models):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no sliding-window or other warning
    return {name: jmoe.hf.from_transformers(m) for name, m in hf_models.items()}


def _ids(shape=(2, 9), seed=1):
  return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _forward(lm, ids):
  logits, _ = nnx.jit(lambda m, t: m(t))(lm, jnp.asarray(ids.numpy()))
  return np.asarray(logits)


def _rel(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]  # _configs() keys


# ------------------------------------------------------------------------------
# Full models.
# ------------------------------------------------------------------------------


@requires_hf
@pytest.mark.parametrize("name", FAMILIES)
def test_lm_logits_match_transformers(name, hf_models, jmoe_models):
  hf, lm = hf_models[name], jmoe_models[name]
  ids = _ids()
  with torch.no_grad():
    ref = hf(ids).logits.numpy()
  got = _forward(lm, ids)
  assert got.shape == ref.shape == (2, 9, V)
  err = _rel(got, ref)
  assert err < PARITY, f"{name}: max|diff| / max|ref| = {err:.3g}"
  # The config pieces really made it across.
  cfg = hf.config
  attn = lm.blocks[0].attn
  assert attn.head_dim == (getattr(cfg, "head_dim", None)
                           or cfg.hidden_size // cfg.num_attention_heads)
  assert attn.norm_eps == cfg.rms_norm_eps
  assert attn.rope_theta == cfg.rope_parameters["rope_theta"]
  assert lm.tie_embeddings == cfg.tie_word_embeddings
  if name == "qwen2_moe":
    assert lm.moe_layers == (True, False)


@requires_hf
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_greedy_generation_matches_transformers(name, hf_models, jmoe_models):
  hf, lm = hf_models[name], jmoe_models[name]
  prompt = _ids((2, 5), seed=3)
  assert hf.dtype == torch.float32
  with torch.no_grad():
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                      eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(prompt))
  got = jnn.generate(lm, jnp.asarray(prompt.numpy()), 8)
  assert got.shape == (2, 13)
  np.testing.assert_array_equal(np.asarray(got), ref.numpy())


@requires_hf
def test_from_safetensors_reads_save_pretrained(hf_models, jmoe_models, tmp_path):
  """save_pretrained writes the on-disk per-expert layout; read it without torch
  (and check the per-expert export writes exactly those tensors)."""
  name = "mixtral"
  hf_models[name].save_pretrained(tmp_path)
  lm = jmoe.hf.from_safetensors(str(tmp_path))
  ids = _ids()
  np.testing.assert_array_equal(_forward(lm, ids), _forward(jmoe_models[name], ids))
  on_disk = jmoe.hf.load_safetensors(str(tmp_path))
  assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in on_disk
  ours = jmoe.hf.to_transformers_state_dict(lm, name, layout="per_expert",
                                            return_tensors="np")
  assert sorted(ours) == sorted(on_disk)
  for k, v in on_disk.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)


# ------------------------------------------------------------------------------
# MoE blocks, routing included.
# ------------------------------------------------------------------------------


def _block_parity(hf_block, moe, x, name):
  """Block outputs and the experts (and weights) chosen for every token."""
  with torch.no_grad():
    ref = hf_block(x).numpy()
    # HF's own router module, as its block calls it.
    _, ref_w, ref_e = hf_block.gate(x.reshape(-1, D))
  xj = jnp.asarray(x.numpy())
  (y, _), routing = nnx.jit(lambda m, x: (m(x), m.router(x)))(moe, xj)
  err = _rel(y, ref)
  assert err < PARITY, f"{name} block: max|diff| / max|ref| = {err:.3g}"
  # Same experts per token (HF's top-k may be unsorted): compare sorted by id.
  ref_e, ref_w = ref_e.numpy(), ref_w.numpy()
  got_e, got_w = np.asarray(routing.experts), np.asarray(routing.weights)
  o_ref, o_got = np.argsort(ref_e, -1), np.argsort(got_e, -1)
  np.testing.assert_array_equal(np.take_along_axis(got_e, o_got, -1),
                                np.take_along_axis(ref_e, o_ref, -1))
  assert_rel(np.take_along_axis(got_w, o_got, -1),
             np.take_along_axis(ref_w, o_ref, -1), what=f"{name} combine weights")
  return routing


@requires_hf
@pytest.mark.parametrize("name", FAMILIES)
def test_moe_block_matches_transformers(name, hf_models):
  hf_block = hf_models[name].model.layers[0].mlp
  moe = jmoe.hf.moe_block_from_transformers(hf_block)
  # The config is also read from the model's config, with the same result.
  from_cfg = jmoe.hf.moe_block_from_transformers(hf_block,
                                                 hf_models[name].config)
  assert from_cfg.config == moe.config
  x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(5))
  _block_parity(hf_block, moe, x, name)


@requires_hf
def test_deepseek_v3_block_grouped_routing_and_bias():
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
  config = _deepseek_config()
  torch.manual_seed(0)
  hf_block = _redraw(ds.DeepseekV3MoE(config).eval(), seed=7)
  bias = torch.tensor([0.4, -0.3, 0.0, 0.25, -0.2, 0.1, 0.35, -0.4])
  hf_block.gate.e_score_correction_bias.copy_(bias)
  moe = jmoe.hf.moe_block_from_transformers(hf_block)
  r = moe.config.router
  assert (r.score, r.num_groups, r.top_groups, r.group_score) == (
      "sigmoid", 4, 2, "top2_sum")
  assert r.normalize and r.routed_scaling_factor == 2.5 and r.top_k == 3
  assert moe.shared.d_ff == 32 and moe.shared_gate is None
  assert isinstance(moe.router.bias, jnn.ExpertBias)
  np.testing.assert_array_equal(np.asarray(moe.router.bias[...]), bias.numpy())

  x = torch.randn(4, 8, D, generator=torch.Generator().manual_seed(6))
  routing = _block_parity(hf_block, moe, x, "deepseek_v3")
  # The bias and the groups really shape the selection here.
  xt = jnp.asarray(x.numpy()).reshape(-1, D)
  logits = moe.router.logits(xt)
  chosen = lambda **kw: np.sort(np.asarray(
      jmoe.route(logits, r, **kw).experts), -1)
  got = np.sort(np.asarray(routing.experts), -1)
  bias_j = moe.router.bias[...]
  np.testing.assert_array_equal(got, chosen(bias=bias_j))
  assert (chosen() != got).any(axis=-1).sum() >= 4  # without the bias
  ungrouped = lambda: np.sort(np.asarray(jmoe.route(
      logits, r, bias=bias_j, num_groups=1, top_groups=1).experts), -1)
  assert (ungrouped() != got).any(axis=-1).sum() >= 4  # without the groups
  # At most 2 of the 4 groups per token.
  assert (np.array([len(set(row // 2)) for row in got]) <= 2).all()

  # Round trip into a fresh transformers block.
  fresh = ds.DeepseekV3MoE(config).eval()
  fresh.load_state_dict(jmoe.hf.moe_block_to_transformers_state_dict(
      moe, "deepseek_v3"), strict=True)
  for k, v in hf_block.state_dict().items():
    torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)


@requires_hf
def test_deepseek_v3_full_model_is_refused():
  with pytest.raises(NotImplementedError, match="latent attention"):
    jmoe.hf.from_state_dict({}, _deepseek_config())


# ------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------


@requires_hf
@pytest.mark.parametrize("name", FAMILIES)
def test_export_round_trip(name, hf_models, jmoe_models):
  hf, lm = hf_models[name], jmoe_models[name]
  cls, config = _configs()[name]
  fresh = cls(config).eval()
  result = fresh.load_state_dict(
      jmoe.hf.to_transformers_state_dict(lm, config), strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  for k, v in hf.state_dict().items():
    torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)


@requires_hf
def test_jmoe_native_model_loads_into_transformers():
  """A model built (e.g. trained) in jmoe runs in transformers with its logits."""
  lm = jnn.MoETransformerLM(
      V, D, 2, 4, 16, num_experts=8, num_kv_heads=2, qk_norm="per_head",
      moe_config=jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2, normalize=True)),
      moe_layers=(False, True), dense_d_ff=24, rope_theta=1e4, norm_eps=1e-6,
      rngs=nnx.Rngs(0))
  config = jmoe.hf.to_transformers_config(lm, "qwen3_moe")
  hf = transformers.Qwen3MoeForCausalLM(config).eval()
  hf.load_state_dict(jmoe.hf.to_transformers_state_dict(lm, "qwen3_moe"))
  ids = _ids()
  with torch.no_grad():
    ref = hf(ids).logits.numpy()
  assert _rel(_forward(lm, ids), ref) < PARITY
  # Families that cannot express the model say why.
  with pytest.raises(ValueError, match="mixtral cannot express"):
    jmoe.hf.to_transformers_state_dict(lm, "mixtral")
  with pytest.raises(ValueError, match="unsupported model_type"):
    jmoe.hf.to_transformers_state_dict(lm, "llama")


@requires_hf
def test_config_round_trip_and_the_mixtral_preset(jmoe_models):
  """An imported model's TransformerConfig is the one jmoe.hf reads back from the
  exported fields; transformers' MixtralConfig() defaults are Mixtral-8x7B's, so
  they read as the preset."""
  lm = jmoe_models["qwen2_moe"]
  fam = jmoe.hf.family("qwen2_moe")
  back = jmoe.hf._config_from_hf(fam, jmoe.hf.transformers_config_dict(lm, fam))
  assert jmoe.hf._canonical(back) == jmoe.hf._canonical(lm.config)
  got = jmoe.hf._config_from_hf(jmoe.hf.family("mixtral"),
                                transformers.MixtralConfig())
  assert jmoe.hf._canonical(got) == jmoe.hf._canonical(
      jnn.TransformerConfig.mixtral_8x7b())


@requires_hf
def test_sliding_window_warns(hf_models):
  hf = hf_models["mixtral"]
  config = transformers.MixtralConfig(**{**hf.config.to_dict(),
                                         "sliding_window": 4})
  with pytest.warns(UserWarning, match="sliding-window"):
    jmoe.hf.from_state_dict(hf.state_dict(), config)


def test_safetensors_round_trip_without_torch(tmp_path):
  """A jmoe-native model -> per-expert safetensors + config dict -> jmoe, with
  only the `safetensors` package (no torch, no transformers)."""
  numpy_io = pytest.importorskip("safetensors.numpy")
  lm = jnn.MoETransformerLM(
      V, D, 2, 4, 16, num_experts=4, num_kv_heads=2, shared_d_ff=24,
      shared_gate=True, qkv_bias=True, moe_layers=(True, False), dense_d_ff=40,
      moe_config=jmoe.MoEConfig(router=jmoe.RouterConfig(top_k=2)), rngs=nnx.Rngs(0))
  config = jmoe.hf.transformers_config_dict(lm, "qwen2_moe")
  sd = jmoe.hf.to_transformers_state_dict(lm, "qwen2_moe", layout="per_expert",
                                          return_tensors="np")
  assert "model.layers.0.mlp.experts.3.down_proj.weight" in sd
  numpy_io.save_file(sd, str(tmp_path / "model.safetensors"))
  back = jmoe.hf.from_safetensors(str(tmp_path), config=config)
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, V)
  fwd = nnx.jit(lambda m, t: m(t)[0])
  np.testing.assert_array_equal(np.asarray(fwd(back, tokens)),
                                np.asarray(fwd(lm, tokens)))
