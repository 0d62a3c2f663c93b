"""A decoder-only MoE language model: its `TransformerConfig`, `TransformerBlock`,
`MoETransformerLM` and the static-shape `KVCache`.

`TransformerConfig` is the one home of the model's options (as flax gemma's
`TransformerConfig`): the modules, `jmoe.hf` and examples/train_lm.py take it, and
model presets are classmethods returning values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src import moe as moe_lib
from jmoe._src import params as params_lib
from jmoe._src import routing as routing_lib
from jmoe._src.nn import aux as aux_lib
from jmoe._src.nn.attention import Attention, AttentionConfig
from jmoe._src.nn.moe import FeedForward, MoE
from jmoe._src.nn.variables import fan_in_init, param

Array = jax.Array


def _rms_norm_module(d_model, eps, dtype, param_dtype, eager_sharding, rngs):
  return nnx.RMSNorm(
      d_model, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      scale_metadata=dict(out_sharding=("embed",), eager_sharding=eager_sharding))


def moe_layer_pattern(num_layers: int, *, first_dense: int = 0,
                      every: int = 1) -> tuple[bool, ...]:
  """Which layers are MoE: layer i is iff i >= first_dense and i % every == 0.

  (DeepSeek's `first_k_dense_replace` and `moe_layer_freq`.) E.g.
  `moe_layer_pattern(4, first_dense=1)` = (False, True, True, True).
  """
  if every < 1 or first_dense < 0:
    raise ValueError(
        f"moe_layer_pattern: need every >= 1 and first_dense >= 0; got"
        f" every={every}, first_dense={first_dense}.")
  return tuple(i >= first_dense and i % every == 0 for i in range(num_layers))


_ATTENTION_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionConfig))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Everything that shapes a `MoETransformerLM`. Plain data: frozen, hashable.

  Build one directly, from sizes and flat keywords (`make`), or from a preset
  (`mixtral_8x7b()`, `qwen3_30b_a3b()`, `olmoe_1b_7b()`); `replace` changes
  fields, attention ones included.

  Attributes:
    vocab_size, d_model, num_layers: sizes.
    attention: the `AttentionConfig` of every layer.
    d_ff: each expert's hidden width.
    num_experts: E (0: every layer is dense).
    moe_config: the `jmoe.MoEConfig` of the MoE layers (`config` of each
      `jmoe.nn.MoE`); its activation is also the dense layers'. (The old keyword
      `moe=` still works, with a DeprecationWarning; `.moe` reads it.)
    moe_layers: one bool per layer (True: MoE); None:
      `moe_layer_pattern(num_layers, first_dense=first_dense)` (all dense when
      num_experts == 0). `layer_is_moe` is the resolved tuple.
    first_dense: the first `first_dense` layers are dense (with moe_layers=None).
    dense_d_ff: width of the dense layers; None: d_ff * top_k (the active FLOPs
      of an MoE layer). `dense_width` is the resolved width.
    shared_d_ff, shared_gate, router_bias: the MoE layers' optional parts
      (`jmoe.MoELayout`; see `jmoe.nn.MoE`).
    tie_embeddings: logits = embed.attend(h) instead of a separate head.
    norm_eps: epsilon of every RMSNorm (the attention's q/k norms too, unless
      `attention.norm_eps` says otherwise).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  attention: AttentionConfig
  d_ff: int
  num_experts: int = 8
  moe_config: moe_lib.MoEConfig = moe_lib.MoEConfig()
  moe_layers: tuple[bool, ...] | None = None
  first_dense: int = 0
  dense_d_ff: int | None = None
  shared_d_ff: int = 0
  shared_gate: bool = False
  router_bias: bool = False
  tie_embeddings: bool = False
  norm_eps: float = 1e-6

  def __post_init__(self):
    fn = "TransformerConfig"
    if not isinstance(self.attention, AttentionConfig):
      raise TypeError(
          f"{fn}: `attention` must be an AttentionConfig; got"
          f" {type(self.attention)}.")
    if not isinstance(self.moe_config, moe_lib.MoEConfig):
      raise TypeError(f"{fn}: `moe_config` must be a MoEConfig; got"
                      f" {type(self.moe_config)}.")
    for name in ("vocab_size", "d_model", "num_layers", "d_ff"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"{fn}: `{name}` must be a positive int; got {v!r}.")
    if self.moe_layers is not None:
      layers = tuple(bool(m) for m in self.moe_layers)
      object.__setattr__(self, "moe_layers", layers)  # hashable, whatever came in
      if self.first_dense:
        raise ValueError(f"{fn}: pass `moe_layers` or `first_dense`, not both.")
      if len(layers) != self.num_layers:
        raise ValueError(
            f"{fn}: `moe_layers` needs one entry per layer ({self.num_layers});"
            f" got {len(layers)}.")
      if any(layers) and self.num_experts <= 0:
        raise ValueError(f"{fn}: MoE layers need `num_experts` > 0.")
    self.attention.resolve(self.d_model)  # checks head_dim against d_model
    if any(self.layer_is_moe):
      self.moe_layout()  # checks the MoE layers' options

  @property
  def moe(self) -> moe_lib.MoEConfig:
    """The old name of `moe_config`."""
    return self.moe_config

  @property
  def layer_is_moe(self) -> tuple[bool, ...]:
    """One bool per layer: True for an MoE layer."""
    if self.moe_layers is not None:
      return self.moe_layers
    if self.num_experts <= 0:
      return (False,) * self.num_layers
    return moe_layer_pattern(self.num_layers, first_dense=self.first_dense)

  @property
  def dense_width(self) -> int:
    """The dense layers' FFN width."""
    return self.d_ff * self.moe_config.top_k if self.dense_d_ff is None else self.dense_d_ff

  @property
  def attention_config(self) -> AttentionConfig:
    """`attention` resolved for this model (head_dim, kv heads, norm_eps)."""
    return self.attention.resolve(self.d_model, norm_eps=self.norm_eps)

  def moe_layout(self) -> params_lib.MoELayout:
    """The `jmoe.MoELayout` of the MoE layers: which parameters they have."""
    try:
      return params_lib.MoELayout(
          d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts,
          glu=moe_lib.is_glu(self.moe_config.activation), shared_d_ff=self.shared_d_ff,
          shared_gate=self.shared_gate, router_bias=self.router_bias)
    except ValueError as err:
      raise ValueError(f"TransformerConfig: {err}") from None

  @classmethod
  def make(cls, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
           d_ff: int, **options) -> TransformerConfig:
    """From sizes and flat keywords: a keyword naming an `AttentionConfig` field
    (num_kv_heads, head_dim, rope_theta, qkv_bias, out_bias, qk_norm,
    implementation) sets the
    attention's, every other one this config's.

      TransformerConfig.make(vocab, 512, 8, 8, 1024, num_kv_heads=2, num_experts=8)
    """
    options = _renamed_moe_keyword(options, "TransformerConfig.make")
    own = {f.name for f in dataclasses.fields(cls)}
    attention = {k: options.pop(k) for k in list(options)
                 if k in _ATTENTION_FIELDS and k not in own}
    return cls(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
               d_ff=d_ff,
               attention=AttentionConfig(num_heads=num_heads, **attention),
               **options)

  def replace(self, **options) -> TransformerConfig:
    """A copy with fields replaced; attention fields (`num_heads`, `qk_norm`,
    ...) replace the attention's."""
    options = _renamed_moe_keyword(options, "TransformerConfig.replace")
    own = {f.name for f in dataclasses.fields(self)}
    attention = {k: options.pop(k) for k in list(options)
                 if k in _ATTENTION_FIELDS and k not in own}
    if attention:
      options["attention"] = dataclasses.replace(
          options.get("attention", self.attention), **attention)
    return dataclasses.replace(self, **options)

  # Presets: the published shapes of real models (router settings as jmoe.hf
  # reads them from the Hugging Face configs).

  @classmethod
  def mixtral_8x7b(cls) -> TransformerConfig:
    """Mixtral-8x7B: 46.7B parameters, 12.9B active; top-2 of 8 experts."""
    return cls(vocab_size=32000, d_model=4096, num_layers=32, d_ff=14336,
               attention=AttentionConfig(num_heads=32, num_kv_heads=8,
                                         rope_theta=1e6),
               num_experts=8, moe_config=moe_lib.MoEConfig(
                   router=routing_lib.RouterConfig(top_k=2, normalize=True)),
               norm_eps=1e-5)

  @classmethod
  def qwen3_30b_a3b(cls) -> TransformerConfig:
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active; top-8 of 128 experts."""
    return cls(vocab_size=151936, d_model=2048, num_layers=48, d_ff=768,
               attention=AttentionConfig(num_heads=32, num_kv_heads=4,
                                         head_dim=128, rope_theta=1e6,
                                         qk_norm="per_head"),
               num_experts=128, moe_config=moe_lib.MoEConfig(
                   router=routing_lib.RouterConfig(top_k=8, normalize=True)),
               norm_eps=1e-6)

  @classmethod
  def olmoe_1b_7b(cls) -> TransformerConfig:
    """OLMoE-1B-7B: 6.9B parameters, 1.3B active; top-8 of 64 experts."""
    return cls(vocab_size=50304, d_model=2048, num_layers=16, d_ff=1024,
               attention=AttentionConfig(num_heads=16, qk_norm="full"),
               num_experts=64, moe_config=moe_lib.MoEConfig(
                   router=routing_lib.RouterConfig(top_k=8)),
               norm_eps=1e-5)


def _renamed_moe_keyword(options: dict, fn: str) -> dict:
  """`moe=` -> `moe_config=`, with a DeprecationWarning."""
  if "moe" in options:
    if "moe_config" in options:
      raise TypeError(f"{fn}: pass `moe_config` only (`moe` is its old name).")
    warnings.warn(f"{fn}: `moe=` is now `moe_config=` (the MoEConfig of the MoE"
                  " layers).", DeprecationWarning, stacklevel=3)
    options = dict(options)
    options["moe_config"] = options.pop("moe")
  return options


_dataclass_init = TransformerConfig.__init__


@functools.wraps(_dataclass_init)
def _config_init(self, *args, **options):
  _dataclass_init(self, *args,
                  **_renamed_moe_keyword(options, "TransformerConfig"))


TransformerConfig.__init__ = _config_init


class TransformerBlock(nnx.Module):
  """A pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

  Layer `layer` of a `TransformerConfig`: its MLP is a `MoE` when
  `config.layer_is_moe[layer]`, else a dense `FeedForward` of width
  `config.dense_width` and the MoE config's activation.

  Submodules: `attn_norm`, `mlp_norm` (`nnx.RMSNorm`, param `scale` [D] ("embed",)),
  `attn` (`Attention`), `mlp` (`MoE` or `FeedForward`).

  Args:
    config: the model's `TransformerConfig`.
    layer: which layer this block is.
    parallel: passed to the `MoE` (e.g. `jmoe.parallel.ExpertParallel`).
    dtype, param_dtype, eager_sharding, rngs: as `MoETransformerLM`.
  """

  def __init__(self, config: TransformerConfig, layer: int = 0, *legacy,
               parallel: Any = None, dtype=None, param_dtype=jnp.float32,
               eager_sharding: bool = False, rngs: nnx.Rngs, **unused):
    if legacy or not isinstance(config, TransformerConfig):
      raise TypeError(
          "TransformerBlock takes the model's TransformerConfig and a layer index:"
          " TransformerBlock(TransformerConfig.make(vocab_size, d_model,"
          " num_layers, num_heads, d_ff, ...), layer, rngs=...); got"
          f" {(config, layer, *legacy)!r}.")
    if unused:
      raise TypeError(
          f"TransformerBlock: model options {sorted(unused)} belong in the"
          " TransformerConfig (TransformerConfig.make(..., option=value)).")
    self.is_moe = config.layer_is_moe[layer]
    self.dtype = dtype
    d = config.d_model
    common = dict(dtype=dtype, param_dtype=param_dtype,
                  eager_sharding=eager_sharding, rngs=rngs)
    self.attn_norm = _rms_norm_module(d, config.norm_eps, dtype, param_dtype,
                                      eager_sharding, rngs)
    self.attn = Attention(d, config.attention_config, **common)
    self.mlp_norm = _rms_norm_module(d, config.norm_eps, dtype, param_dtype,
                                     eager_sharding, rngs)
    if self.is_moe:
      layout = config.moe_layout()
      self.mlp = MoE(d, layout.d_ff, layout.num_experts, config=config.moe_config,
                     parallel=parallel, **common, **layout.options())
    else:
      self.mlp = FeedForward(d, config.dense_width,
                             activation=config.moe_config.activation, **common)

  def __call__(self, x: Array, *, positions: Array | None = None,
               key: Array | None = None, deterministic: bool | None = None
               ) -> tuple[Array, moe_lib.MoEAux | None]:
    """x [B, S, D] -> (x [B, S, D], aux: `MoEAux`, or None for a dense block).

    key / deterministic: router noise of the MoE layer (see `jmoe.nn.MoE`)."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    with jax.named_scope("attention"):
      x = x + self.attn(self.attn_norm(x).astype(x.dtype), positions=positions)
    return self._mlp_residual(x, key, deterministic)

  def decode(self, x: Array, k_cache: Array, v_cache: Array, index: Array
             ) -> tuple[Array, Array, Array]:
    """The block on x [B, S, D] at positions index.. against a KV cache
    (`Attention.decode`). Returns (x, k_cache, v_cache); no aux, no router noise."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    a, k_cache, v_cache = self.attn.decode(self.attn_norm(x).astype(x.dtype),
                                           k_cache, v_cache, index)
    x, _ = self._mlp_residual(x + a, None, True)
    return x, k_cache, v_cache

  def _mlp_residual(self, x: Array, key: Array | None, deterministic):
    with jax.named_scope("moe" if self.is_moe else "mlp"):
      h = self.mlp_norm(x).astype(x.dtype)
      if self.is_moe:
        y, aux = self.mlp(h, key=key, deterministic=deterministic)
      else:
        y, aux = self.mlp(h), None
      return x + y, aux


# Vocabularies up to this size take the embedding's gradient as a one-hot matmul.
ONE_HOT_EMBED_GRAD_MAX_VOCAB = 4096


@jax.custom_vjp
def embed_lookup(table: Array, tokens: Array) -> Array:
  """table[tokens]: [V, D], int [...] -> [..., D] (a gather).

  Its gradient for a vocabulary of at most `ONE_HOT_EMBED_GRAD_MAX_VOCAB` is
  one_hot(tokens)ᵀ @ cotangent, a [V, T] x [T, D] matmul with float32
  accumulation, instead of the scatter-add that `jnp.take`'s transpose is: with a
  small vocabulary nearly every row of the scatter hits a few hot entries, and on
  an H200 that scatter took 20-30 ms of a 100 ms training step (examples/
  train_lm.py's byte-level h200 preset; benchmarks/NOTES.md), the matmul ~0.1 ms.
  Larger vocabularies keep the scatter (less contention, and the one-hot matrix
  would be T x V). Same values either way (one nonzero term per product), but the
  matmul rounds once where a low-precision scatter-add rounds at every add.
  """
  return jnp.take(table, tokens, axis=0)


def _embed_lookup_fwd(table, tokens):
  # Residuals: the tokens, and the table's dtype and vocabulary size (an empty
  # array carries the dtype; the table itself is not kept).
  return jnp.take(table, tokens, axis=0), (tokens, jnp.zeros((0,), table.dtype),
                                           table.shape[0])


def _embed_lookup_bwd(res, ct):
  tokens, like, vocab = res
  if vocab > ONE_HOT_EMBED_GRAD_MAX_VOCAB:
    grad = jnp.zeros((vocab, ct.shape[-1]), like.dtype).at[tokens].add(
        ct.astype(like.dtype))
  else:
    onehot = jax.nn.one_hot(tokens.reshape(-1), vocab, dtype=ct.dtype)
    grad = jnp.dot(onehot.T, ct.reshape(-1, ct.shape[-1]),
                   preferred_element_type=jnp.float32).astype(like.dtype)
  return grad, None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


def _batch_like(cache: Array, tokens: Array) -> Array:
  """A [layers, B, ...] cache resharded so that B is split as tokens' B is, when
  tokens lie on a mesh of Explicit axes (a fresh cache is replicated); else the
  cache as it is."""
  sharding = jax.typeof(tokens).sharding
  mesh = sharding.mesh
  if getattr(mesh, "empty", True) or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return cache
  spec = jax.sharding.PartitionSpec(None, sharding.spec[0])
  return jax.sharding.reshard(cache, jax.sharding.NamedSharding(mesh, spec))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A static-shape key/value cache of a `MoETransformerLM` (all layers stacked).

  Attributes:
    k, v: [layers, B, max_len, kv_heads, head_dim].
    index: int32 [], the number of filled positions (the next token's position).
  """

  k: Array
  v: Array
  index: Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


class MoETransformerLM(nnx.Module):
  """A decoder-only language model with MoE (and optionally dense) layers.

  embed -> blocks -> final RMSNorm -> head (tied: `embed.attend`).

    logits, aux = lm(tokens)   # logits float32 [B, S, vocab]

  Decoding with a static-shape KV cache (`KVCache`): `init_cache` then `decode`;
  `generate(lm, prompt, n)` wraps both.

  `aux` is the `jmoe.MoEAux` of the MoE layers stacked along a leading layer axis
  (`aux.balance_loss`: [num_moe_layers], `aux.tokens_per_expert`:
  [num_moe_layers, E]), or None when no layer is MoE.

  Variables: `embed` (`nnx.Embed`, `embedding` [vocab, D] ("vocab", "embed")),
  `blocks` (an `nnx.List` of `TransformerBlock`), `final_norm` (`nnx.RMSNorm`),
  `head` [D, vocab] ("embed", "vocab") when untied, else None.

    lm = MoETransformerLM(TransformerConfig.make(vocab, 512, 8, 8, 1024,
                                                 num_experts=8), rngs=nnx.Rngs(0))
    lm = MoETransformerLM(vocab, 512, 8, 8, 1024, num_experts=8, rngs=...)  # same

  Args:
    config: the `TransformerConfig`; or, as before, the sizes vocab_size, d_model,
      num_layers, num_heads, d_ff (positional or keywords) with the other fields
      as keywords (`TransformerConfig.make`).
    parallel: None, or an object with `moe_ffn(x, params, config, *, key)` (e.g.
      `jmoe.parallel.ExpertParallel`) every `MoE` calls. Not part of the config:
      it is how to run the model, not what the model is.
    dtype: compute dtype (None: param_dtype); param_dtype: storage dtype.
    eager_sharding: create parameters already sharded (see `jmoe.nn`).
    rngs: `nnx.Rngs` with a `params` stream.
    **options: `TransformerConfig` fields (attention ones included) that replace
      the config's.

  Attributes:
    config: the `TransformerConfig`; `vocab_size`, `d_model`, `moe_layers` (the
      resolved per-layer tuple) and `tie_embeddings` read it.
  """

  def __init__(self, config: TransformerConfig | int | None = None, *sizes: int,
               parallel: Any = None, dtype=None, param_dtype=jnp.float32,
               eager_sharding: bool = False, rngs: nnx.Rngs, **options):
    if isinstance(config, TransformerConfig):
      if sizes:
        raise TypeError(
            "MoETransformerLM: pass a TransformerConfig or the sizes (vocab_size,"
            " d_model, num_layers, num_heads, d_ff), not both.")
      config = config.replace(**options) if options else config
    elif isinstance(config, int):
      config = TransformerConfig.make(config, *sizes, **options)
    elif config is None and "vocab_size" in options:  # the sizes as keywords
      config = TransformerConfig.make(**options)
    else:
      raise TypeError(
          "MoETransformerLM: `config` must be a TransformerConfig (or the sizes"
          f" vocab_size, d_model, num_layers, num_heads, d_ff); got {type(config)}.")
    self.config = config
    self.dtype = dtype
    d, vocab = config.d_model, config.vocab_size
    es = dict(eager_sharding=eager_sharding)
    self.embed = nnx.Embed(
        vocab, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        embedding_metadata=dict(out_sharding=("vocab", "embed"), **es))
    self.blocks = nnx.List([
        TransformerBlock(config, i, parallel=parallel, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **es)
        for i in range(config.num_layers)])
    self.final_norm = _rms_norm_module(d, config.norm_eps, dtype, param_dtype,
                                       eager_sharding, rngs)
    self.head = (None if config.tie_embeddings else
                 param(fan_in_init(rngs.params(), (d, vocab), param_dtype),
                       ("embed", "vocab"), **es))

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def d_model(self) -> int:
    return self.config.d_model

  @property
  def moe_layers(self) -> tuple[bool, ...]:
    return self.config.layer_is_moe

  @property
  def tie_embeddings(self) -> bool:
    return self.config.tie_embeddings

  def __call__(self, tokens: Array, *, positions: Array | None = None,
               key: Array | None = None, deterministic: bool | None = None
               ) -> tuple[Array, moe_lib.MoEAux | None]:
    """logits, aux = lm(tokens).

    Runs on one device or on a mesh: the embedding lookup's output takes the
    tokens' sharding (`out_sharding`), so tokens sharded over a mesh of Explicit
    axes (`jmoe.parallel.shard_inputs`) work as they are.

    Args:
      tokens: int [B, S].
      positions: int [B, S] RoPE positions; None: 0..S-1.
      key: PRNG key for router noise; split into one key per layer.
      deterministic: router noise off (True) or on (False) for this call; None:
        each MoE layer's `deterministic` attribute (`lm.eval()` / `lm.train()`).
        Noise needs a router config with jitter / noise.

    Returns:
      logits: float32 [B, S, vocab].
      aux: the MoE layers' `MoEAux` stacked on a leading layer axis, or None.
    """
    fn = "MoETransformerLM"
    checks.check_rank(fn, "tokens", tokens, 2, "[batch, seq]")
    checks.check_integer(fn, "tokens", tokens)
    with jax.named_scope("embed"):
      x = self._embed(tokens)
    keys = (jax.random.split(key, len(self.blocks)) if key is not None
            else [None] * len(self.blocks))
    auxes = []
    for i, (block, k) in enumerate(zip(self.blocks, keys)):
      with jax.named_scope(f"layer{i}"):
        x, aux = block(x, positions=positions, key=k, deterministic=deterministic)
      if aux is not None:
        auxes.append(aux)
    with jax.named_scope("lm_head"):
      logits = self._logits(x)
    return logits, aux_lib.stack_aux(auxes)

  def _embed(self, tokens: Array) -> Array:
    # The lookup's output is sharded like the tokens (batch dims), features
    # unsharded: with tokens on a mesh of Explicit axes a gather cannot infer it
    # (auto_axes, as nnx.Embed does).
    table = self.embed.embedding[...]
    if self.embed.dtype is not None:
      table = table.astype(self.embed.dtype)
    lookup = embed_lookup
    sharding = jax.typeof(tokens).sharding
    if sharding is not None and getattr(sharding, "mesh", None) is not None \
        and not sharding.mesh.empty:
      lookup = jax.sharding.auto_axes(embed_lookup, out_sharding=sharding)
    return lookup(table, tokens)

  def _logits(self, x: Array) -> Array:
    h = self.final_norm(x).astype(x.dtype)
    if self.head is None:
      logits = self.embed.attend(h)
    else:
      logits = jnp.dot(h, self.head[...].astype(h.dtype),
                       preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache` for `batch_size` sequences of up to `max_len` tokens.

    dtype: of the cached keys / values; None: the compute dtype.
    """
    attn = self.config.attention_config
    if dtype is None:
      dtype = self.dtype if self.dtype is not None else self.embed.embedding.dtype
    shape = (len(self.blocks), batch_size, max_len, attn.num_kv_heads,
             attn.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   index=jnp.zeros((), jnp.int32))

  def decode(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Runs tokens [B, S] at positions cache.index .. cache.index+S-1.

    The prefill (the whole prompt, S = prompt length) and each decode step (S = 1)
    are this one call; `nnx.jit` it (shapes are static, so one compile per S).
    Router noise is off and no aux is returned. index + S must not exceed the
    cache's max_len (the index is traced, so this is not checked).

    Returns:
      logits: float32 [B, S, vocab].
      cache: the `KVCache` with the S new keys / values and index + S.
    """
    fn = "MoETransformerLM.decode"
    checks.check_rank(fn, "tokens", tokens, 2, "[batch, seq]")
    checks.check_integer(fn, "tokens", tokens)
    b, s = tokens.shape
    if cache.k.shape[:2] != (len(self.blocks), b):
      raise ValueError(
          f"{fn}: the cache is for {cache.k.shape[0]} layers and batch"
          f" {cache.k.shape[1]}; this model has {len(self.blocks)} layers and"
          f" tokens have batch {b}.")
    if s > cache.max_len:
      raise ValueError(
          f"{fn}: {s} tokens do not fit a cache of max_len={cache.max_len}.")
    x = self._embed(tokens)
    ck, cv = _batch_like(cache.k, tokens), _batch_like(cache.v, tokens)
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block.decode(x, ck[i], cv[i], cache.index)
      ks.append(k)
      vs.append(v)
    cache = KVCache(k=jnp.stack(ks), v=jnp.stack(vs), index=cache.index + s)
    return self._logits(x), cache

  def moe_blocks(self) -> list[MoE]:
    """The `MoE` modules, in layer order (the order of the stacked aux)."""
    return [b.mlp for b in self.blocks if b.is_moe]

  def update_router_biases(self, tokens_per_expert, *,
                           rate: float = 1e-3) -> None:
    """One `update_expert_bias` step of every MoE layer's router bias
    (`jmoe.nn.update_router_biases(self, tokens_per_expert)`).

    Args:
      tokens_per_expert: [num_moe_layers, E], e.g. `aux.tokens_per_expert` of a
        forward pass (summed over micro-batches if any); or the `aux` itself, or
        the intermediates of `nnx.capture`.
      rate: the update speed.
    """
    aux_lib.update_router_biases(self, tokens_per_expert, rate=rate)
