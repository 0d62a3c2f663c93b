"""The MoE layer's NNX modules: `Router`, `FeedForward` and `MoE`, thin shells over
`jmoe.route`, `jmoe.ffn` and `jmoe.moe_ffn`."""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src import moe as moe_lib
from jmoe._src import routing as routing_lib
from jmoe._src.nn.variables import ExpertBias, Initializer, check_features
from jmoe._src.nn.variables import fan_in_init, param, value_or_none

Array = jax.Array


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
    check_features("Router", x, self.d_model)
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
    return routing_lib.route(self.logits(x), self.config, bias=value_or_none(self.bias),
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
                             w_gate=value_or_none(self.w_gate))

  def __call__(self, x: Array) -> Array:
    """x [..., D] -> [..., D] in the compute dtype."""
    check_features("FeedForward", x, self.d_model)
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
        w_down=self.w_down[...], w_gate=value_or_none(self.w_gate),
        router_bias=value_or_none(self.router.bias),
        shared=None if self.shared is None else self.shared.params(),
        shared_gate=value_or_none(self.shared_gate))

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
    check_features("MoE", x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.parallel is not None:
      return self.parallel.moe_ffn(x, self.params(), self.config, key=key)
    return moe_lib.moe_ffn(x, self.params(), self.config, key=key)

  def update_bias(self, tokens_per_expert: Array, *, rate: float = 1e-3) -> None:
    """One `jmoe.update_expert_bias` step of the router bias from the load [E]."""
    _update_bias("MoE.update_bias", self.router.bias, tokens_per_expert, rate)
