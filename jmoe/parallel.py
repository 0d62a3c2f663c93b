"""Expert parallelism: the MoE layer with its experts sharded over a mesh axis.

This is the only jmoe module that calls `shard_map` or collectives. The per-shard
code *is* the single-device code (`route`, `dispatch_plan` / `permute`, `expert_ffn`,
`unpermute`, `make_aux`, `shared_output`): `shard_map` wraps it and adds the exchange.

Layout. The experts' weights ([E, ...]) are split over `expert_axis` (n devices,
E_l = E / n local experts each) and replicated over the other mesh axes. x's leading
(batch) dimension is split over the *batch axes*: `data_axes` when given, else the
mesh axes that fit the batch (`ExpertParallel.batch_axes`: every device for a batch
divisible by all of them, fewer for small batches). Inside the layer the flat tokens
are split over the *token axes*: the batch axes, plus `expert_axis` when it is not
one of them and each batch shard's tokens divide by n (tokens replicated over the
expert axis are split over it inside the layer, so no device repeats another's
work). Every device routes its own T_l tokens, sends each (token, slot) pair to the
device that owns the chosen expert, runs its local experts with the single-device
grouped matmul, sends the results back and combines them.

Small batches (decoding: say 2 sequences of 1 token on 8 devices): when a batch
shard's tokens do not divide by n, they stay replicated over the expert axis; every
device of that axis routes the same tokens, runs its local experts on the pairs
routed to them and the partial outputs are summed (`psum`) over the expert axis.
Same results, same semantics of every dispatcher (for "all_to_all" the capacity rule
is per token shard, here the batch shard), no exchange blocks.

Dispatchers (`ExpertParallel.dispatcher`), one semantics each:

* "dropless" (default): exact. The result equals `jmoe.moe_ffn` on the whole global
  batch (dropless, or with `MoEConfig.capacity_factor` the *global* capacity, pairs
  kept in global token order). Built on `lax.all_to_all` with static blocks of
  B = min(ceil(dropless_bound * T_l * k / n), T_l * min(k, E_l)) rows per
  (source, destination) pair: `dropless_bound` times the balanced load. Counts are
  exchanged first; if any device would send more than B rows to one device
  (a globally agreed flag, `pmax`), the whole call takes the all-gather path below
  instead (`lax.cond`), so nothing is ever dropped. `DispatchStats.fallback` says
  when that happened.
* "all_to_all": the fast, capacity-bounded exchange. The capacity rule is per token
  shard: each shard applies jmoe's capacity mode to its own T_l tokens with
  C = expert_capacity(T_l, E, k, capacity_factor) rows per expert (pairs kept in token
  order, the rest dropped and counted), so the output is exactly single-device
  `jmoe.moe_ffn(x_shard, params, replace(config, capacity_factor=cf))` on each token
  shard, concatenated in token order. Blocks are B = min(E_l * C, T_l * min(k, E_l))
  rows: no overflow is possible.
* "all_gather": exact, like "dropless". Tokens, expert ids and weights are gathered
  over the expert axis; every device runs its local experts on all n * T_l tokens
  (buffer n * T_l * min(k, E_l) rows) and the partial outputs are summed back with a
  reduce-scatter (`psum_scatter`), in float32 whatever x's dtype (so bf16 outputs
  round once, as on one device). Good when E_l is small and tokens are few.

The exchange of "dropless" and "all_to_all" (`ExpertParallel.exchange`): their
static blocks move with `lax.all_to_all` ("all_to_all", default: every block whole,
padding included) or with `lax.ragged_all_to_all` ("ragged_all_to_all": only each
block's routed rows, and each (source, destination) slice split into
`ragged_splits` updates, since XLA's GPU kernel gives each update one small thread
block; splitting made it 17.8x faster on GB200, openxla/xla #33386). Same layout,
same results bit for bit; `ragged_tables` builds the offsets and sizes from the
counts with static shapes. XLA:CPU has no ragged-all-to-all: on CPU meshes it is
refused.

Auxiliary metrics are global: every shard's `jmoe._src.moe.AuxSums` (sums over its
unmasked tokens) are summed over the token axes and turned into the `MoEAux` of the
whole batch, as `jmoe.moe_ffn` computes it (the balance loss from the summed counts
and the mean router probabilities of all tokens, not a mean of per-shard losses).
Under "all_to_all" the drops follow the per-shard rule: `dropped_fraction` is the
whole batch's dropped pairs over its routed pairs (without a mask, the mean of the
per-shard values). A token mask (`moe_ffn(..., mask=)`) works with every dispatcher.

Usage:

  mesh = jax.make_mesh((2, 4), ("data", "expert"))
  ep = ExpertParallel(mesh)                      # tokens over both axes, dropless
  params = shard_params(params, ep)              # experts over "expert"
  y, aux = jax.jit(ep.moe_ffn)(shard_inputs(x, ep), params)   # = jmoe.moe_ffn
  # or: jmoe.nn.MoE(..., parallel=ep) / MoETransformerLM(..., parallel=ep)

Across hosts the same code runs on a global mesh after `jax.distributed.initialize`;
keep the expert axis inside a host (the last mesh axis) so the all-to-alls ride
NVLink.

Shapes: T tokens (T_l per shard), D d_model, E experts (E_l per device), k slots per
token, n devices on the expert axis, B rows per exchange block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe._src import checks
from jmoe._src import moe as moe_lib
from jmoe._src import params as params_lib
from jmoe._src import permute as permute_lib
from jmoe._src import routing as routing_lib

Array = jax.Array
MoEAux = moe_lib.MoEAux
MoEConfig = moe_lib.MoEConfig
MoEParams = moe_lib.MoEParams

DISPATCHERS = ("all_to_all", "dropless", "all_gather")
EXCHANGES = ("all_to_all", "ragged_all_to_all")
# Platforms whose XLA lacks the ragged-all-to-all HLO (tests emulate it on CPU).
_RAGGED_UNSUPPORTED = ("cpu",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchStats:
  """How the exchange of one `ExpertParallel` call went (int32 scalars, global).

  Attributes:
    fallback: 1 when the "dropless" exchange overflowed its static blocks and the
      call took the all-gather path instead, else 0. Sum it over steps to see how
      often that happens; raise `dropless_bound` if it is often.
    max_block_rows: the most rows any device sent to any one device ("dropless",
      "all_to_all"), or computed ("all_gather"). Divide by `block_rows` for the
      peak utilisation of the static buffers.
    block_rows: the static rows of one block (B), or of the all-gather buffer.
  """

  fallback: Array
  max_block_rows: Array
  block_rows: Array


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Expert parallelism on a mesh: configuration as data (frozen and hashable).

  Attributes:
    mesh: the `jax.sharding.Mesh` (one process or several, see `jax.distributed`).
    expert_axis: the mesh axis the experts are split over (E must divide by its
      size).
    data_axes: the mesh axes x's leading (batch) dimension is split over; the
      batch must divide by their size. None (default): the axes that fit each
      batch, `batch_axes(batch_size)`: every mesh axis when the batch divides by
      the device count (the usual expert-parallel set-up: the same devices hold
      different tokens and different experts), fewer for smaller batches, none
      for a batch of 1.
    dispatcher: "dropless" (exact, all-to-all with an all-gather fallback),
      "all_to_all" (per-shard capacity, see the module docstring) or "all_gather"
      (exact).
    capacity_factor: "all_to_all" only: the per-shard capacity factor. None takes
      `MoEConfig.capacity_factor`; one of the two is required.
    dropless_bound: "dropless" only: each exchange block holds this many times the
      balanced load (T_l * k / n rows); heavier routing takes the fallback. >= 1.
    exchange: how "dropless" and "all_to_all" move their blocks: "all_to_all"
      (`lax.all_to_all` of whole blocks) or "ragged_all_to_all" (only the routed
      rows, `lax.ragged_all_to_all`; not on CPU). Same results.
    ragged_splits: "ragged_all_to_all" only: updates per (source, destination)
      slice (>= 1).
  """

  mesh: Mesh
  _: dataclasses.KW_ONLY
  expert_axis: str = "expert"
  data_axes: tuple[str, ...] | None = None
  dispatcher: Literal["all_to_all", "dropless", "all_gather"] = "dropless"
  capacity_factor: float | None = None
  dropless_bound: float = 2.0
  exchange: Literal["all_to_all", "ragged_all_to_all"] = "all_to_all"
  ragged_splits: int = 32

  def __post_init__(self):
    fn = "ExpertParallel"
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"{fn}: `mesh` must be a jax.sharding.Mesh; got {type(self.mesh)}.")
    names = tuple(self.mesh.axis_names)
    checks.check_choice(fn, "expert_axis", self.expert_axis, names)
    data_axes = self.data_axes
    if data_axes is not None:
      data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
      for a in data_axes:
        if a not in names:
          raise ValueError(
              f"{fn}: unknown axis {a!r} in `data_axes`={data_axes}; expected"
              f" names from the mesh's axes {names}.")
      if len(set(data_axes)) != len(data_axes):
        raise ValueError(f"{fn}: `data_axes`={data_axes} repeats an axis.")
      object.__setattr__(self, "data_axes", data_axes)
    checks.check_choice(fn, "dispatcher", self.dispatcher, DISPATCHERS)
    if self.capacity_factor is not None:
      if self.dispatcher != "all_to_all":
        raise ValueError(
            f"{fn}: `capacity_factor` is the per-shard capacity of"
            f" dispatcher='all_to_all'; got it with dispatcher={self.dispatcher!r}"
            " (the exact dispatchers follow MoEConfig.capacity_factor).")
      routing_lib.check_capacity_factor(fn, "capacity_factor", self.capacity_factor)
    if not (isinstance(self.dropless_bound, (int, float))
            and math.isfinite(self.dropless_bound) and self.dropless_bound >= 1.0):
      raise ValueError(f"{fn}: `dropless_bound` must be >= 1.0; got {self.dropless_bound}.")
    checks.check_choice(fn, "exchange", self.exchange, EXCHANGES)
    if not (isinstance(self.ragged_splits, (int, np.integer))
            and not isinstance(self.ragged_splits, bool) and self.ragged_splits >= 1):
      raise ValueError(f"{fn}: `ragged_splits` must be an int >= 1; got"
                       f" {self.ragged_splits!r}.")
    if self.exchange == "ragged_all_to_all":
      if self.dispatcher == "all_gather":
        raise ValueError(
            f"{fn}: exchange='ragged_all_to_all' moves the blocks of"
            " dispatcher='dropless' or 'all_to_all'; dispatcher='all_gather' has"
            " none.")
      platform = self.mesh.devices.flat[0].platform
      if platform in _RAGGED_UNSUPPORTED:
        raise ValueError(
            f"{fn}: exchange='ragged_all_to_all' needs lax.ragged_all_to_all,"
            f" which XLA on {platform!r} does not implement; use"
            " exchange='all_to_all' there (same results).")

  # ---------------------------------------------------------------- layout
  @property
  def num_expert_shards(self) -> int:
    """n: devices on the expert axis."""
    return self.mesh.shape[self.expert_axis]

  def _size(self, axes) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  def batch_axes(self, batch_size: int | None = None) -> tuple[str, ...]:
    """The mesh axes x's leading dimension (of `batch_size`) is split over.

    `data_axes` when given. Otherwise the mesh axes, in mesh order, each taken
    while the product of the sizes taken still divides `batch_size`: all of them
    for a batch divisible by every device, e.g. ("data",) for a batch of 2 on a
    (2, 4) ("data", "expert") mesh, () for a batch of 1. `batch_size=None`: every
    mesh axis (the layout of a full training batch).
    """
    if self.data_axes is not None:
      return self.data_axes
    axes, size = [], 1
    for a in self.mesh.axis_names:
      if batch_size is None or batch_size % (size * self.mesh.shape[a]) == 0:
        axes.append(a)
        size *= self.mesh.shape[a]
    return tuple(axes)

  def token_axes_for(self, num_tokens: int,
                     batch_size: int | None = None) -> tuple[str, ...]:
    """The axes the flat tokens are split over inside the layer (shard order =
    token order): `batch_axes(batch_size)`, plus the expert axis when it is not
    one of them and each batch shard's tokens divide by its size (else the tokens
    stay replicated over it; see the module docstring)."""
    axes = self.batch_axes(batch_size)
    if self.expert_axis in axes:
      return axes
    if (num_tokens // self._size(axes)) % self.num_expert_shards:
      return axes
    return axes + (self.expert_axis,)

  @property
  def token_axes(self) -> tuple[str, ...]:
    """The token axes of a batch that divides by every shard count."""
    axes = self.batch_axes()
    return axes if self.expert_axis in axes else axes + (self.expert_axis,)

  @property
  def num_token_shards(self) -> int:
    return self._size(self.token_axes)

  @property
  def num_data_shards(self) -> int:
    """Shards of a full batch's leading dimension (`batch_axes()`)."""
    return self._size(self.batch_axes())

  def input_spec(self, batch_size: int | None = None) -> P:
    """PartitionSpec of x [B, ..., D] (and of the output): B over
    `batch_axes(batch_size)`."""
    return P(self.batch_axes(batch_size) or None)

  def input_sharding(self, batch_size: int | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, self.input_spec(batch_size))

  def param_specs(self, params: MoEParams) -> MoEParams:
    """PartitionSpecs of `params`: the experts' weights (group "experts" of
    `jmoe.MOE_PARAMS`) over `expert_axis`, the rest replicated."""
    ex, rep = P(self.expert_axis), P()
    return params_lib.map_params(
        lambda spec, _: ex if spec.group == "experts" else rep, params)

  def params_sharding(self, params: MoEParams) -> MoEParams:
    """NamedShardings of `params` (for `jax.device_put` or jit's shardings)."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(params))

  def block_rows(self, tokens_per_shard: int, num_experts: int,
                 config: MoEConfig, *, deterministic: bool = False) -> int:
    """B: the static rows of one (source, destination) exchange block."""
    n, k = self.num_expert_shards, config.top_k
    e_l = num_experts // n
    most = tokens_per_shard * min(k, e_l)  # the most one device can send to another
    if self.dispatcher == "all_to_all":
      return min(e_l * self.shard_capacity(tokens_per_shard, num_experts, config,
                                           deterministic=deterministic), most)
    if self.dispatcher == "dropless":
      return min(math.ceil(self.dropless_bound * tokens_per_shard * k / n), most)
    return self.num_expert_shards * most  # all_gather: the gathered buffer

  def shard_capacity(self, tokens_per_shard: int, num_experts: int,
                     config: MoEConfig, *, deterministic: bool = False) -> int:
    """"all_to_all": C, each expert's rows per token shard: `expert_capacity` of
    the shard's tokens with `capacity_factor` (else the config's factor of
    training or evaluation) and `MoEConfig.min_capacity`."""
    cf = self.capacity_factor
    if cf is None:
      cf = config.capacity_factor_for(deterministic)
    if cf is None:
      raise ValueError(
          "ExpertParallel: dispatcher='all_to_all' needs a capacity factor: set"
          " ExpertParallel(capacity_factor=...) or MoEConfig(capacity_factor=...)"
          " (and eval_capacity_factor for deterministic=True), or use"
          " dispatcher='dropless'.")
    return routing_lib.expert_capacity(tokens_per_shard, num_experts,
                                       config.top_k, cf,
                                       min_capacity=config.min_capacity)

  # ------------------------------------------------------------------ layer
  def moe_ffn(self, x: Array, params: MoEParams, config: MoEConfig | None = None, *,
              key: Array | None = None, mask: Array | None = None,
              deterministic: bool = False) -> tuple[Array, MoEAux]:
    """The expert-parallel MoE layer; same contract as `jmoe.moe_ffn`.

    Args:
      x: [B, ..., D] global activations, B split over `data_axes` (it is resharded
        to that layout if it arrives otherwise).
      params: global `MoEParams` (see `shard_params`); experts split over
        `expert_axis`, the rest replicated.
      config: `MoEConfig` (default: `MoEConfig()`).
      key: PRNG key for router jitter / noise: the same draws as `jmoe.moe_ffn`
        makes on the whole batch (each shard takes its rows of them).
      mask: optional bool [B, ...] (x.shape[:-1]), True for the tokens to run:
        as in `jmoe.moe_ffn` (masked tokens are not dispatched, give zeros and
        count in no metric), sharded like x.
      deterministic: evaluation, as in `jmoe.moe_ffn` (the eval capacity
        factor, no noise).

    Returns:
      y: [B, ..., D] in x.dtype, sharded like x.
      aux: `MoEAux` of the whole batch (replicated).
    """
    y, aux, _ = self.moe_ffn_with_stats(x, params, config, key=key, mask=mask,
                                        deterministic=deterministic)
    return y, aux

  def moe_ffn_with_stats(self, x: Array, params: MoEParams,
                         config: MoEConfig | None = None, *,
                         key: Array | None = None, mask: Array | None = None,
                         deterministic: bool = False
                         ) -> tuple[Array, MoEAux, DispatchStats]:
    """`moe_ffn`, plus the `DispatchStats` of the exchange."""
    fn = "ExpertParallel.moe_ffn"
    config = MoEConfig() if config is None else config
    moe_lib.check_params(fn, x, params, config.activation)
    mask = routing_lib.check_mask(fn, mask, x.shape[:-1], "x.shape[:-1]")
    if not config.router.kind_impl.per_token:  # `route` validates the rest
      raise ValueError(
          f"{fn}: {config.router.kind} routing (e.g. expert-choice) ranks every"
          " token of the batch for each expert and is not supported under"
          " expert parallelism; use RouterConfig(kind='token_choice').")
    n, e = self.num_expert_shards, params.num_experts
    if e % n:
      raise ValueError(
          f"{fn}: the number of experts ({e}, from params.w_up [experts, d_model,"
          f" d_ff]) must be divisible by the size of `expert_axis`"
          f" {self.expert_axis!r} ({n}).")
    shape = x.shape
    if not shape[0]:
      raise ValueError(f"{fn}: `x` has no tokens (shape {shape}).")
    batch = self.batch_axes(shape[0])
    nd = self._size(batch)
    if shape[0] % nd:
      raise ValueError(
          f"{fn}: x's leading dimension ({shape[0]}, x shape {shape}) is split over"
          f" `data_axes` {self.data_axes} and must be divisible by their size ({nd});"
          " data_axes=None fits the axes to the batch.")
    t = math.prod(shape[:-1])
    axes = self.token_axes_for(t, shape[0])
    if self.dispatcher == "all_to_all":
      self.shard_capacity(t // self._size(axes), e, config,
                          deterministic=deterministic)

    caller_spec = _explicit_spec(x, self.mesh)  # y goes back to x's layout
    x_spec, t_spec = P(batch or None), P(axes or None)
    x = _constrain(x, self.mesh, x_spec)
    xt = _constrain(x.reshape(t, shape[-1]), self.mesh, t_spec)
    if mask is not None:
      mask = _constrain(mask.reshape(t), self.mesh, t_spec)
    # The whole batch's noise, drawn as `jmoe.moe_ffn` draws it; each shard
    # receives its rows.
    noise = routing_lib.noise_draws(config.router, None if deterministic else key,
                                    (t, e))
    if noise is not None:
      noise = tuple(_constrain(a, self.mesh, t_spec) for a in noise)
    params = jax.tree.map(lambda a, s: _constrain(a, self.mesh, s), params,
                          self.param_specs(params))
    body = lambda xt, params, mask, noise: _shard_body(
        self, config, deterministic, t, e, axes, xt, params, mask, noise)
    spec_of = lambda a: jax.tree.map(lambda _: t_spec, a)
    stats_spec = DispatchStats(P(), P(), P())
    aux_spec = MoEAux.filled(P())
    # Every gmm backend types its outputs' varying axes (jmoe._src.gmm.ops).
    check_vma = True
    mapped = jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(t_spec, self.param_specs(params), spec_of(mask),
                  spec_of(noise)),
        out_specs=(t_spec, aux_spec, stats_spec),
        check_vma=check_vma)
    y, aux, stats = mapped(xt, params, mask, noise)
    y = _constrain(y, self.mesh, x_spec).reshape(shape)
    if caller_spec is not None and caller_spec != x_spec:
      y = _constrain(y, self.mesh, caller_spec)
    return y, aux, stats


def shard_params(params: MoEParams, ep: ExpertParallel) -> MoEParams:
  """Puts `params` on `ep.mesh`: experts over the expert axis, the rest replicated.

  Works across processes: every process passes the same full (host) values.
  """
  return jax.tree.map(_put, params, ep.params_sharding(params))


def shard_inputs(x: Array, ep: ExpertParallel) -> Array:
  """Puts x [B, ...] (activations, or the token ids of a model) on `ep.mesh`, B
  split over `ep.batch_axes(B)`."""
  return _put(x, ep.input_sharding(np.shape(x)[0]))


# ---------------------------------------------------------------------------
# Helpers outside the shard.


def _put(a, sharding: NamedSharding) -> Array:
  if jax.process_count() == 1 or (isinstance(a, jax.Array)
                                  and not a.is_fully_addressable):
    return jax.device_put(a, sharding)
  host = np.asarray(a)  # multi-process: every process holds the full value
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _explicit_spec(a: Array, mesh: Mesh) -> P | None:
  """a's PartitionSpec when `mesh` has Explicit axes and a is typed on it."""
  if not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  try:
    sharding = jax.typeof(a).sharding
  except AttributeError:
    return None
  if getattr(sharding.mesh, "empty", True):
    return None
  return sharding.spec


def _constrain(a: Array, mesh: Mesh, spec: P) -> Array:
  """Reshards `a` to `spec` (Explicit mesh axes) or constrains it (Auto axes)."""
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  if explicit:
    return jax.sharding.reshard(a, NamedSharding(mesh, spec))
  return lax.with_sharding_constraint(a, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------
# Inside the shard: the single-device code plus the exchange.


def _shard_body(ep: ExpertParallel, config: MoEConfig, deterministic: bool,
                num_tokens: int, num_experts: int, axes: tuple[str, ...],
                xt: Array, params: MoEParams, mask: Array | None, noise):
  """One device: its T_l tokens xt [T_l, D] (split over the token `axes`; mask
  [T_l], noise rows [T_l, E]), its E_l experts in `params`."""
  ax, n = ep.expert_axis, ep.num_expert_shards
  t_l, k = xt.shape[0], config.top_k
  shard = lax.axis_index(axes) if axes else jnp.zeros((), jnp.int32)
  xt = moe_lib.apply_mask(xt, mask)  # masked tokens are never read
  routing, _ = moe_lib.route_tokens(xt, params, config, None, mask, noise=noise,
                                    deterministic=deterministic)

  if ep.dispatcher == "all_to_all":
    cap = ep.shard_capacity(t_l, num_experts, config, deterministic=deterministic)
    plan = permute_lib.dispatch_plan(routing.experts, num_experts, capacity=cap)
    experts, aux_plan = routing.experts, plan
    if ax not in axes:  # the replicated path takes the kept pairs' ids
      experts = jnp.where(plan.slot_row < plan.num_rows, experts, -1)
  else:
    cap = config.capacity(num_tokens, num_experts, deterministic=deterministic)
    experts, plan, aux_plan = _global_capacity(routing.experts, num_experts, cap,
                                               shard, axes)

  block = ep.block_rows(t_l, num_experts, config, deterministic=deterministic)
  if ax not in axes:  # tokens replicated over the expert axis: no exchange
    y, rows = _exchange_all_gather(xt, experts, routing.weights, params, config,
                                   ax, gather=False)
    stats = DispatchStats(jnp.zeros((), jnp.int32), lax.pmax(rows, axes + (ax,)),
                          jnp.asarray(t_l * min(k, num_experts // n), jnp.int32))
  elif ep.dispatcher == "all_gather":
    y, rows = _exchange_all_gather(xt, experts, routing.weights, params, config, ax)
    stats = DispatchStats(jnp.zeros((), jnp.int32), lax.pmax(rows, axes),
                          jnp.asarray(block, jnp.int32))
  else:
    sent = plan.group_sizes.reshape(n, -1).sum(axis=1)  # [n] rows to each device
    max_rows = lax.pmax(jnp.max(sent), axes)
    splits = ep.ragged_splits if ep.exchange == "ragged_all_to_all" else None
    a2a = lambda: _exchange_all_to_all(xt, experts, plan, routing.weights, params,
                                       config, ax, block, splits)
    if ep.dispatcher == "dropless" and block < t_l * min(k, num_experts // n):
      fallback = max_rows > block  # the same on every device: safe for lax.cond
      y = lax.cond(
          fallback,
          lambda: _exchange_all_gather(xt, experts, routing.weights, params,
                                       config, ax)[0],
          a2a)
    else:  # the blocks hold the worst case: no overflow possible
      fallback = jnp.zeros((), bool)
      y = a2a()
    stats = DispatchStats(fallback.astype(jnp.int32), max_rows,
                          jnp.asarray(block, jnp.int32))

  if params.shared is not None:
    y = y + moe_lib.shared_output(xt, params, config.activation)
  y = moe_lib.apply_mask(y, mask)
  aux = moe_lib.aux_from_sums(
      routing, lax.psum(moe_lib.aux_sums(routing, aux_plan), axes),
      config.balance_convention)
  return y, aux, stats


def _global_capacity(experts: Array, num_experts: int, cap: int | None,
                     shard: Array, axes):
  """The exact dispatchers' plan: dropless, or single-device capacity on the batch.

  With a capacity C (`MoEConfig.capacity` of the whole batch), expert e keeps the
  first C pairs of the *whole batch* in token order: this shard's pair at position
  p of its local segment is kept iff (pairs of e on earlier shards) + p < C.
  Pairs that are not routed (expert -1: masked tokens) are neither kept nor
  dropped.

  Returns:
    experts: int32 [T_l, k], -1 for pairs dropped for capacity.
    plan: the dropless plan of those experts (what is dispatched).
    aux_plan: the plan whose `expert_load` / `num_dropped` feed the metrics.
  """
  plan = permute_lib.dispatch_plan(experts, num_experts)
  if cap is None:
    return experts, plan, plan
  s = math.prod(lax.axis_size(a) for a in axes)
  loads = lax.psum(jnp.zeros((s, num_experts), jnp.int32).at[shard].set(
      plan.expert_load), axes)  # [S, E], shard order = token order
  before = jnp.take(jnp.cumsum(loads, axis=0) - loads, shard, axis=0)  # [E]
  valid = (experts >= 0) & (experts < num_experts)
  keep = valid & (jnp.take(before, experts, mode="clip") + plan.slot_pos < cap)
  kept = jnp.where(keep, experts, -1)
  aux_plan = dataclasses.replace(
      plan, num_dropped=jnp.sum(valid & ~keep, dtype=jnp.int32))
  return kept, permute_lib.dispatch_plan(kept, num_experts), aux_plan


def _local_ffn(rows: Array, params: MoEParams, group_sizes: Array,
               config: MoEConfig) -> Array:
  return moe_lib.expert_ffn(rows, params.w_up, params.w_down, params.w_gate,
                            group_sizes, config.activation,
                            implementation=config.gmm_implementation)


def _exchange_all_gather(xt: Array, experts: Array, weights: Array,
                         params: MoEParams, config: MoEConfig, axis: str, *,
                         gather: bool = True):
  """All-gather tokens over the expert axis, local experts on all, reduce-scatter.

  gather=False: the tokens are already the same on every device of the axis; the
  local experts run on them and the partial outputs are summed (`psum`).

  Returns y [T_l, D] and the rows this device computed (int32 []).
  """
  e_l = params.w_up.shape[0]
  if gather:
    g = lambda a: lax.all_gather(a, axis, axis=0, tiled=True)
    xg, eg, wg = g(xt), g(experts), g(weights)  # n * T_l tokens
  else:  # made varying over the axis, so their cotangents sum over it
    xg, wg = (lax.pcast(a, (axis,), to="varying") for a in (xt, weights))
    eg = experts
  local = eg - lax.axis_index(axis) * e_l  # local expert ids; others -> -1
  local = jnp.where((local >= 0) & (local < e_l), local, -1)
  # capacity = all tokens: nothing dropped, buffer min(k, E_l) * n * T_l rows.
  rows, plan = permute_lib.permute(xg, local, num_experts=e_l, capacity=xg.shape[0])
  out = _local_ffn(rows, params, plan.group_sizes, config)
  # This device's experts only, combined and summed over the axis in float32 and
  # rounded once: as one device's combine. (Rounding each device's partial to a
  # bf16 x.dtype before the sum differed from one device in 31% of the outputs.)
  partial = permute_lib.unpermute(out.astype(jnp.float32), plan, wg)
  if gather:
    y = lax.psum_scatter(partial, axis, scatter_dimension=0, tiled=True)
  else:
    y = lax.psum(partial, axis)
  return y.astype(xt.dtype), jnp.sum(plan.group_sizes)


class _Route(NamedTuple):
  """How `_a2a_dispatch` moved the rows, for `_a2a_return` to move them back."""

  send_plan: permute_lib.DispatchPlan  # the plan in the [n * block] send layout
  to_compact: Array  # int32 [n * block]: received row -> compact row (or n*block)
  from_compact: Array  # int32 [n * block]: compact row -> received row (or n*block)
  sent: Array  # int32 [n]: rows sent to each device (<= block)
  received: Array  # int32 [n]: rows received from each device (<= block)


def ragged_tables(send_counts: Array, recv_counts: Array, me: Array, block: int,
                  splits: int) -> tuple[Array, Array, Array, Array]:
  """`lax.ragged_all_to_all`'s (input_offsets, send_sizes, output_offsets,
  recv_sizes) for the block layout, each int32 [n * splits].

  Layout: this device's buffer [n * block, D] holds in block j the rows for device
  j (its first send_counts[j] rows); every device receives into [n * block, D],
  block s holding source s's rows (its first recv_counts[s]). Each slice is split
  into `splits` updates of ceil(count / splits) rows (the last ones shorter or
  empty, with offsets inside the slice), update (j, u) at entry j * splits + u (destination-major, as the
  collective takes them). Static shapes, no host sync.

  Args:
    send_counts: int [n], rows for each device (<= block).
    recv_counts: int [n], rows from each device (<= block); must equal the
      sources' send_counts[me] (`lax.all_to_all` of send_counts).
    me: int [], this device's index on the axis.
  """
  u = jnp.arange(splits, dtype=jnp.int32)[None, :]

  def split(counts):
    counts = counts.astype(jnp.int32)[:, None]
    chunk = (counts + splits - 1) // splits
    start = jnp.minimum(u * chunk, counts)  # empty updates stay inside the block
    return start, jnp.minimum(counts - start, chunk)

  start, send_sizes = split(send_counts)
  dest = jnp.arange(send_counts.shape[0], dtype=jnp.int32)[:, None]
  input_offsets = dest * block + start
  output_offsets = jnp.asarray(me, jnp.int32) * block + start  # on device j
  _, recv_sizes = split(recv_counts)
  flat = lambda a: a.reshape(-1)
  return (flat(input_offsets), flat(send_sizes), flat(output_offsets),
          flat(recv_sizes))


def _ragged_all_to_all(*args, **kw):  # one name to emulate in CPU tests
  return lax.ragged_all_to_all(*args, **kw)


def _exchange_blocks(buf: Array, send_counts: Array, recv_counts: Array,
                     axis: str, block: int, splits: int | None) -> Array:
  """Block j of buf [n * block, ...] to device j; returns [n * block, ...] with
  block s from device s. splits=None: `lax.all_to_all` of the whole blocks; else
  `lax.ragged_all_to_all` of their first send_counts rows (the rest of each block
  is zeros in buf and stays zeros in the output, so both give the same array)."""
  if splits is None:
    return lax.all_to_all(buf, axis, 0, 0, tiled=True)
  tables = ragged_tables(send_counts, recv_counts, lax.axis_index(axis), block,
                         splits)
  return _ragged_all_to_all(buf, jnp.zeros_like(buf), *tables, axis_name=axis)


def _exchange_all_to_all(xt: Array, experts: Array, plan: permute_lib.DispatchPlan,
                         weights: Array, params: MoEParams, config: MoEConfig,
                         axis: str, block: int, splits: int | None = None) -> Array:
  """Two exchanges (`_exchange_blocks`) of static blocks of `block` rows per
  device pair.

  Pairs past `block` are not sent (the caller makes sure there are none).
  """
  rows, sizes, route = _a2a_dispatch(xt, experts, plan, axis, block, splits)
  out = _local_ffn(rows, params, sizes, config)
  return _a2a_return(out, route, weights, axis, block, splits)


def _a2a_dispatch(xt: Array, experts: Array, plan: permute_lib.DispatchPlan,
                  axis: str, block: int, splits: int | None = None
                  ) -> tuple[Array, Array, _Route]:
  """Sends every dispatched pair to the device of its expert.

  Sender: the plan's compact expert-sorted rows are laid out as n blocks
  [n * block, D], block j holding the rows of device j's experts (expert order,
  then zeros). Receiver: [n * block, D] from the n sources, reordered into one
  compact run per local expert for the grouped matmul.

  Returns:
    rows: [n * block, D], local experts' rows, expert-sorted (zeros past the end).
    sizes: int32 [E_l] rows per local expert.
    route: for `_a2a_return`.
  """
  n = lax.axis_size(axis)
  num_experts = plan.group_sizes.shape[0]
  e_l = num_experts // n
  nb = n * block

  # Sender layout: pair (t, j) -> row dest * block + (its row - dest's first row).
  counts = plan.group_sizes.reshape(n, e_l)  # [n, E_l] rows for each device
  dest = jnp.clip(experts, 0, num_experts - 1) // e_l
  pos = plan.slot_row - jnp.take(plan.indptr, dest * e_l)
  send_row = jnp.where((plan.slot_row < plan.num_rows) & (pos < block),
                       dest * block + pos, nb)
  send_plan = permute_lib.with_rows(plan, send_row, nb)

  send = permute_lib.gather_rows(xt, send_plan.row_token,
                                 send_plan.slot_row)  # [n * block, D]
  recv_counts = lax.all_to_all(counts, axis, 0, 0, tiled=True)  # [n_src, E_l]
  sent = jnp.minimum(counts.sum(axis=1), block)
  received = jnp.minimum(recv_counts.sum(axis=1), block)
  recv = _exchange_blocks(send, sent, received, axis, block,
                          splits)  # block s from source s

  # Receiver: row (s, p) holds local expert e; its compact row is
  # (rows of experts < e) + (rows of e from sources < s) + (p - start of e in s).
  q = jnp.arange(nb, dtype=jnp.int32)
  s, p = q // block, q % block
  end = jnp.cumsum(recv_counts, axis=1)  # [n, E_l] inclusive, per source
  e = jnp.sum(p[:, None] >= end[s], axis=1)  # == E_l past the source's rows
  valid = e < e_l
  ec = jnp.minimum(e, e_l - 1)
  sizes = recv_counts.sum(axis=0)  # [E_l] group sizes
  first = (jnp.cumsum(sizes) - sizes)[ec]
  from_earlier = (jnp.cumsum(recv_counts, axis=0) - recv_counts)[s, ec]
  offset = p - (end - recv_counts)[s, ec]
  to_compact = jnp.where(valid, first + from_earlier + offset, nb).astype(jnp.int32)
  from_compact = permute_lib.invert_index(to_compact, nb)
  rows = permute_lib.gather_rows(recv, from_compact, to_compact[:, None])
  return rows, sizes, _Route(send_plan, to_compact, from_compact, sent, received)


def _a2a_return(out: Array, route: _Route, weights: Array, axis: str, block: int,
                splits: int | None = None) -> Array:
  """Sends the expert outputs back and combines them: y [T_l, D]."""
  back = permute_lib.gather_rows(out, route.to_compact, route.from_compact[:, None])
  ret = _exchange_blocks(back, route.received, route.sent, axis, block,
                         splits)  # my rows, in send layout
  return permute_lib.unpermute(ret, route.send_plan, weights)
