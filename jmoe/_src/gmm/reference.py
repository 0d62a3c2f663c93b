"""The obviously-right grouped matmul: one dense product per group, masked.

It does G times the work of a grouped matmul, so it is the oracle of the tests and a
fallback for tiny problems, never a fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def group_ids(group_sizes: Array, num_rows: int) -> Array:
  """int32 [m]: the group of each row; len(group_sizes) for rows past the total."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32),
                          side="right").astype(jnp.int32)


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array, *,
                  preferred_element_type=None, group_offset: Array | None = None,
                  precision=jax.lax.Precision.HIGHEST) -> Array:
  """out[i] = lhs[i] @ rhs[group(i) - group_offset] for rows whose group is local,
  zeros elsewhere.

  lhs: [m, k]; rhs: [g_local, k, n]; group_sizes: int [g_total]; returns [m, n].
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  m = lhs.shape[0]
  g_local = rhs.shape[0]
  offset = jnp.zeros((), jnp.int32) if group_offset is None else jnp.reshape(
      group_offset, ()).astype(jnp.int32)
  gid = group_ids(group_sizes, m) - offset

  def body(g, acc):
    prod = jnp.dot(lhs, rhs[g], precision=precision,
                   preferred_element_type=jnp.float32)
    return acc + jnp.where((gid == g)[:, None], prod, 0.0)

  acc = jax.lax.fori_loop(0, g_local, body,
                          jnp.zeros((m, rhs.shape[2]), jnp.float32))
  return acc.astype(out_dtype)
