"""The grouped matmul through XLA: `lax.ragged_dot_general` on TPU.

A backend of `ops` (see `ops.Backend` for the interface), and the one that takes
symbolic (shape-polymorphic) shapes and every dtype lax.dot_general takes.

On TPU XLA lowers ragged_dot to a native grouped matmul, and this backend uses it
(`native_gmm`, `native_tgmm`). `lax.ragged_dot` has no working `group_offset` on
CPU/GPU and leaves rows past sum(group_sizes) unspecified on TPU, so the local
groups are passed as they are and the rows outside them are folded into the first
and last local group and masked: zeros in the output (gmm), zeros in both operands
of the contraction (tgmm). The weights are never copied.

On every other platform (CPU, GPU) XLA rewrites ragged_dot to a dense product over
all groups with the rows of the other groups zeroed in lhs: G times the FLOPs, and
0 * inf = NaN, so one group's non-finite weight turns every row of the output NaN.
There this backend runs the same G products with the mask applied after each
product instead (`reference.masked_gmm`, at the precision given): the same FLOPs,
and a non-finite value stays in the rows of its group, as on every other backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jmoe._src.gmm import ops, reference, tiling

Array = jax.Array

FALLBACK = None
supports_dtype = reference.supports_dtype


def _local_layout(group_sizes: Array, group_offset: Array, m, num_local: int
                  ) -> tuple[Array, Array]:
  """(sizes [L] summing to m, bool [m] rows of the local groups).

  Local group l keeps its rows; the rows before the local range join group 0 and
  the rows after it (other groups, then the tail) join group L - 1.
  """
  starts, ends = tiling.group_bounds(group_sizes, m, num_local, group_offset)
  sizes = ends - starts
  sizes = sizes.at[0].add(starts[0]).at[-1].add(m - ends[-1])
  rows = jnp.arange(m, dtype=jnp.int32)
  return sizes, (rows >= starts[0]) & (rows < ends[-1])


def native_gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
               transpose_rhs: bool, out_dtype, precision) -> Array:
  """gmm through lax.ragged_dot_general (what TPU runs)."""
  m = lhs.shape[0]
  sizes, local = _local_layout(group_sizes, group_offset, m, rhs.shape[0])
  contract = 2 if transpose_rhs else 1
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [contract]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
  acc_dtype = ops.accumulation_dtype(lhs.dtype)
  out = lax.ragged_dot_general(lhs, rhs, sizes, dims, precision=precision,
                               preferred_element_type=acc_dtype)
  return jnp.where(local[:, None], out, jnp.zeros((), acc_dtype)).astype(out_dtype)


def native_tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
                num_local: int, out_dtype, precision) -> Array:
  """tgmm through lax.ragged_dot_general (what TPU runs)."""
  m = lhs.shape[0]
  sizes, local = _local_layout(group_sizes, group_offset, m, num_local)
  # Ragged contracting mode: out[g] = lhs[rows_g]^T @ dy[rows_g], [L, k, n].
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  lhs = jnp.where(local[:, None], lhs, jnp.zeros((), lhs.dtype))
  dy = jnp.where(local[:, None], dy, jnp.zeros((), dy.dtype))
  out = lax.ragged_dot_general(lhs, dy, sizes, dims, precision=precision,
                               preferred_element_type=ops.accumulation_dtype(
                                   lhs.dtype))
  return out.astype(out_dtype)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
        transpose_rhs: bool, out_dtype, precision, config=None) -> Array:
  del config
  kw = dict(transpose_rhs=transpose_rhs, out_dtype=out_dtype, precision=precision)
  args = (lhs, rhs, group_sizes, group_offset)
  return lax.platform_dependent(
      *args, tpu=functools.partial(native_gmm, **kw),
      default=functools.partial(reference.masked_gmm, **kw))


def tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
         num_local: int, out_dtype, precision, config=None) -> Array:
  del config
  kw = dict(num_local=num_local, out_dtype=out_dtype, precision=precision)
  args = (lhs, dy, group_sizes, group_offset)
  return lax.platform_dependent(
      *args, tpu=functools.partial(native_tgmm, **kw),
      default=functools.partial(reference.masked_tgmm, **kw))
