"""Mosaic-GPU (Pallas `plgpu`) kernels of the grouped matmul for Hopper (sm_90).

Three products, two kernels, one structure (that of JAX's `hopper_matmul_mgpu`):

* `_gmm_kernel` -- forward out = gmm(lhs, rhs) and, with the static flag
  `transpose_rhs`, the input gradient dlhs = gmm(dy, rhs^T), which reads rhs[g]
  as [n, k] tiles and hands wgmma their transpose (rhs^T is never written to HBM).
* `_tgmm_kernel` -- the weight gradient drhs[g] = lhs[rows_g]^T @ dy[rows_g].

`_gmm_kernel` also takes a second (lhs, rhs) pair of the same shapes and sums both
products in its accumulator (`gmm_sum`): the input gradient of rows that feed two
products (SwiGLU's gate and up) as one K loop of twice the depth and one store,
instead of two [m, n] outputs that XLA adds afterwards.

Both are persistent (one CTA per SM, `plgpu.nd_loop` over the work items) and warp
specialised: three warpgroups per CTA, a memory warpgroup that issues the TMA loads
of a `max_concurrent_steps`-deep pipeline (`_warp_specialized`: one ring of SMEM
slots across all of the CTA's work items, so the next item's first blocks load
during the current item's last steps and epilogue) and two compute warpgroups
that each run wgmma on one half of the CTA's output columns (CTA tile = tile_m x
2*tile_n) with a float32 accumulator in registers. Work items follow an
L2-friendly order (`plgpu.planar_snake`: bands of `grid_tile_width` row tiles walk
the column tiles together). The epilogue casts the accumulator, writes it to
swizzled shared memory in 64-row sub-tiles (two slots per warpgroup, so the
register-to-SMEM write of one overlaps the TMA store of the other) and stores it
with TMA.

The kernels hold no routing logic. Their metadata comes from `tiling.py` (cumsum /
searchsorted under jit, static shapes):

* forward / input gradient: `tiling.row_tiles` -- row-tile visits, each a tile of
  tile_m rows starting at its group's first row (or a multiple of tile_m past it)
  and owning rows [lo, hi). A visit whose tile it owns whole (hi - lo == tile_m:
  every tile of a group but its last, and every tile when group sizes are
  multiples of tile_m) is stored with whole-tile TMA stores. The last, partial tile
  of a group is stored through an unswizzled SMEM buffer with a ladder of
  power-of-two row TMA stores (TMA boxes have static shapes), so no row outside
  [lo, hi) is ever written. Visits of rows outside the local groups (other
  experts' rows under expert parallelism, rows past sum(group_sizes)) skip the K
  loop and store zeros: every output row is written exactly once.
* weight gradient: `tiling.group_schedule` -- each local group's row range, largest
  first. A work item is (group, output tile); it contracts over the group's rows in
  steps of tile_k rows starting at the group's first row; in the last, partial
  step the rows past the group's end are zeroed in SMEM (both operands, with a
  select, so that non-finite values in other groups' rows cannot leak in). An empty
  group runs zero steps and stores zeros.

Shapes and dtypes: operands of one 16-bit float dtype (bf16 or f16; float32 is
served by the Pallas-Triton backend, see `FALLBACK`), float32 accumulation, output
in any float dtype. Any m, k, n: TMA zero-fills loads past the ends of k and n and
clips stores, so ragged k and n cost nothing; k and n that are not multiples of 8
(TMA needs 16-byte row strides) are padded with zeros by the wrapper (a copy), and
m < tile_m is padded to one tile. These kernels need an sm_90 GPU: Mosaic GPU has
no CPU interpreter, so they are tested on the GPU (`tests/`, `gpu` marker).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jmoe._src.gmm import tiling
from jmoe._src.gmm.tiling import cdiv

Array = jax.Array

# Backend interface (jmoe/_src/gmm/ops.py): the operand dtypes and precisions these
# kernels take, and the backend that serves the others.
FALLBACK = "pallas"
_MEMORY_REGISTERS = 40          # registers per thread of the memory warpgroup
_NUM_COMPUTE_WGS = 2
# Tiles start on multiples of 8 rows: TMA loads into swizzled SMEM address rows in
# blocks of 8 (Mosaic tiles the GMEM view by the SMEM tiling).
_ALIGN = 8
_PAD = 64      # k and n padding (elements): whole 128-byte swizzle spans


def supports_dtype(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _presets(*names):
  return frozenset(getattr(lax.DotAlgorithmPreset, n) for n in names)


# Dot algorithms whose result on operands of each dtype is exactly what these
# kernels compute (exact products, float32 accumulation): their input types hold
# the operands exactly (bf16 and f16 widen exactly to tf32 and float32; split
# into bf16 parts, a bf16 value is its first part) and they accumulate in float32.
_EXACT_PRESETS = {
    jnp.dtype(jnp.bfloat16): _presets(
        "DEFAULT", "BF16_BF16_F32", "BF16_BF16_F32_X3", "BF16_BF16_F32_X6",
        "BF16_BF16_F32_X9", "TF32_TF32_F32", "TF32_TF32_F32_X3", "F32_F32_F32"),
    jnp.dtype(jnp.float16): _presets(
        "DEFAULT", "F16_F16_F32", "TF32_TF32_F32", "TF32_TF32_F32_X3",
        "F32_F32_F32"),
}


def supports_precision(precision, dtype) -> bool:
  """Every `lax.Precision` (None, or a pair): wgmma multiplies 16-bit operands
  exactly into a float32 accumulator, which is what HIGHEST asks for and what
  DEFAULT and HIGH give 16-bit operands on the GPU, so all of them are honoured
  as they are. Dot algorithms only where `_EXACT_PRESETS` lists them; the others
  (bf16 or f16 accumulation, fp8, float64, custom `lax.DotAlgorithm`s) run on
  FALLBACK, whose kernels implement them."""
  if precision is None or isinstance(precision, tuple):
    return True
  return (isinstance(precision, lax.DotAlgorithmPreset)
          and precision in _EXACT_PRESETS.get(jnp.dtype(dtype), ()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicConfig:
  """Tiles of one Mosaic-GPU grouped-matmul kernel.

  Attributes:
    tile_m: rows per CTA tile ("gmm", "gmm_t"); output rows (the k dimension) per
      tile ("tgmm"). 64 or 128 (one or two wgmma row blocks per warpgroup).
    tile_n: output columns per compute warpgroup; the CTA tile is 2 * tile_n wide.
    tile_k: contraction per pipeline step (rows of the group per step in "tgmm").
    max_concurrent_steps: depth of the TMA pipeline (shared-memory stages).
    grid_tile_width: row tiles per band of the L2-friendly snake order.
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  max_concurrent_steps: int = 4
  grid_tile_width: int = 16

  def __post_init__(self):
    if self.tile_m not in (64, 128):
      raise ValueError(f"MosaicConfig: tile_m={self.tile_m} must be 64 or 128.")
    if self.tile_n not in (64, 128, 256) :
      raise ValueError(f"MosaicConfig: tile_n={self.tile_n} must be 64, 128 or 256.")
    if self.tile_k not in (32, 64, 128):
      raise ValueError(f"MosaicConfig: tile_k={self.tile_k} must be 32, 64 or 128.")
    if self.max_concurrent_steps < 2:
      raise ValueError("MosaicConfig: max_concurrent_steps must be >= 2.")
    if self.grid_tile_width < 1:
      raise ValueError("MosaicConfig: grid_tile_width must be >= 1.")

  def replace(self, **kw) -> "MosaicConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self):
    return dataclasses.asdict(self)


def _epi_tile_n(out_dtype) -> int:
  """Columns of one epilogue sub-tile: one 128-byte swizzle span."""
  return 128 // jnp.dtype(out_dtype).itemsize


def heuristic_config(op: str, m: int, k: int, n: int, num_groups: int,
                     dtype) -> MosaicConfig:
  """A default per shape (before tuning): hopper_matmul's 128 x (2 x 128) x 64.

  Measured on H200 (benchmarks/results/raw/h200_gmm_autotune_mosaic.json, every
  case within 5% of its tuned best): the forward product with 3 pipeline stages
  (4 are 1-5% slower there), the input gradient and tgmm with 4 (3 are 1-8%
  slower); 64-row tiles when groups hold few rows (decode: one 64-row visit per
  group reads its weights once, 8% faster than 128 rows)."""
  del k, dtype
  rows_per_group = max(1, m // max(1, num_groups))
  if op == "tgmm":
    return MosaicConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                        grid_tile_width=8)
  if rows_per_group <= 64:
    return MosaicConfig(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=4,
                        grid_tile_width=1)
  width = 16 if n >= 4096 else 8
  return MosaicConfig(tile_m=128, tile_n=128, tile_k=64,
                      max_concurrent_steps=3 if op == "gmm" else 4,
                      grid_tile_width=width)


def _num_sms() -> int:
  d = jax.devices()[0]
  return int(getattr(d, "core_count", 0) or 132)


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415
  return plgpu


def _swizzled(plgpu, minor_elems: int, dtype):
  """TMA/wgmma-friendly SMEM transforms for tiles whose minor dim has
  `minor_elems` elements."""
  swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


# ----------------------------------------------------------------------------
# The epilogue shared by both kernels (runs in a compute warpgroup)


def _store_full(plgpu, acc, out_smem, out_tile, wg):
  """acc [tile_m, tile_n] (out dtype) -> out_tile (a GMEM ref of that shape)
  through two swizzled SMEM slots [epi_m, epi_n]: the register-to-SMEM write of
  one sub-tile overlaps the TMA store of the previous one."""
  tile_m, tile_n = acc.shape
  _, _, epi_m, epi_n = out_smem.shape
  idx = 0
  for mi in range(tile_m // epi_m):
    for ni in range(tile_n // epi_n):
      ms = slice(mi * epi_m, (mi + 1) * epi_m)
      ns = slice(ni * epi_n, (ni + 1) * epi_n)
      slot = idx % 2
      idx += 1
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      out_smem[wg, slot] = acc[ms, ns]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_tile.at[ms, ns])


def _store_rows(plgpu, acc, lad_smem, out_gmem, first, row0, rows, col0, wg):
  """Stores rows [first, first + rows) of acc [tile_m, tile_n] to
  out_gmem[row0 + r, col0 + c] (first + rows <= tile_m, both dynamic) and no
  other row: per 128-byte column chunk, the chunk goes to an unswizzled SMEM
  buffer and leaves it in a ladder of power-of-two row TMA stores (TMA boxes
  have static shapes)."""
  tile_m, tile_n = acc.shape
  _, _, epi_n = lad_smem.shape
  for ci in range(tile_n // epi_n):
    ns = slice(ci * epi_n, (ci + 1) * epi_n)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    lad_smem[wg] = acc[:, ns]
    plgpu.commit_smem()
    start = 0          # static for the first piece, traced after it
    piece = tile_m
    while piece >= 1:
      p = piece
      take = (rows & p) != 0

      @pl_when(take)
      def _(start=start, p=p):
        plgpu.copy_smem_to_gmem(
            lad_smem.at[wg, pl_ds(first + start, p)],
            out_gmem.at[pl_ds(row0 + start, p), pl_ds(col0 + ci * epi_n, epi_n)])

      start = start + (rows & p)
      piece //= 2


def pl_when(pred):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  return pl.when(pred)


def pl_ds(start, size):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  return pl.ds(start, size)


def _compute_registers() -> int:
  """Registers per thread of a compute warpgroup: the SM's 64k registers less the
  memory warpgroup's share, split between the compute warpgroups (at most 256,
  a multiple of 8; `emit_pipeline_warp_specialized`'s rule)."""
  per = min(256, (512 - _MEMORY_REGISTERS) // _NUM_COMPUTE_WGS)
  return per // 8 * 8


def _operand_allocs(plgpu, cfg: MosaicConfig, a_block, a_tf, b_block, b_tf,
                    dtype):
  """The `max_concurrent_steps` SMEM slots of both operands and their barriers:
  `ready[s]` completes when both TMA loads into slot s have landed, `consumed[s]`
  when both compute warpgroups are done reading it."""
  slots = cfg.max_concurrent_steps
  return dict(
      a_smem=plgpu.SMEM((slots, *a_block), dtype, transforms=a_tf),
      b_smem=plgpu.SMEM((slots, *b_block), dtype, transforms=b_tf),
      ready=plgpu.Barrier(num_arrivals=2, num_barriers=slots),
      consumed=plgpu.Barrier(num_arrivals=_NUM_COMPUTE_WGS, num_barriers=slots),
  )


def _warp_specialized(plgpu, *, num_items, item, steps, load, mma, finish,
                      a_smem, b_smem, ready, consumed, acc_shape,
                      cfg: MosaicConfig):
  """A persistent warp-specialised loop whose TMA pipeline spans work items.

  The CTA walks work items lin = sm, sm + num_sms, ... (`plgpu.nd_loop`). Each
  item contracts over `steps(it)` blocks (dynamic; zero is allowed), where
  it = item(lin). The memory warpgroup issues, for every block of every item in
  order, `load(it, s, a_slot, b_slot, barrier)` into the next of the
  `max_concurrent_steps` SMEM slots once both compute warpgroups have released
  that slot; the compute warpgroups run `mma(it, s, a_slot, b_slot, acc_ref)` on
  it, release it and, after an item's last block, `finish(it, acc_ref)` (the
  epilogue). The slot counter runs on across items, so the memory warpgroup
  loads the next item's first blocks while the compute warpgroups are still
  on the current item's last blocks and its epilogue: no pipeline drain and
  refill per output tile (which `emit_pipeline_warp_specialized` per item
  pays).
  """
  from jax.experimental import pallas as pl  # noqa: PLC0415
  num_slots = cfg.max_concurrent_steps
  wg = lax.axis_index("wg")
  zero = jnp.int32(0)

  @pl.when(wg == _NUM_COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

    @plgpu.nd_loop((num_items,), collective_axes="sm", init_carry=zero)
    def _items(info, carry):
      it = item(info.index[0])

      def step(s, g):
        slot = lax.rem(g, jnp.int32(num_slots))

        @pl.when(g >= num_slots)
        def _wait_free():
          plgpu.barrier_wait(consumed.at[slot])

        load(it, s, a_smem.at[slot], b_smem.at[slot], ready.at[slot])
        return g + 1

      return lax.fori_loop(zero, steps(it), step, carry)
    # No wait for the last slots' release: nothing loads into them again, and
    # the compute warpgroups' final arrivals need no waiter.

  @pl.when(wg < _NUM_COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(_compute_registers(), action="increase")

    @plgpu.nd_loop((num_items,), collective_axes="sm", init_carry=zero)
    def _items(info, carry):
      it = item(info.index[0])

      def run(acc_ref):
        def step(s, c):
          g, acc = c
          slot = lax.rem(g, jnp.int32(num_slots))
          plgpu.barrier_wait(ready.at[slot])
          acc = mma(it, s, a_smem.at[slot], b_smem.at[slot], acc)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(consumed.at[slot])
          return g + 1, acc

        g, _ = lax.fori_loop(zero, steps(it), step, (carry, acc_ref))
        finish(it, acc_ref)
        return g

      return pl.run_scoped(run, plgpu.ACC(acc_shape, jnp.float32))


def _launch(plgpu, body, out_shape, out_dtype, num_sms, name):
  """A persistent launch: one CTA of three warpgroups per SM, named `name` in
  profiles (where this jax's mesh takes a kernel name)."""
  named = ({"kernel_name": name} if "kernel_name" in _mesh_fields(plgpu) else {})
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      num_threads=_NUM_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **named,
  )


@functools.cache
def _mesh_fields(plgpu) -> frozenset:
  mesh = getattr(plgpu, "Mesh", None)
  try:
    return frozenset(f.name for f in dataclasses.fields(mesh))
  except TypeError:
    return frozenset()


# ----------------------------------------------------------------------------
# Forward and input gradient


def _gmm_kernel(num_ref, table_ref, lhs_gmem, rhs_gmem, *rest,
                cfg: MosaicConfig, transpose_rhs: bool):
  """rest = (out,), or (lhs2, rhs2, out) for the sum of two products with the
  same shapes (`gmm_sum`): each tile's K loop walks (lhs, rhs) and then (lhs2,
  rhs2) into one accumulator."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  plgpu = _plgpu()
  *second, out_gmem = rest
  pairs = [(lhs_gmem, rhs_gmem)] + ([tuple(second)] if second else [])
  dtype = lhs_gmem.dtype
  out_dtype = out_gmem.dtype
  _, kdim = lhs_gmem.shape
  n = out_gmem.shape[1]
  tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n = _NUM_COMPUTE_WGS * tile_n
  n_iters = pl.cdiv(n, cta_n)
  k_iters = pl.cdiv(kdim, tile_k)
  epi_n = _epi_tile_n(out_dtype)
  epi_m = min(64, tile_m)

  a_tf = _swizzled(plgpu, tile_k, dtype)
  b_tf = _swizzled(plgpu, tile_k if transpose_rhs else cta_n, dtype)
  b_block = (cta_n, tile_k) if transpose_rhs else (tile_k, cta_n)
  out_tf = _swizzled(plgpu, epi_n, out_dtype)

  @functools.partial(
      pl.run_scoped,
      **_operand_allocs(plgpu, cfg, (tile_m, tile_k), a_tf, b_block, b_tf, dtype),
      epi_smem=plgpu.RefUnion(
          plgpu.SMEM((_NUM_COMPUTE_WGS, 2, epi_m, epi_n), out_dtype,
                     transforms=out_tf),
          plgpu.SMEM((_NUM_COMPUTE_WGS, tile_m, epi_n), out_dtype),
      ),
      collective_axes="wg",
  )
  def _scope(a_smem, b_smem, ready, consumed, epi_smem):
    out_smem, lad_smem = epi_smem
    wg = lax.axis_index("wg")
    num_t = num_ref[0]           # row-tile visits

    def item(lin):
      t, ni = plgpu.planar_snake(lin, (num_t, n_iters), 0, cfg.grid_tile_width)
      return dict(
          group=table_ref[tiling.GROUP, t],
          row0=pl.multiple_of(table_ref[tiling.START, t], _ALIGN),  # first row
          lo=table_ref[tiling.LO, t],                               # owned:
          hi=table_ref[tiling.HI, t],                               # [lo, hi)
          compute=table_ref[tiling.COMPUTE, t] != 0,
          n0=ni * cta_n)

    def steps(it):
      # Visits of rows outside the local groups run no step and store zeros.
      return jnp.where(it["compute"], jnp.int32(k_iters * len(pairs)),
                       jnp.int32(0))

    def load_pair(lhs_ref, rhs_ref, it, kk, a_slot, b_slot, barrier):
      k0 = kk * tile_k
      plgpu.copy_gmem_to_smem(
          lhs_ref.at[pl.ds(it["row0"], tile_m), pl.ds(k0, tile_k)], a_slot,
          barrier)
      if transpose_rhs:
        rhs_block = rhs_ref.at[it["group"], pl.ds(it["n0"], cta_n),
                               pl.ds(k0, tile_k)]
      else:
        rhs_block = rhs_ref.at[it["group"], pl.ds(k0, tile_k),
                               pl.ds(it["n0"], cta_n)]
      plgpu.copy_gmem_to_smem(rhs_block, b_slot, barrier)

    def load(it, s, a_slot, b_slot, barrier):
      if len(pairs) == 1:
        load_pair(*pairs[0], it, s, a_slot, b_slot, barrier)
        return
      first = s < k_iters

      @pl.when(first)
      def _first():
        load_pair(*pairs[0], it, s, a_slot, b_slot, barrier)

      @pl.when(jnp.logical_not(first))
      def _second():
        load_pair(*pairs[1], it, s - k_iters, a_slot, b_slot, barrier)

    def mma(it, s, a_slot, b_slot, acc_ref):
      del it, s
      wg_n = pl.ds(wg * tile_n, tile_n)
      if transpose_rhs:
        b = b_slot.at[wg_n, :].transpose((1, 0))
      else:
        b = b_slot.at[:, wg_n]
      plgpu.wgmma(acc_ref, a_slot, b)
      return acc_ref

    def finish(it, acc_ref):
      """The tile's rows [row0, row0 + tile_m), of which it owns [lo, hi):
      this warpgroup's tile_n columns."""
      row0, lo = it["row0"], it["lo"]
      rows = it["hi"] - lo
      col0 = it["n0"] + wg * tile_n

      @pl.when(rows > 0)
      def _store():
        acc = acc_ref[...].astype(out_dtype)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        whole = (rows == tile_m) & (lo == row0)

        @pl.when(whole)
        def _full():
          _store_full(plgpu, acc, out_smem,
                      out_gmem.at[pl.ds(row0, tile_m), pl.ds(col0, tile_n)], wg)

        @pl.when(jnp.logical_not(whole))
        def _partial():
          _store_rows(plgpu, acc, lad_smem, out_gmem, lo - row0, lo, rows, col0,
                      wg)

    _warp_specialized(plgpu, num_items=num_t * n_iters, item=item, steps=steps,
                      load=load, mma=mma, finish=finish, a_smem=a_smem,
                      b_smem=b_smem, ready=ready, consumed=consumed,
                      acc_shape=(tile_m, tile_n), cfg=cfg)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pad_to(x, axis: int, multiple: int, minimum: int = 0):
  size = x.shape[axis]
  target = max(cdiv(size, multiple) * multiple, minimum)
  if target == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, target - size)
  return jnp.pad(x, pad)


def gmm_call(lhs: Array, rhs: Array, group_sizes: Array, group_offset: Array, *,
             transpose_rhs: bool, out_dtype, cfg: MosaicConfig,
             num_sms: int | None = None, second: tuple[Array, Array] | None = None
             ) -> Array:
  """One launch of the forward (or, with transpose_rhs, input-gradient) kernel.

  lhs: [m, k]; rhs: [L, k, n] (or [L, n, k]); group_sizes: int32 [G];
  group_offset: int32 []. Returns [m, n] in out_dtype. With `second` = (lhs2,
  rhs2) of the same shapes, returns lhs @ rhs[g] + lhs2 @ rhs2[g] (`gmm_sum`),
  summed in the float32 accumulator.
  """
  plgpu = _plgpu()
  m, k = lhs.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  cta_n = _NUM_COMPUTE_WGS * cfg.tile_n
  # Mosaic's TMA copies of swizzled tiles view GMEM in tiles of 8 rows x 128
  # bytes, and a box may not exceed its array: pad k and n to multiples of 64
  # and at least one block, m to a multiple of 8 and at least one tile (zeros;
  # a copy, only for shapes that need it).
  k_ax, n_ax = (2, 1) if transpose_rhs else (1, 2)
  pad_lhs = lambda a: _pad_to(_pad_to(a, 1, _PAD, cfg.tile_k), 0, _ALIGN,
                              cfg.tile_m)
  pad_rhs = lambda b: _pad_to(_pad_to(b, k_ax, _PAD, cfg.tile_k), n_ax, _PAD,
                              cta_n)
  lhs_p, rhs_p = pad_lhs(lhs), pad_rhs(rhs)
  operands = [lhs_p, rhs_p]
  if second is not None:
    lhs2, rhs2 = second
    if lhs2.shape != lhs.shape or rhs2.shape != rhs.shape:
      raise ValueError(f"gmm_call: the second pair's shapes {lhs2.shape}, "
                       f"{rhs2.shape} must be the first's {lhs.shape}, "
                       f"{rhs.shape}.")
    operands += [pad_lhs(lhs2), pad_rhs(rhs2)]
  m_p = lhs_p.shape[0]
  n_p = rhs_p.shape[n_ax]
  tiles = tiling.row_tiles(group_sizes, m_p, cfg.tile_m, num_local, group_offset,
                           align=_ALIGN)
  kernel = _launch(
      plgpu, functools.partial(_gmm_kernel, cfg=cfg, transpose_rhs=transpose_rhs),
      (m_p, n_p), out_dtype, num_sms,
      "jmoe_mosaic_gmm_t" if transpose_rhs else "jmoe_mosaic_gmm")
  out = kernel(tiles.num_tiles.reshape(1), tiles.table, *operands)
  if (m_p, n_p) != (m, n):
    out = out[:m, :n]
  return out


# ----------------------------------------------------------------------------
# Weight gradient


def _tgmm_kernel(sched_ref, lhs_gmem, dy_gmem, out_gmem, *, cfg: MosaicConfig):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  plgpu = _plgpu()
  dtype = lhs_gmem.dtype
  out_dtype = out_gmem.dtype
  _, kdim = lhs_gmem.shape
  n = dy_gmem.shape[1]
  num_local = out_gmem.shape[0]
  tile_m, tile_n, tile_r = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n = _NUM_COMPUTE_WGS * tile_n
  k_tiles = pl.cdiv(kdim, tile_m)
  n_tiles = pl.cdiv(n, cta_n)
  epi_n = _epi_tile_n(out_dtype)
  epi_m = min(64, tile_m)

  a_tf = _swizzled(plgpu, tile_m, dtype)
  b_tf = _swizzled(plgpu, cta_n, dtype)
  out_tf = _swizzled(plgpu, epi_n, out_dtype)

  @functools.partial(
      pl.run_scoped,
      **_operand_allocs(plgpu, cfg, (tile_r, tile_m), a_tf, (tile_r, cta_n), b_tf,
                        dtype),
      out_smem=plgpu.SMEM((_NUM_COMPUTE_WGS, 2, epi_m, epi_n), out_dtype,
                          transforms=out_tf),
      collective_axes="wg",
  )
  def _scope(a_smem, b_smem, ready, consumed, out_smem):
    wg = lax.axis_index("wg")
    per_group = k_tiles * n_tiles

    def item(lin):
      slot = lax.div(lin, jnp.int32(per_group))
      ki, ni = plgpu.planar_snake(lax.rem(lin, jnp.int32(per_group)),
                                  (k_tiles, n_tiles), 0, cfg.grid_tile_width)
      start = sched_ref[1, slot]
      end = sched_ref[2, slot]
      # Steps of tile_r rows from the multiple of 8 at or below the group's start.
      base = pl.multiple_of(start - lax.rem(start, jnp.int32(_ALIGN)), _ALIGN)
      size = jnp.maximum(end - base, 0)
      steps = jnp.where(end > start,
                        lax.div(size + (tile_r - 1), jnp.int32(tile_r)), 0)
      return dict(g=sched_ref[0, slot], start=start, end=end, base=base,
                  steps=steps, k0=ki * tile_m, n0=ni * cta_n)

    def load(it, s, a_slot, b_slot, barrier):
      r0 = pl.multiple_of(it["base"] + s * tile_r, _ALIGN)
      plgpu.copy_gmem_to_smem(
          lhs_gmem.at[pl.ds(r0, tile_r), pl.ds(it["k0"], tile_m)], a_slot,
          barrier)
      plgpu.copy_gmem_to_smem(
          dy_gmem.at[pl.ds(r0, tile_r), pl.ds(it["n0"], cta_n)], b_slot, barrier)

    def mask_rows(ref, lo_v, hi_v):
      x = ref[...]
      rid = plgpu.layout_cast(
          lax.broadcasted_iota(jnp.int32, x.shape, 0), plgpu.Layout.WGMMA)
      keep = (rid >= lo_v) & (rid < hi_v)
      ref[...] = jnp.where(keep, x, jnp.zeros_like(x))

    def mma(it, s, a_slot, b_slot, acc_ref):
      b = b_slot.at[:, pl.ds(wg * tile_n, tile_n)]
      r0 = it["base"] + s * tile_r
      lo_v = it["start"] - r0      # rows of this step inside the group:
      hi_v = it["end"] - r0        # [lo_v, hi_v) of [0, tile_r)

      @pl.when(((lo_v > 0) | (hi_v < tile_r)))
      def _mask():
        # The first and last steps reach into other groups' rows (or past m):
        # zero those rows in both operands before the tensor cores see them, so
        # that even non-finite values there cannot leak in. Both warpgroups
        # write the same values into the shared A tile.
        mask_rows(a_slot, lo_v, hi_v)
        mask_rows(b, lo_v, hi_v)
        plgpu.commit_smem()

      plgpu.wgmma(acc_ref, a_slot.transpose((1, 0)), b)
      return acc_ref

    def finish(it, acc_ref):
      # An empty group ran zero steps: its accumulator (zeros) is stored.
      acc = acc_ref[...].astype(out_dtype)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      _store_full(plgpu, acc, out_smem,
                  out_gmem.at[it["g"], pl.ds(it["k0"], tile_m),
                              pl.ds(it["n0"] + wg * tile_n, tile_n)], wg)

    _warp_specialized(plgpu, num_items=num_local * per_group, item=item,
                      steps=lambda it: it["steps"], load=load, mma=mma,
                      finish=finish, a_smem=a_smem, b_smem=b_smem, ready=ready,
                      consumed=consumed, acc_shape=(tile_m, tile_n), cfg=cfg)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm_call(lhs: Array, dy: Array, group_sizes: Array, group_offset: Array, *,
              num_local: int, out_dtype, cfg: MosaicConfig,
              num_sms: int | None = None) -> Array:
  """One launch of the weight-gradient kernel: [num_local, k, n]."""
  plgpu = _plgpu()
  m, k = lhs.shape
  n = dy.shape[1]
  cta_n = _NUM_COMPUTE_WGS * cfg.tile_n
  lhs_p = _pad_to(_pad_to(lhs, 1, _PAD, cfg.tile_m), 0, _ALIGN, cfg.tile_k)
  dy_p = _pad_to(_pad_to(dy, 1, _PAD, cta_n), 0, _ALIGN, cfg.tile_k)
  k_p, n_p = lhs_p.shape[1], dy_p.shape[1]
  sched = tiling.group_schedule(group_sizes, m, num_local, group_offset)
  kernel = _launch(plgpu, functools.partial(_tgmm_kernel, cfg=cfg),
                   (num_local, k_p, n_p), out_dtype, num_sms, "jmoe_mosaic_tgmm")
  out = kernel(sched, lhs_p, dy_p)
  if (k_p, n_p) != (k, n):
    out = out[:, :k, :n]
  return out


# ----------------------------------------------------------------------------
# Backend interface (jmoe/_src/gmm/ops.py)


# Tuned entries share `config.py`'s table, under op names with this prefix.
TUNED_PREFIX = "mosaic:"


def candidate_configs(op: str, m: int, k: int, n: int, num_groups: int,
                      dtype) -> list[MosaicConfig]:
  """The heuristic first, then its neighbours (`benchmarks.gmm --autotune`).
  Configs over the shared-memory budget fail to compile and are skipped there."""
  h = heuristic_config(op, m, k, n, num_groups, dtype)
  cands = [h]
  cands += [h.replace(grid_tile_width=w) for w in (1, 4, 8, 16, 32)]
  cands += [h.replace(max_concurrent_steps=s) for s in (3, 4, 5)]
  cands += [h.replace(tile_m=64), h.replace(tile_n=64),
            h.replace(tile_m=64, max_concurrent_steps=6)]
  seen, out = set(), []
  for c in cands:
    if c not in seen:
      seen.add(c)
      out.append(c)
  return out


def select_config(op: str, m: int, k: int, n: int, num_groups: int,
                  dtype) -> MosaicConfig:
  """The tuned config for this device and shape class if recorded (the shared
  tuned table), else the heuristic."""
  from jmoe._src.gmm import config as gmm_config  # noqa: PLC0415
  entry = gmm_config.tuned_table().get(gmm_config.shape_key(
      gmm_config._device_kind(), TUNED_PREFIX + op, m, k, n, num_groups,  # noqa: SLF001
      dtype))
  if entry is not None:
    fields = {f.name for f in dataclasses.fields(MosaicConfig)}
    return MosaicConfig(**{a: b for a, b in entry.items() if a in fields})
  return heuristic_config(op, m, k, n, num_groups, dtype)


def _pick(config, op, m, k, n, num_groups, dtype) -> MosaicConfig:
  if isinstance(config, MosaicConfig):
    return config
  return select_config(op, m, k, n, num_groups, dtype)


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs: bool, out_dtype,
        precision=None, config=None) -> Array:
  """Forward (or input-gradient) product on the Mosaic-GPU kernel.

  `precision` is one `supports_precision` accepts, all of which ask for what the
  kernel computes (exact 16-bit products, float32 accumulation); `ops` sends the
  others to FALLBACK.
  """
  del precision
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  cfg = _pick(config, "gmm_t" if transpose_rhs else "gmm", m, k, n,
              rhs.shape[0], lhs.dtype)
  return gmm_call(lhs, rhs, group_sizes, group_offset,
                  transpose_rhs=transpose_rhs, out_dtype=out_dtype, cfg=cfg)


def gmm_sum(lhs, rhs, lhs2, rhs2, group_sizes, group_offset, *,
            transpose_rhs: bool, out_dtype, precision=None, config=None) -> Array:
  """lhs @ rhs[g] + lhs2 @ rhs2[g] in one launch (one float32 accumulator, one
  store) when the pairs have the same shapes -- the input gradient of rows
  shared by the gate and up products; else two launches summed in float32."""
  if lhs2.shape != lhs.shape or rhs2.shape != rhs.shape:
    kw = dict(transpose_rhs=transpose_rhs, out_dtype=jnp.float32,
              precision=precision, config=config)
    return (gmm(lhs, rhs, group_sizes, group_offset, **kw)
            + gmm(lhs2, rhs2, group_sizes, group_offset, **kw)).astype(out_dtype)
  del precision
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  cfg = _pick(config, "gmm_t" if transpose_rhs else "gmm", m, k, n,
              rhs.shape[0], lhs.dtype)
  return gmm_call(lhs, rhs, group_sizes, group_offset,
                  transpose_rhs=transpose_rhs, out_dtype=out_dtype, cfg=cfg,
                  second=(lhs2, rhs2))


def tgmm(lhs, dy, group_sizes, group_offset, *, num_local: int, out_dtype,
         precision=None, config=None) -> Array:
  """Weight-gradient product on the Mosaic-GPU kernel (zeros for empty groups)."""
  del precision
  m, k = lhs.shape
  n = dy.shape[1]
  cfg = _pick(config, "tgmm", m, k, n, num_local, lhs.dtype)
  return tgmm_call(lhs, dy, group_sizes, group_offset, num_local=num_local,
                   out_dtype=out_dtype, cfg=cfg)
