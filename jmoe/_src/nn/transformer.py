"""A decoder-only MoE language model: `TransformerBlock`, `MoETransformerLM` and
its static-shape `KVCache`."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jmoe._src import checks
from jmoe._src import moe as moe_lib
from jmoe._src.nn.attention import Attention
from jmoe._src.nn.moe import FeedForward, MoE
from jmoe._src.nn.variables import fan_in_init, param

Array = jax.Array


def _rms_norm_module(d_model, eps, dtype, param_dtype, eager_sharding, rngs):
  return nnx.RMSNorm(
      d_model, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      scale_metadata=dict(out_sharding=("embed",), eager_sharding=eager_sharding))


class TransformerBlock(nnx.Module):
  """A pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

  The MLP is a `MoE` when `moe` is given or `num_experts` > 0, else a dense
  `FeedForward` of width `d_ff` and activation `activation`.

  Submodules: `attn_norm`, `mlp_norm` (`nnx.RMSNorm`, param `scale` [D] ("embed",)),
  `attn` (`Attention`), `mlp` (`MoE` or `FeedForward`).
  """

  def __init__(self, d_model: int, num_heads: int, d_ff: int, *,
               num_kv_heads: int | None = None,
               moe: moe_lib.MoEConfig | None = None, num_experts: int = 0,
               shared_d_ff: int = 0, shared_gate: bool = False,
               router_bias: bool = False, parallel: Any = None,
               activation: str = "swiglu", head_dim: int | None = None,
               rope_theta: float = 10000.0, qkv_bias: bool = False,
               out_bias: bool = False,
               qk_norm: Literal["per_head", "full"] | None = None,
               norm_eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    self.is_moe = moe is not None or num_experts > 0
    if self.is_moe and num_experts <= 0:
      raise ValueError("TransformerBlock: an MoE block needs `num_experts` > 0.")
    self.dtype = dtype
    es = dict(eager_sharding=eager_sharding)
    self.attn_norm = _rms_norm_module(d_model, norm_eps, dtype, param_dtype,
                                      eager_sharding, rngs)
    self.attn = Attention(d_model, num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, rope_theta=rope_theta,
                          qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm,
                          norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs, **es)
    self.mlp_norm = _rms_norm_module(d_model, norm_eps, dtype, param_dtype,
                                     eager_sharding, rngs)
    if self.is_moe:
      self.mlp = MoE(d_model, d_ff, num_experts,
                     config=moe_lib.MoEConfig() if moe is None else moe,
                     shared_d_ff=shared_d_ff, shared_gate=shared_gate,
                     router_bias=router_bias, parallel=parallel, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs, **es)
    else:
      self.mlp = FeedForward(d_model, d_ff, activation=activation, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs, **es)

  def __call__(self, x: Array, *, positions: Array | None = None,
               key: Array | None = None) -> tuple[Array, moe_lib.MoEAux | None]:
    """x [B, S, D] -> (x [B, S, D], aux: `MoEAux`, or None for a dense block)."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = x + self.attn(self.attn_norm(x).astype(x.dtype), positions=positions)
    return self._mlp_residual(x, key)

  def decode(self, x: Array, k_cache: Array, v_cache: Array, index: Array
             ) -> tuple[Array, Array, Array]:
    """The block on x [B, S, D] at positions index.. against a KV cache
    (`Attention.decode`). Returns (x, k_cache, v_cache); no aux, no router noise."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    a, k_cache, v_cache = self.attn.decode(self.attn_norm(x).astype(x.dtype),
                                           k_cache, v_cache, index)
    x, _ = self._mlp_residual(x + a, None)
    return x, k_cache, v_cache

  def _mlp_residual(self, x: Array, key: Array | None):
    h = self.mlp_norm(x).astype(x.dtype)
    if self.is_moe:
      y, aux = self.mlp(h, key=key)
    else:
      y, aux = self.mlp(h), None
    return x + y, aux


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

  Args:
    vocab_size, d_model, num_layers, num_heads: sizes.
    d_ff: each expert's hidden width.
    num_experts: E (0: every layer is dense).
    moe: the `jmoe.MoEConfig` of the MoE layers; its activation is also the dense
      layers'.
    moe_layers: one bool per layer (True: MoE); None:
      `moe_layer_pattern(num_layers, first_dense=first_dense)`.
    first_dense: the first `first_dense` layers are dense (with moe_layers=None).
    dense_d_ff: width of the dense layers; None: d_ff * top_k (the active FLOPs
      of an MoE layer).
    shared_d_ff, shared_gate, router_bias, parallel: passed to every `MoE`.
    tie_embeddings: logits = embed.attend(h) instead of a separate head.
    num_kv_heads, head_dim, rope_theta, qkv_bias, out_bias, qk_norm: passed to
      `Attention`.
    norm_eps: epsilon of every RMSNorm.
    dtype: compute dtype (None: param_dtype); param_dtype: storage dtype.
  """

  def __init__(self, vocab_size: int, d_model: int, num_layers: int,
               num_heads: int, d_ff: int, *, num_experts: int = 8,
               moe: moe_lib.MoEConfig = moe_lib.MoEConfig(),
               moe_layers: Sequence[bool] | None = None, first_dense: int = 0,
               dense_d_ff: int | None = None, shared_d_ff: int = 0,
               shared_gate: bool = False, router_bias: bool = False,
               parallel: Any = None, tie_embeddings: bool = False,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               rope_theta: float = 10000.0, qkv_bias: bool = False,
               out_bias: bool = False,
               qk_norm: Literal["per_head", "full"] | None = None,
               norm_eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    fn = "MoETransformerLM"
    if moe_layers is None:
      moe_layers = (moe_layer_pattern(num_layers, first_dense=first_dense)
                    if num_experts > 0 else (False,) * num_layers)
    else:
      moe_layers = tuple(bool(m) for m in moe_layers)
      if first_dense:
        raise ValueError(f"{fn}: pass `moe_layers` or `first_dense`, not both.")
      if len(moe_layers) != num_layers:
        raise ValueError(
            f"{fn}: `moe_layers` needs one entry per layer ({num_layers}); got"
            f" {len(moe_layers)}.")
      if any(moe_layers) and num_experts <= 0:
        raise ValueError(f"{fn}: MoE layers need `num_experts` > 0.")
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.moe_layers = moe_layers
    self.dtype = dtype
    self.tie_embeddings = tie_embeddings
    es = dict(eager_sharding=eager_sharding)
    dense_d_ff = d_ff * moe.top_k if dense_d_ff is None else dense_d_ff
    self.embed = nnx.Embed(
        vocab_size, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        embedding_metadata=dict(out_sharding=("vocab", "embed"), **es))
    blocks = []
    for is_moe in moe_layers:
      blocks.append(TransformerBlock(
          d_model, num_heads, d_ff if is_moe else dense_d_ff,
          num_kv_heads=num_kv_heads, moe=moe if is_moe else None,
          num_experts=num_experts if is_moe else 0, shared_d_ff=shared_d_ff,
          shared_gate=shared_gate, router_bias=router_bias, parallel=parallel,
          activation=moe.activation, head_dim=head_dim, rope_theta=rope_theta,
          qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm,
          norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
          **es))
    self.blocks = nnx.List(blocks)
    self.final_norm = _rms_norm_module(d_model, norm_eps, dtype, param_dtype,
                                       eager_sharding, rngs)
    self.head = (None if tie_embeddings else
                 param(fan_in_init(rngs.params(), (d_model, vocab_size),
                                   param_dtype), ("embed", "vocab"), **es))

  def __call__(self, tokens: Array, *, positions: Array | None = None,
               key: Array | None = None
               ) -> tuple[Array, moe_lib.MoEAux | None]:
    """logits, aux = lm(tokens).

    Args:
      tokens: int [B, S].
      positions: int [B, S] RoPE positions; None: 0..S-1.
      key: PRNG key for router noise; split into one key per layer.

    Returns:
      logits: float32 [B, S, vocab].
      aux: the MoE layers' `MoEAux` stacked on a leading layer axis, or None.
    """
    fn = "MoETransformerLM"
    checks.check_rank(fn, "tokens", tokens, 2, "[batch, seq]")
    checks.check_integer(fn, "tokens", tokens)
    x = self.embed(tokens)
    keys = (jax.random.split(key, len(self.blocks)) if key is not None
            else [None] * len(self.blocks))
    auxes = []
    for block, k in zip(self.blocks, keys):
      x, aux = block(x, positions=positions, key=k)
      if aux is not None:
        auxes.append(aux)
    aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None
    return self._logits(x), aux

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
    attn = self.blocks[0].attn
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
    x = self.embed(tokens)
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block.decode(x, cache.k[i], cache.v[i], cache.index)
      ks.append(k)
      vs.append(v)
    cache = KVCache(k=jnp.stack(ks), v=jnp.stack(vs), index=cache.index + s)
    return self._logits(x), cache

  def moe_blocks(self) -> list[MoE]:
    """The `MoE` modules, in layer order (the order of the stacked aux)."""
    return [b.mlp for b in self.blocks if b.is_moe]

  def update_router_biases(self, tokens_per_expert: Array, *,
                           rate: float = 1e-3) -> None:
    """One `update_expert_bias` step of every MoE layer's router bias.

    Args:
      tokens_per_expert: [num_moe_layers, E], e.g. `aux.tokens_per_expert` of a
        forward pass (summed over micro-batches if any).
      rate: the update speed.
    """
    layers = self.moe_blocks()
    if np.shape(tokens_per_expert)[0] != len(layers):
      raise ValueError(
          f"MoETransformerLM.update_router_biases: `tokens_per_expert` must have"
          f" shape [num_moe_layers={len(layers)}, experts]; got"
          f" {np.shape(tokens_per_expert)}.")
    for i, layer in enumerate(layers):
      layer.update_bias(tokens_per_expert[i], rate=rate)
