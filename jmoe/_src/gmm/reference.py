"""The obviously-right grouped matmul: one dense product per local group, masked.

A backend of `ops` (see `ops.Backend` for the interface). It does L times the work
of a grouped matmul, so it is an oracle for the tests and a readable statement of
the semantics, never a fast path. Its default precision is HIGHEST.

The masks select after each product (gmm) or select both operands (tgmm), so a
non-finite value reaches only the rows and the group that read it: a zero that
multiplies an infinity never enters a sum. `masked_gmm` / `masked_tgmm` are these
products at the precision given; the "xla" backend reuses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe._src.gmm import ops

Array = jax.Array

FALLBACK = None


def supports_dtype(dtype) -> bool:
  """Every dtype lax.dot_general takes: bool, integers, floats, complex."""
  return jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)


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


def exact_dot(a: Array, b: Array, dims, *, precision, preferred_element_type
              ) -> Array:
  """`lax.dot_general(a, b, dims)` for one contracting dim per operand, with
  integer contractions zero-padded to a multiple of 4 (exact).

  Why: XLA's GPU int8 x int8 -> int32 product (jax 0.11.2, H200) returns twice the
  true value when the contraction is not a multiple of 4 (measured for 5, 6, 7, 33;
  4, 8, 12, 16, 20, 40 are right; benchmarks/results/raw/h200_int8_tests_2026-12-02.log
  and benchmarks/NOTES.md). Zero rows add nothing, so the padded product is the
  product, on every platform.
  """
  (ca,), (cb,) = dims[0]
  size = a.shape[ca]
  if (jnp.issubdtype(a.dtype, jnp.integer) and jnp.issubdtype(b.dtype, jnp.integer)
      and size % 4):
    pad = -size % 4
    widths = lambda x, axis: [(0, pad if i == axis else 0) for i in range(x.ndim)]
    a = jnp.pad(a, widths(a, ca))
    b = jnp.pad(b, widths(b, cb))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=preferred_element_type)


def _precision(precision):
  return jax.lax.Precision.HIGHEST if precision is None else precision


def masked_gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
               transpose_rhs: bool, out_dtype, precision) -> Array:
  """out[i] = lhs[i] @ rhs[local(i)] (or @ rhs[local(i)]^T), zeros elsewhere."""
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  acc_dtype = ops.accumulation_dtype(lhs.dtype)
  local = local_ids(group_sizes, group_offset, m)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def body(g, acc):
    prod = exact_dot(lhs, rhs[g], dims, precision=precision,
                     preferred_element_type=acc_dtype)
    return acc + jnp.where((local == g)[:, None], prod, jnp.zeros((), acc_dtype))

  acc = jax.lax.fori_loop(0, rhs.shape[0], body, jnp.zeros((m, n), acc_dtype))
  return acc.astype(out_dtype)


def masked_tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
                num_local: int, out_dtype, precision) -> Array:
  """out[l] = lhs[rows of local group l]^T @ dy[same rows]; [num_local, k, n]."""
  m, k = lhs.shape
  acc_dtype = ops.accumulation_dtype(lhs.dtype)
  local = local_ids(group_sizes, group_offset, m)

  def body(g, acc):
    rows = (local == g)[:, None]
    a = jnp.where(rows, lhs, jnp.zeros((), lhs.dtype))
    b = jnp.where(rows, dy, jnp.zeros((), dy.dtype))
    prod = exact_dot(a, b, (((0,), (0,)), ((), ())), precision=precision,
                     preferred_element_type=acc_dtype)
    return jax.lax.dynamic_update_index_in_dim(acc, prod, g, 0)

  acc = jax.lax.fori_loop(0, num_local, body,
                          jnp.zeros((num_local, k, dy.shape[1]), acc_dtype))
  return acc.astype(out_dtype)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
        transpose_rhs: bool, out_dtype, precision, config=None) -> Array:
  del config
  return masked_gmm(lhs, rhs, group_sizes, group_offset,
                    transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                    precision=_precision(precision))


def tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
         num_local: int, out_dtype, precision, config=None) -> Array:
  del config
  return masked_tgmm(lhs, dy, group_sizes, group_offset, num_local=num_local,
                     out_dtype=out_dtype, precision=_precision(precision))
