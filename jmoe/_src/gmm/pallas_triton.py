"""Pallas-Triton kernels of the grouped matmul and their `custom_vjp` wiring.

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
under jit, static shapes. Operands are cast to a common compute dtype after the load
(bf16 x bf16 or f32 x f32 on the tensor cores), accumulation is float32, and the
result is cast to the requested dtype at the store.

`interpret=True` runs the same kernels on CPU (tests); the Triton compiler parameters
(num_warps, num_stages) are ignored there.
"""

from __future__ import annotations

import dataclasses
import contextlib
import functools
from typing import Any

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


def _out_struct(shape, dtype, operands) -> tuple[jax.ShapeDtypeStruct, list]:
  """The output type of a launch, and its operands, made shard_map-aware.

  Under `shard_map(check_vma=True)` (jmoe.parallel) a pallas_call must say over
  which manual mesh axes its output varies: the union of its operands' axes. The
  operands are cast to vary over that union too, so the kernel sees one type.
  Outside shard_map the union is empty and nothing changes.
  """
  varying = frozenset()
  for x in operands:
    mat = getattr(jax.typeof(x), "mat", None)
    if mat is not None:
      varying |= frozenset(mat.varying)
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype), list(operands)
  axes = tuple(sorted(varying))
  cast = []
  for x in operands:
    missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
    cast.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
  mat = jax.sharding.ManualAxisType(varying=varying)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat), cast


def _interpret_vma(interpret: bool):
  """The interpreter evaluates the kernel body as ordinary JAX ops, under the
  ambient shard_map's varying-axes check; compiled kernels are traced with that
  check off (pallas does so itself). Do the same for the interpreter, so CPU tests
  run the kernels inside jmoe.parallel exactly as the GPU does."""
  if not interpret:
    return contextlib.nullcontext()
  from jax._src import config as jax_config  # noqa: PLC0415
  return jax_config._check_vma(False)



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
  out_struct, args = _out_struct((m, n), out_dtype, args)
  with _interpret_vma(interpret):
    return pl.pallas_call(
        kernel,
        out_shape=out_struct,
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
  out_struct, args = _out_struct(out_shape, out_dtype, args)
  with _interpret_vma(interpret):
    return pl.pallas_call(
        kernel,
        out_shape=out_struct,
        grid=(pl.cdiv(kdim, cfg.block_k) * pl.cdiv(n, cfg.block_n), num_local),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="jmoe_tgmm",
    )(*args)


# ----------------------------------------------------------------------------
# custom_vjp


@dataclasses.dataclass(frozen=True)
class _Static:
  out_dtype: Any
  compute_dtype: Any
  precision: Any
  cfg: GmmConfig
  cfg_t: GmmConfig
  cfg_tgmm: GmmConfig
  interpret: bool
  poison: bool


def _forward(lhs, rhs, group_sizes, group_offset, st: _Static):
  m = lhs.shape[0]
  tiles = tiling.row_tiles(group_sizes, m, st.cfg.block_m, rhs.shape[0],
                           group_offset)
  return gmm_call(lhs, rhs, tiles.table, transpose_rhs=False,
                  out_dtype=st.out_dtype, cfg=st.cfg,
                  compute_dtype=st.compute_dtype, precision=st.precision,
                  interpret=st.interpret, poison=st.poison)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, st: _Static):
  return _forward(lhs, rhs, group_sizes, group_offset, st)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, st: _Static):
  out = _forward(lhs, rhs, group_sizes, group_offset, st)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(st: _Static, res, dy):
  lhs, rhs, group_sizes, group_offset = res
  m = lhs.shape[0]
  num_local = rhs.shape[0]
  tiles = tiling.row_tiles(group_sizes, m, st.cfg_t.block_m, num_local,
                           group_offset)
  dlhs = gmm_call(dy, rhs, tiles.table, transpose_rhs=True, out_dtype=lhs.dtype,
                  cfg=st.cfg_t, compute_dtype=st.compute_dtype,
                  precision=st.precision, interpret=st.interpret,
                  poison=st.poison)
  schedule = tiling.group_schedule(group_sizes, m, num_local, group_offset)
  drhs = tgmm_call(lhs, dy, schedule, out_dtype=rhs.dtype,
                   cfg=st.cfg_tgmm, compute_dtype=st.compute_dtype,
                   precision=st.precision, interpret=st.interpret,
                   poison=st.poison)
  return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_pallas(lhs: Array, rhs: Array, group_sizes: Array, *,
               group_offset: Array | None = None, preferred_element_type=None,
               precision=None, interpret: bool = False,
               config: GmmConfig | None = None,
               config_t: GmmConfig | None = None,
               config_tgmm: GmmConfig | None = None,
               poison_outputs: bool = False) -> Array:
  """Grouped matmul on the Pallas-Triton kernels; differentiable in lhs and rhs.

  Semantics of `jmoe.gmm` (which validates the arguments and calls this).

  Args:
    lhs: [m, k] rows sorted by group.
    rhs: [L, k, n], the local groups group_offset .. group_offset + L - 1.
    group_sizes: int [G] rows per group (all groups).
    group_offset: int scalar or None.
    preferred_element_type: output dtype (default: result type of the inputs);
      accumulation is float32.
    precision: passed to the in-kernel dots (f32 inputs on GPU: None/DEFAULT is
      TF32, HIGHEST is full f32).
    interpret: run the kernels in the Pallas interpreter (CPU).
    config, config_t, config_tgmm: tiles of the forward, input-gradient and
      weight-gradient kernels; None selects (`config.select_config`).
    poison_outputs: testing aid: kernel outputs start as NaN instead of
      uninitialized memory, so rows a kernel fails to write are caught.

  Returns:
    [m, n] in preferred_element_type.
  """
  m, k = lhs.shape
  num_local, _, n = rhs.shape
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  if min(m, k, n, num_local) == 0:
    # Nothing to multiply (no rows, columns, contraction or local groups): zeros,
    # whose gradients are zeros too.
    return jnp.zeros((m, n), out_dtype)

  def pick(given, op, mm, kk, nn):
    if given is not None:
      return fit_to_shape(given, op, mm, kk, nn)
    return select_config(op, mm, kk, nn, num_local, compute_dtype,
                         interpret=interpret)

  st = _Static(
      out_dtype=out_dtype, compute_dtype=compute_dtype, precision=precision,
      cfg=pick(config, "gmm", m, k, n),
      cfg_t=pick(config_t, "gmm_t", m, n, k),
      cfg_tgmm=pick(config_tgmm, "tgmm", m, k, n),
      interpret=bool(interpret), poison=bool(poison_outputs))
  return _gmm(lhs, rhs, group_sizes, group_offset, st)
