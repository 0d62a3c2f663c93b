"""`moe_ffn`: the whole MoE layer as one pure function.

route -> permute (prefix-sum dispatch) -> expert FFN (grouped matmuls) -> unpermute
(weighted combine) [+ shared experts], returning the output and an auxiliary record
of losses and metrics. The parameters (`MoEParams`, their table, `init_params`,
`check_params`) live in `params.py`.

Shapes: T tokens, D d_model, F expert hidden width, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src import permute as permute_lib
from jmoe._src import routing as routing_lib
from jmoe._src.gmm.api import gmm
# The parameters' one home; imported here because the layer takes them.
from jmoe._src.params import ACTIVATIONS, FFNParams, MoEParams  # noqa: F401
from jmoe._src.params import check_params, init_params, is_glu  # noqa: F401

Array = jax.Array


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


_ACT = {"swiglu": jax.nn.silu, "geglu": _gelu, "gelu": _gelu, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
  """Static configuration of an MoE layer. Plain data: frozen and hashable.

  Attributes:
    router: the `RouterConfig` (top_k, scores, grouping, noise, ...).
    activation: expert FFN kind: "swiglu", "geglu" (GLU: needs `w_gate`), "gelu" or
      "relu" (the seed's ReLU(x W1) W2).
    capacity_factor: None for dropless token choice (no token is ever dropped).
      A float turns on capacity mode: each expert keeps at most
      ceil(capacity_factor * T * k / E) (token, slot) pairs in token order and the
      rest are dropped (zero expert output). Expert choice uses it to size each
      expert's pick (default 1.0).
    gmm_implementation: backend of the grouped matmuls (see `jmoe.gmm`).
  """

  router: routing_lib.RouterConfig = routing_lib.RouterConfig()
  activation: Literal["swiglu", "geglu", "gelu", "relu"] = "swiglu"
  capacity_factor: float | None = None
  gmm_implementation: str | None = None

  def __post_init__(self):
    checks.check_choice("MoEConfig", "activation", self.activation, ACTIVATIONS)
    if not isinstance(self.router, routing_lib.RouterConfig):
      raise TypeError(
          f"MoEConfig: `router` must be a RouterConfig; got {type(self.router)}.")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(
          "MoEConfig: `capacity_factor` must be > 0 (or None for dropless); got"
          f" {self.capacity_factor}.")

  @property
  def top_k(self) -> int:
    return self.router.top_k

  def capacity(self, num_tokens: int, num_experts: int) -> int | None:
    """The static per-expert capacity for a batch of `num_tokens` tokens
    (`RouterConfig.capacity` with this config's `capacity_factor`)."""
    return self.router.capacity(num_tokens, num_experts, self.capacity_factor)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEAux:
  """Losses and metrics of one MoE call (all float32 / int32 arrays).

  Attributes:
    balance_loss: [] Switch/GShard load-balancing loss (1.0 when uniform).
    z_loss: [] router z-loss.
    tokens_per_expert: int32 [E] (token, slot) pairs routed to each expert, before
      capacity: the load to feed `update_expert_bias`.
    dropped_fraction: [] share of the T*k pairs dropped for capacity.
    router_entropy: [] mean entropy (nats) of the router distribution.
    nonfinite_tokens: int32 [] tokens whose router logits held NaN or +inf (their
      outputs are NaN; see `route`).
  """

  balance_loss: Array
  z_loss: Array
  tokens_per_expert: Array
  dropped_fraction: Array
  router_entropy: Array
  nonfinite_tokens: Array

  @classmethod
  def filled(cls, value) -> MoEAux:
    """An `MoEAux` holding `value` in every field (e.g. a PartitionSpec)."""
    return cls(**{f.name: value for f in dataclasses.fields(cls)})


def ffn(x: Array, params: FFNParams, activation: str) -> Array:
  """A dense FFN on [..., D], output in x.dtype.

  Matmuls take and give x.dtype (bf16 GEMMs accumulate in float32 inside); the
  activation and gating run in float32. Keeping matmul outputs in the compute
  dtype keeps the backward GEMMs in it too (float32 outputs would make every
  backward product a float32 one).
  """
  dt = x.dtype
  act = _ACT[activation]
  up = jnp.dot(x, params.w_up.astype(dt)).astype(jnp.float32)
  if is_glu(activation):
    gate = jnp.dot(x, params.w_gate.astype(dt)).astype(jnp.float32)
    h = act(gate) * up
  else:
    h = act(up)
  return jnp.dot(h.astype(dt), params.w_down.astype(dt))


def expert_ffn(rows: Array, w_up: Array, w_down: Array, w_gate: Array | None,
               group_sizes: Array, activation: str, *,
               implementation: str | None = None,
               group_offset: Array | None = None) -> Array:
  """Every expert's FFN on its rows: [R, D] -> [R, D] through grouped matmuls.

  Same precision policy as `ffn`: grouped matmuls in rows.dtype with float32
  accumulation, activation in float32.
  """
  dt = rows.dtype
  act = _ACT[activation]
  mm = lambda a, w: gmm(a, w.astype(dt), group_sizes, group_offset=group_offset,
                        implementation=implementation)
  up = mm(rows, w_up).astype(jnp.float32)
  if is_glu(activation):
    h = act(mm(rows, w_gate).astype(jnp.float32)) * up
  else:
    h = act(up)
  return mm(h.astype(dt), w_down)


def router_logits(x: Array, router: Array) -> Array:
  """float32 [T, E] = x @ router, in float32 whatever the activation dtype."""
  return jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def route_tokens(x: Array, params: MoEParams, config: MoEConfig,
                 key: Array | None = None):
  """Router logits and routing decisions for flat tokens x [T, D]; returns
  (routing, capacity), the capacity for `permute`."""
  logits = router_logits(x, params.router)
  capacity = config.capacity(x.shape[0], params.num_experts)
  routing = routing_lib.route(logits, config.router, bias=params.router_bias,
                              key=key, capacity=capacity)
  return routing, capacity


def make_aux(routing, plan: permute_lib.DispatchPlan) -> MoEAux:
  """Losses and metrics from a routing (of either kind) and its dispatch plan."""
  nonfinite = routing_lib.nonfinite_tokens(routing.logits)
  return MoEAux(
      balance_loss=routing.balance_loss(plan.expert_load),
      z_loss=routing_lib.router_z_loss(routing.logits),
      tokens_per_expert=plan.expert_load,
      dropped_fraction=(plan.num_dropped.astype(jnp.float32)
                        / max(routing.num_slots, 1)),
      router_entropy=routing_lib.router_entropy(routing.probs),
      nonfinite_tokens=jnp.sum(nonfinite, dtype=jnp.int32))


def shared_output(x: Array, params: MoEParams, activation: str) -> Array:
  """The shared expert(s) on x [T, D], gated if `params.shared_gate` is set."""
  out = ffn(x, params.shared, activation)
  if params.shared_gate is not None:
    gate = jax.nn.sigmoid(router_logits(x, params.shared_gate))
    out = (out.astype(jnp.float32) * gate).astype(x.dtype)
  return out


def moe_ffn(x: Array, params: MoEParams, config: MoEConfig | None = None, *,
            key: Array | None = None) -> tuple[Array, MoEAux]:
  """The MoE layer: a drop-in replacement for a dense FFN.

  Args:
    x: [..., D] activations (float32 or bfloat16); leading dims are flattened
      into tokens.
    params: `MoEParams`.
    config: `MoEConfig` (default: top-2 softmax routing, SwiGLU, dropless).
    key: PRNG key for router jitter/noise (training); None disables noise.

  Returns:
    y: [..., D] in x.dtype.
    aux: `MoEAux` with the losses and metrics of this call.
  """
  fn = "moe_ffn"
  config = MoEConfig() if config is None else config
  check_params(fn, x, params, config.activation)  # `route` validates the router
  explicit = _explicit_axes(x)
  if explicit:
    # Sharding-in-types (jax.make_mesh's default Explicit axes): the dispatch is a
    # global operation over tokens, so let the compiler partition the body (GSPMD)
    # and hand back y with x's sharding. Expert parallelism with explicit
    # collectives is jmoe.parallel.
    out_sharding = (jax.typeof(x).sharding.spec,
                    MoEAux.filled(jax.sharding.PartitionSpec()))
    body = lambda x, params: _moe_ffn(x, params, config, key)
    with jax.sharding.use_abstract_mesh(jax.typeof(x).sharding.mesh):
      return jax.sharding.auto_axes(body, axes=explicit,
                                    out_sharding=out_sharding)(x, params)
  return _moe_ffn(x, params, config, key)


def _explicit_axes(x: Array) -> tuple[str, ...]:
  """Mesh axes of Explicit type in x's sharding (sharding in types), if any."""
  try:
    mesh = jax.typeof(x).sharding.mesh
  except AttributeError:
    return ()
  if mesh is None or getattr(mesh, "empty", True):
    return ()
  return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types)
               if t == jax.sharding.AxisType.Explicit)


def _moe_ffn(x: Array, params: MoEParams, config: MoEConfig,
             key: Array | None) -> tuple[Array, MoEAux]:
  shape = x.shape
  xt = x.reshape(-1, shape[-1])
  routing, capacity = route_tokens(xt, params, config, key)
  rows, plan = permute_lib.permute(xt, routing, capacity=capacity)
  out_rows = expert_ffn(rows, params.w_up, params.w_down, params.w_gate,
                        plan.group_sizes, config.activation,
                        implementation=config.gmm_implementation)
  y = permute_lib.unpermute(out_rows, plan, routing.weights)
  if params.shared is not None:
    y = y + shared_output(xt, params, config.activation)
  return y.reshape(shape), make_aux(routing, plan)
