"""The grouped matmul on CPU as loops of dense tile products: a backend of `ops`.

XLA:CPU runs `lax.ragged_dot` as about one dense product per group (every row
times every group's matrix, masked), so an MoE layer pays ~experts x its routed
FLOPs. This backend pays about the routed FLOPs: a `lax.scan` over the local
groups, and inside it a `lax.fori_loop` over the group's row tiles, each one
dense [block_m, k] x [k, n] XLA dot. The tiles are those of `tiling.row_tiles`
(align 1): a group's tiles start at its first row, every `block_m` rows, so a
tile never starts in another group; only the last tile of a group overhangs
(the waste: about L * block_m / 2 rows on average), which `default_block_m`
weighs against the loops' fixed cost per step.

* `gmm` (forward, and the input gradient with `transpose_rhs`): each tile
  product is written whole into a float32 output at the tile's first row
  (`dynamic_update_slice`, in place). Rows of the tile past its group's end
  belong to later groups, whose tiles come later and overwrite them (groups and
  tiles run in row order), or to no local group; one select after the loops
  zeroes every row outside the local groups (rows before them, of other groups,
  past sum(group_sizes)). So a non-finite value in one group's rows reaches only
  that group's output rows. lhs and the output get block_m rows of padding, so
  no tile is shifted (a `dynamic_slice` past the end would be).
* `tgmm` (weight gradient): per group, the float32 sum over its tiles of
  lhs_tile^T @ dy_tile, the tile's rows past the group's end selected to zero in
  both operands. An empty group runs no tile and gives zeros.

bfloat16 operands stay bfloat16: XLA:CPU (YNNPACK, AMX or AVX512-BF16) runs a
bf16 x bf16 dot with float32 accumulation ~3x faster than the float32 dot of
the same values on the 2-core Xeon of benchmarks/NOTES.md ("CPU: bf16 products"),
and the products of bf16 values are exact in float32, so the result differs from
float32 products only in summation order. float16 operands are cast to float32
once, before the loops (exact; float16 dots are slower than float32 ones there),
and so are bf16 operands with `CpuConfig(upcast=True)`, for CPUs whose bf16 dots
are slower. Every product accumulates in float32 (`preferred_element_type`); the
result is cast to the requested dtype at the end. The loops run in a fixed
order, one product at a time, so the result is the same bits on every run.

Buckets: each local group's first C = `bucket_rows(m, L)` rows
(`CpuConfig.bucket_factor` times the mean, a multiple of 8) are gathered into a
zero-padded bucket [L, C, .] and one batched XLA dot computes every group at once
(no per-tile cost; about bucket_factor x the routed FLOPs), the output gathered back
per row; the weight gradient gathers its left operand straight into [L, k, C]
(`_buckets_t`), the layout XLA:CPU's fast bf16 dots take. When a group holds more
than C rows, only its rows past the first C (the overflow) run the tile loops
above: the forward takes, row by row, the bucket's or the loops' output (the
loops' overhanging tile rows are never selected), the weight gradient adds both. `lax.cond` skips the loops when every group fits, so the result
never drops a row. Same precision policy; rows outside the local groups give zeros
and a group's non-finite rows reach only its own outputs, on either path.
(benchmarks/NOTES.md, "CPU buckets" and "buckets plus loops for the overflow".)

Where the loops do not pay -- one group in all, or fewer than
`MIN_ROWS_PER_GROUP` rows per group on average (decode: every group's weights
are read for one or two rows, and ragged_dot's dense products cost the same)
-- the products run on the "xla" backend (`lax.ragged_dot`), unless the config
says otherwise. `config` is a `CpuConfig` or None.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jmoe._src.gmm import tiling
from jmoe._src.gmm import xla

Array = jax.Array

FALLBACK = "xla"

# Below this many rows per group on average (m / len(group_sizes)), the "xla"
# backend runs the product (benchmarks/NOTES.md: at 2 rows per group ragged_dot
# is ~10% faster, at 8 the loops are ~3x faster).
MIN_ROWS_PER_GROUP = 4


def supports_dtype(dtype) -> bool:
  """16- and 32-bit floats; others (float64) run on `FALLBACK`."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize in (2, 4)


def supports_precision(precision, dtype) -> bool:
  """None or `lax.Precision` values; a `DotAlgorithm(Preset)` fixes the operand
  types, which the float32 cast would change: those run on `FALLBACK`."""
  del dtype
  if precision is None:
    return True
  values = precision if isinstance(precision, (tuple, list)) else (precision,)
  return all(p is None or isinstance(p, (lax.Precision, str)) for p in values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CpuConfig:
  """Options of the CPU backend (hashable: it travels in `ops.GmmOptions`).

  Attributes:
    block_m: rows per tile; None: `default_block_m(m, k, n, L)`. Clipped to m.
    loops: True: always the tile loops (or buckets); False: always "xla"; None:
      the loops where they pay (see the module docstring).
    bucket_factor: buckets of C = bucket_factor x (m / L) rows (rounded up to a
      multiple of 8, at most m) for every local group's first C rows, the tile
      loops for the rows past them; None: the loops only.
    upcast: True: bfloat16 operands are cast to float32 before the products
      (float16 always is); False: bf16 x bf16 products with float32
      accumulation (the faster ones where the CPU has AMX or AVX512-BF16).
  """

  block_m: int | None = None
  loops: bool | None = None
  bucket_factor: float | None = 1.25
  upcast: bool = False

  def __post_init__(self):
    if self.block_m is not None and (isinstance(self.block_m, bool)
                                     or not isinstance(self.block_m, int)
                                     or self.block_m < 1):
      raise ValueError(f"CpuConfig: block_m must be a positive int or None; got"
                       f" {self.block_m!r}.")
    if not isinstance(self.upcast, bool):
      raise ValueError(f"CpuConfig: upcast must be a bool; got {self.upcast!r}.")
    f = self.bucket_factor
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                          or not f > 0 or f != f or f == float("inf")):
      raise ValueError(f"CpuConfig: bucket_factor must be a finite number > 0 or"
                       f" None; got {f!r}.")


def bucket_rows(m: int, num_local: int, factor: float) -> int:
  """C, the static rows of one bucket: factor x m / L rounded up to a multiple
  of 8, clipped to [1, m]."""
  c = math.ceil(factor * m / max(num_local, 1))
  return max(1, min(-(-c // 8) * 8, m))


def default_block_m(m: int, k: int, n: int, num_local: int) -> int:
  """Rows per tile: the largest power of 2 <= m / (2 L), clamped to [16, 64]
  (at most m); the same for all three products.

  The unused part of each group's last tile (L * block_m / 2 rows on average)
  stays <= 1/4 of m (1/16 at cpu-tiny's 512 rows per group), and a tile is
  tall enough that a loop step's fixed cost and (weight gradient) its
  [k, n] accumulation stay below its product's. Measured on a 2-core Xeon
  (benchmarks/NOTES.md, "CPU grouped matmul"), in one sweep over m 1024-16384, k, n
  128-512, 8 and 64 groups, heights 16-512, this one was within ~10% of the
  fastest for every product at all but one shape (the forward at 1024 rows:
  13%).
  """
  del k, n
  target = max(1, m // (2 * num_local))
  bm = 16
  while bm * 2 <= min(target, 64):
    bm *= 2
  return min(bm, m)


# The config of products that pass none (benchmarks.cpu_step swaps it to compare
# settings on a whole training step, in a fresh process: it is read at trace time).
DEFAULT_CONFIG = CpuConfig()


def _config(config) -> CpuConfig:
  if config is None:
    return DEFAULT_CONFIG
  if not isinstance(config, CpuConfig):
    raise TypeError(f"gmm: the cpu backend's config must be a CpuConfig or None;"
                    f" got {type(config).__name__}.")
  return config


def loops_pay(m: int, num_groups: int) -> bool:
  """Whether the tile loops beat `lax.ragged_dot` on CPU (measured): at least
  two groups in all and `MIN_ROWS_PER_GROUP` rows per group on average."""
  return num_groups >= 2 and m >= MIN_ROWS_PER_GROUP * num_groups


def _use_loops(cfg: CpuConfig, m: int, group_sizes) -> bool:
  return loops_pay(m, group_sizes.shape[0]) if cfg.loops is None else cfg.loops


def _compute_dtype(dtype, precision, upcast: bool):
  """The products' operand dtype: float32 for float16 operands, and for bfloat16
  ones with `upcast`; otherwise the operands' own (a `precision` that is a dot
  algorithm never gets here: `supports_precision` sends it to FALLBACK)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(jnp.bfloat16) and not upcast:
    return dtype
  if dtype.itemsize < 4 and supports_precision(precision, dtype):
    return jnp.dtype(jnp.float32)
  return dtype


def _padded(x, block_m: int, dtype):
  """x [m, c] as `dtype`, with block_m zero rows appended (tiles may overhang
  row m)."""
  return jnp.pad(x.astype(dtype), ((0, block_m), (0, 0)))


def _bucket_rows_index(starts, ends, c: int, m: int):
  """[L, c] row indices of each local group's first c rows (clipped into
  [0, m)) and whether each is one of the group's rows."""
  idx = starts[:, None] + lax.iota(jnp.int32, c)[None, :]
  return jnp.minimum(idx, m - 1), idx < ends[:, None]


def _buckets(x, starts, ends, c: int, dtype):
  """[L, c, width]: local group l's rows of x [m, width] from its first row,
  zeros past its end (and rows of other groups never read)."""
  idx, valid = _bucket_rows_index(starts, ends, c, x.shape[0])
  rows = jnp.take(x.astype(dtype), idx, axis=0)
  return jnp.where(valid[..., None], rows, jnp.zeros((), dtype))


def _buckets_t(x, starts, ends, c: int, dtype):
  """[L, width, c]: `_buckets` transposed, gathered in that layout (the weight
  gradient's left operand: XLA:CPU runs [L, k, c] x [L, c, n] bf16 dots on its
  fast path, a contraction over the middle axis of [L, c, k] not)."""
  idx, valid = _bucket_rows_index(starts, ends, c, x.shape[0])
  cols = lax.iota(jnp.int32, x.shape[1])[None, :, None]
  rows = x.astype(dtype)[idx[:, None, :], cols]
  return jnp.where(valid[:, None, :], rows, jnp.zeros((), dtype))


def _unbucket(y, starts, ends, m: int, overflow=None):
  """y [L, c, n] -> [m, n]: row r of local group l is y[l, r - start_l] for its
  first c rows, overflow[r] (an [m, n] array) for the rest (without one, every
  group must fit in c rows); rows outside the local groups are zeros."""
  num_local, c, n = y.shape
  r = lax.iota(jnp.int32, m)
  g = jnp.clip(jnp.searchsorted(ends, r, side="right"), 0, num_local - 1)
  pos = r - starts[g]
  flat = jnp.clip(g * c + pos, 0, num_local * c - 1)
  out = jnp.take(y.reshape(num_local * c, n), flat, axis=0)
  if overflow is not None:
    out = jnp.where((pos >= c)[:, None], overflow, out)
  local = ((r >= starts[0]) & (r < ends[-1]))[:, None]
  return jnp.where(local, out, 0.0)


def _fits(starts, ends, c: int):
  return jnp.max(ends - starts) <= c


def _overflow_starts(starts, ends, c: int):
  """Each group's first row past its first c (its end when it has no more)."""
  return jnp.minimum(starts + c, ends)


def _num_tiles(start, end, block_m: int):
  """Tiles of block_m rows covering the rows [start, end) (0 when empty)."""
  return (end - start + block_m - 1) // block_m


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
        transpose_rhs: bool, out_dtype, precision, config=None) -> Array:
  """out[i] = lhs[i] @ rhs[l(i)] (rhs[l(i)]^T with transpose_rhs): [m, n]."""
  cfg = _config(config)
  m, k = lhs.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if not _use_loops(cfg, m, group_sizes):
    return xla.gmm(lhs, rhs, group_sizes, group_offset,
                   transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                   precision=precision)
  bm = min(cfg.block_m or default_block_m(m, k, n, num_local), m)
  cdt = _compute_dtype(lhs.dtype, precision, cfg.upcast)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  starts, ends = tiling.group_bounds(group_sizes, m, num_local, group_offset)

  if cfg.bucket_factor is None:
    out = _gmm_loops(lhs, rhs, starts, ends, bm, cdt, dims, precision, n)
  else:
    c = bucket_rows(m, num_local, cfg.bucket_factor)

    def products(lhs, rhs):  # [L, c, n]: every group's first c rows
      return lax.dot_general(_buckets(lhs, starts, ends, c, cdt), rhs.astype(cdt),
                             (((2,), (2 if transpose_rhs else 1,)), ((0,), (0,))),
                             precision=precision, preferred_element_type=jnp.float32)

    def buckets(lhs, rhs):
      return _unbucket(products(lhs, rhs), starts, ends, m)

    def buckets_and_loops(lhs, rhs):
      # A group's rows past its first c (the overflow) run the tile loops.
      # (_unbucket zeroes the rows outside the groups, so the loops need not.)
      rest = _gmm_loops(lhs, rhs, _overflow_starts(starts, ends, c), ends, bm,
                        cdt, dims, precision, n, zero_outside=False)
      return _unbucket(products(lhs, rhs), starts, ends, m, overflow=rest)

    out = lax.cond(_fits(starts, ends, c), buckets, buckets_and_loops, lhs, rhs)
  return out.astype(out_dtype)


def _gmm_loops(lhs, rhs, starts, ends, bm, cdt, dims, precision, n,
               zero_outside: bool = True):
  """The tile loops of `gmm`: float32 [m, n]. zero_outside=False leaves the rows
  outside [starts[0], ends[-1]) as the tiles wrote them (the caller masks)."""
  m = lhs.shape[0]
  lhs = _padded(lhs, bm, cdt)

  def group(out, xs):
    w, start, end = xs
    w = w.astype(cdt)

    def tile(j, out):
      row = start + j * bm
      y = lax.dot_general(lax.dynamic_slice_in_dim(lhs, row, bm, 0), w, dims,
                          precision=precision,
                          preferred_element_type=jnp.float32)
      # The whole tile (see the module docstring). A float32 update straight
      # from the dot keeps the write in place: a cast fused into it would make
      # XLA:CPU rewrite the whole output every step.
      return lax.dynamic_update_slice_in_dim(out, y, row, 0)

    return lax.fori_loop(0, _num_tiles(start, end, bm), tile, out), None

  out = lax.scan(group, jnp.zeros((m + bm, n), jnp.float32),
                 (rhs, starts, ends))[0][:m]
  if not zero_outside:
    return out
  rows = lax.iota(jnp.int32, m)[:, None]
  local = (rows >= starts[0]) & (rows < ends[-1])
  return jnp.where(local, out, 0.0)


def tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
         num_local: int, out_dtype, precision, config=None) -> Array:
  """out[l] = lhs[rows of local group l]^T @ dy[same rows]: [L, k, n]."""
  cfg = _config(config)
  m, k = lhs.shape
  n = dy.shape[1]
  if not _use_loops(cfg, m, group_sizes):
    return xla.tgmm(lhs, dy, group_sizes, group_offset, num_local=num_local,
                    out_dtype=out_dtype, precision=precision)
  bm = min(cfg.block_m or default_block_m(m, k, n, num_local), m)
  cdt = _compute_dtype(lhs.dtype, precision, cfg.upcast)
  starts, ends = tiling.group_bounds(group_sizes, m, num_local, group_offset)

  if cfg.bucket_factor is None:
    out = _tgmm_loops(lhs, dy, starts, ends, bm, cdt, precision)
  else:
    c = bucket_rows(m, num_local, cfg.bucket_factor)

    def buckets(lhs, dy):  # every group's first c rows
      return lax.dot_general(
          _buckets_t(lhs, starts, ends, c, cdt), _buckets(dy, starts, ends, c, cdt),
          (((2,), (1,)), ((0,), (0,))), precision=precision,
          preferred_element_type=jnp.float32)

    def buckets_and_loops(lhs, dy):  # + the tile loops over the overflow rows
      return buckets(lhs, dy) + _tgmm_loops(
          lhs, dy, _overflow_starts(starts, ends, c), ends, bm, cdt, precision)

    out = lax.cond(_fits(starts, ends, c), buckets, buckets_and_loops, lhs, dy)
  return out.astype(out_dtype)


def _tgmm_loops(lhs, dy, starts, ends, bm, cdt, precision):
  """The tile loops of `tgmm`: float32 [L, k, n]."""
  k, n = lhs.shape[1], dy.shape[1]
  lhs, dy = _padded(lhs, bm, cdt), _padded(dy, bm, cdt)
  zero = jnp.zeros((), cdt)

  def group(_, bounds):
    start, end = bounds

    def tile(j, acc):
      row = start + j * bm
      keep = (row + lax.iota(jnp.int32, bm) < end)[:, None]
      x = jnp.where(keep, lax.dynamic_slice_in_dim(lhs, row, bm, 0), zero)
      d = jnp.where(keep, lax.dynamic_slice_in_dim(dy, row, bm, 0), zero)
      return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())),
                                   precision=precision,
                                   preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, _num_tiles(start, end, bm), tile,
                        jnp.zeros((k, n), jnp.float32))
    return None, acc

  # float32 outputs of the scan, cast once after it (by the caller): a cast
  # inside the body would fuse into the scan's write of its output, which
  # XLA:CPU then emits as a pass over the whole [L, k, n] buffer per group.
  return lax.scan(group, None, (starts, ends))[1]
