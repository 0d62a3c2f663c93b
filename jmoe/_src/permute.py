"""The prefix-sum dispatch plan: tokens into expert order and back.

The plan is built from one `jnp.cumsum` over the one-hot assignments of the
T*k (token, slot) pairs, flattened in token order. The running count at a pair is
its position inside its expert's segment, the last row of the sums is every
expert's load (`group_sizes`), and the exclusive prefix sum of the loads is the CSR
`indptr`. No sort, no host sync, static shapes.

Both directions are gathers, forward and backward (custom VJPs), so nothing
scatter-adds floats: the result is bitwise deterministic on every backend.

jmoe.parallel lays the same plan out again for its exchanges with what this module
exports: `DispatchPlan.slot_pos`, `invert_index`, `with_rows` and `gather_rows`.

Shapes: T tokens, k slots per token, E experts, R buffer rows, D features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe._src import checks

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchPlan:
  """Where every (token, slot) goes in the expert-sorted buffer, and back.

  Attributes:
    row_token: int32 [R], the token each buffer row holds; T marks an unused row.
    row_slot: int32 [R], the flat (token*k + slot) pair of each row; T*k marks an
      unused row. (Expert choice: row r is (expert r // C, pick r % C).)
    slot_row: int32 [T, k], the buffer row of each (token, slot); R marks a pair
      that was dropped (over capacity) or had an expert id outside [0, E).
      None for expert choice.
    slot_pos: int32 [T, k], each pair's position in its expert's segment in token
      order, counted before capacity (the pair is kept iff slot_pos < C); -1 for
      ids outside [0, E). None for expert choice.
    group_sizes: int32 [E], rows each expert holds in the buffer (after capacity).
    indptr: int32 [E + 1], CSR offsets: expert e owns rows indptr[e]:indptr[e+1].
    expert_load: int32 [E], (token, slot) pairs that chose each expert, before
      capacity.
    num_dropped: int32 [], pairs dropped for capacity.
    num_tokens: T (static).
  """

  row_token: Array
  row_slot: Array
  slot_row: Array | None
  group_sizes: Array
  indptr: Array
  expert_load: Array
  num_dropped: Array
  slot_pos: Array | None = None
  num_tokens: int = dataclasses.field(metadata=dict(static=True), default=0)

  @property
  def num_rows(self) -> int:
    return self.row_token.shape[0]


def buffer_rows(num_tokens: int, top_k: int, num_experts: int,
                capacity: int | None) -> int:
  """Rows of the dispatch buffer: T*k dropless, min(E*C, T*k) with capacity C."""
  if capacity is None:
    return num_tokens * top_k
  return min(num_experts * capacity, num_tokens * top_k)


def dispatch_plan(experts: Array, num_experts: int, *,
                  capacity: int | None = None) -> DispatchPlan:
  """Builds the prefix-sum dispatch plan for token-choice assignments.

  Args:
    experts: int [T, k] expert id of each (token, slot). Ids outside [0, E) (say -1
      for padding tokens) are not dispatched and not counted as dropped.
    num_experts: E.
    capacity: None for dropless (R = T*k rows), or the static number of rows each
      expert may hold: pairs beyond it, in token order, are dropped (R = min(E*C,
      T*k)). Earlier tokens win; within a token, slots never compete (they choose
      distinct experts).

  Returns:
    The `DispatchPlan`. Rows are compact: expert e's rows are
    indptr[e]:indptr[e+1] in token order; rows past indptr[E] are unused. No
    tokens (T = 0) give a plan of no rows and zero loads.
  """
  fn = "dispatch_plan"
  checks.check_rank(fn, "experts", experts, 2, "[tokens, k]")
  checks.check_integer(fn, "experts", experts)
  if not isinstance(num_experts, int) or num_experts <= 0:
    raise ValueError(f"{fn}: `num_experts` must be a positive int; got {num_experts!r}.")
  if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
    raise ValueError(f"{fn}: `capacity` must be a positive int or None; got {capacity!r}.")
  t, k = experts.shape
  n = t * k
  rows = buffer_rows(t, k, num_experts, capacity)
  flat = experts.reshape(n).astype(jnp.int32)
  valid = (flat >= 0) & (flat < num_experts)
  onehot = (flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32))
  csum = jnp.cumsum(onehot.astype(jnp.int32), axis=0)  # [T*k, E], inclusive
  pos = jnp.sum(jnp.where(onehot, csum, 0), axis=1) - 1  # position in segment
  load = jnp.sum(onehot, axis=0, dtype=jnp.int32)  # [E] (csum[-1]; also T = 0)
  if capacity is None:
    group_sizes = load
    keep = valid
  else:
    group_sizes = jnp.minimum(load, capacity)
    keep = valid & (pos < capacity)
  indptr = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)])
  start = jnp.take(indptr, jnp.clip(flat, 0, num_experts - 1))
  slot_row = jnp.where(keep, start + pos, rows).astype(jnp.int32).reshape(t, k)
  row_slot, row_token = _buffer_rows_of(slot_row, rows)
  num_dropped = jnp.sum(valid & ~keep, dtype=jnp.int32)
  return DispatchPlan(
      row_token=row_token, row_slot=row_slot, slot_row=slot_row,
      group_sizes=group_sizes.astype(jnp.int32), indptr=indptr,
      expert_load=load.astype(jnp.int32), num_dropped=num_dropped,
      slot_pos=pos.astype(jnp.int32).reshape(t, k), num_tokens=t)


def invert_index(index: Array, size: int, fill: int | None = None) -> Array:
  """The inverse of an injective index map: out[index[i]] = i.

  Args:
    index: int [n], distinct targets; targets outside [0, size) are dropped
      (the sentinels of a plan).
    size: the length of the result.
    fill: the value where no i maps (default n).

  Returns:
    int32 [size].
  """
  n = index.shape[0]
  fill = n if fill is None else fill
  return jnp.full((size,), fill, jnp.int32).at[index].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)


def _buffer_rows_of(slot_row: Array, num_rows: int) -> tuple[Array, Array]:
  """(row_slot, row_token) [num_rows] of the pairs' rows slot_row [T, k]."""
  t, k = slot_row.shape
  row_slot = invert_index(slot_row.reshape(t * k), num_rows)
  row_token = jnp.where(row_slot < t * k, row_slot // k, t).astype(jnp.int32)
  return row_slot, row_token


def with_rows(plan: DispatchPlan, slot_row: Array, num_rows: int) -> DispatchPlan:
  """The plan's pairs laid out at other buffer rows (token choice).

  Args:
    plan: a token-choice `DispatchPlan`.
    slot_row: int [T, k], the new row of each (token, slot); num_rows marks a pair
      that is not placed.
    num_rows: the rows of the new buffer.

  Returns:
    `plan` with `slot_row`, `row_slot` and `row_token` of the new layout (its
    counts unchanged): e.g. jmoe.parallel's send buffer of per-device blocks.
  """
  row_slot, row_token = _buffer_rows_of(slot_row.astype(jnp.int32), num_rows)
  return dataclasses.replace(plan, row_token=row_token, row_slot=row_slot,
                             slot_row=slot_row.astype(jnp.int32))


def expert_choice_plan(tokens: Array, num_tokens: int) -> DispatchPlan:
  """The dispatch plan of expert-choice routing: expert e owns rows e*C:(e+1)*C.

  tokens: int [E, C], the picked tokens; T (num_tokens) marks an empty pick."""
  e, c = tokens.shape
  row_token = tokens.reshape(e * c).astype(jnp.int32)
  sizes = jnp.full((e,), c, jnp.int32)
  # An empty pick (token id T, when fewer than C tokens were unmasked) keeps its
  # row (zeros in, weight 0) but is no load.
  load = jnp.sum(tokens < num_tokens, axis=1, dtype=jnp.int32)
  return DispatchPlan(
      row_token=row_token, row_slot=jnp.arange(e * c, dtype=jnp.int32),
      slot_row=None, group_sizes=sizes,
      indptr=jnp.arange(e + 1, dtype=jnp.int32) * c, expert_load=load,
      num_dropped=jnp.zeros((), jnp.int32), num_tokens=num_tokens)


def _take_rows(x: Array, idx: Array) -> Array:
  """x[idx] along axis 0, zeros where idx is out of range (the sentinels)."""
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def gather_rows(x: Array, src: Array, inverse: Array) -> Array:
  """out[r] = x[src[r]] (zeros where src is out of range), with a gather-only VJP.

  `inverse` [len(x), j] lists, for each input row, the output rows holding it
  (len(out) where none): the backward is dx[i] = sum_j dout[inverse[i, j]], a
  gather and a sum instead of a float scatter-add, so it is deterministic. Used by
  `permute` (inverse = slot_row) and by jmoe.parallel's exchange reorderings.
  """
  return _take_rows(x, src)


def _permute_fwd(x, row_token, slot_row):
  return _take_rows(x, row_token), slot_row


def _permute_bwd(slot_row, drows):
  t, k = slot_row.shape
  dx = _take_rows(drows, slot_row.reshape(t * k)).reshape(t, k, drows.shape[-1])
  dx = jnp.sum(dx.astype(jnp.float32), axis=1).astype(drows.dtype)
  return dx, None, None


gather_rows.defvjp(_permute_fwd, _permute_bwd)


# combine: y[t] = sum_j w[t, j] * rows[slot_row[t, j]].
# Backward: drows[r] = w[row_slot[r]] * dy[row_token[r]];  dw[t, j] = <dy[t], rows[slot_row[t, j]]>.
def _combine_impl(rows, weights, slot_row):
  t, k = slot_row.shape
  g = _take_rows(rows, slot_row.reshape(t * k)).reshape(t, k, rows.shape[-1])
  y = jnp.einsum("tkd,tk->td", g, weights.astype(jnp.float32),
                 preferred_element_type=jnp.float32)
  return y.astype(rows.dtype)


@jax.custom_vjp
def _combine(rows, weights, slot_row, row_slot, row_token):
  return _combine_impl(rows, weights, slot_row)


def _combine_fwd(rows, weights, slot_row, row_slot, row_token):
  return _combine_impl(rows, weights, slot_row), (rows, weights, slot_row,
                                                  row_slot, row_token)


def _combine_bwd(res, dy):
  rows, weights, slot_row, row_slot, row_token = res
  t, k = slot_row.shape
  w_rows = jnp.take(weights.reshape(t * k).astype(jnp.float32), row_slot,
                    mode="fill", fill_value=0)
  drows = (_take_rows(dy, row_token).astype(jnp.float32) * w_rows[:, None])
  g = _take_rows(rows, slot_row.reshape(t * k)).reshape(t, k, rows.shape[-1])
  dw = jnp.einsum("tkd,td->tk", g, dy, preferred_element_type=jnp.float32)
  return (drows.astype(rows.dtype), dw.astype(weights.dtype), None, None, None)


_combine.defvjp(_combine_fwd, _combine_bwd)


def permute(
    x: Array,
    routing: Routing | ExpertChoiceRouting | Array,
    *,
    num_experts: int | None = None,
    capacity: int | None = None,
) -> tuple[Array, DispatchPlan]:
  """Gathers tokens into expert order.

  Args:
    x: [T, D] token activations.
    routing: a `Routing` (token choice), an `ExpertChoiceRouting` (anything with
      `plan(capacity)` and `num_tokens`), or an int [T, k] array of expert ids
      (then `num_experts` is required).
    num_experts: E, when `routing` is a bare array.
    capacity: token choice only: None for dropless, else the per-expert row limit
      (see `dispatch_plan`; `expert_capacity` computes the usual one). Expert
      choice ignores it: its routing already holds C tokens per expert.

  Returns:
    rows: [R, D], x's rows in expert order (zeros in unused rows), ready for
      `gmm(rows, w, plan.group_sizes)`.
    plan: the `DispatchPlan`, for `unpermute`.
  """
  fn = "permute"
  checks.check_rank(fn, "x", x, 2, "[tokens, d_model]")
  if hasattr(routing, "plan"):  # a routing decision knows its own plan
    checks.check_dim(fn, "routing", routing.num_tokens, x.shape[0],
                     "tokens must match x [tokens, d_model]")
    plan = routing.plan(capacity)
  else:
    if num_experts is None:
      raise ValueError(f"{fn}: pass `num_experts` with a bare expert-id array.")
    checks.check_rank(fn, "experts", routing, 2, "[tokens, k]")
    checks.check_dim(fn, "experts", routing.shape[0], x.shape[0],
                     "tokens (dim 0) must match x [tokens, d_model]")
    plan = dispatch_plan(routing, num_experts, capacity=capacity)
  if plan.slot_row is None:  # rows name tokens (expert choice): a plain gather
    return _take_rows(x, plan.row_token), plan
  return gather_rows(x, plan.row_token, plan.slot_row), plan


def unpermute(rows: Array, plan: DispatchPlan, weights: Array) -> Array:
  """Combines each token's expert outputs with its weights: the inverse of `permute`.

    y[t] = sum_j weights[t, j] * rows[slot_row[t, j]]   (dropped pairs give 0)

  Accumulates in float32; returns rows.dtype.

  Args:
    rows: [R, D] expert outputs in buffer order.
    plan: the `DispatchPlan` from `permute`.
    weights: float [T, k] combine weights (`Routing.weights`), or [E, C] for
      expert choice.
  Returns:
    [T, D].
  """
  fn = "unpermute"
  checks.check_rank(fn, "rows", rows, 2, "[rows, d_model]")
  checks.check_dim(fn, "rows", rows.shape[0], plan.num_rows,
                   "row count must match the plan")
  if plan.slot_row is None:  # expert choice: a token may appear 0..E times
    if weights.size != plan.num_rows:
      raise ValueError(
          f"{fn}: expert-choice `weights` must have {plan.num_rows} entries"
          f" [experts, capacity]; got shape {weights.shape}.")
    contrib = rows.astype(jnp.float32) * weights.reshape(-1, 1).astype(jnp.float32)
    y = jax.ops.segment_sum(contrib, plan.row_token, plan.num_tokens)
    return y.astype(rows.dtype)
  if weights.shape != plan.slot_row.shape:
    raise ValueError(
        f"{fn}: `weights` must have shape [tokens, k]={plan.slot_row.shape}; got"
        f" {weights.shape}.")
  return _combine(rows, weights, plan.slot_row, plan.row_slot, plan.row_token)
