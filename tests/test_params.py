"""The MoE layer's parameter table: every layer above the core reads the same rows.

init_params, check_params, the NNX and Linen modules and ExpertParallel.param_specs
are checked against `jmoe.MOE_PARAMS` itself: names, shapes, logical axes, which
rows exist, and which are state rather than weights.
"""

import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
import jmoe.linen as jlinen
import jmoe.nn as jnn
from jmoe import parallel

D, F, E, S = 16, 12, 4, 8
LAYOUTS = {
    "plain": dict(),
    "relu_shared": dict(activation="relu", shared_d_ff=S),
    "everything": dict(shared_d_ff=S, shared_gate=True, router_bias=True),
}


def _layout(activation="swiglu", **options):
  return jmoe.MoELayout(d_model=D, d_ff=F, num_experts=E,
                        glu=activation in ("swiglu", "geglu"), **options)


def test_table_covers_moe_params_once():
  leaves = {"router", "w_up", "w_down", "w_gate", "router_bias", "shared_gate"}
  leaves |= {f"shared.{f.name}" for f in dataclasses.fields(jmoe.FFNParams)}
  paths = [s.path for s in jmoe.MOE_PARAMS]
  assert sorted(paths) == sorted(leaves)
  assert {f.name for f in dataclasses.fields(jmoe.MoEParams)} == {
      p.split(".")[0] for p in paths}
  for s in jmoe.MOE_PARAMS + jmoe.FFN_PARAMS:
    assert len(s.axes) == len(s.shape), s
    assert set(s.axes) <= set(jnn.LOGICAL_AXES) | {None}, s
  seeds = [s.seed for s in jmoe.MOE_PARAMS if s.seed is not None]
  assert sorted(seeds) == list(range(len(seeds)))
  # The shared expert is the dense FFN's table with F read as S.
  shared = [s for s in jmoe.MOE_PARAMS if s.path.startswith("shared.")]
  assert [(s.name, s.shape, s.axes) for s in shared] == [
      (f.name, f.shape.replace("F", "S"), f.axes) for f in jmoe.FFN_PARAMS]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_init_params_builds_the_rows_of_its_layout(name):
  opts = dict(LAYOUTS[name])
  params = jmoe.init_params(jax.random.key(0), D, F, E, dtype=jnp.bfloat16,
                            **opts)
  layout = _layout(**opts)
  assert jmoe.MoELayout.of(params) == layout
  assert len(jax.tree.leaves(params)) == len(layout.rows())
  for s in layout.rows():
    value = jmoe._src.params.get_param(params, s.path)
    assert value.shape == layout.shape(s.path), s.path
    # Weights in the storage dtype; router state stays float32.
    assert value.dtype == (jnp.bfloat16 if s.trainable else jnp.float32), s.path
  # The seed column: each weight is the key of its row (seeds keep their values).
  keys = jax.random.split(jax.random.key(0), 8)
  want = jax.random.normal(keys[1], (E, D, F), jnp.float32) / jnp.sqrt(D)
  np.testing.assert_array_equal(np.asarray(params.w_up, np.float32),
                                np.asarray(want.astype(jnp.bfloat16), np.float32))
  if layout.router_bias:
    assert not np.asarray(params.router_bias).any()


def test_check_params_reads_the_table():
  params = jmoe.init_params(jax.random.key(0), D, F, E, shared_d_ff=S,
                            shared_gate=True)
  x = jnp.ones((3, D))
  check = lambda p: jmoe._src.params.check_params("f", x, p, "swiglu")
  check(params)
  bad = dataclasses.replace(params, shared_gate=jnp.ones((D, 2)))
  with pytest.raises(ValueError, match=r"`params.shared_gate` must have shape"
                     r" \[d_model, 1\]=\(16, 1\)"):
    check(bad)
  bad = dataclasses.replace(params, shared=dataclasses.replace(
      params.shared, w_gate=None))
  with pytest.raises(ValueError, match="needs `params.shared.w_gate`"):
    check(bad)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_nnx_module_variables_are_the_table_rows(name):
  opts = dict(LAYOUTS[name])
  activation = opts.pop("activation", "swiglu")
  m = nnx.eval_shape(lambda: jnn.MoE(D, F, E, config=jmoe.MoEConfig(
      activation=activation), rngs=nnx.Rngs(0), **opts))
  layout = _layout(activation, **opts)
  assert m.layout == layout
  flat = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(m))}
  rows = {s.module_path: s for s in layout.rows()}
  assert set(flat) == set(rows)
  for path, var in flat.items():
    s = rows[path]
    assert var.shape == layout.shape(s.path), path
    assert var.get_metadata()["out_sharding"] == s.axes, path
    assert isinstance(var, nnx.Param) == s.trainable, path
    assert isinstance(var, jnn.ExpertBias) == (not s.trainable), path


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_linen_variables_are_the_table_rows(name):
  opts = dict(LAYOUTS[name])
  activation = opts.pop("activation", "swiglu")
  moe = jlinen.MoE(F, E, config=jmoe.MoEConfig(activation=activation), **opts)
  variables = jax.eval_shape(moe.init, jax.random.key(0), jnp.ones((2, D)))
  specs = nn.get_partition_spec(variables)
  layout = _layout(activation, **opts)
  for s in layout.rows():
    col = "params" if s.trainable else jlinen.EXPERT_BIAS
    var, spec = variables[col], specs[col]
    for n in s.path.split("."):
      var, spec = var[n], spec[n]
    assert nn.unbox(var).shape == layout.shape(s.path), s.path
    assert spec == jax.sharding.PartitionSpec(*s.axes), s.path
  n_leaves = len(jax.tree.leaves(nn.unbox(variables)))
  assert n_leaves == len(layout.rows())


def test_expert_parallel_splits_the_experts_group():
  params = jmoe.init_params(jax.random.key(0), D, F, E, shared_d_ff=S,
                            shared_gate=True, router_bias=True)
  ep = parallel.ExpertParallel(jax.make_mesh((2, 4), ("data", "expert")))
  specs = ep.param_specs(params)
  assert jax.tree.structure(specs) == jax.tree.structure(params)
  for s in jmoe.MOE_PARAMS:
    want = (jax.sharding.PartitionSpec("expert") if s.group == "experts"
            else jax.sharding.PartitionSpec())
    assert jmoe._src.params.get_param(specs, s.path) == want, s.path


def test_layout_options_and_errors():
  layout = _layout(shared_d_ff=S, router_bias=True)
  assert layout.options() == dict(shared_d_ff=S, shared_gate=False,
                                  router_bias=True)
  assert [s.path for s in layout.rows()] == [
      "router", "w_gate", "w_up", "w_down", "shared.w_gate", "shared.w_up",
      "shared.w_down", "router_bias"]
  with pytest.raises(ValueError, match="shared_gate"):
    _layout(shared_gate=True)
  with pytest.raises(ValueError, match="shared_gate"):
    jmoe.init_params(jax.random.key(0), D, F, E, shared_gate=True)
  with pytest.raises(TypeError, match="unknown option"):
    jnn.MoE(D, F, E, shared_width=8, rngs=nnx.Rngs(0))
