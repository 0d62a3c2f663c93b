"""The grouped matmul through XLA's `lax.ragged_dot_general`.

A backend of `ops` (see `ops.Backend` for the interface), and the one that takes
symbolic (shape-polymorphic) shapes. On CPU and TPU XLA lowers ragged_dot well; on
GPU it rewrites to a dense masked product (G times the FLOPs), which is why jmoe
has its own kernels there.

`lax.ragged_dot` has no working `group_offset` on CPU/GPU and leaves rows past
sum(group_sizes) unspecified on TPU, so the local groups are passed as they are
and the rows outside them are folded into the first and last local group and
masked: zeros in the output (gmm), zeros in the contraction (tgmm). The weights
are never copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jmoe._src.gmm import tiling

Array = jax.Array

FALLBACK = None


def supports_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


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


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
        transpose_rhs: bool, out_dtype, precision, config=None) -> Array:
  del config
  m = lhs.shape[0]
  sizes, local = _local_layout(group_sizes, group_offset, m, rhs.shape[0])
  contract = 2 if transpose_rhs else 1
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [contract]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
  out = lax.ragged_dot_general(lhs, rhs, sizes, dims, precision=precision,
                               preferred_element_type=jnp.float32)
  return jnp.where(local[:, None], out, 0.0).astype(out_dtype)


def tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
         num_local: int, out_dtype, precision, config=None) -> Array:
  del config
  m = lhs.shape[0]
  sizes, local = _local_layout(group_sizes, group_offset, m, num_local)
  # Ragged contracting mode: out[g] = lhs[rows_g]^T @ dy[rows_g], [L, k, n].
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  lhs = jnp.where(local[:, None], lhs, jnp.zeros((), lhs.dtype))
  out = lax.ragged_dot_general(lhs, dy, sizes, dims, precision=precision,
                               preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
