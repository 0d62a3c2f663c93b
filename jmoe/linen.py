"""A flax.linen wrapper of the MoE layer: a thin shell over `jmoe.moe_ffn`.

  y, aux = jmoe.linen.MoE(d_ff=..., num_experts=..., config=...)(x)

Variables (names mirror `jmoe.MoEParams`; every initializer is wrapped with
`nn.with_logical_partitioning`, so `nn.get_partition_spec(variables)` gives the
logical axis names and `nn.logical_to_mesh_sharding` turns them into shardings):

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
it with `jmoe.update_expert_bias(bias, aux.tokens_per_expert)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe._src import moe as moe_lib
from jmoe.nn import fan_in_init

Array = jax.Array

EXPERT_BIAS = "expert_bias"  # the collection of the non-trainable router bias
ROUTER_RNG = "router"  # the rng stream used for router noise when no key is given


class _FFNWeights(nn.Module):
  """The weights of a dense FFN of width `d_ff` as `jmoe.FFNParams`."""

  d_ff: int
  activation: str = "swiglu"
  param_dtype: Any = jnp.float32
  kernel_init: Callable = fan_in_init

  @nn.compact
  def __call__(self, d_model: int) -> moe_lib.FFNParams:
    p = lambda name, shape, names: self.param(
        name, nn.with_logical_partitioning(self.kernel_init, names), shape,
        self.param_dtype)
    w_gate = (p("w_gate", (d_model, self.d_ff), ("embed", "mlp"))
              if moe_lib.is_glu(self.activation) else None)
    return moe_lib.FFNParams(
        w_up=p("w_up", (d_model, self.d_ff), ("embed", "mlp")),
        w_down=p("w_down", (self.d_ff, d_model), ("mlp", "embed")),
        w_gate=w_gate)


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
      `jmoe.parallel.ExpertParallel`) called instead of `jmoe.moe_ffn`.
    dtype: compute dtype (None: x.dtype); param_dtype: storage dtype.
    kernel_init: initializer `(key, shape, dtype)` of every weight.
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

  @nn.compact
  def __call__(self, x: Array, *,
               key: Array | None = None) -> tuple[Array, moe_lib.MoEAux]:
    """y, aux = moe(x).

    Args:
      x: [..., d_model].
      key: PRNG key for router jitter / noise; None: the "router" rng stream if
        one was passed to `apply`, else no noise.

    Returns:
      y: [..., d_model] in the compute dtype; aux: `jmoe.MoEAux`.
    """
    if x.ndim < 1:
      raise ValueError(f"jmoe.linen.MoE: `x` must be [..., d_model]; got {x.shape}.")
    if self.shared_gate and not self.shared_d_ff:
      raise ValueError(
          "jmoe.linen.MoE: `shared_gate` needs a shared expert (shared_d_ff > 0).")
    cfg = self.config
    e, d, f = self.num_experts, x.shape[-1], self.d_ff
    p = lambda name, shape, names: self.param(
        name, nn.with_logical_partitioning(self.kernel_init, names), shape,
        self.param_dtype)
    router = p("router", (d, e), ("embed", "expert"))
    w_gate = (p("w_gate", (e, d, f), ("expert", "embed", "mlp"))
              if moe_lib.is_glu(cfg.activation) else None)
    w_up = p("w_up", (e, d, f), ("expert", "embed", "mlp"))
    w_down = p("w_down", (e, f, d), ("expert", "mlp", "embed"))
    shared = (_FFNWeights(self.shared_d_ff, cfg.activation, self.param_dtype,
                          self.kernel_init, name="shared")(d)
              if self.shared_d_ff else None)
    shared_gate = p("shared_gate", (d, 1), ("embed", None)) if self.shared_gate \
        else None
    bias = (self.variable(EXPERT_BIAS, "router_bias",
                          nn.with_logical_partitioning(jnp.zeros, ("expert",)),
                          (e,), jnp.float32).value
            if self.router_bias else None)
    params = moe_lib.MoEParams(router=router, w_up=w_up, w_down=w_down,
                               w_gate=w_gate, router_bias=bias, shared=shared,
                               shared_gate=shared_gate)
    if key is None and self.has_rng(ROUTER_RNG):
      key = self.make_rng(ROUTER_RNG)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.parallel is not None:
      return self.parallel.moe_ffn(x, params, cfg, key=key)
    return moe_lib.moe_ffn(x, params, cfg, key=key)


def moe_params(variables) -> moe_lib.MoEParams:
  """The `jmoe.MoEParams` of a `MoE`'s variables ({"params": ..., ["expert_bias":
  ...]}, boxed or not)."""
  variables = nn.meta.unbox(variables)
  p = variables["params"]
  s = p.get("shared")
  bias = variables.get(EXPERT_BIAS, {}).get("router_bias")
  return moe_lib.MoEParams(
      router=p["router"], w_up=p["w_up"], w_down=p["w_down"],
      w_gate=p.get("w_gate"), router_bias=bias,
      shared=None if s is None else moe_lib.FFNParams(
          w_up=s["w_up"], w_down=s["w_down"], w_gate=s.get("w_gate")),
      shared_gate=p.get("shared_gate"))
