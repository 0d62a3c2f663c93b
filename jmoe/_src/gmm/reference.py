"""The obviously-right grouped matmul: one dense product per local group, masked.

A backend of `ops` (see `ops.Backend` for the interface). It does L times the work
of a grouped matmul, so it is an oracle for the tests and a readable statement of
the semantics, never a fast path. Its default precision is HIGHEST.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

FALLBACK = None


def supports_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def group_ids(group_sizes: Array, num_rows: int) -> Array:
  """int32 [m]: the group of each row; len(group_sizes) for rows past the total."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32),
                          side="right").astype(jnp.int32)


def local_ids(group_sizes: Array, group_offset: Array, num_rows: int) -> Array:
  """int32 [m]: each row's local group (its group - group_offset); -1 for rows past
  sum(group_sizes). Rows of non-local groups get values outside [0, L)."""
  gid = group_ids(group_sizes, num_rows)
  return jnp.where(gid < group_sizes.shape[0], gid - group_offset, -1)


def _precision(precision):
  return jax.lax.Precision.HIGHEST if precision is None else precision


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
        transpose_rhs: bool, out_dtype, precision, config=None) -> Array:
  """out[i] = lhs[i] @ rhs[local(i)] (or @ rhs[local(i)]^T), zeros elsewhere."""
  del config
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  local = local_ids(group_sizes, group_offset, m)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def body(g, acc):
    prod = jax.lax.dot_general(lhs, rhs[g], dims, precision=_precision(precision),
                               preferred_element_type=jnp.float32)
    return acc + jnp.where((local == g)[:, None], prod, 0.0)

  acc = jax.lax.fori_loop(0, rhs.shape[0], body, jnp.zeros((m, n), jnp.float32))
  return acc.astype(out_dtype)


def tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
         num_local: int, out_dtype, precision, config=None) -> Array:
  """out[l] = lhs[rows of local group l]^T @ dy[same rows]; [num_local, k, n]."""
  del config
  m, k = lhs.shape
  local = local_ids(group_sizes, group_offset, m)

  def body(g, acc):
    a = jnp.where((local == g)[:, None], lhs, 0)
    prod = jax.lax.dot_general(a, dy, (((0,), (0,)), ((), ())),
                               precision=_precision(precision),
                               preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(acc, prod, g, 0)

  acc = jax.lax.fori_loop(0, num_local, body,
                          jnp.zeros((num_local, k, dy.shape[1]), jnp.float32))
  return acc.astype(out_dtype)
