"""XLA:CPU dot speed by operand dtype and layout: the figures behind the "cpu"
backend's bf16 products (benchmarks/NOTES.md, "CPU: bf16 products").

  python -m benchmarks.cpu_dot_probe [--out FILE]

At cpu-tiny's bucket shape ([L, C, k] = [8, 640, 128], n = 128), best of 5 means:
the batched forward dot in float32, bf16 -> float32 and float16 -> float32; the
weight-gradient dot with the contraction over the middle axis ([L, C, k] x
[L, C, n]) against the same dot with its left operand already [L, k, C]; the
bucket weight gradient with its gathers, as the backend had it and as it is
(gathered straight into [L, k, C]); and a dense SwiGLU of cpu-tiny's layer
(2048 x 128 -> 256 -> 128) fwd+bwd with bf16 and with float32 dot outputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
BATCH = (((2,), (1,)), ((0,), (0,)))      # [L, a, b] x [L, b, c]
MIDDLE = (((1,), (1,)), ((0,), (0,)))     # [L, C, k] x [L, C, n]


def bench(f, *args, n=50, reps=5):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(n):
      r = f(*args)
    jax.block_until_ready(r)
    best = min(best, (time.perf_counter() - t) / n * 1e3)
  return best


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  L, C, K, N, m = 8, 640, 128, 128, 4096
  ks = jax.random.split(jax.random.key(0), 8)
  rec = {}
  for name, dt in (("f32", F32), ("bf16", BF16), ("f16", F16)):
    x = jax.random.normal(ks[0], (L, C, K), dt)
    w = jax.random.normal(ks[1], (L, K, N), dt)
    rec[f"fwd_batched_{name}_to_f32"] = bench(
        lambda x, w: lax.dot_general(x, w, BATCH, preferred_element_type=F32), x, w)
  x = jax.random.normal(ks[0], (L, C, K), BF16)
  w = jax.random.normal(ks[1], (L, K, N), BF16)
  y = jax.random.normal(ks[2], (L, C, N), BF16)
  rec["fwd_batched_bf16_to_bf16"] = bench(
      lambda x, w: lax.dot_general(x, w, BATCH), x, w)
  rec["tgmm_middle_axis_bf16"] = bench(
      lambda x, y: lax.dot_general(x, y, MIDDLE, preferred_element_type=F32), x, y)
  rec["tgmm_middle_axis_f32"] = bench(
      lambda x, y: lax.dot_general(x.astype(F32), y.astype(F32), MIDDLE), x, y)
  xt = jnp.swapaxes(x, 1, 2)
  rec["tgmm_lhs_given_as_LkC_bf16"] = bench(
      lambda xt, y: lax.dot_general(xt, y, BATCH, preferred_element_type=F32), xt, y)
  X = jax.random.normal(ks[3], (m, K), BF16)
  Y = jax.random.normal(ks[4], (m, N), BF16)
  idx = jnp.minimum(jnp.arange(L)[:, None] * (m // L) + jnp.arange(C)[None, :], m - 1)
  rec["tgmm_bucket_gathers_middle_axis_bf16"] = bench(
      lambda X, Y: lax.dot_general(jnp.take(X, idx, 0), jnp.take(Y, idx, 0), MIDDLE,
                                   preferred_element_type=F32), X, Y)
  rec["tgmm_bucket_gathers_LkC_bf16"] = bench(
      lambda X, Y: lax.dot_general(
          X[idx[:, None, :], jnp.arange(K)[None, :, None]], jnp.take(Y, idx, 0),
          BATCH, preferred_element_type=F32), X, Y)
  T, D, Fh = 2048, 128, 256
  xs = jax.random.normal(ks[5], (T, D), BF16)
  ws = [jax.random.normal(k, s, F32) * 0.1
        for k, s in zip(ks[6:8], ((D, Fh), (D, Fh)))] + [
            jax.random.normal(ks[7], (Fh, D), F32) * 0.1]

  def ffn(x, w1, w3, w2, pref):
    dot = (lambda a, b: jnp.dot(a, b.astype(BF16), preferred_element_type=F32)
           ) if pref else (lambda a, b: jnp.dot(a, b.astype(BF16)))
    h = (jax.nn.silu(dot(x, w1).astype(F32)) * dot(x, w3).astype(F32)).astype(BF16)
    return dot(h, w2).astype(BF16)

  for pref in (False, True):
    loss = lambda *a, pref=pref: jnp.sum(ffn(*a, pref).astype(F32) ** 2)
    g = jax.grad(loss, argnums=(0, 1, 2, 3))
    rec[f"dense_swiglu_fwdbwd_{'f32' if pref else 'bf16'}_outputs"] = bench(
        lambda *a, g=g: g(*a), xs, *ws)
  dev = jax.devices()[0]
  out = dict(device=f"{dev.platform}:{dev.device_kind}", jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
             units="ms (best of 5 means)", shapes=dict(L=L, C=C, k=K, n=N, m=m),
             results=rec)
  print(json.dumps(out, indent=1))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
