"""Mosaic-GPU (Pallas `plgpu`) kernel of the row gather-sum for Hopper (sm_90).

    out[t] = sum_j rows[idx[t, j]]      (zeros where idx[t, j] is outside [0, R))

The permute backward (`jmoe.permute`'s token gradient: a token's k expert rows
summed) is this product. XLA runs it as one reduction fusion over a gathered
[T, k, D] at about half the HBM roofline (benchmarks/NOTES.md); here every row
is one TMA copy and the sum is one pass over shared memory.

Layout: rows [R, D] are viewed as [R, D // c, c] (c <= 256, TMA's largest box
side), so one TMA box [1, nc, c] brings a whole row slab of nc * c columns. A CTA
(one warpgroup) owns `block_t` tokens x `block_c` column chunks: it issues the
block_t * k row copies onto one barrier (a row index outside [0, R) is a box
wholly out of bounds, which TMA fills with zeros), sums the k slabs in float32 in
registers, writes the result to shared memory and stores it with one TMA copy
(which clips the rows past T of the last token block). Occupancy hides the
latency: a CTA holds k * block_t * block_c * c elements of shared memory and
several run per SM.

The kernel holds no routing logic: `idx` is whatever the caller's plan says.
Mosaic GPU has no CPU interpreter; the kernel is tested on the GPU (`gpu` marker).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_MAX_BOX = 256          # TMA box side limit (elements)
_SMEM_BUDGET = 48 * 1024  # bytes of row slabs per CTA (several CTAs per SM)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatherSumConfig:
  """Block of one CTA: `block_t` tokens x `block_c` chunks of `chunk` columns."""

  chunk: int
  block_c: int
  block_t: int


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415
  return plgpu


def config_for(num_tokens: int, k: int, d: int, dtype) -> GatherSumConfig | None:
  """The default block for [T, k] x [R, D], or None where the kernel does not
  apply (D not a multiple of 8 -- TMA needs 16-byte row strides -- or a block
  smaller than one warpgroup's vector width)."""
  item = jnp.dtype(dtype).itemsize
  if d % 8 or item != 2 or num_tokens < 1 or k < 1:
    return None
  chunk = next(c for c in (256, 128, 64, 32, 16, 8) if d % c == 0)
  nc = d // chunk
  # Column chunks per CTA: the whole row where its k slabs fit the budget.
  block_c = nc
  while block_c > 1 and k * block_c * chunk * item > _SMEM_BUDGET:
    block_c = (block_c + 1) // 2
    while nc % block_c:
      block_c -= 1
  block_t = 1
  while (block_t * 2 <= min(num_tokens, 16)
         and k * 2 * block_t * block_c * chunk * item <= _SMEM_BUDGET):
    block_t *= 2
  if block_t * block_c * chunk < 1024:  # 128 threads x 8 elements
    return None
  return GatherSumConfig(chunk=chunk, block_c=block_c, block_t=block_t)


def _kernel(idx_gmem, rows_gmem, out_gmem, buf, out_smem, ready, *, k: int,
            num_tokens: int, cfg: GatherSumConfig):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  plgpu = _plgpu()
  bt, bc = cfg.block_t, cfg.block_c
  t0 = lax.axis_index("t") * bt
  c0 = lax.axis_index("c") * bc
  for i in range(bt):
    tok = jnp.minimum(t0 + i, num_tokens - 1)  # the last block's spare rows
    for j in range(k):
      r = idx_gmem[tok, j]
      plgpu.copy_gmem_to_smem(rows_gmem.at[pl.ds(r, 1), pl.ds(c0, bc)],
                              buf.at[j, pl.ds(i, 1)], ready)
  plgpu.barrier_wait(ready)
  acc = buf[0].astype(jnp.float32)
  for j in range(1, k):
    acc = acc + buf[j].astype(jnp.float32)
  out_smem[...] = acc.astype(out_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(t0, bt), pl.ds(c0, bc)])
  plgpu.wait_smem_to_gmem(0)


def gather_sum(rows: Array, idx: Array, *, out_dtype=None,
               cfg: GatherSumConfig | None = None) -> Array:
  """out [T, D] = sum_j rows[idx[t, j]], float32 sums, out_dtype (rows.dtype).

  rows: [R, D] bf16 or f16; idx: int32 [T, k], entries outside [0, R) add zero.
  `cfg` defaults to `config_for` (which must not be None for these shapes).
  """
  plgpu = _plgpu()
  (num_rows, d), (t, k) = rows.shape, idx.shape
  out_dtype = jnp.dtype(out_dtype or rows.dtype)
  cfg = cfg or config_for(t, k, d, rows.dtype)
  if cfg is None:
    raise ValueError(f"gather_sum: no Mosaic block for rows {rows.shape} "
                     f"{rows.dtype}, idx {idx.shape}.")
  nc = d // cfg.chunk
  idx = idx.astype(jnp.int32)
  # Every out-of-range index becomes R: one box past the end (zeros).
  idx = jnp.where((idx >= 0) & (idx < num_rows), idx, num_rows)
  rows3 = rows.reshape(num_rows, nc, cfg.chunk)
  bt = min(cfg.block_t, t)
  cfg = dataclasses.replace(cfg, block_t=bt)
  slab = (cfg.block_c, cfg.chunk)
  kernel = plgpu.kernel(
      functools.partial(_kernel, k=k, num_tokens=t, cfg=cfg),
      out_type=jax.ShapeDtypeStruct((t, nc, cfg.chunk), out_dtype),
      grid=(pl_cdiv(t, bt), nc // cfg.block_c),
      grid_names=("t", "c"),
      scratch_types=[
          plgpu.SMEM((k, bt, *slab), rows.dtype),
          plgpu.SMEM((bt, *slab), out_dtype),
          plgpu.Barrier(num_arrivals=k * bt),
      ],
  )
  return kernel(idx, rows3).reshape(t, d)


def pl_cdiv(a: int, b: int) -> int:
  return -(-a // b)
