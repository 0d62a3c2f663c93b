"""Is a 2-CTA cluster (TMA multicast of the shared operand) what the Mosaic kernels
lack? Times, on one dense matmul per shape and in one run: XLA (cuBLAS), JAX's
`hopper_matmul_mgpu` without a cluster and with 2-CTA clusters along M and N, and
jmoe's Mosaic grouped kernel with every row in one group.

  python -m benchmarks.dense_cluster_probe [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback

import jax
import jax.numpy as jnp

from benchmarks.mosaic_probe import timeit
from jmoe._src.gmm import pallas_mosaic_gpu as pm

BF16 = jnp.bfloat16
SHAPES = {  # name: (m, k, n), the benchmark's grouped products at one group
    "mixtral_fwd": (16384, 4096, 14336),
    "mixtral_down": (16384, 14336, 4096),
    "olmoe_fwd": (131072, 2048, 1024),
}

# hopper_matmul configs: (label, tile_m, tile_n, stages, cluster, wg split, grid
# minor dim). With wg_dimension N the CTA tile is tile_m x 2 tile_n and each
# warpgroup issues 2 x m64 x n128 wgmmas per k16 (its B half read twice from
# SMEM); the m64n256 ones split the 128-row CTA tile by rows, so each warpgroup
# issues one m64 x n256 wgmma reading the whole shared B tile once.
VARIANTS = (
    ("hm", 128, 128, 4, None, "N", "N"),
    ("hm_cluster_m", 128, 128, 4, "M", "N", "N"),
    ("hm_cluster_n", 128, 128, 4, "N", "N", "N"),
    ("hm_cluster_m_minor_m", 128, 128, 4, "M", "N", "M"),
    ("hm_wg_m_cluster_n", 128, 128, 4, "N", "M", "N"),
    ("hm_m64n256_wg_m_s3", 64, 256, 3, None, "M", "N"),
    ("hm_m64n256_wg_m_s4", 64, 256, 4, None, "M", "N"),
    ("hm_m64n256_wg_m_cluster_m", 64, 256, 4, "M", "M", "N"),
    ("hm_m64n256_wg_m_cluster_n", 64, 256, 3, "N", "M", "N"),
)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=None)
  p.add_argument("--shapes", nargs="*", default=list(SHAPES))
  p.add_argument("--variants", nargs="*", default=None,
                 help="hopper_matmul variants to time (default: all of VARIANTS)")
  a = p.parse_args(argv)
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm  # noqa: PLC0415
  D = hm.MatmulDimension
  recs = []
  for name in a.shapes:
    m, k, n = SHAPES[name]
    flops = 2.0 * m * k * n
    sets = []
    for i in range(2):
      k1, k2 = jax.random.split(jax.random.key(i))
      sets.append((jax.random.normal(k1, (m, k), BF16),
                   (jax.random.normal(k2, (k, n), BF16) * k ** -0.5).astype(BF16)))
    ref = jnp.dot(*sets[0], preferred_element_type=jnp.float32)

    def record(method, f):
      try:
        err = float(jnp.linalg.norm(f(*sets[0]).astype(jnp.float32) - ref)
                    / jnp.linalg.norm(ref))
        ms = timeit(f, sets)
        r = dict(shape=name, m=m, k=k, n=n, method=method, ms=ms,
                 tflops=flops / ms / 1e9, rel_err=err)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = dict(shape=name, method=method, error=f"{type(e).__name__}: {str(e)[:300]}")
      recs.append(r)
      print(json.dumps(r), flush=True)

    record("xla", jax.jit(jnp.dot))
    for label, tm, tn, st, cl, wgd, gmd in VARIANTS:
      if a.variants and label not in a.variants:
        continue
      cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=st,
                            grid_tile_width=16, grid_minor_dim=getattr(D, gmd),
                            wg_dimension=getattr(D, wgd),
                            cluster_dimension=cl and getattr(D, cl))
      record(label, jax.jit(lambda x, w, cfg=cfg: hm.matmul(x, w, None, cfg)))
    gs = jnp.array([m], jnp.int32)
    cfg = pm.select_config("gmm", m, k, n, 1, BF16)
    record("jmoe_mosaic_1group", jax.jit(lambda x, w: pm.gmm_call(
        x, w[None], gs, jnp.int32(0), transpose_rhs=False, out_dtype=BF16, cfg=cfg)))
  head = dict(device=str(jax.devices()[0].device_kind), jax_version=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat())
  for r in recs:
    x = [q for q in recs if q.get("shape") == r.get("shape") and q["method"] == "xla"]
    if "ms" in r and x and "ms" in x[0]:
      r["vs_xla"] = x[0]["ms"] / r["ms"]
  for r in recs:
    if "vs_xla" in r:
      print(f"{r['shape']:14s} {r['method']:22s} {r['ms']:8.3f} ms"
            f" {r['tflops']:6.0f} TF/s  vs xla {r['vs_xla']:.3f}"
            f"  err {r['rel_err']:.1e}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(dict(head, records=recs), f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
