"""Group metadata of the grouped-matmul kernels, built outside them in plain jnp.

The kernels hold no routing logic. Everything they need to know about the groups is
computed here from `group_sizes` with a cumsum, under `jax.jit`, with static shapes
and no host sync:

* `row_tiles` (forward `gmm` and the input gradient): the list of row-tile visits.
  The rows [0, m) are cut into segments: the rows before the local groups, one
  segment per local group, and the rows after them (including rows past
  sum(group_sizes)). Each segment is cut into tiles of `block_m` rows *starting at
  the segment's first row* (the last tile of a segment may be short); a visit owns
  the rows [lo, hi) of its tile. Visits of local groups multiply; visits of the two
  outer segments only write zeros. So every output row is written by exactly one
  visit, whatever the routing.

  With `align` > 1 (the Mosaic-GPU kernels: their TMA loads of swizzled SMEM tiles
  address rows in blocks of 8), each segment's first tile starts at the multiple
  of `align` at or below the segment's first row instead, so a tile may also cover
  up to align - 1 rows before the rows it owns; the START row of the table is the
  tile's first row (== LO when align is 1).

  Unlike megablox (TPU), whose tiles are aligned to multiples of block_m and so
  visit a block that straddles a group boundary once per group, GPU kernels address
  rows with pointer arithmetic and need no alignment: a group of s rows takes
  ceil(s / block_m) visits instead of up to one more. That saves 10-30% of the
  MMA work when groups hold a few tiles (DeepSeek-V3: 256 rows per expert) and
  makes a decode step read every expert's weights exactly once when its rows fit
  one tile. Both layouts need at most cdiv(m, block_m) + L + 1 visits.
* `group_schedule` (weight gradient `tgmm`): each local group's row range, largest
  group first, so that the programs of a big group start early and do not form a
  tail (longest-processing-time-first order).

Shapes: m rows, G = len(group_sizes) groups in all, L local groups (rhs.shape[0]).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Rows of the int32 [5, T] table that `row_tiles` returns (and the kernels read).
GROUP, LO, HI, COMPUTE, START = range(5)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def num_tiles_bound(m: int, block_m: int, num_local: int, align: int = 1) -> int:
  """Static upper bound on the row-tile visits of `row_tiles`.

  L + 2 contiguous segments of sizes s_i cover [0, m); a segment's tiles start
  d_i < align rows before it, so it takes ceil((s_i + d_i) / b) visits and all
  take < (m + (L + 2)(align - 1)) / b + (L + 2): at most
  cdiv(m + (L + 2)(align - 1), b) + L + 1 (cdiv(m, b) + L + 1 when align is 1).
  """
  return cdiv(m + (num_local + 2) * (align - 1), block_m) + num_local + 1


def _offset(group_offset) -> Array:
  if group_offset is None:
    return jnp.zeros((), jnp.int32)
  return jnp.reshape(group_offset, ()).astype(jnp.int32)


def group_bounds(group_sizes: Array, m: int, num_local: int,
                 group_offset: Array | None = None) -> tuple[Array, Array]:
  """Row range [start, end) of each local group, clamped to [0, m).

  Local group l is group `group_offset + l` of `group_sizes`; a local index with no
  such group (offset out of range) gets an empty range.

  Returns:
    (starts, ends): int32 [L] each.
  """
  gs = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(gs), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  # Pad L empty groups at both sides so that any offset in [-L, G] slices exactly.
  total = ends[-1:]
  pad_lo = jnp.zeros((num_local,), jnp.int32)
  pad_hi = jnp.broadcast_to(total, (num_local,))
  starts = jnp.concatenate([pad_lo, starts, pad_hi])
  ends = jnp.concatenate([pad_lo, ends, pad_hi])
  off = jnp.clip(_offset(group_offset) + num_local, 0,
                 group_sizes.shape[0] + num_local)
  return (jax.lax.dynamic_slice(starts, (off,), (num_local,)),
          jax.lax.dynamic_slice(ends, (off,), (num_local,)))


class RowTiles(NamedTuple):
  """The row-tile visits of the forward kernel (see the module docstring).

  Attributes:
    table: int32 [5, T], T = `num_tiles_bound(...)`; column t is visit t:
      GROUP: local group whose matrix the visit multiplies by (0 where none),
      LO, HI: the rows [LO, HI) the visit owns, HI - LO <= block_m
        (LO == HI: owns none),
      COMPUTE: 1 if the visit multiplies, 0 if it writes zeros or is padding,
      START: the tile's first row (the tile is rows START .. START + block_m,
        START <= LO < HI <= START + block_m; START == LO when align is 1, a
        multiple of align otherwise).
      Visits come in row order; padding visits (t >= num_tiles) own no rows.
    num_tiles: int32 [], visits actually used.
  """

  table: Array
  num_tiles: Array


def row_tiles(group_sizes: Array, m: int, block_m: int, num_local: int,
              group_offset: Array | None = None, *, align: int = 1) -> RowTiles:
  """Builds the row-tile visits for a grouped matmul over m rows.

  Args:
    group_sizes: int [G] rows per group (all groups); sum <= m (larger sums are
      clamped to m).
    m: rows of lhs (static).
    block_m: rows per tile (static).
    num_local: L, groups held locally: group_offset .. group_offset + L - 1.
    group_offset: int scalar or None (0).
    align: tiles start at the multiple of `align` at or below their segment's
      first row (then every block_m rows); 1: at the segment's first row.

  Returns:
    RowTiles with T = num_tiles_bound(m, block_m, num_local, align) columns.
  """
  starts, ends = group_bounds(group_sizes, m, num_local, group_offset)
  # Segments: [0, first local start), each local group, [last local end, m).
  seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, ends[-1:]])
  seg_end = jnp.concatenate([starts[:1], ends, jnp.full((1,), m, jnp.int32)])
  seg_base = seg_start - seg_start % align          # first tile's first row
  seg_tiles = jnp.where(seg_end > seg_start,
                        (seg_end - seg_base + (block_m - 1)) // block_m, 0)
  cum = jnp.cumsum(seg_tiles)
  num_tiles = cum[-1]

  t_max = num_tiles_bound(m, block_m, num_local, align)
  t = jnp.arange(t_max, dtype=jnp.int32)
  num_segments = num_local + 2
  seg = jnp.minimum(jnp.searchsorted(cum, t, side="right").astype(jnp.int32),
                    num_segments - 1)
  valid = t < num_tiles
  start = seg_base[seg] + (t - (cum - seg_tiles)[seg]) * block_m
  lo = jnp.maximum(start, seg_start[seg])
  hi = jnp.minimum(start + block_m, seg_end[seg])
  compute = valid & (seg >= 1) & (seg <= num_local)
  group = jnp.where(compute, seg - 1, 0)
  lo = jnp.where(valid, lo, 0)
  hi = jnp.where(valid, hi, 0)
  start = jnp.where(valid, start, 0)
  table = jnp.stack([group, lo, hi, compute.astype(jnp.int32),
                     start]).astype(jnp.int32)
  return RowTiles(table=table, num_tiles=num_tiles.astype(jnp.int32))


def group_schedule(group_sizes: Array, m: int, num_local: int,
                   group_offset: Array | None = None) -> Array:
  """int32 [3, L]: rows (local group, start, end), largest group first (stable)."""
  starts, ends = group_bounds(group_sizes, m, num_local, group_offset)
  order = jnp.argsort(-(ends - starts), stable=True).astype(jnp.int32)
  return jnp.stack([order, starts[order], ends[order]]).astype(jnp.int32)
