"""The grouped matmul through XLA's `lax.ragged_dot`.

On CPU and TPU XLA lowers it well; on GPU it rewrites to a dense masked product (G
times the FLOPs), which is why jmoe has its own kernel there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def gmm_xla(lhs: Array, rhs: Array, group_sizes: Array, *,
            preferred_element_type=None, group_offset: Array | None = None,
            precision=None) -> Array:
  group_sizes = group_sizes.astype(jnp.int32)
  if group_offset is None and rhs.shape[0] == group_sizes.shape[0]:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision,
                              preferred_element_type=preferred_element_type)
  # Local expert range: lax.ragged_dot has no working group_offset on CPU/GPU, so
  # fold the rows before and after the local groups into two zero-weight groups.
  g_local = rhs.shape[0]
  offset = jnp.zeros((), jnp.int32) if group_offset is None else jnp.reshape(
      group_offset, ()).astype(jnp.int32)
  ends = jnp.cumsum(group_sizes)
  total = ends[-1]
  before = jnp.where(offset > 0, jnp.take(ends, offset - 1, mode="clip"), 0)
  local = jax.lax.dynamic_slice(group_sizes, (offset,), (g_local,))
  after = total - before - local.sum()
  sizes = jnp.concatenate([before[None], local, after[None]])
  zeros = jnp.zeros((1,) + rhs.shape[1:], rhs.dtype)
  out = jax.lax.ragged_dot(lhs, jnp.concatenate([zeros, rhs, zeros]), sizes,
                           precision=precision,
                           preferred_element_type=preferred_element_type)
  return out
