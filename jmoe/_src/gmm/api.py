"""`jmoe.gmm`: the grouped ("ragged") matmul, with `jax.lax.ragged_dot`'s signature."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src.gmm.reference import gmm_reference
from jmoe._src.gmm.xla import gmm_xla

Array = jax.Array

# "pallas_interpret": the Pallas kernels in the Pallas interpreter (CPU tests).
IMPLEMENTATIONS = ("xla", "reference", "pallas", "pallas_interpret")


def default_implementation() -> str:
  """The backend `gmm` uses when `implementation=None`: the Pallas-Triton kernels
  on NVIDIA GPUs (XLA's ragged_dot does G times the work there), XLA elsewhere."""
  return "pallas" if jax.devices()[0].platform == "gpu" else "xla"


def check_gmm_args(fn: str, lhs, rhs, group_sizes, group_offset) -> None:
  checks.check_rank(fn, "lhs", lhs, 2, "[m, k]")
  checks.check_rank(fn, "rhs", rhs, 3, "[groups, k, n]")
  checks.check_rank(fn, "group_sizes", group_sizes, 1, "[groups]")
  checks.check_floating(fn, "lhs", lhs)
  checks.check_floating(fn, "rhs", rhs)
  checks.check_integer(fn, "group_sizes", group_sizes)
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
    if jnp.size(group_offset) != 1:
      raise ValueError(
          f"{fn}: `group_offset` must be a scalar (or shape [1]) int; got shape"
          f" {jnp.shape(group_offset)}.")
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
    implementation: Literal["xla", "reference", "pallas", "pallas_interpret"]
    | None = None,
) -> Array:
  """Grouped matmul: consecutive row blocks of `lhs` times their group's matrix.

  Same signature and semantics as `jax.lax.ragged_dot`: rows
  [sum(group_sizes[:g]), sum(group_sizes[:g+1])) of `lhs` are multiplied by
  `rhs[g]`; rows past sum(group_sizes) give zeros. Differentiable in `lhs` and `rhs`
  (the weight gradient of an empty group is zero).

  Args:
    lhs: [m, k] rows sorted by group (e.g. `permute`'s output).
    rhs: [g, k, n] one matrix per group.
    group_sizes: int32 [g] rows per group; sum <= m.
    precision: passed to the dot products.
    preferred_element_type: output dtype (accumulation is float32 regardless);
      default: the inputs' result dtype.
    group_offset: optional int scalar for an expert-parallel shard: `rhs` then holds
      only the local groups group_offset .. group_offset + rhs.shape[0] - 1 of
      `group_sizes` (which lists all groups), and rows of other groups give zeros.
    implementation: "xla" (`lax.ragged_dot`), "reference" (dense and masked, G times
      the work: the test oracle), "pallas" (Pallas-Triton kernels, GPU),
      "pallas_interpret" (the same kernels interpreted, CPU), or None for the best
      available on this backend ("pallas" on GPU, "xla" elsewhere).

  Returns:
    [m, n] in `preferred_element_type`.
  """
  fn = "gmm"
  check_gmm_args(fn, lhs, rhs, group_sizes, group_offset)
  impl = implementation or default_implementation()
  checks.check_choice(fn, "implementation", impl, IMPLEMENTATIONS)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if impl == "reference":
    return gmm_reference(lhs, rhs, group_sizes,
                         preferred_element_type=out_dtype,
                         group_offset=group_offset)
  if impl in ("pallas", "pallas_interpret"):
    # Imported here so that `import jmoe` never depends on the Pallas-Triton stack.
    from jmoe._src.gmm.pallas_triton import gmm_pallas  # noqa: PLC0415
    return gmm_pallas(lhs, rhs, group_sizes, group_offset=group_offset,
                      preferred_element_type=out_dtype, precision=precision,
                      interpret=impl == "pallas_interpret")
  # Accumulate in float32 whatever the requested output dtype.
  out = gmm_xla(lhs, rhs, group_sizes, precision=precision,
                preferred_element_type=jnp.float32, group_offset=group_offset)
  return out.astype(out_dtype)
