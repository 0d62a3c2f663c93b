"""Unit tests of the grouped-matmul kernel metadata (`jmoe._src.gmm.tiling`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmoe._src.gmm import tiling
from jmoe._src.gmm.reference import group_ids

M, BM = 50, 8


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5))
def _tiles(group_sizes, m, block_m, num_local, group_offset=None, align=1):
  return tiling.row_tiles(group_sizes, m, block_m, num_local, group_offset,
                          align=align)


def check_tiles(group_sizes, m, block_m, num_local, offset, align=1):
  """Every row is owned by exactly one visit, with the right group, in row order;
  tiles start at their segment's first row (or a multiple of block_m past it)."""
  gs = np.asarray(group_sizes)
  off = None if offset is None else jnp.int32(offset)
  tiles = _tiles(jnp.asarray(gs, jnp.int32), m, block_m, num_local, off, align)
  table = np.asarray(tiles.table)
  n_used = int(tiles.num_tiles)
  t_max = tiling.num_tiles_bound(m, block_m, num_local, align)
  assert table.shape == (5, t_max)
  assert 0 < n_used <= t_max
  group, lo, hi, compute, start = table
  if align > 1:
    return check_aligned(table, n_used, gs, m, block_m, num_local, offset, align)
  np.testing.assert_array_equal(start, lo)
  owner = np.full(m, -1)
  for t in range(t_max):
    if t >= n_used:  # padding: owns nothing, computes nothing
      assert lo[t] == hi[t] and compute[t] == 0, (t, table[:, t])
      continue
    assert 0 <= lo[t] < hi[t] <= min(m, lo[t] + block_m), table[:, t]
    assert (owner[lo[t]:hi[t]] == -1).all(), "a row is owned twice"
    owner[lo[t]:hi[t]] = t
  assert (owner >= 0).all(), "a row is owned by no visit"
  assert np.all(np.diff(owner) >= 0), "visits are not in row order"
  # The group of each row, as the reference defines it.
  gid = np.asarray(group_ids(jnp.asarray(gs, jnp.int32), m)) - (offset or 0)
  local = (gid >= 0) & (gid < num_local)
  np.testing.assert_array_equal(compute[owner], local.astype(np.int32))
  np.testing.assert_array_equal(group[owner][local], gid[local])
  # Segments: before the local groups (-1), each local group, after (num_local).
  seg = np.where(local, gid, np.where(gid < 0, -1, num_local))
  bounds = np.flatnonzero(np.diff(seg)) + 1
  seg_starts = np.concatenate([[0], bounds])
  seg_sizes = np.diff(np.concatenate([seg_starts, [m]]))
  # Tight count: ceil(size / block_m) visits per segment, starting at its first row.
  assert n_used == int(sum(-(-s // block_m) for s in seg_sizes))
  for t in range(n_used):
    s0 = seg_starts[np.searchsorted(seg_starts, lo[t], side="right") - 1]
    assert (lo[t] - s0) % block_m == 0, (t, lo[t], s0)
  return table, n_used


def test_simple_layout():
  # groups: [0,5) [5,5) [5,20) [20,21); rows 21..49 past the total.
  table, n = check_tiles([5, 0, 15, 1], M, BM, 4, None)
  group, lo, hi, compute, _ = table[:, :n]
  assert lo.tolist() == [0, 5, 13, 20, 21, 29, 37, 45]
  assert hi.tolist() == [5, 13, 20, 21, 29, 37, 45, 50]
  assert group.tolist()[:4] == [0, 2, 2, 3]
  assert compute.tolist() == [1] * 4 + [0] * 4  # rows 21..49 write zeros


@pytest.mark.parametrize("sizes", [
    [0, 0, 0, 0],          # nothing routed: all rows are tail zeros
    [M, 0, 0, 0],          # all rows in the first group
    [0, 0, 0, M],          # all rows in the last group
    [8, 8, 8, 26],         # boundaries on tile edges
    [3, 0, 0, 4],          # sum < m
    [60, 0, 0, 0],         # sum > m: clamped
])
def test_edge_cases(sizes):
  check_tiles(sizes, M, BM, 4, None)


@pytest.mark.parametrize("offset", [0, 1, 3, 5])
def test_group_offset(offset):
  sizes = [7, 9, 0, 12, 3, 6, 2]  # 7 groups in all, 2 local
  table, n = check_tiles(sizes, M, BM, 2, offset)
  if offset == 1:  # local groups 1, 2 = rows [7, 16): rows before and after zero
    owned = [(lo, hi) for lo, hi, c in zip(table[1, :n], table[2, :n], table[3, :n])
             if c]
    assert sum(h - l for l, h in owned) == 9


def test_group_bounds():
  gs = jnp.array([4, 0, 6, 5], jnp.int32)
  s, e = jax.jit(tiling.group_bounds, static_argnums=(1, 2))(gs, 12, 4)
  assert s.tolist() == [0, 4, 4, 10] and e.tolist() == [4, 4, 10, 12]  # clamped
  s, e = jax.jit(tiling.group_bounds, static_argnums=(1, 2))(gs, 20, 2,
                                                             jnp.int32(2))
  assert s.tolist() == [4, 10] and e.tolist() == [10, 15]
  s, e = jax.jit(tiling.group_bounds, static_argnums=(1, 2))(gs, 20, 2,
                                                             jnp.int32(3))
  assert s.tolist() == [10, 15] and e.tolist() == [15, 15]  # past G: empty


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=5, max_size=5),
       st.sampled_from([None, 0, 1, 2, 3]))
def test_fuzz(sizes, offset):
  sizes = np.asarray(sizes)
  if sizes.sum() > M:  # keep the documented contract sum <= m
    sizes = (sizes * M) // sizes.sum()
  num_local = 5 if offset is None else 2
  check_tiles(sizes, M, BM, num_local, offset)


def test_bound_holds_in_a_bad_case():
  # Worst case: every segment one row longer than a tile multiple.
  # 10 groups of 9 rows, 3 tail rows: 2 visits each + 1 = 21 = cdiv(93, 8) + 10 - 1.
  _, n = check_tiles([9] * 10, 93, 8, 10, None)
  assert n == 21 <= tiling.num_tiles_bound(93, 8, 10)


def test_decode_reads_each_group_once():
  # Groups that fit a tile take one visit each, wherever they start.
  table, n = check_tiles([30, 33, 0, 31, 34, 29, 32, 35], 256, 64, 8, None)
  assert n == 7 + 1  # 7 non-empty groups + 2 tail rows
  assert table[3, :n].tolist() == [1] * 7 + [0]


def test_group_schedule_largest_first():
  gs = jnp.array([3, 9, 0, 9, 20, 1], jnp.int32)
  sched = np.asarray(jax.jit(tiling.group_schedule, static_argnums=(1, 2))(
      gs, 50, 4, jnp.int32(1)))  # local groups 1..4: sizes 9, 0, 9, 20
  assert sched[0].tolist() == [3, 0, 2, 1]  # 20, 9, 9 (stable), 0
  starts, ends = sched[1], sched[2]
  assert (ends - starts).tolist() == [20, 9, 9, 0]
  assert starts.tolist()[:3] == [21, 3, 12]


def check_aligned(table, n_used, gs, m, block_m, num_local, offset, align):
  """align > 1: tiles start on multiples of `align`, at most align - 1 rows before
  the first row their segment owns; otherwise the same ownership as align = 1."""
  group, lo, hi, compute, start = table
  ref_table, ref_n = check_tiles(gs, m, block_m, num_local, offset)
  owner = np.full(m, -1)
  for t in range(table.shape[1]):
    if t >= n_used:
      assert lo[t] == hi[t] and compute[t] == 0, (t, table[:, t])
      continue
    assert start[t] % align == 0, table[:, t]
    assert start[t] <= lo[t] < hi[t] <= min(m, start[t] + block_m), table[:, t]
    assert lo[t] - start[t] < align or lo[t] == start[t], table[:, t]
    assert (owner[lo[t]:hi[t]] == -1).all(), "a row is owned twice"
    owner[lo[t]:hi[t]] = t
  assert (owner >= 0).all(), "a row is owned by no visit"
  assert np.all(np.diff(owner) >= 0), "visits are not in row order"
  # Same group and compute flag per row as the align = 1 table.
  ref_owner = np.concatenate([np.full(h - l, t) for t, (l, h) in enumerate(
      zip(ref_table[1, :ref_n], ref_table[2, :ref_n]))])
  np.testing.assert_array_equal(compute[owner], ref_table[3][ref_owner])
  np.testing.assert_array_equal(group[owner], ref_table[0][ref_owner])
  return table, n_used


@pytest.mark.parametrize("align", [2, 8])
@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=5, max_size=5),
       offset=st.sampled_from([None, 0, 1, 3]))
def test_fuzz_aligned(align, sizes, offset):
  sizes = np.asarray(sizes)
  if sizes.sum() > M:
    sizes = (sizes * M) // sizes.sum()
  num_local = 5 if offset is None else 2
  check_tiles(sizes, M, BM, num_local, offset, align)


def test_aligned_simple_layout():
  # groups: [0,5) [5,5) [5,20) [20,21); align 4: group 2's tiles start at 4, 12.
  table, n = check_tiles([5, 0, 15, 1], M, BM, 4, None, align=4)
  group, lo, hi, compute, start = table[:, :n]
  assert start.tolist()[:4] == [0, 4, 12, 20]
  assert lo.tolist()[:4] == [0, 5, 12, 20]
  assert hi.tolist()[:4] == [5, 12, 20, 21]

