"""Causal attention with grouped-query heads and RoPE (Hugging Face conventions).

`AttentionConfig` holds every attention option; `Attention`, `TransformerConfig`
and `jmoe.hf` take it, so a new option is a field here and the code that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from flax import nnx
import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src.nn.variables import check_features, normal_init, param
from jmoe._src.nn.variables import value_or_none

Array = jax.Array


def rope(positions: Array, head_dim: int, theta: float = 10000.0
         ) -> tuple[Array, Array]:
  """RoPE tables in the Hugging Face "rotate_half" (NeoX) convention.

  Args:
    positions: int [B, S] token positions.
    head_dim: hd (even).
    theta: the RoPE base.

  Returns:
    cos, sin: float32 [B, S, hd]; frequency i sits at both i and i + hd/2.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                              / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, S, N, hd] rotated: x*cos + rotate_half(x)*sin (float32, out x.dtype)."""
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMSNorm over the trailing `scale.ndim` axes of x (float32, out x.dtype)."""
  axes = tuple(range(x.ndim - scale.ndim, x.ndim))
  xf = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(xf), axis=axes, keepdims=True)
  return (xf * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)).astype(x.dtype)


def _proj(x: Array, w: Array, spec: str, bias: Array | None = None) -> Array:
  """einsum(spec, x, w) in x.dtype (+ bias in float32), out x.dtype.

  The product's output stays in the compute dtype (bf16 GEMMs accumulate in
  float32 inside), as the FFNs' (`moe.ffn`, `moe.expert_ffn`) do: a float32 output
  (`preferred_element_type`) makes the cotangent float32, so both backward GEMMs
  of every projection ran in float32 (TF32 on an H200: 24% of the h200 training
  step, benchmarks/NOTES.md)."""
  y = jnp.einsum(spec, x, w.astype(x.dtype))
  if bias is not None:
    y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
  return y


QK_NORMS = ("per_head", "full")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def _nvidia_gpu() -> tuple[bool, bool]:
  """(default backend is an NVIDIA GPU, and it is Hopper or later)."""
  if jax.default_backend() != "gpu":
    return False, False
  dev = jax.devices()[0]
  if "nvidia" not in dev.device_kind.lower() and "nvidia" not in str(
      getattr(dev.client, "platform_version", "")).lower():
    return False, False
  cc = getattr(dev, "compute_capability", None)
  try:
    major = int(str(cc).split(".")[0])
  except ValueError:
    major = 0
  return True, major >= 9


def cudnn_attention_fits(dtype, head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot run here (None: it can): an NVIDIA GPU,
  bf16/f16, head_dim a multiple of 8 and <= 128 (256 on Hopper and later)."""
  gpu, hopper = _nvidia_gpu()
  if not gpu:
    return f"the default backend is {jax.default_backend()!r}, not an NVIDIA GPU"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"the compute dtype is {jnp.dtype(dtype).name}, not bfloat16/float16"
  h_max = 256 if hopper else 128
  if head_dim % 8 or head_dim > h_max:
    return f"head_dim={head_dim} is not a multiple of 8 up to {h_max}"
  return None


def attention_implementation(requested: str | None, dtype, head_dim: int) -> str:
  """The `jax.nn.dot_product_attention` implementation to use (see
  `AttentionConfig.implementation`): None resolves to "cudnn" where it fits,
  else "xla"; an explicit "cudnn" that cannot run raises a ValueError saying why."""
  if requested == "xla":
    return "xla"
  why = cudnn_attention_fits(dtype, head_dim)
  if requested is None:
    return "xla" if why else "cudnn"
  if why:
    raise ValueError(
        f"Attention: implementation='cudnn' cannot run: {why}; use"
        " implementation=None (cuDNN where it fits, else XLA) or 'xla'.")
  return "cudnn"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """The options of causal self-attention. Plain data: frozen and hashable.

  Attributes:
    num_heads: H query heads.
    num_kv_heads: K key/value heads (H % K == 0); None: H.
    head_dim: hd (even, for RoPE); None: d_model // H.
    rope_theta: the RoPE base.
    qkv_bias: biases on the q/k/v projections (Qwen2-MoE).
    out_bias: a bias on the output projection.
    qk_norm: None, "per_head" (an RMSNorm of each head, Qwen3) or "full" (over
      the whole projected width before the head split, OLMoE).
    norm_eps: epsilon of the q/k RMSNorms; None: the model's
      (`TransformerConfig.norm_eps`), or 1e-6 for an `Attention` on its own.
    implementation: the `implementation` of `jax.nn.dot_product_attention` for
      the causal forward: "xla" (scores materialised), "cudnn" (cuDNN flash
      attention: NVIDIA GPUs, bf16/f16, head_dim a multiple of 8 up to 128, or 256
      on Hopper and later), or None: "cudnn" where those hold, "xla" elsewhere
      (CPU, TPU, float32). `Attention.decode` (KV cache, boolean mask) always
      uses "xla".
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_theta: float = 10000.0
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: Literal["per_head", "full"] | None = None
  norm_eps: float | None = None
  implementation: Literal["xla", "cudnn"] | None = None

  def __post_init__(self):
    fn = "AttentionConfig"
    if not isinstance(self.num_heads, int) or self.num_heads <= 0:
      raise ValueError(
          f"{fn}: `num_heads` must be a positive int; got {self.num_heads!r}.")
    kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if not isinstance(kv, int) or kv <= 0 or self.num_heads % kv:
      raise ValueError(
          f"{fn}: `num_heads`={self.num_heads} must be a multiple of"
          f" `num_kv_heads`={kv}.")
    if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
      raise ValueError(
          f"{fn}: RoPE needs an even, positive `head_dim`; got {self.head_dim}.")
    if self.qk_norm is not None:
      checks.check_choice(fn, "qk_norm", self.qk_norm, QK_NORMS)
    if self.implementation is not None:
      checks.check_choice(fn, "implementation", self.implementation,
                          ATTENTION_IMPLEMENTATIONS)

  def resolve(self, d_model: int, *, norm_eps: float = 1e-6) -> AttentionConfig:
    """This config with every default filled in for a model of width `d_model`:
    num_kv_heads, head_dim (d_model // num_heads) and norm_eps (`norm_eps`)."""
    head_dim = self.head_dim
    if head_dim is None:
      if d_model % self.num_heads:
        raise ValueError(
            f"AttentionConfig: d_model={d_model} is not divisible by"
            f" num_heads={self.num_heads}; pass `head_dim`.")
      head_dim = d_model // self.num_heads
      if head_dim % 2:
        raise ValueError(
            f"AttentionConfig: RoPE needs an even `head_dim`; d_model // num_heads"
            f" = {head_dim}.")
    return dataclasses.replace(
        self, head_dim=head_dim,
        num_kv_heads=self.num_heads if self.num_kv_heads is None
        else self.num_kv_heads,
        norm_eps=norm_eps if self.norm_eps is None else self.norm_eps)


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query heads and RoPE.

  RoPE follows Hugging Face's rotate_half (NeoX) convention, so Mixtral, Qwen2/3
  and OLMoE checkpoints load with logit parity.

  Params (a Hugging Face `nn.Linear` weight W [out, in] maps as shown):
    q_proj: [D, H, hd] ("embed", "q_heads", "head_dim")   = W.T.reshape(D, H, hd)
    k_proj, v_proj: [D, K, hd] ("embed", "kv_heads", "head_dim")
    o_proj: [H, hd, D] ("q_heads", "head_dim", "embed")   = W.T.reshape(H, hd, D)
    q_bias: [H, hd], k_bias / v_bias: [K, hd] when `qkv_bias` (Qwen2), else None.
    o_bias: [D] ("embed",) when `out_bias`, else None.
    q_norm / k_norm (`qk_norm`):
      "per_head": [hd] ("head_dim",), RMSNorm of each head (Qwen3).
      "full": [H, hd] / [K, hd], RMSNorm over the whole projected width before the
        head split (OLMoE; HF weight [H*hd] -> reshape(H, hd)).

  Args:
    d_model: D.
    config: the `AttentionConfig`, or the number of heads H (then the keywords
      `overrides` give the other fields: `Attention(D, 8, num_kv_heads=2, ...)`,
      or `Attention(D, num_heads=8, ...)`).
    dtype: compute dtype (None: x.dtype); param_dtype: storage dtype.
    eager_sharding: create parameters already sharded (see `jmoe.nn`).
    rngs: `nnx.Rngs` with a `params` stream.
    **overrides: `AttentionConfig` fields that replace the config's.

  Attributes:
    config: the resolved `AttentionConfig` (no None left); `num_heads`,
      `num_kv_heads`, `head_dim`, `rope_theta`, `qk_norm` and `norm_eps` read it.
  """

  def __init__(self, d_model: int, config: AttentionConfig | int | None = None, *,
               dtype=None, param_dtype=jnp.float32, eager_sharding: bool = False,
               rngs: nnx.Rngs, **overrides):
    if isinstance(config, AttentionConfig):
      config = dataclasses.replace(config, **overrides) if overrides else config
    elif isinstance(config, int):
      config = AttentionConfig(num_heads=config, **overrides)
    elif config is None and "num_heads" in overrides:  # Attention(D, num_heads=H)
      config = AttentionConfig(**overrides)
    else:
      raise TypeError(
          "Attention: `config` must be an AttentionConfig (or the number of"
          f" heads); got {type(config)}.")
    config = config.resolve(d_model)
    self.d_model = d_model
    self.config = config
    self.dtype = dtype
    h, k, hd, d = config.num_heads, config.num_kv_heads, config.head_dim, d_model
    qkv_bias, out_bias, qk_norm = config.qkv_bias, config.out_bias, config.qk_norm
    es = dict(eager_sharding=eager_sharding)
    dt = jnp.dtype(param_dtype)
    # Fan-in scaled normals: fan_in = D for q/k/v, H * hd for o.
    in_init = lambda key, shape, _: normal_init(key, shape, dt, d)
    out_init = lambda key, shape, _: normal_init(key, shape, dt, h * hd)
    self.q_proj = param(in_init(rngs.params(), (d, h, hd), param_dtype),
                        ("embed", "q_heads", "head_dim"), **es)
    self.k_proj = param(in_init(rngs.params(), (d, k, hd), param_dtype),
                        ("embed", "kv_heads", "head_dim"), **es)
    self.v_proj = param(in_init(rngs.params(), (d, k, hd), param_dtype),
                        ("embed", "kv_heads", "head_dim"), **es)
    self.o_proj = param(out_init(rngs.params(), (h, hd, d), param_dtype),
                        ("q_heads", "head_dim", "embed"), **es)
    zeros = lambda shape, names: param(jnp.zeros(shape, param_dtype), names, **es)
    ones = lambda shape, names: param(jnp.ones(shape, param_dtype), names, **es)
    self.q_bias = zeros((h, hd), ("q_heads", "head_dim")) if qkv_bias else None
    self.k_bias = zeros((k, hd), ("kv_heads", "head_dim")) if qkv_bias else None
    self.v_bias = zeros((k, hd), ("kv_heads", "head_dim")) if qkv_bias else None
    self.o_bias = zeros((d,), ("embed",)) if out_bias else None
    if qk_norm == "per_head":
      self.q_norm = ones((hd,), ("head_dim",))
      self.k_norm = ones((hd,), ("head_dim",))
    elif qk_norm == "full":
      self.q_norm = ones((h, hd), ("q_heads", "head_dim"))
      self.k_norm = ones((k, hd), ("kv_heads", "head_dim"))
    else:
      self.q_norm = self.k_norm = None

  @property
  def num_heads(self) -> int:
    return self.config.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.config.num_kv_heads

  @property
  def head_dim(self) -> int:
    return self.config.head_dim

  @property
  def rope_theta(self) -> float:
    return self.config.rope_theta

  @property
  def qk_norm(self) -> str | None:
    return self.config.qk_norm

  @property
  def norm_eps(self) -> float:
    return self.config.norm_eps

  def project_qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """q [B, S, H, hd], k, v [B, S, K, hd] of x [B, S, D]: projections, biases,
    q/k norms and RoPE at `positions` [B, S]. Shared by prefill and decode."""
    q = _proj(x, self.q_proj[...], "bsd,dnh->bsnh", value_or_none(self.q_bias))
    k = _proj(x, self.k_proj[...], "bsd,dnh->bsnh", value_or_none(self.k_bias))
    v = _proj(x, self.v_proj[...], "bsd,dnh->bsnh", value_or_none(self.v_bias))
    if self.q_norm is not None:
      q = rms_norm(q, self.q_norm[...], self.norm_eps)
      k = rms_norm(k, self.k_norm[...], self.norm_eps)
    cos, sin = rope(positions, self.head_dim, self.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def project_out(self, o: Array) -> Array:
    """[B, S, H, hd] -> [B, S, D]."""
    return _proj(o, self.o_proj[...], "bsnh,nhd->bsd", value_or_none(self.o_bias))

  def __call__(self, x: Array, *, positions: Array | None = None) -> Array:
    """Causal self-attention.

    Args:
      x: [B, S, d_model].
      positions: int [B, S] RoPE positions; None: 0..S-1 for every row.

    Returns:
      [B, S, d_model] in the compute dtype.
    """
    fn = "Attention"
    checks.check_rank(fn, "x", x, 3, "[batch, seq, d_model]")
    check_features(fn, x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    b, s, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    elif positions.shape != (b, s):
      raise ValueError(
          f"{fn}: `positions` must have shape [batch, seq]=({b}, {s}); got"
          f" {positions.shape}.")
    with jax.named_scope("qkv_proj"):
      q, k, v = self.project_qkv(x, positions)
    impl = attention_implementation(self.config.implementation, q.dtype,
                                    self.head_dim)
    with jax.named_scope("sdpa"):
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=impl)
    with jax.named_scope("out_proj"):
      return self.project_out(o)

  def decode(self, x: Array, k_cache: Array, v_cache: Array, index: Array
             ) -> tuple[Array, Array, Array]:
    """Causal attention of x against a KV cache (prefill or one decode step).

    The S tokens of x sit at positions index .. index+S-1 (the same for every
    row); their keys and values are written into the cache at those slots, and
    each attends to the cache slots up to its own position.

    Args:
      x: [B, S, d_model].
      k_cache, v_cache: [B, T, K, hd], slots [0, index) already filled.
      index: int32 [], the number of filled slots (index + S <= T).

    Returns:
      y [B, S, d_model] in the compute dtype, and the updated k_cache, v_cache.
    """
    fn = "Attention.decode"
    checks.check_rank(fn, "x", x, 3, "[batch, seq, d_model]")
    check_features(fn, x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    b, s, _ = x.shape
    t = k_cache.shape[1]
    shape = (b, t, self.num_kv_heads, self.head_dim)
    if k_cache.shape != shape or v_cache.shape != shape:
      raise ValueError(
          f"{fn}: `k_cache` and `v_cache` must have shape [batch, max_len,"
          f" kv_heads, head_dim]={shape}; got {k_cache.shape}, {v_cache.shape}.")
    index = jnp.asarray(index, jnp.int32)
    pos = index + jnp.arange(s, dtype=jnp.int32)  # [S]
    q, k, v = self.project_qkv(x, jnp.broadcast_to(pos, (b, s)))
    start = (0, index, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    mask = jnp.arange(t, dtype=jnp.int32)[None, :] <= pos[:, None]  # [S, T]
    o = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype),
                                     v_cache.astype(q.dtype),
                                     mask=mask[None, None])
    return self.project_out(o), k_cache, v_cache
