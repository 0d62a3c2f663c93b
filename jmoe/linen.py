"""A flax.linen wrapper of the MoE layer: a thin shell over `jmoe.moe_ffn`.

  y, aux = jmoe.linen.MoE(d_ff=..., num_experts=..., config=...)(x)

Variables (the rows of `jmoe.MOE_PARAMS`, named by their `jmoe.MoEParams` paths;
every initializer is wrapped with `nn.with_logical_partitioning`, so
`nn.get_partition_spec(variables)` gives the logical axis names and
`nn.logical_to_mesh_sharding` turns them into shardings):

  params:
    router       [D, E]     ("embed", "expert")
    w_gate       [E, D, F]  ("expert", "embed", "mlp")   GLU activations only
    w_up         [E, D, F]  ("expert", "embed", "mlp")
    w_down       [E, F, D]  ("expert", "mlp", "embed")
    shared/      w_gate, w_up [D, S] ("embed", "mlp"), w_down [S, D] ("mlp", "embed")
    shared_gate  [D, 1]     ("embed", None)
  expert_bias:   (collection `EXPERT_BIAS`, not trainable)
    router_bias  [E]        ("expert",)

`moe_params(variables)` rebuilds the `jmoe.MoEParams` of a variables dict. The
router bias is not in "params", so an optimizer over "params" never moves it; step
every bias of a model with `update_router_biases(variables, intermediates)`.

Aux: each call returns its `jmoe.MoEAux` and sows it in the "intermediates"
collection under "moe_aux" (kept when `apply(..., mutable=["intermediates"])`);
`jmoe.nn.collect_aux(state["intermediates"])` stacks a whole model's records and
`jmoe.nn.total_aux_loss` weights them. Router noise: an explicit `key`, else the
"router" rng stream (`apply(..., rngs={"router": key})`) unless `deterministic`.
Input and output are constrained to the logical activation names
`jmoe.nn.ACTIVATION_AXES` under `nn.logical_axis_rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe._src import moe as moe_lib
from jmoe._src import params as params_lib
from jmoe._src import routing as routing_lib
from jmoe._src.nn import aux as aux_lib
from jmoe._src.nn.moe import AUX_NAME, ROUTER_RNG, run_layer
from jmoe.nn import fan_in_init

Array = jax.Array

EXPERT_BIAS = "expert_bias"  # the collection of the non-trainable router bias


def _create(module: nn.Module, spec: params_lib.ParamSpec, sizes, param_dtype,
            kernel_init: Callable) -> Array:
  """The variable of one table row in `module` (a param, or router state)."""
  shape = spec.shape_of(sizes)
  if not spec.trainable:
    return module.variable(EXPERT_BIAS, spec.name,
                           nn.with_logical_partitioning(jnp.zeros, spec.axes),
                           shape, jnp.float32).value
  init = jax.nn.initializers.zeros if spec.init == "zeros" else kernel_init
  return module.param(spec.name, nn.with_logical_partitioning(init, spec.axes),
                      shape, param_dtype)


class _FFNWeights(nn.Module):
  """The weights of a dense FFN of width `d_ff` (`jmoe.FFN_PARAMS`) as
  `jmoe.FFNParams`."""

  d_ff: int
  activation: Any = "swiglu"
  param_dtype: Any = jnp.float32
  kernel_init: Callable = fan_in_init

  @nn.compact
  def __call__(self, d_model: int) -> moe_lib.FFNParams:
    flags = {"glu": moe_lib.is_glu(self.activation)}
    sizes = {"D": d_model, "F": self.d_ff}
    return moe_lib.FFNParams(**{
        s.name: _create(self, s, sizes, self.param_dtype, self.kernel_init)
        for s in params_lib.FFN_PARAMS if s.present(flags)})


class MoE(nn.Module):
  """A Mixture-of-Experts FFN: `y, aux = MoE(...)(x)`, d_model inferred from x.

  Attributes:
    d_ff: each expert's hidden width F.
    num_experts: E.
    config: the `jmoe.MoEConfig`.
    shared_d_ff: width of the shared expert(s); 0 for none.
    shared_gate: gate the shared output by sigmoid(x @ shared_gate) (Qwen2-MoE).
    router_bias: keep a selection-only router bias in collection `EXPERT_BIAS`.
    parallel: None, or an object with `moe_ffn(x, params, config, *, key)` (e.g.
      `jmoe.parallel.ExpertParallel`) called instead of `jmoe.moe_ffn` (given
      `mask=` / `deterministic=True` too when the call passes them).
    dtype: compute dtype (None: x.dtype); param_dtype: storage dtype.
    kernel_init: initializer `(key, shape, dtype)` of every weight.
    deterministic: no router noise from the "router" rng stream (as
      `nn.Dropout`); the call's argument overrides it.
    remat: None, True or a `jax.checkpoint` policy over the layer's named
      intermediates (`jmoe.MOE_CHECKPOINT_NAMES`), as `jmoe.nn.MoE`'s.
  """

  d_ff: int
  num_experts: int
  config: moe_lib.MoEConfig = moe_lib.MoEConfig()
  shared_d_ff: int = 0
  shared_gate: bool = False
  router_bias: bool = False
  parallel: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = fan_in_init
  deterministic: bool | None = None
  remat: Any = None

  @nn.compact
  def __call__(self, x: Array, *, key: Array | None = None,
               mask: Array | None = None,
               deterministic: bool | None = None
               ) -> tuple[Array, moe_lib.MoEAux]:
    """y, aux = moe(x).

    Args:
      x: [..., d_model].
      key: PRNG key for router jitter / noise; None: the "router" rng stream if
        one was passed to `apply` and not deterministic, else no noise.
      mask: optional bool [...] (x.shape[:-1]), True for real tokens (see
        `jmoe.moe_ffn`).
      deterministic: overrides the attribute for this call. Deterministic means
        evaluation: the config's `eval_capacity_factor` and no router noise.

    Returns:
      y: [..., d_model] in the compute dtype; aux: `jmoe.MoEAux`.
    """
    if x.ndim < 1:
      raise ValueError(f"jmoe.linen.MoE: `x` must be [..., d_model]; got {x.shape}.")
    cfg = self.config
    try:
      layout = params_lib.MoELayout(
          d_model=x.shape[-1], d_ff=self.d_ff, num_experts=self.num_experts,
          glu=moe_lib.is_glu(cfg.activation), shared_d_ff=self.shared_d_ff,
          shared_gate=self.shared_gate, router_bias=self.router_bias)
    except ValueError as err:
      raise ValueError(f"jmoe.linen.MoE: {err}") from None
    values = {}
    for s in layout.rows():  # table order: the shared rows come as one FFN
      if s.path.startswith("shared."):
        if "shared.w_up" not in values:
          ffn = _FFNWeights(layout.shared_d_ff, cfg.activation, self.param_dtype,
                            self.kernel_init, name="shared")(layout.d_model)
          values.update({f"shared.{k}": v for k, v in vars(ffn).items()
                         if v is not None})
      else:
        values[s.path] = _create(self, s, layout.sizes, self.param_dtype,
                                 self.kernel_init)
    params = params_lib.params_from_flat(values)
    if deterministic is None:
      deterministic = bool(self.deterministic)
    if key is None and not deterministic and self.has_rng(ROUTER_RNG):
      key = self.make_rng(ROUTER_RNG)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y, aux = run_layer(x, params, cfg, parallel=self.parallel, remat=self.remat,
                       key=key, mask=mask, deterministic=deterministic)
    self.sow("intermediates", AUX_NAME, aux)
    return y, aux


def moe_params(variables) -> moe_lib.MoEParams:
  """The `jmoe.MoEParams` of a `MoE`'s variables ({"params": ..., ["expert_bias":
  ...]}, boxed or not)."""
  variables = nn.meta.unbox(variables)
  values = {}
  for s in params_lib.MOE_PARAMS:
    value = variables["params"] if s.trainable else variables.get(EXPERT_BIAS, {})
    for name in s.path.split("."):
      value = value.get(name) if value is not None else None
    if value is not None:
      values[s.path] = value
  return params_lib.params_from_flat(values)


def update_router_biases(variables, record, *, rate: float = 1e-3):
  """`variables` with one `jmoe.update_expert_bias` step of every router bias.

  Args:
    variables: a Linen model's variables ({"params": ..., "expert_bias": ...});
      every "router_bias" in the `EXPERT_BIAS` collection is stepped.
    record: the "intermediates" collection of an
      `apply(..., mutable=["intermediates"])` (or the state holding it), matched
      by module path (a layer's calls summed; layers without a record are left
      alone); or a stacked record (`jmoe.nn.collect_aux`, or its
      tokens_per_expert [L, E]) with one row per router bias, in path order.
    rate: the update speed.

  Returns:
    A new variables dict (a plain dict; the other collections as they were).
  """
  fn = "jmoe.linen.update_router_biases"
  biases = []

  def walk(node, path):
    for k, v in node.items():
      if k == "router_bias" and not hasattr(v, "items"):
        biases.append((path, v))
      elif hasattr(v, "items"):
        walk(v, path + (k,))

  variables = nn.meta.unbox(variables)
  walk(variables.get(EXPERT_BIAS, {}), ())
  if not biases:
    raise ValueError(f"{fn}: `variables` hold no router bias (collection"
                     f" {EXPERT_BIAS!r}; build the MoE with router_bias=True).")
  biases.sort(key=lambda e: aux_lib.path_key(e[0]))
  tokens = aux_lib.tokens_by_path(fn, record, [p for p, _ in biases])
  out = _to_dict(variables)  # new dicts, same leaves
  for (path, bias), t in zip(biases, tokens):
    if t is None:
      continue
    node = out[EXPERT_BIAS]
    for k in path:
      node = node[k]
    node["router_bias"] = routing_lib.update_expert_bias(bias, t, rate=rate)
  return out


def _to_dict(tree):
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree
