"""The MoE layer's NNX modules: `Router`, `FeedForward` and `MoE`, thin shells over
`jmoe.route`, `jmoe.ffn` and `jmoe.moe_ffn`.

Their variables are the rows of `jmoe.MOE_PARAMS` (and `jmoe.FFN_PARAMS`), created
from the table in its order; `params()` reads them back as `jmoe.MoEParams`.

`MoE` records its aux in the `nnx.Intermediate` collection under `AUX_NAME`
("moe_aux") when called inside `nnx.capture(..., nnx.Intermediate)` (and only
then: outside a capture it stores nothing), draws router noise from its `nnx.Rngs`
stream unless `deterministic`, and constrains its input and output to the logical
activation axes `ACTIVATION_AXES` when `nnx.logical_axis_rules` are active.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jmoe._src import moe as moe_lib
from jmoe._src import params as params_lib
from jmoe._src import routing as routing_lib
from jmoe._src.nn.variables import ExpertBias, Initializer, check_features
from jmoe._src.nn.variables import constrain_activation, fan_in_init
from jmoe._src.nn.variables import table_variable, value_or_none

Array = jax.Array

AUX_NAME = "moe_aux"  # the name MoE layers sow their aux under (NNX and Linen)
ROUTER_RNG = "router"  # the rng stream of router noise (NNX and Linen)


def has_noise(config: routing_lib.RouterConfig) -> bool:
  """Whether routing with `config` draws random numbers (jitter or noise)."""
  return config.jitter_eps > 0 or config.noise_std > 0


def sow_aux(module: nnx.Module, aux) -> None:
  """Records `aux` in `module`'s `nnx.Intermediate` "moe_aux" when a
  `nnx.capture` is collecting that module's intermediates; a no-op otherwise (so
  plain calls keep the module's state unchanged)."""
  if hasattr(module, "__captures__"):  # set by nnx.capture for its duration
    module.sow(nnx.Intermediate, AUX_NAME, aux)


def _router_stream(rngs: nnx.Rngs | None, config: routing_lib.RouterConfig):
  """A fork of the "router" stream (or "default") for noisy routers, else None."""
  if rngs is None or not has_noise(config):
    return nnx.data(None)
  try:
    return rngs[ROUTER_RNG].fork()
  except KeyError:  # no "router" and no "default" stream: explicit keys only
    return nnx.data(None)


def _update_bias(fn: str, bias: ExpertBias | None, tokens_per_expert: Array,
                 rate: float) -> None:
  if bias is None:
    raise ValueError(f"{fn}: this module has no router bias (router_bias=False).")
  bias[...] = routing_lib.update_expert_bias(bias[...], tokens_per_expert,
                                             rate=rate)


class Router(nnx.Module):
  """A router: logits = x @ kernel (float32), then `jmoe.route`.

  Variables (rows "router" and "router_bias" of `jmoe.MOE_PARAMS`): `kernel`
  [d_model, E] ("embed", "expert"); `bias` [E] ("expert",), an `ExpertBias` (not
  a Param) when `use_bias`, else None.
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
    mk = lambda path: table_variable(
        params_lib.PARAMS_BY_PATH[path], {"D": d_model, "E": num_experts},
        rngs=rngs, param_dtype=param_dtype, kernel_init=kernel_init,
        eager_sharding=eager_sharding)
    self.kernel = mk("router")
    self.bias = mk("router_bias") if use_bias else None

  def logits(self, x: Array) -> Array:
    """float32 [T, E] router logits of x [..., D] (leading dims flattened)."""
    check_features("Router", x, self.d_model)
    return moe_lib.router_logits(x.reshape(-1, self.d_model), self.kernel[...])

  def __call__(self, x: Array, *, key: Array | None = None,
               capacity: int | None = None, mask: Array | None = None):
    """Routes x [..., D]; leading dims are flattened into T tokens.

    Args:
      x: [..., d_model] activations.
      key: PRNG key enabling the config's jitter / noise (training only).
      capacity: expert choice only: tokens per expert (see `jmoe.route`).
      mask: optional bool [...] (x.shape[:-1]): the tokens to route (see
        `jmoe.route`).

    Returns:
      `jmoe.Routing` (or `jmoe.ExpertChoiceRouting`) over the T flat tokens.
    """
    if mask is not None:
      mask = routing_lib.check_mask("Router", mask, x.shape[:-1],
                                    "x.shape[:-1]").reshape(-1)
    return routing_lib.route(self.logits(x), self.config,
                             bias=value_or_none(self.bias), key=key,
                             capacity=capacity, mask=mask)

  def update_bias(self, tokens_per_expert: Array, *, rate: float = 1e-3) -> None:
    """One `jmoe.update_expert_bias` step of `bias` from the observed load [E]."""
    _update_bias("Router.update_bias", self.bias, tokens_per_expert, rate)


class FeedForward(nnx.Module):
  """A dense FFN, `jmoe.ffn`. Returns y only.

  Params (the rows of `jmoe.FFN_PARAMS`, mirroring `jmoe.FFNParams`): `w_gate`
  [D, F] ("embed", "mlp") for GLU activations else None, `w_up` [D, F] ("embed",
  "mlp"), `w_down` [F, D] ("mlp", "embed").
  """

  def __init__(self, d_model: int, d_ff: int, *, activation="swiglu",
               dtype=None, param_dtype=jnp.float32,
               kernel_init: Initializer = fan_in_init,
               eager_sharding: bool = False, rngs: nnx.Rngs):
    moe_lib.activation_of(activation, "FeedForward")
    self.d_model = d_model
    self.d_ff = d_ff
    self.activation = activation
    self.dtype = dtype
    flags, sizes = {"glu": moe_lib.is_glu(activation)}, {"D": d_model, "F": d_ff}
    for s in params_lib.FFN_PARAMS:
      setattr(self, s.name, table_variable(
          s, sizes, rngs=rngs, param_dtype=param_dtype, kernel_init=kernel_init,
          eager_sharding=eager_sharding) if s.present(flags) else None)

  def params(self) -> moe_lib.FFNParams:
    """The `jmoe.FFNParams` of this module (stored dtype)."""
    return moe_lib.FFNParams(**{s.name: value_or_none(getattr(self, s.name))
                                for s in params_lib.FFN_PARAMS})

  def __call__(self, x: Array) -> Array:
    """x [..., D] -> [..., D] in the compute dtype."""
    check_features("FeedForward", x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return moe_lib.ffn(x, self.params(), self.activation)


def run_layer(x: Array, params: moe_lib.MoEParams, config: moe_lib.MoEConfig, *,
              parallel, remat, key, mask, deterministic: bool):
  """The MoE modules' (NNX and Linen) one call of the layer: `jmoe.moe_ffn`, or
  `parallel.moe_ffn`, under the `remat` policy, with the activations' logical
  sharding constraints on x and y. `mask` / `deterministic=True` reach the layer
  only when given (a `parallel=` object need not take them otherwise)."""
  kw = {"key": key}
  if mask is not None:
    kw["mask"] = mask
  if deterministic:
    kw["deterministic"] = True
  layer = moe_lib.moe_ffn if parallel is None else parallel.moe_ffn
  layer = moe_lib.remat_layer(layer, remat)
  y, aux = layer(constrain_activation(x), params, config, **kw)
  return constrain_activation(y), aux


class MoE(nnx.Module):
  """A Mixture-of-Experts FFN layer: a thin shell over `jmoe.moe_ffn`.

  A drop-in for a dense FFN whose extra output is the aux record:

    y, aux = moe(x)   # x, y: [..., d_model]; aux: jmoe.MoEAux (losses, load)

  Variables: the rows of `jmoe.MOE_PARAMS` that `layout` (a `jmoe.MoELayout`)
  has, at their NNX paths (`params()` returns them as one `jmoe.MoEParams`):
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
    parallel: None, or an object with `moe_ffn(x, params, config, *, key)` (e.g.
      `jmoe.parallel.ExpertParallel`) called instead of `jmoe.moe_ffn`; it gets
      `mask=` / `deterministic=True` too when the call passes them. Static.
    dtype: compute dtype of the activations (None: x.dtype). `moe_ffn` casts the
      expert weights to it; router math stays float32.
    param_dtype: storage dtype of the parameters.
    kernel_init: initializer of every weight, `(key, shape, dtype)`; the default
      scales by the fan-in shape[-2].
    eager_sharding: create parameters already sharded (see the module docstring).
    deterministic: no router noise unless a `key` is passed (as `nnx.Dropout`;
      `model.eval()` / `model.train()` set it). False (default): a router config
      with jitter / noise draws it from the stream below.
    remat: rematerialise the layer in the backward (`jax.checkpoint`): None
      (default, no remat), True (keep only the inputs) or a `jax.checkpoint`
      policy over the layer's named intermediates, e.g.
      `jax.checkpoint_policies.save_only_these_names("moe_up", "moe_gate")`
      (`jmoe.MOE_CHECKPOINT_NAMES`). Gradients are the same for every choice.
    rngs: `nnx.Rngs` with a `params` stream. For a router config with noise, the
      module keeps a fork of its "router" stream (or "default"; neither: noise
      only from explicit keys).
    **options: the layer's optional parts, fields of `jmoe.MoELayout`:
      shared_d_ff: width of the shared expert(s); 0 for none.
      shared_gate: scale the shared output by sigmoid(x @ shared_gate)
        (Qwen2-MoE).
      router_bias: keep a selection-only router bias (DeepSeek-V3 aux-loss-free
        balancing); update it with `update_bias(aux.tokens_per_expert)`.
  """

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *,
               config: moe_lib.MoEConfig = moe_lib.MoEConfig(),
               parallel: Any = None, dtype=None, param_dtype=jnp.float32,
               kernel_init: Initializer = fan_in_init,
               eager_sharding: bool = False, deterministic: bool = False,
               remat: Any = None, rngs: nnx.Rngs, **options):
    if not isinstance(config, moe_lib.MoEConfig):
      raise TypeError(f"MoE: `config` must be a MoEConfig; got {type(config)}.")
    unknown = sorted(set(options) - set(params_lib.LAYOUT_OPTIONS))
    if unknown:
      raise TypeError(
          f"MoE: unknown option(s) {unknown}; the options are"
          f" {params_lib.LAYOUT_OPTIONS} (fields of jmoe.MoELayout).")
    try:
      layout = params_lib.MoELayout(
          d_model=d_model, d_ff=d_ff, num_experts=num_experts,
          glu=moe_lib.is_glu(config.activation), **options)
    except ValueError as err:
      raise ValueError(f"MoE: {err}") from None
    if layout.router_bias and not config.router.kind_impl.supports_bias:
      raise ValueError(
          "MoE: `router_bias` is for token-choice routing only; got"
          f" kind={config.router.kind!r}.")
    self.layout = layout
    self.config = config
    self.parallel = nnx.static(parallel)
    self.dtype = dtype
    self.deterministic = deterministic
    moe_lib.remat_layer(None, remat)  # validates it
    self.remat = nnx.static(remat)
    self.rngs = _router_stream(rngs, config.router)
    common = dict(param_dtype=param_dtype, kernel_init=kernel_init,
                  eager_sharding=eager_sharding, rngs=rngs)
    submodules = {  # the rows with a two-part NNX path live in these
        "router": lambda: Router(d_model, num_experts, config=config.router,
                                 use_bias=layout.router_bias, **common),
        "shared": lambda: FeedForward(d_model, layout.shared_d_ff,
                                      activation=config.activation, dtype=dtype,
                                      **common) if layout.shared else None,
    }
    for s in params_lib.MOE_PARAMS:  # in table order: the order of the draws
      name = s.module_path[0]
      if len(s.module_path) > 1:
        if not hasattr(self, name):
          setattr(self, name, submodules[name]())
      else:
        setattr(self, name, table_variable(s, layout.sizes, **common)
                if s.present(layout.flags) else None)

  @property
  def d_model(self) -> int:
    return self.layout.d_model

  @property
  def d_ff(self) -> int:
    return self.layout.d_ff

  @property
  def num_experts(self) -> int:
    return self.layout.num_experts

  def params(self) -> moe_lib.MoEParams:
    """The `jmoe.MoEParams` of this module (stored dtype)."""
    values = {}
    for s in params_lib.MOE_PARAMS:
      v = self
      for name in s.module_path:
        v = None if v is None else getattr(v, name)
      if v is not None:
        values[s.path] = v[...]
    return params_lib.params_from_flat(values)

  def set_params(self, params: moe_lib.MoEParams) -> None:
    """Writes `jmoe.MoEParams` (e.g. from `jmoe.upcycle_ffn`) into this module's
    variables, cast to their dtypes. Shapes and present parts must match."""
    fn = "MoE.set_params"
    for s in params_lib.MOE_PARAMS:
      var = self
      for name in s.module_path:
        var = None if var is None else getattr(var, name)
      value = params_lib.get_param(params, s.path)
      if (var is None) != (value is None):
        raise ValueError(
            f"{fn}: `params.{s.path}` is {'missing' if value is None else 'given'}"
            f" but this module {'has' if var is not None else 'has no'} it.")
      if var is None:
        continue
      if tuple(value.shape) != tuple(var[...].shape):
        raise ValueError(
            f"{fn}: `params.{s.path}` must have shape {s.layout}="
            f"{tuple(var[...].shape)}; got {tuple(value.shape)}.")
      var[...] = jnp.asarray(value, var[...].dtype)

  def __call__(self, x: Array, *, key: Array | None = None,
               mask: Array | None = None,
               deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None) -> tuple[Array, moe_lib.MoEAux]:
    """y, aux = moe(x).

    Router noise (only for a config with jitter / noise): none when
    deterministic (the argument, or the module's attribute: evaluation, as
    `jmoe.moe_ffn(deterministic=True)`, an explicit `key` included); else an
    explicit `key`; else a key from `rngs` (its "router" or "default" stream) or
    from the module's own stream; else none.

    Args:
      x: [..., d_model] activations.
      key: PRNG key for router jitter / noise.
      mask: optional bool [...] (x.shape[:-1]), True for real tokens: masked
        ones are not dispatched, give zeros and count in no loss (see
        `jmoe.moe_ffn`).
      deterministic: overrides the module's `deterministic` for this call.
        Deterministic means evaluation: the config's `eval_capacity_factor` and
        no router noise (an explicit `key` included), as `jmoe.moe_ffn`.
      rngs: `nnx.Rngs` to draw the noise key from instead of the module's stream.

    Returns:
      y: [..., d_model] in the compute dtype.
      aux: `jmoe.MoEAux` of this call (also sown as "moe_aux", see the module
        docstring).
    """
    check_features("MoE", x, self.d_model)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    det = bool(self.deterministic if deterministic is None else deterministic)
    key = self._noise_key(key, det, rngs)
    y, aux = run_layer(x, self.params(), self.config, parallel=self.parallel,
                       remat=self.remat, key=key, mask=mask, deterministic=det)
    sow_aux(self, aux)
    return y, aux

  def _noise_key(self, key, deterministic: bool, rngs):
    if key is not None or not has_noise(self.config.router):
      return key
    if deterministic:
      return None
    if rngs is not None:
      return rngs[ROUTER_RNG]()
    return None if self.rngs is None else self.rngs()

  def set_view(self, deterministic: bool | None = None):
    """For `nnx.view`: deterministic=True switches router noise off."""
    if deterministic is not None:
      self.deterministic = deterministic

  def update_bias(self, tokens_per_expert: Array, *, rate: float = 1e-3) -> None:
    """One `jmoe.update_expert_bias` step of the router bias from the load [E]."""
    _update_bias("MoE.update_bias", self.router.bias, tokens_per_expert, rate)
