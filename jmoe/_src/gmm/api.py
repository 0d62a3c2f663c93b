"""`jmoe.gmm`: the grouped ("ragged") matmul, with `jax.lax.ragged_dot`'s signature."""

from __future__ import annotations

from typing import Literal

import jax

from jmoe._src import checks
from jmoe._src.gmm import ops

Array = jax.Array

# "pallas" and "pallas_triton" name the same backend; "pallas_interpret" runs its
# kernels in the Pallas interpreter (CPU tests).
IMPLEMENTATIONS = ops.IMPLEMENTATIONS
default_implementation = ops.default_implementation


def check_gmm_args(fn: str, lhs, rhs, group_sizes, group_offset) -> None:
  checks.check_rank(fn, "lhs", lhs, 2, "[m, k]")
  checks.check_rank(fn, "rhs", rhs, 3, "[groups, k, n]")
  checks.check_rank(fn, "group_sizes", group_sizes, 1, "[groups]")
  checks.check_floating(fn, "lhs", lhs)
  checks.check_floating(fn, "rhs", rhs)
  checks.check_integer(fn, "group_sizes", group_sizes)
  ops.check_static_groups(fn, group_sizes.shape[0], rhs.shape[0])
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(
        f"{fn}: contracting dims differ: `lhs` [m, k] has k={lhs.shape[1]} but"
        f" `rhs` [groups, k, n] has k={rhs.shape[1]} (shapes {lhs.shape},"
        f" {rhs.shape}).")
  if group_offset is None:
    if group_sizes.shape[0] != rhs.shape[0]:
      raise ValueError(
          f"{fn}: `group_sizes` must have length groups={rhs.shape[0]} (rhs"
          f" [groups, k, n]={rhs.shape}); got length {group_sizes.shape[0]}.")
  else:
    if jax.numpy.size(group_offset) != 1:
      raise ValueError(
          f"{fn}: `group_offset` must be a scalar (or shape [1]) int; got shape"
          f" {jax.numpy.shape(group_offset)}.")
    checks.check_integer(fn, "group_offset", group_offset)
    if group_sizes.shape[0] < rhs.shape[0]:
      raise ValueError(
          f"{fn}: with `group_offset`, `group_sizes` lists all groups and must be"
          f" at least as long as rhs's local groups ({rhs.shape[0]}); got"
          f" {group_sizes.shape[0]}.")


def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    precision=None,
    preferred_element_type=None,
    group_offset: Array | None = None,
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
  numpy inputs (compiled once per shape). Mixed operand dtypes are promoted to one
  compute dtype, and so is the cotangent in the backward: bf16 operands with a
  float32 output get their gradients computed from the float32 cotangent.

  Args:
    lhs: [m, k] rows sorted by group (e.g. `permute`'s output).
    rhs: [g, k, n] one matrix per group.
    group_sizes: int [g] rows per group; sum <= m.
    precision: passed to the dot products.
    preferred_element_type: output dtype (accumulation is float32 regardless);
      default: the inputs' result dtype.
    group_offset: optional int scalar for an expert-parallel shard: `rhs` then holds
      only the local groups group_offset .. group_offset + rhs.shape[0] - 1 of
      `group_sizes` (which lists all groups), and rows of other groups give zeros.
    implementation: "xla" (`lax.ragged_dot`), "reference" (dense and masked, G times
      the work: the test oracle), "pallas" or "pallas_triton" (the Pallas-Triton
      kernels, NVIDIA GPUs), "pallas_interpret" (the same kernels interpreted, CPU
      tests), "mosaic" (the Mosaic-GPU kernels, Hopper; 16-bit float operands,
      float32 falls back to "pallas"), "cpu" (loops of dense tile products,
      ~the routed FLOPs, where they beat "xla": at least 2 groups and 4 rows per
      group; "xla" otherwise and for float64), or None for the best available
      here: "mosaic" on Hopper GPUs, "pallas" on other NVIDIA GPUs, "cpu" on CPU,
      "xla" elsewhere.

  Returns:
    [m, n] in `preferred_element_type`.
  """
  fn = "gmm"
  check_gmm_args(fn, lhs, rhs, group_sizes, group_offset)
  return ops.gmm(lhs, rhs, group_sizes, group_offset, precision=precision,
                 preferred_element_type=preferred_element_type,
                 implementation=implementation)
