"""Shared test helpers: one tolerance table keyed by dtype, and a relative-error check."""

import jax.numpy as jnp
import numpy as np

# Relative error ||out - ref|| / ||ref|| allowed for a result computed in `dtype`
# against a float32/float64 reference. Never loosen these to make a test pass.
RTOL = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 5e-3,
}


def tol(dtype) -> float:
  return RTOL[jnp.dtype(dtype)]


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  denom = np.linalg.norm(ref.ravel())
  num = np.linalg.norm((out - ref).ravel())
  return float(num / denom) if denom > 0 else float(num)


def assert_rel(out, ref, dtype=jnp.float32, what=""):
  assert np.all(np.isfinite(np.asarray(out, np.float64))), f"{what}: non-finite output"
  err = rel_err(out, ref)
  assert err < tol(dtype), f"{what}: relative error {err:.3g} >= {tol(dtype):.1g}"


def assert_tree_rel(out, ref, dtype=jnp.float32, what=""):
  import jax
  lo, lr = jax.tree.leaves(out), jax.tree.leaves(ref)
  assert len(lo) == len(lr), f"{what}: tree structure differs"
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(out)]
  for p, o, r in zip(paths, lo, lr):
    assert_rel(o, r, dtype, f"{what}{p}")
