"""Hugging Face transformers <-> jmoe: checkpoint conversion for MoE families.

Optional extra `jmoe[hf]`. Converting a live PyTorch model needs torch and
transformers; reading safetensors files needs `safetensors` (and transformers
only to parse a `config.json`), not torch.

  lm = jmoe.hf.from_transformers(hf_model)           # -> jmoe.nn.MoETransformerLM
  logits, aux = lm(tokens)
  tokens = jmoe.nn.generate(lm, prompt, 20)           # KV-cached, jitted
  moe = jmoe.hf.moe_block_from_transformers(hf_block) # -> jmoe.nn.MoE
  sd = jmoe.hf.to_transformers_state_dict(lm, "mixtral")
  hf_model.load_state_dict(sd)

Families (transformers `model_type`; the full LM and/or the MoE block):

  mixtral      MixtralForCausalLM / MixtralSparseMoeBlock
  qwen2_moe    Qwen2MoeForCausalLM / Qwen2MoeSparseMoeBlock
  qwen3_moe    Qwen3MoeForCausalLM / Qwen3MoeSparseMoeBlock
  olmoe        OlmoeForCausalLM / OlmoeSparseMoeBlock
  deepseek_v3  DeepseekV3MoE (block only: the LM's multi-head latent attention
               has no jmoe module)

Each family is a value (`Family`, in `FAMILIES`): config-field names, router
settings and key names. Nothing in jmoe's core knows about them. A transformers
config reads into one `jmoe.nn.TransformerConfig` (the model's `lm.config`), and
export writes that config back and checks that the family reads it the same way.
The MoE block's tensors are the rows of `jmoe.MOE_PARAMS` that its `MoELayout`
has, each under its HF name.

Router (HF config -> `jmoe.RouterConfig`):

  mixtral      softmax over all experts, top-k, renormalise (= top-k logits then
               softmax): order="softmax_topk", normalize=True
  qwen*, olmoe softmax, top-k, normalize=`norm_topk_prob`
  deepseek_v3  score="sigmoid", selection on sigmoid + `e_score_correction_bias`
               (the jmoe router bias, selection only), num_groups=`n_group`,
               top_groups=`topk_group`, group_score="top2_sum",
               normalize=`norm_topk_prob`, routed_scaling_factor

Weight mapping. HF `nn.Linear` weights are W [out, in]; jmoe kernels are [in, out].
D hidden_size, H heads, K kv heads, hd head_dim, E experts, F expert width, Fs
shared width, Fd dense width, V vocab. HF keys are transformers' in-memory (v5)
names with L = model.layers.{i}, A = L.self_attn, M = L.mlp; jmoe paths are in
the `MoETransformerLM` with a = blocks[i].attn, m = blocks[i].mlp:

  HF key                      HF shape       jmoe path            jmoe value
  model.embed_tokens.weight   [V, D]         embed.embedding      same
  lm_head.weight (untied)     [V, D]         head                 W.T [D, V]
  model.norm.weight           [D]            final_norm.scale     same
  L.input_layernorm.weight    [D]            blocks[i].attn_norm  .scale, same
  L.post_attention_layernorm.weight [D]      blocks[i].mlp_norm   .scale, same
  A.q_proj.weight             [H*hd, D]      a.q_proj             W.T -> [D, H, hd]
  A.{k,v}_proj.weight         [K*hd, D]      a.{k,v}_proj         W.T -> [D, K, hd]
  A.o_proj.weight             [D, H*hd]      a.o_proj             W.T -> [H, hd, D]
  A.q_proj.bias (1)           [H*hd]         a.q_bias             -> [H, hd]
  A.{k,v}_proj.bias (1)       [K*hd]         a.{k,v}_bias         -> [K, hd]
  A.o_proj.bias (2)           [D]            a.o_bias             same
  A.{q,k}_norm.weight qwen3   [hd]           a.{q,k}_norm         same ("per_head")
  A.{q,k}_norm.weight olmoe   [H*hd]/[K*hd]  a.{q,k}_norm         -> [H|K, hd] (full)
  M.gate.weight               [E, D]         m.router.kernel      W.T [D, E]
  M.gate.e_score_correction_bias [E]         m.router.bias        same (ExpertBias)
  M.experts.gate_up_proj      [E, 2F, D]     m.w_gate, m.w_up     [:, :F], [:, F:],
                                                                  .T -> [E, D, F]
  M.experts.down_proj         [E, D, F]      m.w_down             .T -> [E, F, D]
  M.shared_expert(3).gate_proj.weight [Fs,D] m.shared.w_gate      W.T [D, Fs]
  M.shared_expert(3).up_proj.weight   [Fs,D] m.shared.w_up        W.T [D, Fs]
  M.shared_expert(3).down_proj.weight [D,Fs] m.shared.w_down      W.T [Fs, D]
  M.shared_expert_gate.weight [1, D]         m.shared_gate        W.T [D, 1]
  M.{gate,up}_proj.weight (4) [Fd, D]        m.w_{gate,up}        W.T [D, Fd]
  M.down_proj.weight (4)      [D, Fd]        m.w_down             W.T [Fd, D]

(1) Qwen2-MoE `qkv_bias`, Qwen3-MoE / OLMoE `attention_bias`. (2) Qwen3-MoE /
OLMoE `attention_bias`. (3) DeepSeek-V3: `shared_experts` (width
moe_intermediate_size * n_shared_experts, no gate). (4) Dense layers (Qwen
`mlp_only_layers` / `decoder_sparse_step`): m is a `jmoe.nn.FeedForward`.

The MoE block alone (`moe_block_from_transformers`) uses the same rows with the
`M.` prefix dropped and paths relative to the `jmoe.nn.MoE`.

Checkpoints on disk (and transformers 4.x models) store experts one by one:
`...experts.{j}.{gate_proj,up_proj,down_proj}.weight` (Mixtral:
`block_sparse_moe.experts.{j}.{w1,w3,w2}.weight`, w1 gate, w3 up, w2 down). Both
layouts are read; `to_transformers_state_dict(..., layout="per_expert")` writes
the on-disk one.

Numerics (float32 parity, asserted in tests/test_hf.py at 1e-4 of the logit scale):
every RMSNorm (layers, final, q/k norms) uses `rms_norm_eps` in float32; RoPE is
HF's rotate-half with `rope_parameters["rope_theta"]` ("default" rope only);
attention scale hd**-0.5. HF computes Mixtral/Qwen/OLMoE router logits in the
model dtype and Qwen/OLMoE cast the combine weights back to it; jmoe keeps router
math and combine weights in float32 (identical in float32, jmoe is the more
precise in bfloat16). DeepSeek-V3 masks unused groups with -inf before its top-k,
as jmoe does. Sliding-window attention (Mixtral `sliding_window`, Qwen
`use_sliding_window`) is not modelled: a warning says so, and outputs agree only
for sequences no longer than the window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import glob
import json
import os
import re
from typing import Any
import warnings

from flax import nnx
import jax.numpy as jnp
import numpy as np

from jmoe import nn as jnn
from jmoe._src import moe as moe_lib
from jmoe._src import params as params_lib
from jmoe._src import routing as routing_lib

_MISSING = object()


def _get(config, name: str, default=_MISSING):
  """A field of a transformers config object or of a config dict."""
  if isinstance(config, Mapping):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  if value is _MISSING:
    raise ValueError(f"jmoe.hf: the config has no field {name!r}.")
  return value


# ------------------------------------------------------------------------------
# Families: plain data.
# ------------------------------------------------------------------------------


def _softmax_router(c, *, normalize: bool | None = None) -> routing_lib.RouterConfig:
  return routing_lib.RouterConfig(
      top_k=int(_get(c, "num_experts_per_tok")), score="softmax",
      order="softmax_topk",
      normalize=bool(_get(c, "norm_topk_prob", False)) if normalize is None
      else normalize)


def _mixtral_router(c):
  return _softmax_router(c, normalize=True)


def _deepseek_router(c):
  return routing_lib.RouterConfig(
      top_k=int(_get(c, "num_experts_per_tok")), score="sigmoid",
      normalize=bool(_get(c, "norm_topk_prob", False)),
      routed_scaling_factor=float(_get(c, "routed_scaling_factor", 1.0)),
      num_groups=int(_get(c, "n_group", 1) or 1),
      top_groups=int(_get(c, "topk_group", 1) or 1), group_score="top2_sum")


def _all_moe(c, n: int) -> tuple[bool, ...]:
  return (True,) * n


def _sparse_step_moe(c, n: int) -> tuple[bool, ...]:
  """Qwen: layer i is MoE unless in `mlp_only_layers`; every
  `decoder_sparse_step`-th layer."""
  dense = set(_get(c, "mlp_only_layers", None) or ())
  step = int(_get(c, "decoder_sparse_step", 1) or 1)
  has_experts = int(_get(c, "num_experts")) > 0
  return tuple(has_experts and i not in dense and (i + 1) % step == 0
               for i in range(n))


def _first_dense_moe(c, n: int) -> tuple[bool, ...]:
  k = int(_get(c, "first_k_dense_replace", 0) or 0)
  return tuple(i >= k for i in range(n))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
  """How one transformers MoE family maps onto jmoe. Plain data.

  Attributes:
    model_type: transformers' `config.model_type`.
    causal_lm: the transformers LM class name, or None when only the MoE block
      converts (DeepSeek-V3: multi-head latent attention).
    moe_block: the transformers MoE block class name.
    router: HF config -> `jmoe.RouterConfig`.
    num_experts: config field of the number of routed experts.
    expert_d_ff: config field of each expert's width.
    dense_d_ff: config field of the dense layers' width (or None).
    moe_layers: (config, num_layers) -> which layers are MoE.
    shared: module name of the shared expert(s) ("" for none).
    shared_d_ff: config -> width of the shared expert(s).
    shared_gate: the shared output is scaled by sigmoid(x @ shared_expert_gate).
    router_bias: the router has a selection-only bias (e_score_correction_bias).
    qkv_bias, out_bias: config -> biases on q/k/v and on o.
    qk_norm: None, "per_head" (Qwen3) or "full" (OLMoE).
    head_dim_field: the config takes an explicit `head_dim`.
    legacy_moe: the MoE module's name in on-disk checkpoints.
    legacy_experts: on-disk names of each expert's (gate, up, down) linears.
    export_fields: (config, router) -> the family-specific config fields, from
      the model's canonical `jmoe.nn.TransformerConfig` (see `_canonical`).
  """

  model_type: str
  causal_lm: str | None
  moe_block: str
  router: Callable[[Any], routing_lib.RouterConfig]
  num_experts: str
  expert_d_ff: str
  dense_d_ff: str | None = None
  moe_layers: Callable[[Any, int], tuple[bool, ...]] = _all_moe
  shared: str = ""
  shared_d_ff: Callable[[Any], int] = lambda c: 0
  shared_gate: bool = False
  router_bias: bool = False
  qkv_bias: Callable[[Any], bool] = lambda c: False
  out_bias: Callable[[Any], bool] = lambda c: False
  qk_norm: str | None = None
  head_dim_field: bool = False
  legacy_moe: str = "mlp"
  legacy_experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  export_fields: Callable[[Any, routing_lib.RouterConfig], dict] | None = None


def _dense_layers(config) -> list[int]:
  return [i for i, m in enumerate(config.layer_is_moe) if not m]


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        model_type="mixtral", causal_lm="MixtralForCausalLM",
        moe_block="MixtralSparseMoeBlock", router=_mixtral_router,
        num_experts="num_local_experts", expert_d_ff="intermediate_size",
        head_dim_field=True, legacy_moe="block_sparse_moe",
        legacy_experts=("w1", "w3", "w2"),
        export_fields=lambda s, r: dict(
            num_local_experts=s.num_experts, intermediate_size=s.d_ff,
            sliding_window=None)),
    "qwen2_moe": Family(
        model_type="qwen2_moe", causal_lm="Qwen2MoeForCausalLM",
        moe_block="Qwen2MoeSparseMoeBlock", router=_softmax_router,
        num_experts="num_experts", expert_d_ff="moe_intermediate_size",
        dense_d_ff="intermediate_size", moe_layers=_sparse_step_moe,
        shared="shared_expert",
        shared_d_ff=lambda c: int(_get(c, "shared_expert_intermediate_size")),
        shared_gate=True, qkv_bias=lambda c: bool(_get(c, "qkv_bias", True)),
        export_fields=lambda s, r: dict(
            num_experts=s.num_experts, moe_intermediate_size=s.d_ff,
            intermediate_size=s.dense_d_ff or s.d_ff,
            shared_expert_intermediate_size=s.shared_d_ff,
            norm_topk_prob=r.normalize, decoder_sparse_step=1,
            mlp_only_layers=_dense_layers(s), qkv_bias=s.attention.qkv_bias,
            use_sliding_window=False)),
    "qwen3_moe": Family(
        model_type="qwen3_moe", causal_lm="Qwen3MoeForCausalLM",
        moe_block="Qwen3MoeSparseMoeBlock", router=_softmax_router,
        num_experts="num_experts", expert_d_ff="moe_intermediate_size",
        dense_d_ff="intermediate_size", moe_layers=_sparse_step_moe,
        qkv_bias=lambda c: bool(_get(c, "attention_bias", False)),
        out_bias=lambda c: bool(_get(c, "attention_bias", False)),
        qk_norm="per_head", head_dim_field=True,
        export_fields=lambda s, r: dict(
            num_experts=s.num_experts, moe_intermediate_size=s.d_ff,
            intermediate_size=s.dense_d_ff or s.d_ff, norm_topk_prob=r.normalize,
            decoder_sparse_step=1, mlp_only_layers=_dense_layers(s),
            attention_bias=s.attention.qkv_bias, use_sliding_window=False)),
    "olmoe": Family(
        model_type="olmoe", causal_lm="OlmoeForCausalLM",
        moe_block="OlmoeSparseMoeBlock", router=_softmax_router,
        num_experts="num_experts", expert_d_ff="intermediate_size",
        qkv_bias=lambda c: bool(_get(c, "attention_bias", False)),
        out_bias=lambda c: bool(_get(c, "attention_bias", False)),
        qk_norm="full",
        export_fields=lambda s, r: dict(
            num_experts=s.num_experts, intermediate_size=s.d_ff,
            norm_topk_prob=r.normalize, attention_bias=s.attention.qkv_bias,
            clip_qkv=None)),
    "deepseek_v3": Family(
        model_type="deepseek_v3", causal_lm=None, moe_block="DeepseekV3MoE",
        router=_deepseek_router, num_experts="n_routed_experts",
        expert_d_ff="moe_intermediate_size", dense_d_ff="intermediate_size",
        moe_layers=_first_dense_moe, shared="shared_experts",
        shared_d_ff=lambda c: (int(_get(c, "moe_intermediate_size"))
                               * int(_get(c, "n_shared_experts", 0) or 0)),
        router_bias=True),
}

_BLOCK_FAMILIES = {f.moe_block: f for f in FAMILIES.values()}


def family(name_or_config) -> Family:
  """The `Family` of a model_type name, a transformers config or a config dict."""
  if isinstance(name_or_config, Family):
    return name_or_config
  name = (name_or_config if isinstance(name_or_config, str)
          else _get(name_or_config, "model_type"))
  if name not in FAMILIES:
    raise ValueError(
        f"jmoe.hf: unsupported model_type {name!r}; supported:"
        f" {sorted(FAMILIES)}.")
  return FAMILIES[name]


# ------------------------------------------------------------------------------
# The model: a jmoe.nn.TransformerConfig, read from a transformers config.
# ------------------------------------------------------------------------------


_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu",
                "gelu_pytorch_tanh": "geglu_tanh"}


def _activation(c) -> str:
  act = _get(c, "hidden_act", "silu")
  if act not in _ACTIVATIONS:
    raise NotImplementedError(
        f"jmoe.hf: hidden_act={act!r} has no jmoe equivalent; supported:"
        f" {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[act]


def _rope_theta(c) -> float:
  params = _get(c, "rope_parameters", None) or {}
  scaling = _get(c, "rope_scaling", None)
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default" or (scaling and scaling.get(
      "rope_type", scaling.get("type", "default")) != "default"):
    raise NotImplementedError(
        f"jmoe.hf: rope type {rope_type!r} (scaled RoPE) is not supported; only"
        " the default RoPE.")
  return float(params.get("rope_theta", _get(c, "rope_theta", 10000.0)))


def _config_from_hf(fam: Family, c) -> jnn.TransformerConfig:
  """The `jmoe.nn.TransformerConfig` of a transformers config (object or dict)."""
  d = int(_get(c, "hidden_size"))
  h = int(_get(c, "num_attention_heads"))
  kv = int(_get(c, "num_key_value_heads", None) or h)
  hd = int(_get(c, "head_dim", None) or d // h)
  n = int(_get(c, "num_hidden_layers"))
  if fam.qk_norm == "full" and hd != d // h:
    raise ValueError(
        f"jmoe.hf: {fam.model_type} sizes its k_norm with hidden_size //"
        f" num_attention_heads = {d // h}, but head_dim = {hd}.")
  if fam.model_type == "olmoe" and _get(c, "clip_qkv", None) is not None:
    raise NotImplementedError("jmoe.hf: OLMoE `clip_qkv` is not supported.")
  attention = jnn.AttentionConfig(
      num_heads=h, num_kv_heads=kv, head_dim=hd,
      rope_theta=_rope_theta(c) if fam.causal_lm else 10000.0,
      qkv_bias=bool(fam.qkv_bias(c)), out_bias=bool(fam.out_bias(c)),
      qk_norm=fam.qk_norm)
  return jnn.TransformerConfig(
      vocab_size=int(_get(c, "vocab_size")), d_model=d, num_layers=n,
      attention=attention, d_ff=int(_get(c, fam.expert_d_ff)),
      num_experts=int(_get(c, fam.num_experts)),
      moe_config=moe_lib.MoEConfig(router=fam.router(c), activation=_activation(c)),
      moe_layers=tuple(fam.moe_layers(c, n)),
      dense_d_ff=(int(_get(c, fam.dense_d_ff)) if fam.dense_d_ff else None),
      shared_d_ff=int(fam.shared_d_ff(c)), shared_gate=fam.shared_gate,
      router_bias=fam.router_bias,
      tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
      norm_eps=float(_get(c, "rms_norm_eps", 1e-6)))


def _canonical(config: jnn.TransformerConfig) -> jnn.TransformerConfig:
  """One spelling of a model: explicit layer pattern and attention, the dense
  width only where there are dense layers, and the router as `_comparable` (what
  routes the same compares equal; capacity and the gmm backend are not part of
  the checkpoint)."""
  layers = config.layer_is_moe
  return dataclasses.replace(
      config, attention=config.attention_config, moe_layers=layers,
      first_dense=0, dense_d_ff=config.dense_width if not all(layers) else None,
      moe_config=moe_lib.MoEConfig(router=_comparable(config.moe_config.router),
                                   activation=config.moe_config.activation))


# ------------------------------------------------------------------------------
# The weight table: one bidirectional entry per HF tensor.
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
  hf: str                                 # HF state-dict key
  paths: tuple[tuple, ...]                # jmoe state paths
  to_jmoe: Callable[[np.ndarray], tuple]  # HF array -> jmoe arrays
  to_hf: Callable[..., np.ndarray]        # jmoe arrays -> HF array


def _t(a):
  return np.asarray(a).T


def _linear(hf: str, path: tuple, shape: tuple[int, ...]) -> _Entry:
  """HF W [out, in] <-> jmoe [in, ...out] = W.T.reshape(shape)."""
  def to_hf(p):
    p = np.asarray(p)
    return p.reshape(shape[0], -1).T
  return _Entry(hf, (path,), lambda w: (_t(w).reshape(shape),), to_hf)


def _linear_in(hf: str, path: tuple, shape: tuple[int, ...]) -> _Entry:
  """HF W [out, in...] <-> jmoe [...in, out] (o_proj: W.T.reshape(H, hd, D))."""
  def to_hf(p):
    p = np.asarray(p)
    return p.reshape(-1, shape[-1]).T
  return _Entry(hf, (path,), lambda w: (_t(w).reshape(shape),), to_hf)


def _same(hf: str, path: tuple, shape: tuple[int, ...],
          hf_shape: tuple[int, ...] = (-1,)) -> _Entry:
  """A reshape only: HF [prod(shape)] (or hf_shape) <-> jmoe shape."""
  return _Entry(hf, (path,), lambda w: (np.asarray(w).reshape(shape),),
                lambda p: np.asarray(p).reshape(hf_shape))


def _ffn_entries(hp: str, jp: tuple, d: int, f: int) -> list[_Entry]:
  return [_linear(hp + "gate_proj.weight", jp + ("w_gate",), (d, f)),
          _linear(hp + "up_proj.weight", jp + ("w_up",), (d, f)),
          _linear(hp + "down_proj.weight", jp + ("w_down",), (f, d))]


def _split_gate_up(gu):
  gu = np.asarray(gu)
  f = gu.shape[1] // 2
  return (gu[:, :f].transpose(0, 2, 1), gu[:, f:].transpose(0, 2, 1))


def _join_gate_up(g, u):
  return np.concatenate([np.asarray(g).transpose(0, 2, 1),
                         np.asarray(u).transpose(0, 2, 1)], axis=1)


def _moe_entries(fam: Family, layout: params_lib.MoELayout, hp: str,
                 jp: tuple) -> list[_Entry]:
  """The entries of one MoE block's parameters: the rows of `jmoe.MOE_PARAMS`
  that `layout` has, each under its HF name (and at its NNX path)."""
  path = lambda p: jp + params_lib.PARAMS_BY_PATH[p].module_path
  shape = layout.shape
  gate_up = _Entry(hp + "experts.gate_up_proj", (path("w_gate"), path("w_up")),
                   _split_gate_up, _join_gate_up)
  shared = {f"shared.{e.paths[0][-1]}": e for e in _ffn_entries(
      f"{hp}{fam.shared}.", jp + ("shared",), layout.d_model, layout.shared_d_ff)}
  hf = {
      "router": _linear(hp + "gate.weight", path("router"), shape("router")),
      "w_gate": gate_up, "w_up": gate_up,  # one fused HF tensor
      "w_down": _Entry(hp + "experts.down_proj", (path("w_down"),),
                       lambda w: (np.asarray(w).transpose(0, 2, 1),),
                       lambda p: np.asarray(p).transpose(0, 2, 1)),
      **shared,
      "shared_gate": _linear(hp + "shared_expert_gate.weight", path("shared_gate"),
                             shape("shared_gate")),
      "router_bias": _same(hp + "gate.e_score_correction_bias",
                           path("router_bias"), shape("router_bias")),
  }
  out = {}
  for row in layout.rows():
    if row.path not in hf:
      raise NotImplementedError(
          f"jmoe.hf: the MoE parameter {row.path!r} has no Hugging Face name.")
    out.setdefault(hf[row.path].hf, hf[row.path])
  return list(out.values())


def _lm_entries(fam: Family, config: jnn.TransformerConfig) -> list[_Entry]:
  a_cfg = config.attention_config
  d, h, k, hd = config.d_model, a_cfg.num_heads, a_cfg.num_kv_heads, a_cfg.head_dim
  v = config.vocab_size
  out = [_same("model.embed_tokens.weight", ("embed", "embedding"), (v, d),
               (v, d)),
         _same("model.norm.weight", ("final_norm", "scale"), (d,))]
  if not config.tie_embeddings:
    out.append(_linear("lm_head.weight", ("head",), (d, v)))
  for i, is_moe in enumerate(config.layer_is_moe):
    hp, jp = f"model.layers.{i}.", ("blocks", i)
    a, ja = hp + "self_attn.", jp + ("attn",)
    out += [
        _same(hp + "input_layernorm.weight", jp + ("attn_norm", "scale"), (d,)),
        _same(hp + "post_attention_layernorm.weight", jp + ("mlp_norm", "scale"),
              (d,)),
        _linear(a + "q_proj.weight", ja + ("q_proj",), (d, h, hd)),
        _linear(a + "k_proj.weight", ja + ("k_proj",), (d, k, hd)),
        _linear(a + "v_proj.weight", ja + ("v_proj",), (d, k, hd)),
        _linear_in(a + "o_proj.weight", ja + ("o_proj",), (h, hd, d)),
    ]
    if a_cfg.qkv_bias:
      out += [_same(a + "q_proj.bias", ja + ("q_bias",), (h, hd)),
              _same(a + "k_proj.bias", ja + ("k_bias",), (k, hd)),
              _same(a + "v_proj.bias", ja + ("v_bias",), (k, hd))]
    if a_cfg.out_bias:
      out.append(_same(a + "o_proj.bias", ja + ("o_bias",), (d,)))
    if a_cfg.qk_norm is not None:
      qs, ks = ((hd,), (hd,)) if a_cfg.qk_norm == "per_head" else ((h, hd), (k, hd))
      out += [_same(a + "q_norm.weight", ja + ("q_norm",), qs),
              _same(a + "k_norm.weight", ja + ("k_norm",), ks)]
    if is_moe:
      out += _moe_entries(fam, config.moe_layout(), hp + "mlp.", jp + ("mlp",))
    else:
      out += _ffn_entries(hp + "mlp.", jp + ("mlp",), d, config.dense_width)
  return out


# ------------------------------------------------------------------------------
# State dicts: torch -> numpy, on-disk per-expert layout <-> fused layout.
# ------------------------------------------------------------------------------


def _numpy_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
      v = v.detach().cpu().float().numpy()
    out[k] = np.asarray(v, np.float32)
  return out


_EXPERT_KEY = re.compile(r"^(?:(?P<pre>.*)\.)?experts\.(?P<j>\d+)\.(?P<name>\w+)"
                         r"\.weight$")


def _fused(sd: dict[str, np.ndarray], fam: Family) -> dict[str, np.ndarray]:
  """On-disk per-expert keys -> transformers' fused in-memory layout."""
  legacy = f".{fam.legacy_moe}."
  gate, up, down = fam.legacy_experts
  out, groups = {}, {}
  for key, v in sd.items():
    if fam.legacy_moe != "mlp":
      key = key.replace(legacy, ".mlp.")
      if key.startswith(legacy[1:]):
        key = "mlp." + key[len(legacy) - 1:]
    m = _EXPERT_KEY.match(key)
    if m and m["name"] in (gate, up, down):
      groups.setdefault(m["pre"], {})[(int(m["j"]), m["name"])] = v
    else:
      out[key] = v
  for pre, ex in groups.items():
    p = f"{pre}.experts." if pre else "experts."
    n = 1 + max(j for j, _ in ex)
    try:
      out[p + "gate_up_proj"] = np.stack(
          [np.concatenate([ex[(j, gate)], ex[(j, up)]], 0) for j in range(n)])
      out[p + "down_proj"] = np.stack([ex[(j, down)] for j in range(n)])
    except KeyError as err:
      raise ValueError(f"jmoe.hf: expert weight {err} missing under {p!r}.")
  return out


def _per_expert(sd: dict, fam: Family) -> dict:
  """transformers' fused layout -> the on-disk per-expert keys."""
  gate, up, down = fam.legacy_experts
  out = {}
  for key, v in sd.items():
    if key.endswith("experts.gate_up_proj"):
      p = key[:-len("gate_up_proj")]
      f = v.shape[1] // 2
      for j in range(v.shape[0]):
        out[f"{p}{j}.{gate}.weight"] = v[j, :f]
        out[f"{p}{j}.{up}.weight"] = v[j, f:]
    elif key.endswith("experts.down_proj"):
      p = key[:-len("down_proj")]
      for j in range(v.shape[0]):
        out[f"{p}{j}.{down}.weight"] = v[j]
    else:
      out[key] = v
  if fam.legacy_moe != "mlp":  # Mixtral: every mlp is the MoE block
    out = {k.replace(".mlp.", f".{fam.legacy_moe}."): v for k, v in out.items()}
  return out


# ------------------------------------------------------------------------------
# Building jmoe modules from a table, and back.
# ------------------------------------------------------------------------------


def _fill(ctor: Callable[[], nnx.Module], entries: list[_Entry],
          sd: dict[str, np.ndarray], *, ignore: tuple[str, ...] = ()):
  """Builds the module abstractly and fills every variable from `sd`."""
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  flat = dict(nnx.to_flat_state(state))
  unused = set(sd) - {e.hf for e in entries} - set(ignore)
  if unused:
    raise ValueError(
        "jmoe.hf: tensors with no jmoe counterpart (an unsupported feature?):"
        f" {sorted(unused)[:8]}{' ...' if len(unused) > 8 else ''}")
  values = {}
  for e in entries:
    if e.hf not in sd:
      raise ValueError(f"jmoe.hf: the state dict has no {e.hf!r}.")
    for path, value in zip(e.paths, e.to_jmoe(sd[e.hf])):
      values[path] = value
  missing = set(flat) - set(values)
  if missing:
    raise ValueError(f"jmoe.hf: no HF tensor for jmoe variables {sorted(missing)}.")
  pairs = []
  for path, var in flat.items():
    value = values[path]
    if tuple(value.shape) != tuple(var.shape):
      key = next(e.hf for e in entries if path in e.paths)
      raise ValueError(
          f"jmoe.hf: {key!r} gives {path} the shape {value.shape}; the model"
          f" expects {var.shape}.")
    pairs.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(pairs))


def _export(module: nnx.Module, entries: list[_Entry], fam: Family, layout: str,
            return_tensors: str) -> dict:
  if layout not in ("fused", "per_expert"):
    raise ValueError(f"jmoe.hf: layout must be 'fused' or 'per_expert'; got"
                     f" {layout!r}.")
  if return_tensors not in ("pt", "np"):
    raise ValueError(f"jmoe.hf: return_tensors must be 'pt' or 'np'; got"
                     f" {return_tensors!r}.")
  flat = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(module))}
  sd = {}
  for e in entries:
    sd[e.hf] = np.ascontiguousarray(np.asarray(
        e.to_hf(*[np.asarray(flat[p], np.float32) for p in e.paths]), np.float32))
  if layout == "per_expert":
    sd = _per_expert(sd, fam)
  if return_tensors == "pt":
    import torch  # pylint: disable=g-import-not-at-top
    sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  return sd


def _warn_sliding_window(c) -> None:
  window = _get(c, "sliding_window", None)
  layer_types = _get(c, "layer_types", None) or ()
  if (window and (_get(c, "use_sliding_window", True))) or (
      "sliding_attention" in layer_types):
    warnings.warn(
        f"jmoe.hf: sliding-window attention (window {window}) is not modelled;"
        " jmoe attends to the whole context, so outputs agree only for sequences"
        " no longer than the window.", stacklevel=3)


def _lm_ctor(config: jnn.TransformerConfig, dtype, param_dtype):
  return lambda: jnn.MoETransformerLM(config, dtype=dtype,
                                      param_dtype=param_dtype, rngs=nnx.Rngs(0))


def _lm_family(config) -> Family:
  fam = family(config)
  if fam.causal_lm is None:
    raise NotImplementedError(
        f"jmoe.hf: the full {fam.model_type} model needs attention jmoe does not"
        " have (multi-head latent attention); convert its MoE blocks with"
        " `moe_block_from_transformers`.")
  return fam


# ------------------------------------------------------------------------------
# Public API: import.
# ------------------------------------------------------------------------------


def from_state_dict(state_dict: Mapping[str, Any], config, *, dtype=None,
                    param_dtype=jnp.float32) -> jnn.MoETransformerLM:
  """A `jmoe.nn.MoETransformerLM` from a causal-LM state dict and its config.

  Args:
    state_dict: transformers tensor names -> torch tensors or arrays, in the
      fused (transformers 5 in-memory) or per-expert (on-disk, transformers 4)
      layout.
    config: the transformers config (or its dict, as in config.json).
    dtype: compute dtype of the jmoe model (None: param_dtype).
    param_dtype: storage dtype of the jmoe parameters.
  """
  fam = _lm_family(config)
  model_config = _config_from_hf(fam, config)
  _warn_sliding_window(config)
  sd = _fused(_numpy_state_dict(state_dict), fam)
  ignore = ("lm_head.weight",) if model_config.tie_embeddings else ()
  return _fill(_lm_ctor(model_config, dtype, param_dtype),
               _lm_entries(fam, model_config), sd, ignore=ignore)


def from_transformers(hf_model, config=None, *, dtype=None,
                      param_dtype=jnp.float32) -> jnn.MoETransformerLM:
  """Converts a transformers causal LM into a `jmoe.nn.MoETransformerLM`.

    lm = jmoe.hf.from_transformers(MixtralForCausalLM(cfg))
    logits, aux = lm(tokens)    # = hf_model(tokens).logits

  Args:
    hf_model: a `MixtralForCausalLM`, `Qwen2MoeForCausalLM`,
      `Qwen3MoeForCausalLM` or `OlmoeForCausalLM` (or its state dict, with
      `config`).
    config: its config (default: `hf_model.config`).
    dtype, param_dtype: as `from_state_dict`.
  """
  if isinstance(hf_model, Mapping):
    if config is None:
      raise ValueError("jmoe.hf.from_transformers: a state dict needs `config`.")
    return from_state_dict(hf_model, config, dtype=dtype, param_dtype=param_dtype)
  config = hf_model.config if config is None else config
  return from_state_dict(hf_model.state_dict(), config, dtype=dtype,
                         param_dtype=param_dtype)


def _act_name(act) -> str:
  name = type(act).__name__
  if "SiLU" in name:
    return "silu"
  if name == "GELUActivation":
    return "gelu"
  raise NotImplementedError(f"jmoe.hf: expert activation {name} is not supported.")


def _block_config(hf_block) -> dict:
  """The router fields of an HF MoE block, read from its modules."""
  if getattr(hf_block, "config", None) is not None:
    return hf_block.config
  name = type(hf_block).__name__
  if name not in _BLOCK_FAMILIES:
    raise ValueError(
        f"jmoe.hf: unsupported MoE block {name}; supported:"
        f" {sorted(_BLOCK_FAMILIES)}.")
  gate = hf_block.gate
  try:
    return {
        "model_type": _BLOCK_FAMILIES[name].model_type,
        "num_experts_per_tok": gate.top_k,
        "norm_topk_prob": getattr(gate, "norm_topk_prob", False),
        "routed_scaling_factor": getattr(gate, "routed_scaling_factor", 1.0),
        "n_group": getattr(gate, "num_group", 1),
        "topk_group": getattr(gate, "topk_group", 1),
        "hidden_act": _act_name(hf_block.experts.act_fn),
    }
  except AttributeError as err:  # e.g. transformers 4.x modules
    raise ValueError(
        f"jmoe.hf: cannot read the router settings of this {name} ({err});"
        " pass the model's `config`.") from err


def _block_layout(fam: Family, sd: dict) -> params_lib.MoELayout:
  """The `jmoe.MoELayout` of an HF MoE block, read from its tensors."""
  e, d = sd["gate.weight"].shape
  shared = f"{fam.shared}.up_proj.weight"
  return params_lib.MoELayout(
      d_model=d, d_ff=sd["experts.gate_up_proj"].shape[1] // 2, num_experts=e,
      shared_d_ff=sd[shared].shape[0] if fam.shared and shared in sd else 0,
      shared_gate="shared_expert_gate.weight" in sd,
      router_bias="gate.e_score_correction_bias" in sd)


def moe_block_from_transformers(hf_block, config=None, *, dtype=None,
                                param_dtype=jnp.float32) -> jnn.MoE:
  """Converts one transformers MoE block into a `jmoe.nn.MoE`.

    moe = jmoe.hf.moe_block_from_transformers(hf_model.model.layers[0].mlp)
    y, aux = moe(x)             # = hf_block(x)

  Args:
    hf_block: a `MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock`,
      `Qwen3MoeSparseMoeBlock`, `OlmoeSparseMoeBlock` or `DeepseekV3MoE`, or the
      block's state dict (keys "gate.weight", "experts.gate_up_proj", ...) when
      `config` is given.
    config: the model's transformers config (or dict); default: the block's own
      `config` if it has one, else its router's attributes.
    dtype, param_dtype: compute and storage dtypes of the jmoe module.
  """
  if isinstance(hf_block, Mapping):
    if config is None:
      raise ValueError(
          "jmoe.hf.moe_block_from_transformers: a state dict needs `config`.")
    sd = hf_block
  else:
    config = _block_config(hf_block) if config is None else config
    sd = hf_block.state_dict()
  fam = family(config)
  sd = _fused(_numpy_state_dict(sd), fam)
  layout = _block_layout(fam, sd)
  moe = moe_lib.MoEConfig(router=fam.router(config), activation=_activation(config))
  ctor = lambda: jnn.MoE(
      layout.d_model, layout.d_ff, layout.num_experts, config=moe, dtype=dtype,
      param_dtype=param_dtype, rngs=nnx.Rngs(0), **layout.options())
  return _fill(ctor, _moe_entries(fam, layout, "", ()), sd)


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file, or of the `*.safetensors` files of a
  checkpoint directory, as float32 numpy arrays (no torch needed)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(path, n) for n in names]
    else:
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"jmoe.hf: no *.safetensors file in {path!r}.")
  else:
    files = [path]
  sd = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      keys = list(f.keys())
      try:
        for k in keys:
          sd[k] = np.asarray(f.get_tensor(k), np.float32)
        continue
      except TypeError:  # bfloat16: no numpy dtype; read this file through jax
        pass
    with safe_open(file, framework="flax") as f:
      for k in keys:
        sd[k] = np.asarray(f.get_tensor(k), np.float32)
  return sd


def from_safetensors(path: str, config=None, *, dtype=None,
                     param_dtype=jnp.float32) -> jnn.MoETransformerLM:
  """A `jmoe.nn.MoETransformerLM` from a checkpoint directory (`save_pretrained`
  output: config.json + *.safetensors), without torch.

  Args:
    path: the checkpoint directory.
    config: a transformers config or dict; default: `path`/config.json, parsed
      with transformers' config classes when transformers is installed (they
      fill the fields config.json leaves at their defaults), else as a dict.
  """
  if config is None:
    try:
      import transformers  # pylint: disable=g-import-not-at-top
      config = transformers.AutoConfig.from_pretrained(path)
    except ImportError:
      with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
  return from_state_dict(load_safetensors(path), config, dtype=dtype,
                         param_dtype=param_dtype)


# ------------------------------------------------------------------------------
# Public API: export.
# ------------------------------------------------------------------------------


def _comparable(r: routing_lib.RouterConfig) -> routing_lib.RouterConfig:
  """Router configs that route identically compare equal (noise is training-only;
  top-k-then-softmax == softmax, top-k, renormalise)."""
  r = dataclasses.replace(r, jitter_eps=0.0, noise_std=0.0)
  if r.score == "softmax" and r.order == "topk_softmax":
    r = dataclasses.replace(r, order="softmax_topk", normalize=True)
  if r.score == "sigmoid":
    r = dataclasses.replace(r, order="softmax_topk")
  if r.num_groups == 1:
    r = dataclasses.replace(r, top_groups=1, group_score="max")
  return r


def transformers_config_dict(model: jnn.MoETransformerLM, family_name) -> dict:
  """The transformers config fields (a dict) of a jmoe LM exported as a family.

  Raises ValueError when the family cannot express the model (e.g. qk-norm,
  biases, a shared expert or a router the family does not have). Router noise
  and `capacity_factor` are not exported: transformers runs the model dropless.
  """
  fam = _lm_family(family_name)
  if not any(model.config.layer_is_moe):
    raise ValueError("jmoe.hf: the model has no MoE layer.")
  s = _canonical(model.config)
  a, router = s.attention, model.config.moe.router
  act = {v: k for k, v in _ACTIVATIONS.items() if k != "swish"}.get(
      s.moe.activation)
  if act is None:
    raise ValueError(
        f"jmoe.hf: activation {s.moe.activation!r} cannot be exported.")
  if not fam.head_dim_field and a.head_dim != s.d_model // a.num_heads:
    raise ValueError(
        f"jmoe.hf: {fam.model_type} needs head_dim = d_model // num_heads ="
        f" {s.d_model // a.num_heads}; the model has {a.head_dim}.")
  fields = dict(
      model_type=fam.model_type, vocab_size=s.vocab_size, hidden_size=s.d_model,
      num_hidden_layers=s.num_layers, num_attention_heads=a.num_heads,
      num_key_value_heads=a.num_kv_heads, rms_norm_eps=s.norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
      tie_word_embeddings=s.tie_embeddings, hidden_act=act,
      num_experts_per_tok=router.top_k)
  if fam.head_dim_field:
    fields["head_dim"] = a.head_dim
  fields.update(fam.export_fields(s, router))
  # The family must read these fields back into the very same model.
  back = _canonical(_config_from_hf(fam, fields))
  diff = {}
  for f in dataclasses.fields(s):
    mine, theirs = getattr(s, f.name), getattr(back, f.name)
    if f.name == "attention":
      diff.update({f"attention.{g.name}": (getattr(mine, g.name),
                                           getattr(theirs, g.name))
                   for g in dataclasses.fields(mine)
                   if getattr(mine, g.name) != getattr(theirs, g.name)})
    elif mine != theirs:
      diff[f.name] = (mine, theirs)
  if diff:
    raise ValueError(
        f"jmoe.hf: {fam.model_type} cannot express this model; (jmoe, family)"
        f" differ in {diff}.")
  return fields


def to_transformers_config(model: jnn.MoETransformerLM, family_name, **overrides):
  """A transformers config object for `model` as `family_name` (needs
  transformers): `MixtralForCausalLM(to_transformers_config(lm, "mixtral"))`."""
  import transformers  # pylint: disable=g-import-not-at-top
  fields = transformers_config_dict(model, family_name)
  fields.update(overrides)
  return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def to_transformers_state_dict(model: jnn.MoETransformerLM, family_name, *,
                               layout: str = "fused",
                               return_tensors: str = "pt") -> dict:
  """A transformers state dict of a jmoe LM, for `hf_model.load_state_dict(sd)`.

  Args:
    model: a `jmoe.nn.MoETransformerLM` (e.g. trained in jmoe).
    family_name: "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", or a transformers
      config (its model_type).
    layout: "fused" (transformers 5 modules: experts.gate_up_proj / down_proj)
      or "per_expert" (transformers 4 modules and on-disk checkpoints).
    return_tensors: "pt" (torch tensors) or "np" (float32 numpy arrays).
  """
  fam = _lm_family(family_name)
  transformers_config_dict(model, fam)  # raises if the family can't express it
  sd = _export(model, _lm_entries(fam, model.config), fam, layout,
               return_tensors)
  if model.config.tie_embeddings:  # tied: lm_head.weight is the embedding
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  return sd


def moe_block_to_transformers_state_dict(moe: jnn.MoE, family_name, *,
                                         layout: str = "fused",
                                         return_tensors: str = "pt") -> dict:
  """The state dict of one transformers MoE block from a `jmoe.nn.MoE`
  (keys relative to the block: "gate.weight", "experts.gate_up_proj", ...)."""
  fam = family(family_name)
  return _export(moe, _moe_entries(fam, moe.layout, "", ()), fam, layout,
                 return_tensors)
