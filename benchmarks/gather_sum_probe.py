"""Does a row gather-sum kernel beat XLA's fusion for the permute backward?

    out[t] = sum_j rows[idx[t, j]]   (rows [R, D] bf16, idx [T, k] a dispatch plan's
                                      slot_row; zeros where idx is out of range)

Checks a Mosaic-GPU kernel written for it (below: one TMA box per row, float32
sum from shared memory; not part of jmoe, see NOTES.md, sixth session) and a
Pallas-Triton one bitwise against a float32 sum in j order (XLA's differs only
where the probe's index -1 meets jnp.take's negative-index wrap), then times, in one run: XLA's fusion as jmoe's
permute backward writes it, the kernels at a few blocks, each also with the
router's token gradient added after it (the permute backward's cotangent meets it
in the layer), and an HBM ceiling: an elementwise pass over the same bytes.

  python -m benchmarks.gather_sum_probe [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
import traceback

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks.mosaic_probe import timeit
from jmoe._src import permute as pmod

BF16 = jnp.bfloat16
CASES = {  # name: (tokens, k, experts, d_model), the layer benchmark's shapes
    "olmoe": (16384, 8, 64, 2048),
    "mixtral": (16384, 2, 8, 4096),
}
CHECKS = ((16384, 8, 64, 2048), (4096, 2, 8, 4096), (37, 3, 5, 192),
          (300, 4, 16, 1000), (1, 8, 64, 2048))


def plan_idx(key, t, k, e, *, drop_frac=0.0):
  """A dispatch plan's slot_row for random distinct experts per token, with some
  pairs pointed past the end (sentinels) when drop_frac > 0."""
  scores = jax.random.uniform(key, (t, e))
  experts = jax.lax.top_k(scores, k)[1]
  plan = pmod.dispatch_plan(experts, e)
  idx = plan.slot_row
  if drop_frac:
    kill = jax.random.uniform(jax.random.fold_in(key, 1), idx.shape) < drop_frac
    idx = jnp.where(kill, plan.num_rows, idx)
    idx = idx.at[0, 0].set(-1) if t > 1 else idx
  return idx, plan.num_rows


def oracle(rows, idx):
  """float32 sum in j order of the in-range rows, cast once."""
  r = rows.shape[0]
  acc = jnp.zeros((idx.shape[0], rows.shape[1]), jnp.float32)
  for j in range(idx.shape[1]):
    ij = idx[:, j]
    ok = (ij >= 0) & (ij < r)
    acc = acc + jnp.where(ok[:, None], rows[jnp.clip(ij, 0, r - 1)].astype(jnp.float32), 0)
  return acc.astype(rows.dtype)


def xla_permute_bwd(rows, idx):
  """jmoe.permute's backward as written (XLA fuses it)."""
  t, k = idx.shape
  g = jnp.take(rows, idx.reshape(t * k), axis=0, mode="fill", fill_value=0)
  return jnp.sum(g.reshape(t, k, -1).astype(jnp.float32), axis=1).astype(rows.dtype)


# --- the Mosaic-GPU gather-sum (measured, not wired in: NOTES, sixth session) ---

Array = jax.Array
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


# --- a Pallas-Triton gather-sum, for comparison ---------------------------------

def triton_gather_sum(rows, idx, *, bt=16, bd=256, num_warps=4, interpret=False):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415
  (r, d), (t, k) = rows.shape, idx.shape

  def kernel(idx_ref, rows_ref, out_ref):
    i, c = pl.program_id(0), pl.program_id(1)
    toks = i * bt + jnp.arange(bt, dtype=jnp.int32)
    cols = c * bd + jnp.arange(bd, dtype=jnp.int32)
    tin = toks < t
    cin = cols < d
    acc = jnp.zeros((bt, bd), jnp.float32)
    for j in range(k):
      ij = plt.load(idx_ref.at[pl.ds(i * bt, bt), jnp.int32(j)], mask=tin, other=-1)
      ok = tin & (ij >= 0) & (ij < r)
      ij = jnp.where(ok, ij, 0)
      # Array indices in both dims (the interpreter takes no array-and-slice mix).
      v = plt.load(rows_ref.at[ij[:, None], jnp.minimum(cols, d - 1)[None, :]],
                   mask=ok[:, None] & cin[None, :], other=0.0)
      acc = acc + v.astype(jnp.float32)
    plt.store(out_ref.at[pl.ds(i * bt, bt), pl.ds(c * bd, bd)],
              acc.astype(out_ref.dtype), mask=tin[:, None] & cin[None, :])

  cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((t, d), rows.dtype),
      grid=(pl.cdiv(t, bt), pl.cdiv(d, bd)),
      compiler_params=cls(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="probe_triton_gather_sum")(idx.astype(jnp.int32), rows)


def configs_for(t, k, d):
  base = config_for(t, k, d, BF16)
  out = [("mosaic_default", base)]
  nc = d // base.chunk
  for bt, bc in ((1, nc), (2, nc), (4, nc // 2), (2, nc // 2), (1, nc // 2),
                 (4, nc // 4), (8, nc // 4)):
    if bc < 1 or nc % bc:
      continue
    c = GatherSumConfig(chunk=base.chunk, block_c=bc, block_t=bt)
    if c != base and k * bt * bc * base.chunk * 2 <= 160 * 1024:
      out.append((f"mosaic_t{bt}_c{bc}", c))
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=None)
  p.add_argument("--cases", nargs="*", default=list(CASES))
  a = p.parse_args(argv)
  rec = dict(device=str(jax.devices()[0].device_kind), jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
             argv=sys.argv[1:], checks=[], timings=[])
  key = jax.random.key(0)
  # -- correctness: bitwise against the j-order float32 sum --
  for (t, k, e, d) in CHECKS:
    for drop in (0.0, 0.1):
      kk = jax.random.fold_in(key, t * 131 + k)
      idx, r = plan_idx(kk, t, k, e, drop_frac=drop)
      rows = jax.random.normal(jax.random.fold_in(kk, 2), (r, d), BF16)
      want = np.asarray(oracle(rows, idx).astype(jnp.float32))
      for name, fn in (("mosaic", lambda x, i: gather_sum(x, i)),
                       ("triton", triton_gather_sum),
                       ("xla", xla_permute_bwd)):
        entry = dict(shape=[t, k, e, d], drop=drop, impl=name)
        try:
          got = np.asarray(jax.jit(fn)(rows, idx).astype(jnp.float32))
          entry.update(bitwise=bool(np.array_equal(got, want)),
                       max_abs=float(np.max(np.abs(got - want))))
        except Exception as ex:  # noqa: BLE001
          entry.update(error=f"{type(ex).__name__}: {ex}"[:2000])
          traceback.print_exc()
        print(entry, flush=True)
        rec["checks"].append(entry)
  # -- timings --
  for case in a.cases:
    t, k, e, d = CASES[case]
    idx, r = plan_idx(jax.random.fold_in(key, 7), t, k, e)
    rows = [jax.random.normal(jax.random.fold_in(key, s), (r, d), BF16) for s in (1, 2)]
    add = jax.random.normal(jax.random.fold_in(key, 3), (t, d), BF16)
    args = [(x, idx) for x in rows]
    bytes_moved = r * d * 2 + t * d * 2 + idx.size * 4
    ceil_args = [(x,) for x in rows]
    ceil_ms = timeit(jax.jit(lambda x: x + jnp.asarray(1, x.dtype)), ceil_args)
    ceil_bytes = 2 * r * d * 2
    out = dict(case=case, shape=[t, k, e, d], bytes=bytes_moved,
               hbm_ceiling_ms=ceil_ms, hbm_ceiling_tb_s=ceil_bytes / ceil_ms / 1e9,
               results={})
    fns = [("xla", xla_permute_bwd)]
    for name, cfg in configs_for(t, k, d):
      fns.append((name, functools.partial(gather_sum, cfg=cfg)))
    for bt, bd, nw in ((16, 256, 4), (8, 512, 4), (32, 256, 8), (16, 512, 8)):
      fns.append((f"triton_t{bt}_d{bd}_w{nw}",
                  functools.partial(triton_gather_sum, bt=bt, bd=bd, num_warps=nw)))
    for name, fn in fns:
      try:
        ms = timeit(jax.jit(fn), args)
        plus = timeit(jax.jit(lambda x, i, fn=fn: fn(x, i) + add), args)
        out["results"][name] = dict(
            ms=ms, tb_s=bytes_moved / ms / 1e9, vs_ceiling_bw=(bytes_moved / ms) / (ceil_bytes / ceil_ms),
            ms_with_router_add=plus)
      except Exception as ex:  # noqa: BLE001
        out["results"][name] = dict(error=f"{type(ex).__name__}: {ex}"[:2000])
        traceback.print_exc()
      print(case, name, out["results"][name], flush=True)
    # the fused form XLA sees in the layer: the permute bwd plus the router's dx
    ms = timeit(jax.jit(lambda x, i: (xla_permute_bwd(x, i).astype(jnp.float32)
                                      + add.astype(jnp.float32)).astype(BF16)), args)
    out["results"]["xla_fused_with_router_add"] = dict(ms=ms)
    rec["timings"].append(out)
  text = json.dumps(rec, indent=1)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
