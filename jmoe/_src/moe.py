"""`moe_ffn`: the whole MoE layer as one pure function.

route -> permute (prefix-sum dispatch) -> expert FFN (grouped matmuls) -> unpermute
(weighted combine) [+ shared experts], returning the output and an auxiliary record
of losses and metrics. The parameters (`MoEParams`, their table, `init_params`,
`check_params`) live in `params.py`.

Shapes: T tokens, D d_model, F expert hidden width, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jmoe._src import checks
from jmoe._src import permute as permute_lib
from jmoe._src import routing as routing_lib
from jmoe._src.gmm.api import gmm, gmm_pair
# The parameters' one home; imported here because the layer takes them.
from jmoe._src.params import ACTIVATIONS, Activation, FFNParams, MoEParams  # noqa: F401
from jmoe._src.params import activation_of, check_params, init_params, is_glu  # noqa: F401

Array = jax.Array

_ROUTER_FIELDS = tuple(f.name for f in dataclasses.fields(routing_lib.RouterConfig))
TRAIN = "train"  # `eval_capacity_factor`'s default: the training factor


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
  """Static configuration of an MoE layer. Plain data: frozen and hashable.

  Router options may be given directly: `MoEConfig(top_k=1, score="sigmoid")` is
  `MoEConfig(router=RouterConfig(top_k=1, score="sigmoid"))`; next to `router=`
  they replace its fields (so `dataclasses.replace(config, top_k=4)` works too).

  Attributes:
    router: the `RouterConfig` (top_k, scores, grouping, noise, ...).
    activation: the expert FFN's activation: a name in `jmoe.ACTIVATIONS`
      ("swiglu", "geglu", "geglu_tanh" (gated: need `w_gate`), "gelu",
      "gelu_tanh", "relu" (the seed's ReLU(x W1) W2)), a `jmoe.Activation`, or
      any elementwise callable (not gated). "_tanh" is the tanh-approximate GELU
      (gemma's GeGLU, Hugging Face's "gelu_pytorch_tanh").
    capacity_factor: the capacity factor in training (`deterministic=False`, the
      default). None for dropless token choice (no token is ever dropped). A
      float turns on capacity mode: each expert keeps at most
      max(ceil(capacity_factor * T * k / E), min_capacity) (token, slot) pairs in
      token order and the rest are dropped (zero expert output). Expert choice
      uses it to size each expert's pick (default 1.0). Finite and > 0.
    eval_capacity_factor: the factor in evaluation (`deterministic=True`): "train"
      (default) uses `capacity_factor`, None is dropless, a float its own.
    min_capacity: the least capacity of an expert in capacity mode (an int >= 1;
      DeepSpeed's `min_capacity`, flaxformer's `min_expert_capacity`). Capacity
      never exceeds the tokens T.
    balance_convention: the scale of `MoEAux.balance_loss`: "switch" (default:
      E * sum_e f_e P_e with f over the T*k pairs, 1.0 when uniform) or "hf"
      (Hugging Face's `load_balancing_loss_func`, k times larger: k when
      uniform). Coefficients ported from a Hugging Face config (Mixtral's
      `router_aux_loss_coef`, Qwen-MoE, OLMoE) need "hf".
    gmm_implementation: backend of the grouped matmuls (see `jmoe.gmm`).
  """

  router: routing_lib.RouterConfig = routing_lib.RouterConfig()
  activation: Any = "swiglu"
  capacity_factor: float | None = None
  eval_capacity_factor: float | None | Literal["train"] = TRAIN
  min_capacity: int = 1
  balance_convention: Literal["switch", "hf"] = "switch"
  gmm_implementation: str | None = None

  def __post_init__(self):
    fn = "MoEConfig"
    activation_of(self.activation, fn)
    if not isinstance(self.router, routing_lib.RouterConfig):
      raise TypeError(
          f"{fn}: `router` must be a RouterConfig; got {type(self.router)}.")
    routing_lib.check_capacity_factor(fn, "capacity_factor", self.capacity_factor)
    if self.eval_capacity_factor != TRAIN:
      routing_lib.check_capacity_factor(fn, "eval_capacity_factor",
                                        self.eval_capacity_factor)
    routing_lib.check_min_capacity(fn, self.min_capacity)
    checks.check_choice(fn, "balance_convention", self.balance_convention,
                        routing_lib.BALANCE_CONVENTIONS)

  @property
  def top_k(self) -> int:
    return self.router.top_k

  def capacity_factor_for(self, deterministic: bool = False) -> float | None:
    """The capacity factor of training (False) or evaluation (True)."""
    if deterministic and self.eval_capacity_factor != TRAIN:
      return self.eval_capacity_factor
    return self.capacity_factor

  def capacity(self, num_tokens: int, num_experts: int, *,
               deterministic: bool = False) -> int | None:
    """The static per-expert capacity for a batch of `num_tokens` tokens
    (`RouterConfig.capacity` with this config's factor and `min_capacity`)."""
    return self.router.capacity(num_tokens, num_experts,
                                self.capacity_factor_for(deterministic),
                                min_capacity=self.min_capacity)


_dataclass_init = MoEConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self, **kwargs):
  router_kw = {k: kwargs.pop(k) for k in _ROUTER_FIELDS if k in kwargs}
  if router_kw:
    router = kwargs.get("router", routing_lib.RouterConfig())
    if not isinstance(router, routing_lib.RouterConfig):
      raise TypeError(
          f"MoEConfig: `router` must be a RouterConfig; got {type(router)}.")
    kwargs["router"] = dataclasses.replace(router, **router_kw)
  try:
    _dataclass_init(self, **kwargs)
  except TypeError as err:
    if "unexpected keyword" not in str(err):
      raise
    fields = [f.name for f in dataclasses.fields(MoEConfig)]
    raise TypeError(
        f"MoEConfig: {err}; its fields are {fields} and the RouterConfig fields"
        f" {list(_ROUTER_FIELDS)} may be given directly.") from None


MoEConfig.__init__ = _init


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEAux:
  """Losses and metrics of one MoE call (all float32 / int32 arrays). Masked-out
  tokens (`moe_ffn(..., mask=)`) count in none of them; an empty batch (or one
  with every token masked) gives zeros.

  Attributes:
    balance_loss: [] Switch/GShard load-balancing loss (1.0 when uniform; k with
      `MoEConfig.balance_convention="hf"`).
    z_loss: [] router z-loss.
    tokens_per_expert: int32 [E] (token, slot) pairs routed to each expert, before
      capacity: the load to feed `update_expert_bias`.
    dropped_fraction: [] share of the routed pairs dropped for capacity.
    router_entropy: [] mean entropy (nats) of the router distribution.
    nonfinite_tokens: int32 [] tokens whose router logits held NaN or +inf, or
      were all -inf (their outputs are NaN; see `route`).
    mean_router_probs: float32 [E] the mean router probability of each expert,
      P_e of the balance loss. A balance loss over a global batch (several
      micro-batches or data shards) is E * sum_e f_e * P_e with f the summed
      `tokens_per_expert` over the summed pairs and P the (token-weighted) mean
      of these.
  """

  balance_loss: Array
  z_loss: Array
  tokens_per_expert: Array
  dropped_fraction: Array
  router_entropy: Array
  nonfinite_tokens: Array
  mean_router_probs: Array

  @classmethod
  def filled(cls, value) -> MoEAux:
    """An `MoEAux` holding `value` in every field (e.g. a PartitionSpec)."""
    return cls(**{f.name: value for f in dataclasses.fields(cls)})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AuxSums:
  """The additive parts of `MoEAux`: sums over the (unmasked) tokens of a batch,
  so those of several shards add up (jmoe.parallel `psum`s them).

  Attributes:
    tokens: int32 [] unmasked tokens.
    slots: int32 [] routed (token, slot) pairs (expert choice: filled picks).
    expert_load: int32 [E] pairs per expert, before capacity.
    dropped: int32 [] pairs dropped for capacity.
    probs: float32 [E] summed router probabilities.
    z: float32 [] summed logsumexp(logits)^2.
    entropy: float32 [] summed router entropies.
    nonfinite: int32 [] non-finite tokens.
  """

  tokens: Array
  slots: Array
  expert_load: Array
  dropped: Array
  probs: Array
  z: Array
  entropy: Array
  nonfinite: Array


# Names of the layer's intermediates for `jax.checkpoint` policies
# (`jax.checkpoint_policies.save_only_these_names(*names)`, `save_any_names_but_these`,
# ...): `moe_ffn` tags them with `jax.ad_checkpoint.checkpoint_name`, which is the
# identity outside `jax.checkpoint`. `jmoe.nn.MoE(remat=policy)` applies a policy.
ROUTER_LOGITS = "moe_router_logits"    # float32 [T, E], before noise
PERMUTED_ROWS = "moe_permuted_rows"    # [R, D], the dispatched rows
GATE = "moe_gate"                      # [R, F], rows @ w_gate (GLU activations)
UP = "moe_up"                          # [R, F], rows @ w_up
HIDDEN = "moe_hidden"                  # [R, F], act(gate) * up, the w_down input
EXPERT_OUT = "moe_expert_out"          # [R, D], the expert outputs before combine
CHECKPOINT_NAMES = (ROUTER_LOGITS, PERMUTED_ROWS, GATE, UP, HIDDEN, EXPERT_OUT)
# `jax.named_scope`s of the layer's stages, in op metadata and profiles (the
# training-step profile, benchmarks/train_step_profile.py, groups time by them).
SCOPES = ("router", "dispatch", "experts", "combine", "shared_expert")
# The dense FFN's (`ffn`; the shared expert of an MoE layer uses it too).
FFN_GATE, FFN_UP, FFN_HIDDEN = "ffn_gate", "ffn_up", "ffn_hidden"


def ffn(x: Array, params: FFNParams, activation) -> Array:
  """A dense FFN on [..., D], output in x.dtype.

  `activation`: a name in `jmoe.ACTIVATIONS`, a `jmoe.Activation` or an
  elementwise callable (see `MoEConfig.activation`).

  Matmuls take and give x.dtype (bf16 GEMMs accumulate in float32 inside); the
  activation and gating run in float32. Keeping matmul outputs in the compute
  dtype keeps the backward GEMMs in it too (float32 outputs would make every
  backward product a float32 one).
  """
  dt = x.dtype
  act = activation_of(activation, "ffn")
  name = checkpoint_name
  up = name(jnp.dot(x, params.w_up.astype(dt)), FFN_UP).astype(jnp.float32)
  if act.glu:
    gate = name(jnp.dot(x, params.w_gate.astype(dt)), FFN_GATE).astype(jnp.float32)
    h = act.fn(gate) * up
  else:
    h = act.fn(up)
  h = name(h.astype(dt), FFN_HIDDEN)
  return jnp.dot(h, params.w_down.astype(dt))


def expert_ffn(rows: Array, w_up: Array, w_down: Array, w_gate: Array | None,
               group_sizes: Array, activation, *,
               implementation: str | None = None,
               group_offset: Array | None = None) -> Array:
  """Every expert's FFN on its rows: [R, D] -> [R, D] through grouped matmuls.

  Same precision and activation policy as `ffn`: grouped matmuls in rows.dtype
  with float32 accumulation, activation in float32. The products are tagged
  `UP`, `GATE`, `HIDDEN` for `jax.checkpoint` policies (`CHECKPOINT_NAMES`).
  """
  dt = rows.dtype
  act = activation_of(activation, "expert_ffn")
  name = checkpoint_name
  mm = lambda a, w: gmm(a, w.astype(dt), group_sizes, group_offset=group_offset,
                        implementation=implementation)
  if act.glu:
    # One primitive for both products of rows: its input gradient is one product
    # (one kernel on the Mosaic backend), not two [R, D] arrays added by the AD.
    gate, up = gmm_pair(rows, w_gate.astype(dt), w_up.astype(dt), group_sizes,
                        group_offset=group_offset, implementation=implementation)
    up = name(up, UP).astype(jnp.float32)
    h = act.fn(name(gate, GATE).astype(jnp.float32)) * up
  else:
    h = act.fn(name(mm(rows, w_up), UP).astype(jnp.float32))
  return mm(name(h.astype(dt), HIDDEN), w_down)


def _bf16_pieces(a: Array) -> tuple[Array, Array, Array]:
  """Three bfloat16 arrays whose float32 sum is `a` (float32): 3 x 8 mantissa bits
  hold float32's 24, so the split is exact for normal values."""
  a = a.astype(jnp.float32)
  hi = a.astype(jnp.bfloat16)
  r = a - hi.astype(jnp.float32)
  mid = r.astype(jnp.bfloat16)
  return hi, mid, (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)


def _dot_f32(a: Array, b: Array) -> Array:
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _block_sum(y: Array, parts: int) -> Array:
  """y [T, parts * E] -> [T, E]: the sum of its column blocks, last first."""
  blocks = jnp.split(y, parts, axis=-1)
  acc = blocks[-1]
  for b in blocks[-2::-1]:
    acc = acc + b
  return acc


@jax.custom_vjp
def _router_dot_bf16(x: Array, router: Array) -> Array:
  """float32 x @ router for bfloat16 x, on bfloat16 products: x is exact in
  bfloat16 and router = hi + mid + lo exactly, so x @ [hi | mid | lo] (one
  matmul with float32 accumulation) has float32 HIGHEST's exact products, only
  summed in another order. Tensor cores instead of float32 FMA on GPUs (an
  H200's float32 router matmuls took ~0.4 ms of a 10 ms OLMoE layer; NOTES.md)."""
  return _block_sum(_dot_f32(x, jnp.concatenate(_bf16_pieces(router), 1)), 3)


def _router_dot_fwd(x, router):
  return _router_dot_bf16(x, router), (x, router)


def _router_dot_bwd(res, g):
  x, router = res
  g_hi, g_mid, g_lo = _bf16_pieces(g)
  w_hi, w_mid, w_lo = _bf16_pieces(router)
  # d router = x^T g: x exact, g = g_hi + g_mid + g_lo, so the products are exact.
  dr = _block_sum(_dot_f32(x.T, jnp.concatenate([g_hi, g_mid, g_lo], 1)), 3)
  # d x = g router^T: both float32; the six pieces' products down to 2^-16 of
  # the leading one (the three left out are ~2^-24 of it), in one matmul.
  a = jnp.concatenate([g_hi, g_hi, g_mid, g_hi, g_mid, g_lo], 1)
  b = jnp.concatenate([w_hi, w_mid, w_hi, w_lo, w_mid, w_hi], 1)
  dx = _dot_f32(a, b.T)
  return dx.astype(x.dtype), dr.astype(router.dtype)


_router_dot_bf16.defvjp(_router_dot_fwd, _router_dot_bwd)


def router_logits(x: Array, router: Array) -> Array:
  """float32 [T, E] = x @ router, in float32 whatever the activation dtype
  (tagged `ROUTER_LOGITS` for `jax.checkpoint` policies). bfloat16 x runs as
  bfloat16 products that are exact in float32 (`_router_dot_bf16`); other dtypes
  as a float32 HIGHEST matmul."""
  if x.dtype == jnp.bfloat16:
    logits = _router_dot_bf16(x, router)
  else:
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return checkpoint_name(logits, ROUTER_LOGITS)


def route_tokens(x: Array, params: MoEParams, config: MoEConfig,
                 key: Array | None = None, mask: Array | None = None, *,
                 deterministic: bool = False, noise=None):
  """Router logits and routing decisions for flat tokens x [T, D] (mask [T]);
  returns (routing, capacity), the capacity for `permute`. `noise`: the rows of
  `routing.noise_draws` to use instead of drawing them from `key`."""
  logits = router_logits(x, params.router)
  if noise is not None:
    logits, key = routing_lib.add_noise(logits, config.router, noise), None
  capacity = config.capacity(x.shape[0], params.num_experts,
                             deterministic=deterministic)
  routing = routing_lib.route(logits, config.router, bias=params.router_bias,
                              key=key, capacity=capacity, mask=mask)
  return routing, capacity


def aux_sums(routing, plan: permute_lib.DispatchPlan) -> AuxSums:
  """The `AuxSums` of a routing (of either kind) and its dispatch plan: sums
  over the tokens its mask keeps (all without one)."""
  mask = routing.mask
  keep = lambda v: v if mask is None else jnp.where(
      mask.reshape(mask.shape + (1,) * (v.ndim - 1)), v, 0)
  total = lambda v: jnp.sum(keep(v), axis=0)
  return AuxSums(
      tokens=jnp.asarray(routing_lib.num_unmasked(mask, routing.num_tokens),
                         jnp.int32),
      slots=jnp.asarray(routing.num_routed_slots, jnp.int32),
      expert_load=plan.expert_load,
      dropped=plan.num_dropped,
      probs=total(routing.probs.astype(jnp.float32)),
      z=total(routing_lib.token_z(routing.logits)),
      entropy=total(routing_lib.token_entropy(routing.probs)),
      nonfinite=jnp.sum(routing_lib.nonfinite_tokens(routing.logits, mask),
                        dtype=jnp.int32))


def aux_from_sums(routing, sums: AuxSums,
                  convention: str = "switch") -> MoEAux:
  """`MoEAux` from `AuxSums` (of one batch, or summed over shards); `routing`
  gives the balance-loss rule of its kind. Means over no token are 0."""
  per_token = lambda v: v / jnp.maximum(sums.tokens, 1).astype(jnp.float32)
  mean_probs = per_token(sums.probs)
  return MoEAux(
      balance_loss=routing.balance_loss(sums.expert_load, num_slots=sums.slots,
                                        mean_probs=mean_probs,
                                        convention=convention),
      z_loss=per_token(sums.z),
      tokens_per_expert=sums.expert_load,
      dropped_fraction=(sums.dropped.astype(jnp.float32)
                        / jnp.maximum(sums.slots, 1).astype(jnp.float32)),
      router_entropy=per_token(sums.entropy),
      nonfinite_tokens=sums.nonfinite,
      mean_router_probs=mean_probs)


def make_aux(routing, plan: permute_lib.DispatchPlan,
             convention: str = "switch") -> MoEAux:
  """Losses and metrics from a routing (of either kind) and its dispatch plan;
  masked-out tokens count in none of them."""
  return aux_from_sums(routing, aux_sums(routing, plan), convention)


def shared_output(x: Array, params: MoEParams, activation) -> Array:
  """The shared expert(s) on x [T, D], gated if `params.shared_gate` is set."""
  out = ffn(x, params.shared, activation)
  if params.shared_gate is not None:
    gate = jax.nn.sigmoid(router_logits(x, params.shared_gate))
    out = (out.astype(jnp.float32) * gate).astype(x.dtype)
  return out


def moe_ffn(x: Array, params: MoEParams, config: MoEConfig | None = None, *,
            key: Array | None = None, mask: Array | None = None,
            deterministic: bool = False) -> tuple[Array, MoEAux]:
  """The MoE layer: a drop-in replacement for a dense FFN.

  Args:
    x: [..., D] activations (float32 or bfloat16); leading dims are flattened
      into tokens. Zero tokens (x of shape [0, D]) give y of that shape and an
      aux of zeros.
    params: `MoEParams`.
    config: `MoEConfig` (default: top-2 softmax routing, SwiGLU, dropless).
    key: PRNG key for router jitter/noise (training); None disables noise.
    mask: optional bool [...] (x.shape[:-1]; integers: nonzero), True for the
      tokens to run. A False token (padding) is not read (NaN padding is
      harmless), not dispatched, takes no capacity, gives a zero output (shared
      expert included) and a zero gradient, and counts in no loss or metric. The
      static capacity is still computed from all of x's tokens (it sizes
      buffers), so masked tokens leave their room unused.
    deterministic: evaluation: `config.eval_capacity_factor` instead of
      `capacity_factor`, and no router noise (`key` is ignored), as Flax's
      `Dropout(deterministic=True)`.

  Returns:
    y: [..., D] in x.dtype.
    aux: `MoEAux` with the losses and metrics of this call.
  """
  fn = "moe_ffn"
  config = MoEConfig() if config is None else config
  check_params(fn, x, params, config.activation)  # `route` validates the router
  mask = routing_lib.check_mask(fn, mask, x.shape[:-1], "x.shape[:-1]")
  if deterministic:
    key = None
  body = lambda x, params, mask: _moe_ffn(x, params, config, key, mask,
                                          deterministic)
  explicit = _explicit_axes(x)
  if explicit:
    # Sharding-in-types (jax.make_mesh's default Explicit axes): the dispatch is a
    # global operation over tokens, so let the compiler partition the body (GSPMD)
    # and hand back y with x's sharding. Expert parallelism with explicit
    # collectives is jmoe.parallel.
    out_sharding = (jax.typeof(x).sharding.spec,
                    MoEAux.filled(jax.sharding.PartitionSpec()))
    with jax.sharding.use_abstract_mesh(jax.typeof(x).sharding.mesh):
      return jax.sharding.auto_axes(body, axes=explicit,
                                    out_sharding=out_sharding)(x, params, mask)
  return body(x, params, mask)


def remat_layer(layer, remat):
  """`layer(x, params, config, **kw)` (`moe_ffn` or a parallel layer's) under
  `jax.checkpoint`, for the modules' `remat` option.

  remat: None or False (no remat), True (`jax.checkpoint`'s default: keep only
  the inputs, recompute the rest in the backward) or a `jax.checkpoint` policy,
  e.g. `jax.checkpoint_policies.save_only_these_names(jmoe.MOE_CHECKPOINT_NAMES)`
  (see `CHECKPOINT_NAMES` for what each name is).
  """
  if remat is None or remat is False:
    return layer
  if remat is not True and not callable(remat):
    raise TypeError(
        "`remat` must be None, a bool or a jax.checkpoint policy (e.g."
        " jax.checkpoint_policies.save_only_these_names(...)); got"
        f" {type(remat).__name__}.")
  policy = None if remat is True else remat

  def run(x, params, config, **kw):
    arrays = {k: kw.pop(k) for k in ("key", "mask") if k in kw}
    body = lambda x, params, arrays: layer(x, params, config, **arrays, **kw)
    return jax.checkpoint(body, policy=policy)(x, params, arrays)

  return run


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


def _moe_ffn(x: Array, params: MoEParams, config: MoEConfig, key: Array | None,
             mask: Array | None, deterministic: bool) -> tuple[Array, MoEAux]:
  shape = x.shape
  xt = x.reshape(-1, shape[-1])
  mt = None if mask is None else mask.reshape(-1)
  xt = apply_mask(xt, mt)  # masked tokens are never read
  # Named scopes (`SCOPES`) label the ops of each stage in HLO metadata and in
  # profiles (forward and backward alike).
  with jax.named_scope("router"):
    routing, capacity = route_tokens(xt, params, config, key, mt,
                                     deterministic=deterministic)
  with jax.named_scope("dispatch"):
    rows, plan = permute_lib.permute(xt, routing, capacity=capacity)
  rows = checkpoint_name(rows, PERMUTED_ROWS)
  with jax.named_scope("experts"):
    out_rows = expert_ffn(rows, params.w_up, params.w_down, params.w_gate,
                          plan.group_sizes, config.activation,
                          implementation=config.gmm_implementation)
  out_rows = checkpoint_name(out_rows, EXPERT_OUT)
  with jax.named_scope("combine"):
    y = permute_lib.unpermute(out_rows, plan, routing.weights)
  if params.shared is not None:
    with jax.named_scope("shared_expert"):
      y = y + shared_output(xt, params, config.activation)
  with jax.named_scope("router"):
    aux = make_aux(routing, plan, config.balance_convention)
  return apply_mask(y, mt).reshape(shape), aux


def apply_mask(y: Array, mask: Array | None) -> Array:
  """y [T, D] with the rows of masked-out tokens set to zero (mask [T] or None)."""
  return y if mask is None else jnp.where(mask[:, None], y, jnp.zeros((), y.dtype))
