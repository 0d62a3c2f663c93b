"""Router gating: logits -> routing decisions, plus the router losses.

All router math runs in float32 whatever dtype the logits arrive in.

Routing kinds (token choice, expert choice) differ behind one small interface, so
nothing downstream branches on the kind:
  * before routing, `RoutingKind` (`RouterConfig.kind_impl`): its checks, its static
    capacity, whether it takes a selection bias or works on a shard of the batch
    (`per_token`), and its selection rule;
  * after routing, the result (`Routing` or `ExpertChoiceRouting`): `num_tokens`,
    `num_slots`, `plan(capacity)` (its dispatch plan) and `balance_loss(load)`.

Shapes: T tokens, E experts, k experts per token, C tokens per expert (expert choice).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src import permute as permute_lib

Array = jax.Array

SCORES = ("softmax", "sigmoid")
ORDERS = ("softmax_topk", "topk_softmax")
GROUP_SCORES = ("max", "top2_sum")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
  """How router logits become routing decisions. Plain data: hashable, frozen.

  Attributes:
    top_k: experts per token (token choice), or the average experts per token that
      sets each expert's capacity (expert choice).
    score: "softmax" (Switch, GShard, Mixtral, Qwen, OLMoE) or "sigmoid"
      (DeepSeek-V3: independent per-expert scores).
    order: with softmax scores, "softmax_topk" (softmax over all experts, then pick
      the top-k probabilities: Switch/GShard/Qwen/OLMoE) or "topk_softmax" (pick the
      top-k logits, then softmax over those k: Mixtral). Ignored for sigmoid.
    normalize: renormalise the k combine weights of each token to sum to 1
      (`norm_topk_prob`). "topk_softmax" is normalised by construction.
    routed_scaling_factor: multiplies the combine weights (DeepSeek-V3: 2.5).
    num_groups: split the experts into this many equal groups (grouped /
      device-limited routing, DeepSeek-V3 `n_group`). 1 turns grouping off.
    top_groups: how many groups each token may use (`topk_group`).
    group_score: how a group is scored for group selection: "max" of its experts'
      scores (DeepSeek-V2) or "top2_sum" (DeepSeek-V3).
    kind: "token_choice" (each token picks k experts) or "expert_choice" (each
      expert picks its top-C tokens, Zhou et al. 2022).
    jitter_eps: multiplicative jitter on the logits, U(1-eps, 1+eps) (Switch).
    noise_std: additive Gaussian noise on the logits (noisy top-k, Shazeer 2017).
      Both noises apply only when a PRNG key is passed: training passes a key,
      evaluation does not.
  """

  top_k: int = 2
  score: Literal["softmax", "sigmoid"] = "softmax"
  order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
  normalize: bool = False
  routed_scaling_factor: float = 1.0
  num_groups: int = 1
  top_groups: int = 1
  group_score: Literal["max", "top2_sum"] = "max"
  kind: Literal["token_choice", "expert_choice"] = "token_choice"
  jitter_eps: float = 0.0
  noise_std: float = 0.0

  def __post_init__(self):
    fn = "RouterConfig"
    checks.check_choice(fn, "score", self.score, SCORES)
    checks.check_choice(fn, "order", self.order, ORDERS)
    checks.check_choice(fn, "kind", self.kind, KINDS)
    checks.check_choice(fn, "group_score", self.group_score, GROUP_SCORES)
    if not isinstance(self.top_k, int) or self.top_k <= 0:
      raise ValueError(f"{fn}: `top_k` must be a positive int; got {self.top_k!r}.")
    if not isinstance(self.num_groups, int) or self.num_groups <= 0:
      raise ValueError(
          f"{fn}: `num_groups` must be a positive int; got {self.num_groups!r}."
      )
    if not 1 <= self.top_groups <= self.num_groups:
      raise ValueError(
          f"{fn}: `top_groups` must be in [1, num_groups={self.num_groups}]; got"
          f" {self.top_groups!r}."
      )
    if self.jitter_eps < 0 or self.noise_std < 0:
      raise ValueError(
          f"{fn}: `jitter_eps` and `noise_std` must be >= 0; got"
          f" {self.jitter_eps}, {self.noise_std}."
      )
    self.kind_impl.check(self, fn)

  @property
  def kind_impl(self) -> RoutingKind:
    """The `RoutingKind` named by `kind`."""
    return ROUTING_KINDS[self.kind]

  def capacity(self, num_tokens: int, num_experts: int,
               capacity_factor: float | None = None) -> int | None:
    """The static per-expert capacity of a batch, or None for dropless.

    Token choice: None without a capacity factor, else `expert_capacity`. Expert
    choice always has one: the factor defaults to 1.0 (each expert takes
    T * top_k / E tokens).
    """
    return self.kind_impl.capacity(self, num_tokens, num_experts, capacity_factor)

  def validate(self, num_experts: int, fn: str = "route") -> None:
    """Checks the config against the number of experts."""
    self.kind_impl.validate(self, num_experts, fn)
    if num_experts % self.num_groups:
      raise ValueError(
          f"{fn}: the number of experts ({num_experts}) must be divisible by"
          f" `num_groups`={self.num_groups}."
      )
    if self.num_groups > 1:
      per_group = num_experts // self.num_groups
      if self.group_score == "top2_sum" and per_group < 2:
        raise ValueError(
            f"{fn}: group_score='top2_sum' needs >= 2 experts per group; got"
            f" {per_group}."
        )
      if self.top_k > self.top_groups * per_group:
        raise ValueError(
            f"{fn}: `top_k`={self.top_k} exceeds the experts reachable in"
            f" top_groups={self.top_groups} groups of {per_group}."
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """Token-choice routing: which k experts each token goes to, and with what weight.

  Attributes:
    experts: int32 [T, k], the chosen experts of each token, best first.
    weights: float32 [T, k], combine weights. NaN for tokens whose logits hold NaN
      or +inf (see `route`).
    probs: float32 [T, E], router probabilities (softmax, or sigmoid scores
      normalised per token): the P of the load-balancing loss.
    logits: float32 [T, E], the router logits (after noise): z-loss input.
  """

  experts: Array
  weights: Array
  probs: Array
  logits: Array

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def num_tokens(self) -> int:
    return self.probs.shape[0]

  @property
  def num_slots(self) -> int:
    """T * k: the (token, slot) pairs routed."""
    return self.experts.size

  def plan(self, capacity: int | None = None) -> permute_lib.DispatchPlan:
    """The dispatch plan (`jmoe.dispatch_plan`): dropless, or `capacity` rows per
    expert."""
    return permute_lib.dispatch_plan(self.experts, self.num_experts,
                                     capacity=capacity)

  def balance_loss(self, expert_load: Array, *, num_slots=None,
                   mean_probs: Array | None = None) -> Array:
    """The Switch/GShard loss from the pairs per expert [E] (a plan's
    `expert_load`). `num_slots` and `mean_probs` [E] default to this routing's;
    jmoe.parallel passes the whole batch's."""
    return switch_loss(
        expert_load, self.num_slots if num_slots is None else num_slots,
        mean_router_probs(self.probs) if mean_probs is None else mean_probs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertChoiceRouting:
  """Expert-choice routing: which C tokens each expert takes.

  Attributes:
    tokens: int32 [E, C], the tokens each expert picked, ascending (token order).
    weights: float32 [E, C], the router probability of each picked (token, expert).
    probs: float32 [T, E], router probabilities.
    logits: float32 [T, E], router logits (after noise).
  """

  tokens: Array
  weights: Array
  probs: Array
  logits: Array

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def num_tokens(self) -> int:
    return self.probs.shape[0]

  @property
  def num_slots(self) -> int:
    """E * C: the (expert, pick) pairs routed."""
    return self.tokens.size

  def plan(self, capacity: int | None = None) -> permute_lib.DispatchPlan:
    """The dispatch plan: expert e owns rows e*C:(e+1)*C. `capacity` is unused
    (the routing already holds C tokens per expert)."""
    del capacity
    return permute_lib.expert_choice_plan(self.tokens, self.num_tokens)

  def balance_loss(self, expert_load: Array, **unused) -> Array:
    """Zero: every expert takes exactly C tokens, balanced by construction."""
    del expert_load, unused
    return jnp.zeros((), jnp.float32)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """Static per-expert capacity: ceil(capacity_factor * tokens * top_k / experts).

  Clipped to [1, tokens] so a buffer never holds more rows than there are tokens.
  """
  if capacity_factor <= 0:
    raise ValueError(
        f"expert_capacity: `capacity_factor` must be > 0; got {capacity_factor}."
    )
  cap = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
  return int(min(max(cap, 1), num_tokens))


def apply_noise(logits: Array, config: RouterConfig, key: Array | None, *,
                row_start: Array | int = 0, total_rows: int | None = None) -> Array:
  """The config's jitter / noise on float32 logits [T, E] (identity without a key).

  The random numbers are drawn for a [total_rows, E] batch and rows
  row_start : row_start + T are used, so a shard of a batch (jmoe.parallel) gets
  exactly the noise the whole batch would get.
  """
  logits = logits.astype(jnp.float32)
  if key is None or (config.jitter_eps == 0 and config.noise_std == 0):
    return logits
  shape = (logits.shape[0] if total_rows is None else total_rows, logits.shape[1])
  rows = lambda a: jax.lax.dynamic_slice_in_dim(a, row_start, logits.shape[0], 0)
  k_jitter, k_noise = jax.random.split(key)
  if config.jitter_eps > 0:
    logits = logits * rows(jax.random.uniform(
        k_jitter, shape, jnp.float32,
        1.0 - config.jitter_eps, 1.0 + config.jitter_eps))
  if config.noise_std > 0:
    logits = logits + config.noise_std * rows(jax.random.normal(
        k_noise, shape, jnp.float32))
  return logits


def _group_mask(selection: Array, config: RouterConfig) -> Array:
  """Keeps the experts of each token's `top_groups` best groups; -inf elsewhere."""
  t, e = selection.shape
  g = config.num_groups
  grouped = selection.reshape(t, g, e // g)
  if config.group_score == "max":
    group_scores = grouped.max(axis=-1)
  else:
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
  _, best = jax.lax.top_k(group_scores, config.top_groups)  # [T, top_groups]
  keep = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], best].set(True)
  keep = jnp.repeat(keep, e // g, axis=1)
  return jnp.where(keep, selection, -jnp.inf)


def route(
    logits: Array,
    config: RouterConfig | None = None,
    *,
    bias: Array | None = None,
    key: Array | None = None,
    capacity: int | None = None,
    **overrides,
) -> Routing | ExpertChoiceRouting:
  """Turns router logits into routing decisions.

  Args:
    logits: [T, E] router logits, any float dtype (computed in float32).
    config: a `RouterConfig`; keyword `overrides` replace its fields (or build one:
      `route(logits, top_k=2, score="sigmoid")`).
    bias: optional float [E] per-expert bias added to the *selection* scores only,
      never to the combine weights (DeepSeek-V3's aux-loss-free balancing; see
      `update_expert_bias`). Selection scores are the probabilities (softmax_topk),
      the logits (topk_softmax) or the sigmoid scores. No gradient flows into it.
    key: PRNG key enabling the config's jitter / noise (training only).
    capacity: expert choice: tokens per expert (default
      `config.capacity(T, E)`, i.e. `expert_capacity(T, E, top_k, 1.0)`). Token
      choice ignores it (capacity is applied by the dispatch plan).

  Returns:
    `Routing` for token choice, `ExpertChoiceRouting` for expert choice.

  Non-finite logits: a token whose logits hold NaN or +inf gets NaN combine
  weights, so its output (and any loss built on it) turns NaN instead of being
  routed silently to arbitrary experts. -inf is allowed and means "this expert is
  unavailable to this token" (probability 0). `moe_ffn` also counts such tokens in
  `MoEAux.nonfinite_tokens`.
  """
  fn = "route"
  config = RouterConfig() if config is None else config
  if overrides:
    config = dataclasses.replace(config, **overrides)
  checks.check_rank(fn, "logits", logits, 2, "[tokens, experts]")
  checks.check_floating(fn, "logits", logits)
  num_tokens, num_experts = logits.shape
  config.validate(num_experts, fn)
  kind = config.kind_impl
  if bias is not None:
    if jnp.shape(bias) != (num_experts,):
      raise ValueError(
          f"{fn}: `bias` must have shape [experts]=({num_experts},); got"
          f" {jnp.shape(bias)}."
      )
    if not kind.supports_bias:
      raise ValueError(
          f"{fn}: `bias` is for token-choice routing only; got"
          f" kind={config.kind!r}.")
    bias = jax.lax.stop_gradient(jnp.asarray(bias, jnp.float32))

  logits = apply_noise(logits, config, key)
  if config.score == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.maximum(scores.sum(-1, keepdims=True), 1e-20)
  if capacity is None:
    capacity = config.capacity(num_tokens, num_experts)
  return kind.select(logits, scores, probs, config, bias=bias, capacity=capacity,
                     fn=fn)


def nonfinite_tokens(logits: Array) -> Array:
  """bool [T]: tokens whose logits hold NaN or +inf (-inf is a legal mask)."""
  return jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)


# ---------------------------------------------------------------------------
# Routing kinds.


class RoutingKind:
  """What one routing kind decides; `RouterConfig.kind_impl` names the instance.

  Attributes:
    name: the `RouterConfig.kind` value.
    per_token: a token's routing depends on its own logits only, so each shard
      of a batch routes as the whole batch would (what jmoe.parallel needs).
    supports_bias: takes a selection bias (`route(..., bias=)`).
  """

  name: str
  per_token: bool
  supports_bias: bool

  def check(self, config: RouterConfig, fn: str) -> None:
    """Checks of the config alone (run by `RouterConfig.__post_init__`)."""

  def validate(self, config: RouterConfig, num_experts: int, fn: str) -> None:
    """Checks of the config against the number of experts."""

  def capacity(self, config: RouterConfig, num_tokens: int, num_experts: int,
               capacity_factor: float | None) -> int | None:
    """The static per-expert capacity (None: dropless)."""
    raise NotImplementedError

  def select(self, logits: Array, scores: Array, probs: Array,
             config: RouterConfig, *, bias: Array | None, capacity: int | None,
             fn: str):
    """The routing decisions from float32 logits, scores and probs [T, E]."""
    raise NotImplementedError


class TokenChoice(RoutingKind):
  """Each token picks its top-k experts (optionally within its best groups)."""

  name = "token_choice"
  per_token = True
  supports_bias = True

  def validate(self, config, num_experts, fn):
    if config.top_k > num_experts:
      raise ValueError(
          f"{fn}: `top_k`={config.top_k} must be <= the number of experts"
          f" ({num_experts})."
      )

  def capacity(self, config, num_tokens, num_experts, capacity_factor):
    if capacity_factor is None:
      return None
    return expert_capacity(num_tokens, num_experts, config.top_k, capacity_factor)

  def select(self, logits, scores, probs, config, *, bias, capacity, fn):
    del capacity, fn  # the dispatch plan applies token choice's capacity
    topk_softmax = config.score == "softmax" and config.order == "topk_softmax"
    selection = logits if topk_softmax else scores
    if bias is not None:
      selection = selection + bias
    if config.num_groups > 1:
      selection = _group_mask(selection, config)
    _, experts = jax.lax.top_k(selection, config.top_k)  # [T, k]
    experts = experts.astype(jnp.int32)
    if topk_softmax:
      weights = jax.nn.softmax(jnp.take_along_axis(logits, experts, -1), axis=-1)
    else:
      weights = jnp.take_along_axis(scores, experts, axis=-1)
      if config.normalize:
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-20)
    weights = weights * config.routed_scaling_factor
    weights = jnp.where(nonfinite_tokens(logits)[:, None], jnp.nan, weights)
    return Routing(experts=experts, weights=weights, probs=probs, logits=logits)


class ExpertChoice(RoutingKind):
  """Each expert picks its top-C tokens (Zhou et al. 2022): balanced by design,
  but a token's routing depends on the whole batch."""

  name = "expert_choice"
  per_token = False
  supports_bias = False

  def check(self, config, fn):
    if config.num_groups != 1:
      raise ValueError(f"{fn}: grouped routing needs kind='token_choice'.")

  def capacity(self, config, num_tokens, num_experts, capacity_factor):
    cf = 1.0 if capacity_factor is None else capacity_factor
    return expert_capacity(num_tokens, num_experts, config.top_k, cf)

  def select(self, logits, scores, probs, config, *, bias, capacity, fn):
    del bias
    num_tokens = logits.shape[0]
    if not 1 <= capacity <= num_tokens:
      raise ValueError(
          f"{fn}: expert-choice `capacity` must be in [1, tokens={num_tokens}];"
          f" got {capacity}."
      )
    _, tokens = jax.lax.top_k(scores.T, capacity)  # [E, C]
    tokens = jnp.sort(tokens, axis=-1).astype(jnp.int32)
    weights = jnp.take_along_axis(scores.T, tokens, axis=-1)
    weights = weights * config.routed_scaling_factor
    weights = jnp.where(nonfinite_tokens(logits)[tokens], jnp.nan, weights)
    return ExpertChoiceRouting(tokens=tokens, weights=weights, probs=probs,
                               logits=logits)


ROUTING_KINDS: dict[str, RoutingKind] = {
    k.name: k for k in (TokenChoice(), ExpertChoice())}
KINDS = tuple(ROUTING_KINDS)


def expert_load(experts: Array, num_experts: int) -> Array:
  """int32 [E]: how many (token, slot) pairs chose each expert. Ids outside [0, E)
  are not counted."""
  onehot = experts.reshape(-1)[:, None] == jnp.arange(num_experts)
  return onehot.sum(0, dtype=jnp.int32)


def load_balancing_loss(probs: Array, experts: Array) -> Array:
  """Switch / GShard auxiliary load-balancing loss.

    loss = E * sum_e f_e * P_e

  f_e is the fraction of the T*k (token, slot) assignments that went to expert e
  (no gradient), P_e the mean router probability of expert e. It equals 1.0 under
  perfectly uniform routing and grows as routing concentrates. (Hugging Face's
  `load_balancing_loss_func` sums f over the k slots instead: its value is k times
  this one.)

  Args:
    probs: float [T, E] router probabilities (`Routing.probs`).
    experts: int [T, k] chosen experts (`Routing.experts`).
  """
  fn = "load_balancing_loss"
  checks.check_rank(fn, "probs", probs, 2, "[tokens, experts]")
  checks.check_rank(fn, "experts", experts, 2, "[tokens, k]")
  checks.check_integer(fn, "experts", experts)
  checks.check_dim(fn, "experts", experts.shape[0], probs.shape[0],
                   "tokens (dim 0) must match probs")
  counts = expert_load(experts, probs.shape[-1])
  return balance_loss_from_counts(probs, counts, experts.size)


def balance_loss_from_counts(probs: Array, counts: Array, num_slots: int) -> Array:
  """`load_balancing_loss` from precomputed per-expert counts (e.g. a dispatch
  plan's `expert_load`), so the layer does not count twice."""
  return switch_loss(counts, num_slots, mean_router_probs(probs))


def mean_router_probs(probs: Array) -> Array:
  """float32 [E]: P_e, the mean router probability of each expert over tokens."""
  return probs.astype(jnp.float32).mean(axis=0)


def switch_loss(counts: Array, num_slots, mean_probs: Array) -> Array:
  """E * sum_e f_e * P_e with f = counts / num_slots (no gradient) and P the mean
  router probabilities [E]: the formula of `load_balancing_loss`, in one place."""
  f = jax.lax.stop_gradient(counts.astype(jnp.float32)) / jnp.maximum(num_slots, 1)
  return mean_probs.shape[-1] * jnp.sum(f * mean_probs)


def router_z_loss(logits: Array) -> Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

  Args:
    logits: float [T, E] router logits.
  """
  checks.check_rank("router_z_loss", "logits", logits, 2, "[tokens, experts]")
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(z**2)


def router_entropy(probs: Array) -> Array:
  """Mean over tokens of the entropy (nats) of the router distribution."""
  p = probs.astype(jnp.float32)
  return -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1))


def update_expert_bias(bias: Array, tokens_per_expert: Array, *,
                       rate: float = 1e-3) -> Array:
  """DeepSeek-V3's aux-loss-free balancing step for the selection bias.

  Each expert's bias moves by `rate` towards balance: up if the expert received
  fewer tokens than the mean, down if more, unchanged if exactly at the mean.

    bias_e <- bias_e + rate * sign(mean(load) - load_e)

  Args:
    bias: float [E] selection bias (`route(..., bias=)`).
    tokens_per_expert: [E] observed load (e.g. `MoEAux.tokens_per_expert`, summed
      over a batch or a step).
    rate: the update speed gamma (DeepSeek-V3 uses 1e-3).
  Returns:
    The new bias, same shape and dtype as `bias`.
  """
  fn = "update_expert_bias"
  checks.check_rank(fn, "bias", bias, 1, "[experts]")
  if jnp.shape(tokens_per_expert) != bias.shape:
    raise ValueError(
        f"{fn}: `tokens_per_expert` must have the shape of `bias` [experts]="
        f"{bias.shape}; got {jnp.shape(tokens_per_expert)} (sum per-layer or"
        " per-step loads first, or update each layer's bias separately).")
  load = jnp.asarray(tokens_per_expert, jnp.float32)
  step = rate * jnp.sign(load.mean() - load)
  return (bias.astype(jnp.float32) + step).astype(bias.dtype)
