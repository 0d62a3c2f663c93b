"""`jmoe.gmm`: the grouped ("ragged") matmul, with `jax.lax.ragged_dot`'s signature."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jmoe._src import checks
from jmoe._src.gmm import ops

Array = jax.Array
ShapeDtypeError = checks.ShapeDtypeError

# "pallas" and "pallas_triton" name the same backend; "pallas_interpret" runs its
# kernels in the Pallas interpreter (CPU tests).
IMPLEMENTATIONS = ops.IMPLEMENTATIONS
default_implementation = ops.default_implementation


def check_gmm_args(fn: str, lhs, rhs, group_sizes, group_offset, precision=None,
                   preferred_element_type=None) -> None:
  """Every static problem of a gmm call, as a `ShapeDtypeError` (a ValueError
  and a TypeError) naming the argument and what it should be, or a ValueError
  for a `precision` lax does not know."""
  checks.check_rank(fn, "lhs", lhs, 2, "[m, k]")
  checks.check_rank(fn, "rhs", rhs, 3, "[groups, k, n]")
  checks.check_rank(fn, "group_sizes", group_sizes, 1, "[groups]")
  checks.check_numeric(fn, "lhs", lhs)
  checks.check_numeric(fn, "rhs", rhs)
  checks.check_integer(fn, "group_sizes", group_sizes)
  lhs_shape, rhs_shape = np.shape(lhs), np.shape(rhs)
  num_groups = np.shape(group_sizes)[0]
  ops.check_static_groups(fn, num_groups, rhs_shape[0])
  if lhs_shape[1] != rhs_shape[1]:
    raise ShapeDtypeError(
        f"{fn}: contracting dims differ: `lhs` [m, k] has k={lhs_shape[1]} but"
        f" `rhs` [groups, k, n] has k={rhs_shape[1]} (shapes {lhs_shape},"
        f" {rhs_shape}).")
  if group_offset is None:
    if num_groups != rhs_shape[0]:
      raise ShapeDtypeError(
          f"{fn}: `group_sizes` must have length groups={rhs_shape[0]} (rhs"
          f" [groups, k, n]={rhs_shape}); got length {num_groups}.")
  else:
    if jnp.size(group_offset) != 1:
      raise ShapeDtypeError(
          f"{fn}: `group_offset` must be a scalar (or shape [1]) int; got shape"
          f" {jnp.shape(group_offset)}.")
    checks.check_integer(fn, "group_offset", group_offset)
    if num_groups < rhs_shape[0]:
      raise ShapeDtypeError(
          f"{fn}: with `group_offset`, `group_sizes` lists all groups and must be"
          f" at least as long as rhs's local groups ({rhs_shape[0]}); got"
          f" {num_groups}.")
  try:
    precision = ops.canonical_precision(precision)
  except ValueError as e:
    raise ValueError(f"{fn}: unknown `precision`={precision!r}; {e}") from e
  if preferred_element_type is not None:
    try:
      jnp.dtype(preferred_element_type)
    except TypeError as e:
      raise ShapeDtypeError(
          f"{fn}: `preferred_element_type` must be a dtype; got"
          f" {preferred_element_type!r}.") from e
  lhs_dt, rhs_dt = jnp.result_type(lhs), jnp.result_type(rhs)
  try:
    ops.result_dtype(lhs_dt, rhs_dt, preferred_element_type, precision)
  except TypeError as e:
    raise ShapeDtypeError(
        f"{fn}: lax.ragged_dot takes no `lhs` {lhs_dt} x `rhs` {rhs_dt} product"
        f" with preferred_element_type={preferred_element_type} ({e}).") from e


def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    precision=None,
    preferred_element_type=None,
    group_offset: Array | None = None,
    out_sharding=None,
    *,
    implementation: Literal["xla", "reference", "pallas", "pallas_triton",
                            "pallas_interpret", "mosaic", "cpu"] | None = None,
) -> Array:
  """Grouped matmul: consecutive row blocks of `lhs` times their group's matrix.

  Same signature and semantics as `jax.lax.ragged_dot`: rows
  [sum(group_sizes[:g]), sum(group_sizes[:g+1])) of `lhs` are multiplied by
  `rhs[g]`; rows past sum(group_sizes) give zeros (on every backend).

  Every backend behaves as `lax.ragged_dot` does under `jax.jit`, `jax.grad` /
  `jax.vjp` (in `lhs` and `rhs`; the weight gradient of an empty group is zero),
  `jax.jvp` / `jax.jacfwd`, higher-order derivatives (grad of grad,
  hessian-vector products), `jax.vmap` (one launch per batch element),
  `shard_map` (with `check_vma=True`), `jax.export` (with symbolic shapes the
  product lowers to "xla": the kernels need static shapes) and eager calls with
  numpy inputs (compiled once per shape).

  Dtypes, as lax.ragged_dot: any bool, integer, floating or complex operands
  lax.dot_general takes (int8 x int8, int8 x bf16, f16 x bf16, ...); the result
  has the dtype lax gives (the operand dtype with more exponent, then mantissa
  bits wins: f16 x bf16 -> bf16, int8 x bf16 -> bf16, int8 x int8 -> int8) or
  `preferred_element_type`. The products run in one compute dtype that holds both
  operands exactly (int8 x bf16 in bf16, f16 x bf16 in float32, where lax on
  CPU/GPU first rounds the f16 operand to bf16), accumulated in float32 (float64,
  complex: their own width; integers and bool: int32, so integer results wrap as
  lax's do), and so is the cotangent in the backward: bf16 operands with a
  float32 output get their gradients from the float32 cotangent. A kernel backend
  runs only the dtypes its kernels take (16-bit floats for "mosaic", those and
  float32 for "pallas") and passes the others to its fallback ("mosaic" ->
  "pallas" -> "xla").

  Bad input (one behaviour on every backend, eager and under `jit`; the checks
  that need values run under `jax.experimental.checkify.checkify` with the user
  checks, e.g. `checkify.checkify(jax.jit(f))`, and cost nothing otherwise):
    * wrong ranks, shapes or dtypes, a group count that is not static: a
      `jmoe.ShapeDtypeError` (both a ValueError and a TypeError, as lax raises
      TypeError) naming the argument and the expected shape or dtype; an unknown
      `precision` or `implementation`: a ValueError.
    * a negative group size is read as 0 (lax.ragged_dot shifts the following
      groups back instead); checkify reports it.
    * sum(group_sizes) > m: groups are cut at row m (the group that crosses it is
      shortened, later groups are empty); checkify reports it.
    * `group_offset` outside [0, G - L]: the local groups that are not groups of
      `group_sizes` are empty (zero rows, zero weight gradient); checkify reports
      it.
    * m, k, n or the group count 0: zeros of shape [m, n] (and zero gradients).
    * non-finite values reach only the products that read them: NaN/inf in a row
      of lhs affects that row and its group's weight gradient; in rhs[g], the rows
      of group g. Rows outside the local groups and past sum(group_sizes) are
      zeros whatever lhs holds there. (lax.ragged_dot on CPU/GPU multiplies every
      rhs[g] by zeros for the other groups' rows, so an inf there makes every row
      NaN.)

  Args:
    lhs: [m, k] rows sorted by group (e.g. `permute`'s output).
    rhs: [g, k, n] one matrix per group.
    group_sizes: int [g] rows per group; sum <= m.
    precision: as for `lax.dot_general` (a `lax.Precision`, its name, a pair of
      them, a `lax.DotAlgorithmPreset` or a `lax.DotAlgorithm`; None reads
      `jax_default_matmul_precision`), honoured by every backend: "xla",
      "reference" (whose None is HIGHEST) and "pallas" pass it to their
      `lax.dot_general` (Triton: TF32 for DEFAULT and HIGH float32 products);
      "mosaic" computes exact 16-bit products in float32, which is what every
      `lax.Precision` gives 16-bit operands there, and passes the dot algorithms
      that ask for something else (bf16 accumulation, ...) to "pallas". What lax
      refuses on this platform (e.g. most algorithms on CPU), gmm refuses too.
    preferred_element_type: output dtype; default: lax.ragged_dot's result dtype
      (above).
    group_offset: optional int scalar (or [1]) for an expert-parallel shard:
      `rhs` then holds only the local groups group_offset .. group_offset +
      rhs.shape[0] - 1 of `group_sizes` (which lists all groups), and rows of
      other groups give zeros.
    out_sharding: the result's sharding, as for `lax.ragged_dot` (a
      `NamedSharding`, or a `PartitionSpec` under `jax.set_mesh`). Over Explicit
      mesh axes the products run inside `jax.sharding.auto_axes` and the result
      is typed with `out_sharding`, by default lhs's row sharding and rhs's
      column sharding (where lax.ragged_dot asks for it); over Auto axes and
      without a mesh it is applied as `jax.sharding.reshard` applies it.
    implementation: "xla" (`lax.ragged_dot` on TPU, G masked products elsewhere),
      "reference" (dense and masked, G times the work: the test oracle), "pallas"
      or "pallas_triton" (the Pallas-Triton kernels, NVIDIA GPUs),
      "pallas_interpret" (the same kernels interpreted, CPU tests), "mosaic" (the
      Mosaic-GPU kernels, Hopper; 16-bit float operands), "cpu" (XLA:CPU: one batched
      dot over per-group buckets of 1.25x the mean group, loops of dense tile
      products for a group's rows past its bucket; ~the routed FLOPs where they
      beat "xla", i.e. at least 2 groups and 4 rows per group; "xla" otherwise
      and for the dtypes it does not take), or None for the best available here: "mosaic" on Hopper
      GPUs, "pallas" on other NVIDIA GPUs, "cpu" on CPU, "xla" elsewhere. "pallas"
      and "mosaic" where their kernels cannot lower (e.g. on CPU) raise a
      ValueError saying what to use instead.

  Returns:
    [m, n] in `preferred_element_type` (default: lax.ragged_dot's result dtype).
  """
  fn = "gmm"
  check_gmm_args(fn, lhs, rhs, group_sizes, group_offset, precision,
                 preferred_element_type)
  return ops.gmm(lhs, rhs, group_sizes, group_offset, precision=precision,
                 preferred_element_type=preferred_element_type,
                 implementation=implementation, out_sharding=out_sharding)


def gmm_pair(lhs: Array, rhs_a: Array, rhs_b: Array, group_sizes: Array, *,
             group_offset: Array | None = None,
             implementation: str | None = None) -> tuple[Array, Array]:
  """(gmm(lhs, rhs_a, ...), gmm(lhs, rhs_b, ...)): two grouped products of one lhs.

  The same values, dtypes and derivatives as the two `gmm` calls (default
  precision and result dtype); the difference is the gradient w.r.t. lhs, which is
  one product, ct_a @ rhs_a[g]^T + ct_b @ rhs_b[g]^T, run as one kernel by the
  Mosaic backend (one float32 accumulator and one [m, k] store) instead of two
  input gradients added afterwards. `jmoe.expert_ffn` uses it for SwiGLU's gate
  and up products.

  Args:
    lhs: [m, k]; rhs_a: [groups, k, n_a]; rhs_b: [groups, k, n_b], both of one
      dtype; group_sizes, group_offset, implementation: as for `gmm`.

  Returns:
    ([m, n_a], [m, n_b]).
  """
  fn = "gmm_pair"
  check_gmm_args(fn, lhs, rhs_a, group_sizes, group_offset)
  check_gmm_args(fn, lhs, rhs_b, group_sizes, group_offset)
  if np.shape(rhs_a)[0] != np.shape(rhs_b)[0] or (
      jnp.result_type(rhs_a) != jnp.result_type(rhs_b)):
    raise ShapeDtypeError(
        f"{fn}: `rhs_a` and `rhs_b` must hold the same groups in one dtype; got"
        f" {np.shape(rhs_a)} {jnp.result_type(rhs_a)} and {np.shape(rhs_b)}"
        f" {jnp.result_type(rhs_b)}.")
  return ops.gmm_pair(lhs, rhs_a, rhs_b, group_sizes, group_offset,
                      implementation=implementation)
