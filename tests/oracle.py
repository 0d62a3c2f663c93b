"""The obviously-right MoE: every expert on every token, then masked and weighted.

    Y = sum_j s_j * FFN_{i_j}(X)      (the seed's Y = s0·FFN_i0(X) + s1·FFN_i1(X))

computed densely: all E expert FFNs run on all T tokens, and a [T, E] combine matrix
(weights where a token chose an expert and was kept, zero elsewhere) mixes them.
Capacity drops are decided by a plain Python loop over tokens in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jmoe


def capacity_keep(experts: np.ndarray, num_experts: int, capacity: int | None):
  """bool [T, k]: which (token, slot) pairs survive capacity, first come first served."""
  experts = np.asarray(experts)
  keep = np.ones(experts.shape, bool)
  if capacity is None:
    return keep
  count = np.zeros(num_experts, int)
  for t in range(experts.shape[0]):
    for j in range(experts.shape[1]):
      e = experts[t, j]
      if count[e] < capacity:
        count[e] += 1
      else:
        keep[t, j] = False
  return keep


def all_experts(x, params: jmoe.MoEParams, activation: str):
  """[E, T, D]: every expert's FFN applied to every token."""
  experts = jmoe.FFNParams(w_up=params.w_up, w_down=params.w_down,
                           w_gate=params.w_gate)
  one = lambda p: jmoe.ffn(x, p, activation).astype(jnp.float32)
  return jax.vmap(one)(experts)


def combine_matrix(routing, num_tokens: int, keep=None):
  """float32 [T, E]: the weight of expert e in token t's output (0 if unused)."""
  if isinstance(routing, jmoe.ExpertChoiceRouting):
    e, c = routing.tokens.shape
    onehot = jax.nn.one_hot(routing.tokens, num_tokens, dtype=jnp.float32)  # [E,C,T]
    return jnp.einsum("ect,ec->te", onehot, routing.weights)
  e = routing.probs.shape[-1]
  w = routing.weights
  if keep is not None:
    w = jnp.where(jnp.asarray(keep), w, 0.0)
  onehot = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32)  # [T,k,E]
  return jnp.einsum("tke,tk->te", onehot, w)


def oracle_moe(x, params: jmoe.MoEParams, config: jmoe.MoEConfig, *, keep=None,
               key=None, capacity=None):
  """Returns (y, routing). `keep`: optional bool [T, k] capacity mask (token choice).
  `capacity`: expert choice's picks per expert (default: the config's for T)."""
  shape = x.shape
  xt = x.reshape(-1, shape[-1])
  t = xt.shape[0]
  logits = jnp.dot(xt.astype(jnp.float32), params.router.astype(jnp.float32),
                   precision="highest")
  if capacity is None:
    capacity = config.capacity(t, params.num_experts)
  routing = jmoe.route(
      logits, config.router, bias=params.router_bias, key=key,
      capacity=capacity if config.router.kind == "expert_choice" else None)
  h = all_experts(xt, params, config.activation)  # [E, T, D]
  comb = combine_matrix(routing, t, keep)
  y = jnp.einsum("te,etd->td", comb, h, precision="highest")
  if params.shared is not None:
    s = jmoe.ffn(xt, params.shared, config.activation).astype(jnp.float32)
    if params.shared_gate is not None:
      s = s * jax.nn.sigmoid(xt.astype(jnp.float32) @ params.shared_gate.astype(jnp.float32))
    y = y + s
  return y.astype(x.dtype).reshape(shape), routing


def oracle_keep(x, params, config, capacity=None):
  """The capacity mask the oracle should use for this input (None if dropless).
  `capacity`: the per-expert capacity (default: the config's for x's tokens)."""
  xt = x.reshape(-1, x.shape[-1])
  cap = config.capacity(xt.shape[0], params.num_experts) if capacity is None else capacity
  if config.router.kind == "expert_choice" or cap is None:
    return None
  _, routing = oracle_moe(x, params, config)
  return capacity_keep(np.asarray(routing.experts), params.num_experts, cap)
