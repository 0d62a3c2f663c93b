"""Parameters with logical axis names, and the sharding helpers that read them.

Sharding is data. Every parameter is an `nnx.Param` (the MoE selection bias an
`ExpertBias`, which is not a Param) carrying the logical names of its axes in its
`out_sharding` metadata:

  "embed"     d_model
  "expert"    the expert axis
  "mlp"       FFN hidden width (experts, shared expert, dense FFN)
  "vocab"     vocabulary
  "q_heads"   query heads;  "kv_heads": key/value heads;  "head_dim": head width
  None        unsharded

`logical_partition_specs(model, rules)` turns them into a tree of mesh
`PartitionSpec`s, `logical_shardings(model, mesh, rules)` into `NamedSharding`s:

  rules = (("expert", "ep"), ("mlp", "tp"))
  shardings = jmoe.nn.logical_shardings(model, mesh, rules)
  nnx.update(model, jax.device_put(nnx.state(model), shardings))

The same with flax's own functions (flax 0.12 has no `nnx.logical_to_mesh_sharding`;
the linen one works on nnx states):

  specs = nnx.get_partition_spec(nnx.state(model))   # logical names as P(...)
  shardings = flax.linen.logical_to_mesh_sharding(specs, mesh, rules)

(Calling `nnx.get_partition_spec` under `nnx.logical_axis_rules(rules)` instead
keeps names without a rule as they are, so there the rules must name every axis:
`complete_rules(rules)`.)

Parameters are created with `eager_sharding=False` by default, so modules build with
or without a mesh. Pass `eager_sharding=True` to create them already sharded; that
needs an active mesh and rules naming every logical axis, e.g.

  with jax.set_mesh(mesh), nnx.logical_axis_rules(complete_rules(rules)):
    model = MoETransformerLM(..., eager_sharding=True, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as _linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jmoe._src import checks
from jmoe._src import params as params_lib

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]

LOGICAL_AXES = ("embed", "expert", "mlp", "vocab", "q_heads", "kv_heads",
                "head_dim")

# The logical names of an activation x [batch, ..., d_model]: the first axis,
# the middle ones (sequence), the last. `constrain_activation` applies them.
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


class ExpertBias(nnx.Variable):
  """The selection-only router bias [E] (aux-loss-free balancing): the state rows
  (`trainable=False`) of `jmoe.MOE_PARAMS`.

  Not an `nnx.Param`: `nnx.grad` and `nnx.Optimizer(..., wrt=nnx.Param)` leave it
  alone; it moves only through `update_bias` (`jmoe.update_expert_bias`).
  """


def param(value: Array, names: Sequence[str | None], *,
          eager_sharding: bool = False, variable_type: type = nnx.Param):
  """A Variable (an `nnx.Param` by default) with logical axis names.

  Args:
    value: the initial value.
    names: one logical name (or None) per axis of `value`, see `LOGICAL_AXES`.
    eager_sharding: shard the value at creation (needs an active mesh and
      `nnx.logical_axis_rules` naming every axis). False: metadata only.
    variable_type: the Variable class (`nnx.Param`, `ExpertBias`, ...).
  """
  names = tuple(names)
  if len(names) != np.ndim(value):
    raise ValueError(
        f"param: {len(names)} logical names {names} for a value of shape"
        f" {np.shape(value)}.")
  return variable_type(value, out_sharding=names, eager_sharding=eager_sharding)


def complete_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
  """`rules` plus (name, None) for every name of `LOGICAL_AXES` it leaves out."""
  rules = tuple((n, m) for n, m in rules)
  named = {n for n, _ in rules}
  return rules + tuple((n, None) for n in LOGICAL_AXES if n not in named)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_partition_specs(tree, rules: Sequence[tuple[str, Any]] | None = None):
  """Mesh `PartitionSpec`s of a module's (or state's) Variables, from their names.

  Args:
    tree: an `nnx.Module`, or a state / pytree of `nnx.Variable`s (for instance
      `nnx.state(model, nnx.Param)`).
    rules: (logical name, mesh axis | tuple of mesh axes | None) pairs in priority
      order, as in `flax.linen.logical_to_mesh_axes`: a name with no rule, or whose
      mesh axis is already used by another dimension, is unsharded. None: return
      the logical names themselves as `PartitionSpec`s.

  Returns:
    The state of `tree` (`nnx.state(tree)` for a module) with every Variable's value
    replaced by its `PartitionSpec` (`PartitionSpec()` for a Variable without
    names). Same structure as the state, like `nnx.get_partition_spec`.
  """
  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

  def spec(v):
    if not isinstance(v, nnx.Variable):
      return jax.sharding.PartitionSpec()
    names = v.get_metadata().get("out_sharding")
    if not names:
      return v.replace(jax.sharding.PartitionSpec())
    if rules is None:
      return v.replace(jax.sharding.PartitionSpec(*names))
    return v.replace(_linen.logical_to_mesh_axes(names, tuple(rules)))

  return jax.tree.map(spec, state, is_leaf=_is_variable)


def logical_shardings(tree, mesh: jax.sharding.Mesh,
                      rules: Sequence[tuple[str, Any]]):
  """`NamedSharding`s on `mesh` of `logical_partition_specs(tree, rules)`."""
  specs = logical_partition_specs(tree, rules)
  return jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def normal_init(key: Array, shape: tuple[int, ...], dtype, fan_in: int) -> Array:
  # Jitted: one small program per (shape, dtype) instead of one per op.
  x = jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)
  return x.astype(dtype)


def fan_in_init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
  """Normal with variance 1/fan_in, fan_in = shape[-2] (as `jmoe.init_params`).

  The one default of every [..., in, out] weight here: router [D, E], experts
  [E, D, F] / [E, F, D], FFN [D, F] / [F, D], head [D, vocab]; leading axes are
  batch (experts).
  """
  shape = tuple(shape)
  return normal_init(key, shape, jnp.dtype(dtype), shape[-2])


def table_variable(spec: params_lib.ParamSpec, sizes, *, rngs: nnx.Rngs,
                   param_dtype, kernel_init: Initializer,
                   eager_sharding: bool) -> nnx.Variable:
  """The Variable of one row of a parameter table (`jmoe.MOE_PARAMS`,
  `jmoe.FFN_PARAMS`) at `sizes`: an `nnx.Param` from `kernel_init` (or zeros), or
  for state rows (`trainable=False`) a float32 `ExpertBias` of zeros."""
  shape = spec.shape_of(sizes)
  dtype = param_dtype if spec.trainable else jnp.float32
  value = (jnp.zeros(shape, dtype) if spec.init == "zeros"
           else kernel_init(rngs.params(), shape, dtype))
  return param(value, spec.axes, eager_sharding=eager_sharding,
               variable_type=nnx.Param if spec.trainable else ExpertBias)


def activation_names(ndim: int) -> tuple[str | None, ...]:
  """The logical names of an activation of rank `ndim` >= 1: [..., D] ->
  ("activation_batch", "activation_length", ..., "activation_embed"); a rank-2
  [T, D] is ("activation_batch", "activation_embed"); axes past the second
  sequence axis are None."""
  batch, length, embed = ACTIVATION_AXES
  if ndim == 1:
    return (embed,)
  middle = (length,) + (None,) * (ndim - 3) if ndim > 2 else ()
  return (batch,) + middle + (embed,)


def constrain_activation(x: Array) -> Array:
  """x constrained to the mesh axes its `ACTIVATION_AXES` names map to under the
  active `nnx.logical_axis_rules` (or `flax.linen.logical_axis_rules`); x itself
  when no rules are active or none of the names has a rule.

  On a mesh of Explicit axes (`jax.set_mesh`) it reshards
  (`jax.sharding.reshard`), on Auto axes it is `with_sharding_constraint`.
  """
  rules = _linen.get_logical_axis_rules()
  if not rules:
    return x
  spec = _linen.logical_to_mesh_axes(activation_names(np.ndim(x)), rules)
  if all(a is None for a in spec):
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(
        "jmoe.nn: logical axis rules for the activations need a mesh: run under"
        " `jax.set_mesh(mesh)` (or give no rule for the names"
        f" {ACTIVATION_AXES}).")
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def check_features(fn: str, x: Array, d_model: int) -> None:
  if np.ndim(x) < 1 or x.shape[-1] != d_model:
    raise ValueError(
        f"{fn}: `x` must have shape [..., d_model] with d_model={d_model}; got"
        f" shape {np.shape(x)}.")
  checks.check_floating(fn, "x", x)


def value_or_none(v):
  return None if v is None else v[...]

