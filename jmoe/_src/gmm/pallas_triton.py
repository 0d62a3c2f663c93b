"""Pallas-Triton kernels of the grouped matmul: a backend of `ops`.

Three products, two kernels:

* `_gmm_kernel` -- forward out = gmm(lhs, rhs) and, with the static flag
  `transpose_rhs`, the input gradient dlhs = gmm(dy, rhs^T) read straight from rhs
  (rhs^T is never written to HBM). Launch grid: one program per (row-tile visit,
  column tile), 1-D and swizzled so that bands of 8 consecutive visits walk the
  column tiles together (operand tiles stay in L2). Each program reads its visit
  from the `tiling.row_tiles` table (a tile of block_m rows starting at its
  group's first row or a multiple of block_m past it), runs a K loop over
  [block_m, block_k] x [block_k, block_n] tiles into a float32 accumulator, and
  stores only the rows [lo, hi) it owns (row-masked loads and store). Visits of
  the rows outside the local groups skip the loop and store zeros, so every output
  row is written exactly once.
* `_tgmm_kernel` -- weight gradient drhs[g] = lhs[rows_g]^T @ dy[rows_g]. Grid:
  (output tiles of [k, n], swizzled) x (local groups, largest first). Each program
  loops over its group's rows in chunks of block_m (row-masked loads, so a chunk
  never mixes groups); an empty group runs zero steps and stores zeros.

The kernels hold no routing logic: `tiling.py` builds their metadata with a cumsum,
under jit, static shapes. Both operands arrive in one dtype (`ops` promotes them;
bf16 x bf16 or f32 x f32 on the tensor cores), accumulation is float32, and the
result is cast to the requested dtype at the store. Any k and n: the loads and
stores of a tile overhanging k, n or the owned rows are masked (nothing is padded
in HBM).

This module holds the kernels, their `pallas_call` wrappers (`gmm_call`,
`tgmm_call`, which the autotuner in benchmarks/gmm.py launches directly) and the
backend interface of `ops` (`gmm`, `tgmm`, `supports_dtype`,
`supports_precision`, `FALLBACK`), whose
`config` is a `GmmConfig`, a `TritonConfig` or None (tuned table or heuristic).
Differentiation, vmap, shard_map typing and dtype promotion are `ops`'s.

`interpret=True` runs the same kernels on CPU (tests; `implementation=
"pallas_interpret"`); the Triton compiler parameters (num_warps, num_stages) are
ignored there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jmoe._src.gmm import tiling
from jmoe._src.gmm.config import GmmConfig, fit_to_shape, select_config

Array = jax.Array

# Consecutive row-tile visits (gmm) / output row tiles (tgmm) per swizzle band.
_SWIZZLE = 8


def _compiler_params(cfg: GmmConfig):
  """Triton compiler parameters: `CompilerParams` in jax >= 0.6 (0.10, 0.11),
  `TritonCompilerParams` before."""
  cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
  return cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _swizzle(pid, rows: int, cols: int, group: int):
  """pid in [0, rows*cols) -> (r, c): r fastest inside bands of `group` rows."""
  width = group * cols
  band = lax.div(pid, jnp.int32(width))
  first = band * group
  band_rows = jnp.minimum(jnp.int32(rows) - first, jnp.int32(group))
  rem = lax.rem(pid, jnp.int32(width))
  return first + lax.rem(rem, band_rows), lax.div(rem, band_rows)


def _mask2(rows, cols):
  """Outer AND of two optional 1-D masks: a broadcastable 2-D mask, or None."""
  if rows is None and cols is None:
    return None
  if rows is None:
    return cols[None, :]
  if cols is None:
    return rows[:, None]
  return rows[:, None] & cols[None, :]


def _load(ref, mask, shape):
  if mask is None:
    return plt.load(ref)
  return plt.load(ref, mask=jnp.broadcast_to(mask, shape), other=0.0)


def _store(ref, val, mask):
  if mask is None:
    plt.store(ref, val)
  else:
    plt.store(ref, val, mask=jnp.broadcast_to(mask, val.shape))


# ----------------------------------------------------------------------------
# Kernels


def _gmm_kernel(table_ref, lhs_ref, rhs_ref, *rest, bm: int, bn: int, bk: int,
                kdim: int, n: int, num_t: int, transpose_rhs: bool, compute_dtype,
                precision):
  out_ref = rest[-1]  # rest = (out,) or (poisoned init aliased to out, out)
  num_n = pl.cdiv(n, bn)
  t, j = _swizzle(pl.program_id(0), num_t, num_n, _SWIZZLE)
  group = table_ref[tiling.GROUP, t]
  lo = table_ref[tiling.LO, t]
  hi = table_ref[tiling.HI, t]
  compute = table_ref[tiling.COMPUTE, t]

  # The tile is rows lo .. lo + bm (any alignment); the visit owns [lo, hi).
  col0 = j * bn
  rows = lo + jnp.arange(bm, dtype=jnp.int32)
  cols = col0 + jnp.arange(bn, dtype=jnp.int32)
  own = rows < hi                    # also keeps the loads inside [0, m)
  col_in = cols < n if n % bn else None
  k_ragged = kdim % bk != 0
  num_k = pl.cdiv(kdim, bk)

  def body(kk, acc):
    k0 = kk * bk
    k_in = (k0 + jnp.arange(bk, dtype=jnp.int32)) < kdim if k_ragged else None
    a = _load(lhs_ref.at[pl.ds(lo, bm), pl.ds(k0, bk)], _mask2(own, k_in),
              (bm, bk)).astype(compute_dtype)
    if transpose_rhs:  # rhs[g] is [n, kdim]: read its [bn, bk] tile, contract dim 1
      b = _load(rhs_ref.at[group, pl.ds(col0, bn), pl.ds(k0, bk)],
                _mask2(col_in, k_in), (bn, bk)).astype(compute_dtype)
      dims = (((1,), (1,)), ((), ()))
    else:              # rhs[g] is [kdim, n]: read its [bk, bn] tile
      b = _load(rhs_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)],
                _mask2(k_in, col_in), (bk, bn)).astype(compute_dtype)
      dims = (((1,), (0,)), ((), ()))
    return acc + lax.dot_general(a, b, dims, precision=precision,
                                 preferred_element_type=jnp.float32)

  steps = jnp.where(compute != 0, jnp.int32(num_k), jnp.int32(0))
  acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  _store(out_ref.at[pl.ds(lo, bm), pl.ds(col0, bn)], acc.astype(out_ref.dtype),
         _mask2(own, col_in))


def _tgmm_kernel(sched_ref, lhs_ref, dy_ref, *rest, bm: int, bk: int, bn: int,
                 kdim: int, n: int, compute_dtype, precision):
  out_ref = rest[-1]
  num_kt, num_nt = pl.cdiv(kdim, bk), pl.cdiv(n, bn)
  i, j = _swizzle(pl.program_id(0), num_kt, num_nt, _SWIZZLE)
  slot = pl.program_id(1)  # groups run largest first (tiling.group_schedule)
  g = sched_ref[0, slot]
  start = sched_ref[1, slot]
  end = sched_ref[2, slot]
  k0 = i * bk
  n0 = j * bn
  k_in = (k0 + jnp.arange(bk, dtype=jnp.int32)) < kdim if kdim % bk else None
  n_in = (n0 + jnp.arange(bn, dtype=jnp.int32)) < n if n % bn else None

  def body(s, acc):
    r0 = start + s * bm
    r_in = (r0 + jnp.arange(bm, dtype=jnp.int32)) < end
    a = _load(lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], _mask2(r_in, k_in),
              (bm, bk)).astype(compute_dtype)
    b = _load(dy_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], _mask2(r_in, n_in),
              (bm, bn)).astype(compute_dtype)
    return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                 precision=precision,
                                 preferred_element_type=jnp.float32)

  steps = lax.div(jnp.maximum(end - start, 0) + (bm - 1), jnp.int32(bm))
  acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
  _store(out_ref.at[g, pl.ds(k0, bk), pl.ds(n0, bn)], acc.astype(out_ref.dtype),
         _mask2(k_in, n_in))


# ----------------------------------------------------------------------------
# pallas_call wrappers


def _poison(shape, dtype):
  return jnp.full(shape, jnp.nan if jnp.issubdtype(dtype, jnp.floating) else -1,
                  dtype)


def gmm_call(lhs: Array, rhs: Array, table: Array, *, transpose_rhs: bool,
             out_dtype, cfg: GmmConfig, compute_dtype, precision=None,
             interpret: bool = False, poison: bool = False) -> Array:
  """One launch of the forward kernel over the visits of `table` (row_tiles).

  lhs: [m, kdim]; rhs: [L, kdim, n] (or [L, n, kdim] with transpose_rhs);
  table: int32 [4, T] from `tiling.row_tiles(..., block_m=cfg.block_m)`.
  Returns [m, n] in out_dtype. `poison` (tests) starts the output from NaN, so a
  row no visit writes shows up.
  """
  m, kdim = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  num_t = table.shape[1]
  kernel = functools.partial(
      _gmm_kernel, bm=cfg.block_m, bn=cfg.block_n, bk=cfg.block_k, kdim=kdim,
      n=n, num_t=num_t, transpose_rhs=transpose_rhs,
      compute_dtype=compute_dtype, precision=precision)
  args = [table, lhs, rhs]
  aliases = {}
  if poison:
    args.append(_poison((m, n), out_dtype))
    aliases = {3: 0}
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_t * pl.cdiv(n, cfg.block_n),),
      input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg),
      interpret=interpret,
      name="jmoe_gmm_t" if transpose_rhs else "jmoe_gmm",
  )(*args)


def tgmm_call(lhs: Array, dy: Array, schedule: Array, *, out_dtype,
              cfg: GmmConfig, compute_dtype, precision=None,
              interpret: bool = False, poison: bool = False) -> Array:
  """One launch of the weight-gradient kernel.

  lhs: [m, k]; dy: [m, n]; schedule: int32 [3, L] (group; start; end) from
  `tiling.group_schedule`. Returns [L, k, n] in out_dtype.
  """
  _, kdim = lhs.shape
  n = dy.shape[1]
  num_local = schedule.shape[1]
  kernel = functools.partial(
      _tgmm_kernel, bm=cfg.block_m, bk=cfg.block_k, bn=cfg.block_n, kdim=kdim,
      n=n, compute_dtype=compute_dtype, precision=precision)
  out_shape = (num_local, kdim, n)
  args = [schedule, lhs, dy]
  aliases = {}
  if poison:
    args.append(_poison(out_shape, out_dtype))
    aliases = {3: 0}
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(pl.cdiv(kdim, cfg.block_k) * pl.cdiv(n, cfg.block_n), num_local),
      input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg),
      interpret=interpret,
      name="jmoe_tgmm",
  )(*args)


# ----------------------------------------------------------------------------
# The backend interface of `ops` (see `ops.Backend`).

FALLBACK = "xla"  # operand dtypes (float64, integers, ...) and dot algorithms
                  # the kernels do not take go to XLA
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports_dtype(dtype) -> bool:
  return jnp.dtype(dtype) in _DTYPES


# The dot algorithms Pallas-Triton lowers (jax/_src/pallas/triton/lowering.py);
# `lax.Precision` pairs choose TF32 or IEEE float32 products there.
_PRESETS = frozenset(getattr(lax.DotAlgorithmPreset, name) for name in (
    "DEFAULT", "TF32_TF32_F32", "TF32_TF32_F32_X3", "F32_F32_F32",
    "F16_F16_F16", "F16_F16_F32", "BF16_BF16_BF16", "BF16_BF16_F32",
    "BF16_BF16_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X9"))


def supports_precision(precision, dtype) -> bool:
  """None, `lax.Precision` pairs and the presets above, honoured by the kernels'
  `lax.dot_general` (in the interpreter, by XLA's, which refuses what the CPU
  lacks); other algorithms run on FALLBACK."""
  del dtype
  return (precision is None or isinstance(precision, tuple)
          or isinstance(precision, lax.DotAlgorithmPreset)
          and precision in _PRESETS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TritonConfig:
  """This backend's `config` value, when more than the tiles is wanted.

  Attributes:
    tiles: the kernel's tiles, or None to select them (`config.select_config`).
    poison_outputs: testing aid: the output starts as NaN instead of uninitialized
      memory, so rows (or empty groups) a kernel fails to write are caught.
  """

  tiles: GmmConfig | None = None
  poison_outputs: bool = False


def _resolve(config, op: str, m: int, k: int, n: int, num_local: int, dtype,
             interpret: bool) -> tuple[GmmConfig, bool]:
  """(tiles fitted to the kernel view m, k, n, poison) from a `config` value:
  None, a `GmmConfig` or a `TritonConfig`."""
  if config is None or isinstance(config, GmmConfig):
    config = TritonConfig(tiles=config)
  if not isinstance(config, TritonConfig):
    raise TypeError(f"pallas_triton: config must be None, a GmmConfig or a"
                    f" TritonConfig; got {config!r}.")
  if config.tiles is None:
    tiles = select_config(op, m, k, n, num_local, dtype, interpret=interpret)
  else:
    tiles = fit_to_shape(config.tiles, op, m, k, n)
  return tiles, config.poison_outputs


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
        transpose_rhs: bool, out_dtype, precision, config=None,
        interpret: bool = False) -> Array:
  """The forward kernel ("gmm") or, with transpose_rhs, the input-gradient kernel
  ("gmm_t"), over `tiling.row_tiles`. `config`: see `_resolve`."""
  m, k = lhs.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  op = "gmm_t" if transpose_rhs else "gmm"
  cfg, poison = _resolve(config, op, m, k, n, num_local, lhs.dtype, interpret)
  tiles = tiling.row_tiles(group_sizes, m, cfg.block_m, num_local, group_offset)
  return gmm_call(lhs, rhs, tiles.table, transpose_rhs=transpose_rhs,
                  out_dtype=out_dtype, cfg=cfg, compute_dtype=lhs.dtype,
                  precision=precision, interpret=interpret, poison=poison)


def tgmm(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
         num_local: int, out_dtype, precision, config=None,
         interpret: bool = False) -> Array:
  """The weight-gradient kernel over `tiling.group_schedule`."""
  m, k = lhs.shape
  n = dy.shape[1]
  cfg, poison = _resolve(config, "tgmm", m, k, n, num_local, lhs.dtype, interpret)
  schedule = tiling.group_schedule(group_sizes, m, num_local, group_offset)
  return tgmm_call(lhs, dy, schedule, out_dtype=out_dtype, cfg=cfg,
                   compute_dtype=lhs.dtype, precision=precision,
                   interpret=interpret, poison=poison)
