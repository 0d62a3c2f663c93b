"""Flax NNX modules: thin shells over jmoe's pure functions.

Each module owns its parameters and calls a pure function: `MoE` -> `jmoe.moe_ffn`,
`FeedForward` -> `jmoe.ffn`, `Router` -> `jmoe.route`. No routing or dispatch logic
lives here. `Attention`, `TransformerBlock` and `MoETransformerLM` complete a small
decoder-only language model around the MoE layer.

Conventions: sizes positional, then `*`, then options, `rngs: nnx.Rngs` last.
`dtype` is the compute dtype (None: the input's), `param_dtype` the storage dtype
(float32 by default). Router math is float32 whatever the dtypes.

Sharding is data. Every parameter is an `nnx.Param` (the MoE selection bias an
`ExpertBias`, which is not a Param) carrying the logical names of its axes in its
`out_sharding` metadata:

  "embed"     d_model
  "expert"    the expert axis
  "mlp"       FFN hidden width (experts, shared expert, dense FFN)
  "vocab"     vocabulary
  "q_heads"   query heads;  "kv_heads": key/value heads;  "head_dim": head width
  None        unsharded

`logical_partition_specs(model, rules)` turns them into a tree of mesh
`PartitionSpec`s, `logical_shardings(model, mesh, rules)` into `NamedSharding`s:

  rules = (("expert", "ep"), ("mlp", "tp"))
  shardings = jmoe.nn.logical_shardings(model, mesh, rules)
  nnx.update(model, jax.device_put(nnx.state(model), shardings))

The same with flax's own functions (flax 0.12 has no `nnx.logical_to_mesh_sharding`;
the linen one works on nnx states):

  specs = nnx.get_partition_spec(nnx.state(model))   # logical names as P(...)
  shardings = flax.linen.logical_to_mesh_sharding(specs, mesh, rules)

(Calling `nnx.get_partition_spec` under `nnx.logical_axis_rules(rules)` instead
keeps names without a rule as they are, so there the rules must name every axis:
`complete_rules(rules)`.)

Parameters are created with `eager_sharding=False` by default, so modules build with
or without a mesh. Pass `eager_sharding=True` to create them already sharded; that
needs an active mesh and rules naming every logical axis, e.g.

  with jax.set_mesh(mesh), nnx.logical_axis_rules(complete_rules(rules)):
    model = MoETransformerLM(..., eager_sharding=True, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any, Literal

import flax.linen as _linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jmoe._src import checks
from jmoe._src import moe as moe_lib
from jmoe._src import routing as routing_lib

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]

LOGICAL_AXES = ("embed", "expert", "mlp", "vocab", "q_heads", "kv_heads",
                "head_dim")


# ------------------------------------------------------------------------------
# Parameters with logical axis names.
# ------------------------------------------------------------------------------


class ExpertBias(nnx.Variable):
  """The selection-only router bias [E] (aux-loss-free balancing).

  Not an `nnx.Param`: `nnx.grad` and `nnx.Optimizer(..., wrt=nnx.Param)` leave it
  alone; it moves only through `update_bias` (`jmoe.update_expert_bias`).
  """


def param(value: Array, names: Sequence[str | None], *,
          eager_sharding: bool = False, variable_type: type = nnx.Param):
  """A Variable (an `nnx.Param` by default) with logical axis names.

  Args:
    value: the initial value.
    names: one logical name (or None) per axis of `value`, see `LOGICAL_AXES`.
    eager_sharding: shard the value at creation (needs an active mesh and
      `nnx.logical_axis_rules` naming every axis). False: metadata only.
    variable_type: the Variable class (`nnx.Param`, `ExpertBias`, ...).
  """
  names = tuple(names)
  if len(names) != np.ndim(value):
    raise ValueError(
        f"param: {len(names)} logical names {names} for a value of shape"
        f" {np.shape(value)}.")
  return variable_type(value, out_sharding=names, eager_sharding=eager_sharding)


def complete_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
  """`rules` plus (name, None) for every name of `LOGICAL_AXES` it leaves out."""
  rules = tuple((n, m) for n, m in rules)
  named = {n for n, _ in rules}
  return rules + tuple((n, None) for n in LOGICAL_AXES if n not in named)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_partition_specs(tree, rules: Sequence[tuple[str, Any]] | None = None):
  """Mesh `PartitionSpec`s of a module's (or state's) Variables, from their names.

  Args:
    tree: an `nnx.Module`, or a state / pytree of `nnx.Variable`s (for instance
      `nnx.state(model, nnx.Param)`).
    rules: (logical name, mesh axis | tuple of mesh axes | None) pairs in priority
      order, as in `flax.linen.logical_to_mesh_axes`: a name with no rule, or whose
      mesh axis is already used by another dimension, is unsharded. None: return
      the logical names themselves as `PartitionSpec`s.

  Returns:
    The state of `tree` (`nnx.state(tree)` for a module) with every Variable's value
    replaced by its `PartitionSpec` (`PartitionSpec()` for a Variable without
    names). Same structure as the state, like `nnx.get_partition_spec`.
  """
  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

  def spec(v):
    if not isinstance(v, nnx.Variable):
      return jax.sharding.PartitionSpec()
    names = v.get_metadata().get("out_sharding")
    if not names:
      return v.replace(jax.sharding.PartitionSpec())
    if rules is None:
      return v.replace(jax.sharding.PartitionSpec(*names))
    return v.replace(_linen.logical_to_mesh_axes(names, tuple(rules)))

  return jax.tree.map(spec, state, is_leaf=_is_variable)


def logical_shardings(tree, mesh: jax.sharding.Mesh,
                      rules: Sequence[tuple[str, Any]]):
  """`NamedSharding`s on `mesh` of `logical_partition_specs(tree, rules)`."""
  specs = logical_partition_specs(tree, rules)
  return jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_init(key: Array, shape: tuple[int, ...], dtype, fan_in: int) -> Array:
  # Jitted: one small program per (shape, dtype) instead of one per op.
  x = jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)
  return x.astype(dtype)


def fan_in_init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
  """Normal with variance 1/fan_in, fan_in = shape[-2] (as `jmoe.init_params`).

  The one default of every [..., in, out] weight here: router [D, E], experts
  [E, D, F] / [E, F, D], FFN [D, F] / [F, D], head [D, vocab]; leading axes are
  batch (experts).
  """
  shape = tuple(shape)
  return _normal_init(key, shape, jnp.dtype(dtype), shape[-2])


def _check_features(fn: str, x: Array, d_model: int) -> None:
  if np.ndim(x) < 1 or x.shape[-1] != d_model:
    raise ValueError(
        f"{fn}: `x` must have shape [..., d_model] with d_model={d_model}; got"
        f" shape {np.shape(x)}.")
  checks.check_floating(fn, "x", x)


def _value(v):
  return None if v is None else v[...]


# ------------------------------------------------------------------------------
# Router, FeedForward, MoE.
# ------------------------------------------------------------------------------


def _update_bias(fn: str, bias: ExpertBias | None, tokens_per_expert: Array,
                 rate: float) -> None:
  if bias is None:
    raise ValueError(f"{fn}: this module has no router bias (router_bias=False).")
  bias[...] = routing_lib.update_expert_bias(bias[...], tokens_per_expert,
                                             rate=rate)


class Router(nnx.Module):
  """A router: logits = x @ kernel (float32), then `jmoe.route`.

  Variables: `kernel` [d_model, E] ("embed", "expert"); `bias` [E] ("expert",),
  an `ExpertBias` (not a Param) when `use_bias`, else None.
  """

  def __init__(self, d_model: int, num_experts: int, *,
               config: routing_lib.RouterConfig = routing_lib.RouterConfig(),
               use_bias: bool = False, param_dtype=jnp.float32,
               kernel_init: Initializer = fan_in_init,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    config.validate(num_experts, "Router")
    self.d_model = d_model
    self.num_experts = num_experts
    self.config = config
    self.kernel = param(kernel_init(rngs.params(), (d_model, num_experts),
                                    param_dtype),
                        ("embed", "expert"), eager_sharding=eager_sharding)
    self.bias = (param(jnp.zeros((num_experts,), jnp.float32), ("expert",),
                       eager_sharding=eager_sharding, variable_type=ExpertBias)
                 if use_bias else None)

  def logits(self, x: Array) -> Array:
    """float32 [T, E] router logits of x [..., D] (leading dims flattened)."""
    _check_features("Router", x, self.d_model)
    return moe_lib.router_logits(x.reshape(-1, self.d_model), self.kernel[...])

  def __call__(self, x: Array, *, key: Array | None = None,
               capacity: int | None = None):
    """Routes x [..., D]; leading dims are flattened into T tokens.

    Args:
      x: [..., d_model] activations.
      key: PRNG key enabling the config's jitter / noise (training only).
      capacity: expert choice only: tokens per expert (see `jmoe.route`).

    Returns:
      `jmoe.Routing` (or `jmoe.ExpertChoiceRouting`) over the T flat tokens.
    """
    return routing_lib.route(self.logits(x), self.config, bias=_value(self.bias),
                             key=key, capacity=capacity)

  def update_bias(self, tokens_per_expert: Array, *, rate: float = 1e-3) -> None:
    """One `jmoe.update_expert_bias` step of `bias` from the observed load [E]."""
    _update_bias("Router.update_bias", self.bias, tokens_per_expert, rate)


class FeedForward(nnx.Module):
  """A dense FFN, `jmoe.ffn`. Returns y only.

  Params (mirror `jmoe.FFNParams`): `w_up` [D, F] ("embed", "mlp"), `w_down` [F, D]
  ("mlp", "embed"), `w_gate` [D, F] ("embed", "mlp") for GLU activations else None.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "swiglu",
               dtype=None, param_dtype=jnp.float32,
               kernel_init: Initializer = fan_in_init,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    checks.check_choice("FeedForward", "activation", activation,
                        moe_lib.ACTIVATIONS)
    self.d_model = d_model
    self.d_ff = d_ff
    self.activation = activation
    self.dtype = dtype
    mk = lambda shape, names: param(kernel_init(rngs.params(), shape, param_dtype),
                                    names, eager_sharding=eager_sharding)
    self.w_gate = (mk((d_model, d_ff), ("embed", "mlp"))
                   if moe_lib.is_glu(activation) else None)
    self.w_up = mk((d_model, d_ff), ("embed", "mlp"))
    self.w_down = mk((d_ff, d_model), ("mlp", "embed"))

  def params(self) -> moe_lib.FFNParams:
    """The `jmoe.FFNParams` of this module (stored dtype)."""
    return moe_lib.FFNParams(w_up=self.w_up[...], w_down=self.w_down[...],
                             w_gate=_value(self.w_gate))

  def __call__(self, x: Array) -> Array:
    """x [..., D] -> [..., D] in the compute dtype."""
    _check_features("FeedForward", x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return moe_lib.ffn(x, self.params(), self.activation)


class MoE(nnx.Module):
  """A Mixture-of-Experts FFN layer: a thin shell over `jmoe.moe_ffn`.

  A drop-in for a dense FFN whose extra output is the aux record:

    y, aux = moe(x)   # x, y: [..., d_model]; aux: jmoe.MoEAux (losses, load)

  Variables (mirror `jmoe.MoEParams`; `params()` returns them as one):
    router: a `Router`: `router.kernel` [D, E] ("embed", "expert") and, with
      `router_bias`, `router.bias` [E] ("expert",), an `ExpertBias` (not a Param).
    w_gate: [E, D, F] ("expert", "embed", "mlp"), GLU activations only, else None.
    w_up: [E, D, F] ("expert", "embed", "mlp").
    w_down: [E, F, D] ("expert", "mlp", "embed").
    shared: a `FeedForward` of width `shared_d_ff` (the always-on shared
      expert(s)), or None.
    shared_gate: [D, 1] ("embed", None) when `shared_gate`, else None.

  Args:
    d_model: D.
    d_ff: F, each expert's hidden width.
    num_experts: E.
    config: the `jmoe.MoEConfig` (routing, activation, capacity, gmm backend).
    shared_d_ff: width of the shared expert(s); 0 for none.
    shared_gate: scale the shared output by sigmoid(x @ shared_gate) (Qwen2-MoE).
    router_bias: keep a selection-only router bias (DeepSeek-V3 aux-loss-free
      balancing); update it with `update_bias(aux.tokens_per_expert)`.
    parallel: None, or an object with `moe_ffn(x, params, config, *, key)` (e.g.
      `jmoe.parallel.ExpertParallel`) called instead of `jmoe.moe_ffn`. Static.
    dtype: compute dtype of the activations (None: x.dtype). `moe_ffn` casts the
      expert weights to it; router math stays float32.
    param_dtype: storage dtype of the parameters.
    kernel_init: initializer of every weight, `(key, shape, dtype)`; the default
      scales by the fan-in shape[-2].
    eager_sharding: create parameters already sharded (see the module docstring).
    rngs: `nnx.Rngs` with a `params` stream.
  """

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *,
               config: moe_lib.MoEConfig = moe_lib.MoEConfig(),
               shared_d_ff: int = 0, shared_gate: bool = False,
               router_bias: bool = False, parallel: Any = None, dtype=None,
               param_dtype=jnp.float32, kernel_init: Initializer = fan_in_init,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    if not isinstance(config, moe_lib.MoEConfig):
      raise TypeError(f"MoE: `config` must be a MoEConfig; got {type(config)}.")
    if shared_gate and not shared_d_ff:
      raise ValueError("MoE: `shared_gate` needs a shared expert (shared_d_ff > 0).")
    if router_bias and not config.router.kind_impl.supports_bias:
      raise ValueError(
          "MoE: `router_bias` is for token-choice routing only; got"
          f" kind={config.router.kind!r}.")
    self.d_model = d_model
    self.d_ff = d_ff
    self.num_experts = num_experts
    self.config = config
    self.parallel = nnx.static(parallel)
    self.dtype = dtype
    e, d, f = num_experts, d_model, d_ff
    mk = lambda shape, names: param(kernel_init(rngs.params(), shape, param_dtype),
                                    names, eager_sharding=eager_sharding)
    self.router = Router(d, e, config=config.router, use_bias=router_bias,
                         param_dtype=param_dtype, kernel_init=kernel_init,
                         eager_sharding=eager_sharding, rngs=rngs)
    self.w_gate = (mk((e, d, f), ("expert", "embed", "mlp"))
                   if moe_lib.is_glu(config.activation) else None)
    self.w_up = mk((e, d, f), ("expert", "embed", "mlp"))
    self.w_down = mk((e, f, d), ("expert", "mlp", "embed"))
    self.shared = (FeedForward(d, shared_d_ff, activation=config.activation,
                               dtype=dtype, param_dtype=param_dtype,
                               kernel_init=kernel_init,
                               eager_sharding=eager_sharding, rngs=rngs)
                   if shared_d_ff else None)
    self.shared_gate = mk((d, 1), ("embed", None)) if shared_gate else None

  def params(self) -> moe_lib.MoEParams:
    """The `jmoe.MoEParams` of this module (stored dtype)."""
    return moe_lib.MoEParams(
        router=self.router.kernel[...], w_up=self.w_up[...],
        w_down=self.w_down[...], w_gate=_value(self.w_gate),
        router_bias=_value(self.router.bias),
        shared=None if self.shared is None else self.shared.params(),
        shared_gate=_value(self.shared_gate))

  def __call__(self, x: Array, *,
               key: Array | None = None) -> tuple[Array, moe_lib.MoEAux]:
    """y, aux = moe(x).

    Args:
      x: [..., d_model] activations.
      key: PRNG key for router jitter / noise (training); None: no noise.

    Returns:
      y: [..., d_model] in the compute dtype.
      aux: `jmoe.MoEAux` of this call.
    """
    _check_features("MoE", x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.parallel is not None:
      return self.parallel.moe_ffn(x, self.params(), self.config, key=key)
    return moe_lib.moe_ffn(x, self.params(), self.config, key=key)

  def update_bias(self, tokens_per_expert: Array, *, rate: float = 1e-3) -> None:
    """One `jmoe.update_expert_bias` step of the router bias from the load [E]."""
    _update_bias("MoE.update_bias", self.router.bias, tokens_per_expert, rate)


# ------------------------------------------------------------------------------
# Attention.
# ------------------------------------------------------------------------------


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
  """einsum(spec, x, w) with float32 accumulation (+ bias), out x.dtype."""
  y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


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
    num_heads: H query heads.
    num_kv_heads: K key/value heads (H % K == 0); None: H.
    head_dim: hd (even); None: D // H.
    rope_theta: RoPE base.
    qkv_bias: biases on the q/k/v projections.
    out_bias: a bias on the output projection.
    qk_norm: None, "per_head" or "full".
    norm_eps: epsilon of the q/k RMSNorms.
    dtype: compute dtype (None: x.dtype); param_dtype: storage dtype.
  """

  def __init__(self, d_model: int, num_heads: int, *,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               rope_theta: float = 10000.0, qkv_bias: bool = False,
               out_bias: bool = False,
               qk_norm: Literal["per_head", "full"] | None = None,
               norm_eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    fn = "Attention"
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
      raise ValueError(
          f"{fn}: `num_heads`={num_heads} must be a multiple of"
          f" `num_kv_heads`={num_kv_heads}.")
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(
            f"{fn}: d_model={d_model} is not divisible by num_heads={num_heads};"
            " pass `head_dim`.")
      head_dim = d_model // num_heads
    if head_dim % 2:
      raise ValueError(f"{fn}: RoPE needs an even `head_dim`; got {head_dim}.")
    if qk_norm is not None:
      checks.check_choice(fn, "qk_norm", qk_norm, ("per_head", "full"))
    self.d_model = d_model
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.qk_norm = qk_norm
    self.norm_eps = norm_eps
    self.dtype = dtype
    h, k, hd, d = num_heads, num_kv_heads, head_dim, d_model
    es = dict(eager_sharding=eager_sharding)
    dt = jnp.dtype(param_dtype)
    # Fan-in scaled normals: fan_in = D for q/k/v, H * hd for o.
    in_init = lambda key, shape, _: _normal_init(key, shape, dt, d)
    out_init = lambda key, shape, _: _normal_init(key, shape, dt, h * hd)
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

  def project_qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """q [B, S, H, hd], k, v [B, S, K, hd] of x [B, S, D]: projections, biases,
    q/k norms and RoPE at `positions` [B, S]. Shared by prefill and decode."""
    q = _proj(x, self.q_proj[...], "bsd,dnh->bsnh", _value(self.q_bias))
    k = _proj(x, self.k_proj[...], "bsd,dnh->bsnh", _value(self.k_bias))
    v = _proj(x, self.v_proj[...], "bsd,dnh->bsnh", _value(self.v_bias))
    if self.q_norm is not None:
      q = rms_norm(q, self.q_norm[...], self.norm_eps)
      k = rms_norm(k, self.k_norm[...], self.norm_eps)
    cos, sin = rope(positions, self.head_dim, self.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def project_out(self, o: Array) -> Array:
    """[B, S, H, hd] -> [B, S, D]."""
    return _proj(o, self.o_proj[...], "bsnh,nhd->bsd", _value(self.o_bias))

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
    _check_features(fn, x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    b, s, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    elif positions.shape != (b, s):
      raise ValueError(
          f"{fn}: `positions` must have shape [batch, seq]=({b}, {s}); got"
          f" {positions.shape}.")
    q, k, v = self.project_qkv(x, positions)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
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
    _check_features(fn, x, self.d_model)
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


# ------------------------------------------------------------------------------
# Transformer block and language model.
# ------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------
# Generation.
# ------------------------------------------------------------------------------


def sample_logits(logits: Array, key: Array | None, *, temperature=0.0,
                  top_p=1.0) -> Array:
  """Next tokens int32 [B] from logits [B, vocab].

  temperature == 0 (a Python number): greedy (argmax; `key` unused). Otherwise
  softmax(logits / temperature) restricted to the nucleus: the most probable
  tokens whose cumulative probability before them is below `top_p` (always at
  least the top token), as Hugging Face's temperature then top-p warpers.
  `temperature` and `top_p` may be traced scalars.
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
  logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: MoETransformerLM, prompt_tokens: Array, max_new_tokens: int,
             *, temperature: float = 0.0, top_p: float = 1.0,
             key: Array | None = None, eos_id: int | None = None) -> Array:
  """Autoregressive generation with a static-shape KV cache, in one jitted call.

  The prompt is prefilled in one `decode` call, then a `lax.scan` runs one-token
  decode steps; the cache holds prompt + max_new_tokens positions, so every shape
  is static. One compile per (model, shapes, greedy or not); temperature, top_p
  and eos_id are traced.

  Args:
    model: a `MoETransformerLM`.
    prompt_tokens: int [B, P] prompts, all of length P (no padding).
    max_new_tokens: N, tokens to generate per row.
    temperature: 0.0: greedy; > 0: sampling from softmax(logits / temperature).
    top_p: nucleus sampling threshold in (0, 1] (1.0: off). Sampling only.
    key: PRNG key, required when sampling.
    eos_id: once a row emits this token, its remaining tokens are eos_id.

  Returns:
    int32 [B, P + N]: the prompts followed by the generated tokens.
  """
  fn = "generate"
  checks.check_rank(fn, "prompt_tokens", prompt_tokens, 2, "[batch, prompt_len]")
  checks.check_integer(fn, "prompt_tokens", prompt_tokens)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(
        f"{fn}: `max_new_tokens` must be an int >= 0; got {max_new_tokens!r}.")
  if temperature < 0:
    raise ValueError(f"{fn}: `temperature` must be >= 0; got {temperature}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"{fn}: `top_p` must be in (0, 1]; got {top_p}.")
  greedy = temperature == 0
  if not greedy and key is None:
    raise ValueError(f"{fn}: sampling (temperature > 0) needs a PRNG `key`.")
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if max_new_tokens == 0:
    return prompt_tokens
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_tokens, key,
                   jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p),
                   jnp.int32(-1 if eos_id is None else eos_id),
                   max_new_tokens=max_new_tokens, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "greedy"))
def _generate(graphdef, state, prompt, key, temperature, top_p, eos, *,
              max_new_tokens, greedy):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape
  pick = functools.partial(sample_logits, temperature=0 if greedy else temperature,
                           top_p=top_p)
  keys = jax.random.split(key, max_new_tokens)
  cache = model.init_cache(b, p + max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  first = pick(logits[:, -1], keys[0])

  def step(carry, k):
    token, cache, done = carry
    logits, cache = model.decode(token[:, None], cache)
    token = jnp.where(done, eos, pick(logits[:, 0], k))
    return (token, cache, done | (token == eos)), token

  _, rest = jax.lax.scan(step, (first, cache, first == eos), keys[1:])  # [N-1, B]
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
