"""jmoe.gmm (xla and reference) against a per-group loop: values, gradients, empties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jmoe
from tests.utils import assert_rel, assert_tree_rel, tol

M, K, N, G = 40, 16, 24, 5


def loop_reference(lhs, rhs, group_sizes, group_offset=0):
  """One jnp.dot per group on concrete slices; zeros for rows of other groups."""
  sizes = [int(s) for s in np.asarray(group_sizes)]
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  start = 0
  for g, s in enumerate(sizes):
    local = g - group_offset
    if 0 <= local < rhs.shape[0] and s:
      blk = jnp.dot(lhs[start:start + s].astype(jnp.float32),
                    rhs[local].astype(jnp.float32), precision="highest")
      out = out.at[start:start + s].set(blk)
    start += s
  return out


def inputs(dtype=jnp.float32, seed=0, g=G):
  k1, k2 = jax.random.split(jax.random.key(seed))
  lhs = jax.random.normal(k1, (M, K), dtype)
  rhs = jax.random.normal(k2, (g, K, N), dtype)
  return lhs, rhs


IMPLS = ["xla", "reference"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [[8, 0, 12, 0, 20], [40, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                                   [3, 7, 1, 9, 2], [0, 5, 5, 5, 0]])
def test_values_and_gradients(impl, sizes):
  lhs, rhs = inputs()
  gs = jnp.array(sizes, jnp.int32)
  out = jmoe.gmm(lhs, rhs, gs, implementation=impl)
  ref = loop_reference(lhs, rhs, gs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  total = sum(sizes)
  assert np.all(np.asarray(out)[total:] == 0), "rows past sum(group_sizes) must be 0"
  c = jax.random.normal(jax.random.key(1), out.shape)
  g = jax.grad(lambda a, b: jnp.sum(jmoe.gmm(a, b, gs, implementation=impl) * c),
               argnums=(0, 1))(lhs, rhs)
  g_ref = jax.grad(lambda a, b: jnp.sum(loop_reference(a, b, gs) * c), argnums=(0, 1))(lhs, rhs)
  np.testing.assert_allclose(np.asarray(g[0]), np.asarray(g_ref[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g[1]), np.asarray(g_ref[1]), rtol=1e-5, atol=1e-5)
  for i, s in enumerate(sizes):
    if s == 0:
      assert np.all(np.asarray(g[1][i]) == 0), "empty group must get a zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_accumulates_in_float32(impl):
  lhs, rhs = inputs(jnp.bfloat16, seed=2)
  gs = jnp.array([10, 0, 10, 10, 10], jnp.int32)
  out = jmoe.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32, implementation=impl)
  assert out.dtype == jnp.float32
  assert_rel(out, loop_reference(lhs, rhs, gs), jnp.float32, "bf16 in, f32 out")
  out16 = jmoe.gmm(lhs, rhs, gs, implementation=impl)
  assert out16.dtype == jnp.bfloat16
  assert_rel(out16, loop_reference(lhs, rhs, gs), jnp.bfloat16, "bf16 out")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [0, 2, 4])
def test_group_offset_local_range(impl, offset):
  lhs, _ = inputs(seed=3)
  g_local = 2 if offset < 4 else 1
  rhs = jax.random.normal(jax.random.key(4), (g_local, K, N))
  gs = jnp.array([6, 9, 0, 11, 8], jnp.int32)
  off = jnp.int32(offset)
  out = jax.jit(lambda a, b, s, o: jmoe.gmm(a, b, s, group_offset=o, implementation=impl))(
      lhs, rhs, gs, off)
  ref = loop_reference(lhs, rhs, gs, offset)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  c = jax.random.normal(jax.random.key(5), out.shape)
  g = jax.grad(lambda a, b: jnp.sum(jmoe.gmm(a, b, gs, group_offset=off,
                                             implementation=impl) * c), argnums=(0, 1))(lhs, rhs)
  g_ref = jax.grad(lambda a, b: jnp.sum(loop_reference(a, b, gs, offset) * c),
                   argnums=(0, 1))(lhs, rhs)
  assert_tree_rel(g, g_ref, jnp.float32, f"offset {offset} grads ")


_gmm_xla = jax.jit(lambda a, b, s: jmoe.gmm(a, b, s, implementation="xla"))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=G, max_size=G))
def test_fuzzed_group_sizes(sizes):
  # Fit into M rows: sum(sizes) <= M always holds (5 * 12 = 60 > 40, so clip).
  sizes = np.array(sizes)
  while sizes.sum() > M:
    sizes[np.argmax(sizes)] -= 1
  lhs, rhs = inputs(seed=int(sizes.sum()))
  gs = jnp.asarray(sizes, jnp.int32)
  out = _gmm_xla(lhs, rhs, gs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(loop_reference(lhs, rhs, gs)),
                             rtol=1e-5, atol=1e-5)


def test_default_implementation_on_cpu_is_xla():
  from jmoe._src.gmm import api
  if jax.devices()[0].platform == "cpu":
    assert api.default_implementation() == "xla"
