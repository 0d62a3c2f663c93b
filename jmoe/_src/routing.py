"""Router gating: logits -> routing decisions, plus the router losses.

All router math runs in float32 whatever dtype the logits arrive in.

Routing kinds (token choice, expert choice) differ behind one small interface, so
nothing downstream branches on the kind:
  * before routing, `RoutingKind` (`RouterConfig.kind_impl`): its checks, its static
    capacity, whether it takes a selection bias or works on a shard of the batch
    (`per_token`), and its selection rule;
  * after routing, the result (`Routing` or `ExpertChoiceRouting`): `num_tokens`,
    `num_slots`, `num_routed_slots` (without the masked tokens), `mask`,
    `plan(capacity)` (its dispatch plan) and `balance_loss(load)`.

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
               capacity_factor: float | None = None, *,
               min_capacity: int = 1) -> int | None:
    """The static per-expert capacity of a batch, or None for dropless.

    Token choice: None without a capacity factor, else `expert_capacity` (at least
    `min_capacity`). Expert choice always has one: the factor defaults to 1.0
    (each expert takes T * top_k / E tokens).
    """
    return self.kind_impl.capacity(self, num_tokens, num_experts, capacity_factor,
                                   min_capacity)

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
    mask: bool [T], the tokens that were routed (`route(..., mask=)`), or None
      for all of them. A masked-out token has experts -1 (not dispatched) and
      weights 0, and counts in no loss or metric.
  """

  experts: Array
  weights: Array
  probs: Array
  logits: Array
  mask: Array | None = None

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def num_tokens(self) -> int:
    return self.probs.shape[0]

  @property
  def num_slots(self) -> int:
    """T * k: the (token, slot) pairs of the buffers (masked tokens included)."""
    return self.experts.size

  @property
  def num_routed_slots(self):
    """The (token, slot) pairs routed: T * k, or (unmasked tokens) * k (traced)."""
    return num_unmasked(self.mask, self.num_tokens) * self.experts.shape[-1]

  def plan(self, capacity: int | None = None) -> permute_lib.DispatchPlan:
    """The dispatch plan (`jmoe.dispatch_plan`): dropless, or `capacity` rows per
    expert."""
    return permute_lib.dispatch_plan(self.experts, self.num_experts,
                                     capacity=capacity)

  def balance_loss(self, expert_load: Array, *, num_slots=None,
                   mean_probs: Array | None = None,
                   convention: str = "switch") -> Array:
    """The Switch/GShard loss from the pairs per expert [E] (a plan's
    `expert_load`). `num_slots` and `mean_probs` [E] default to this routing's
    (unmasked tokens only); jmoe.parallel passes the whole batch's.
    `convention`: see `load_balancing_loss`."""
    loss = switch_loss(
        expert_load, self.num_routed_slots if num_slots is None else num_slots,
        mean_router_probs(self.probs, self.mask) if mean_probs is None
        else mean_probs)
    return loss * balance_factor(convention, self.experts.shape[-1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertChoiceRouting:
  """Expert-choice routing: which C tokens each expert takes.

  Attributes:
    tokens: int32 [E, C], the tokens each expert picked, ascending (token order);
      T marks an empty pick (fewer than C unmasked tokens).
    weights: float32 [E, C], the router probability of each picked (token, expert);
      0 for an empty pick.
    probs: float32 [T, E], router probabilities.
    logits: float32 [T, E], router logits (after noise).
    mask: bool [T], the tokens that could be picked, or None for all of them.
  """

  tokens: Array
  weights: Array
  probs: Array
  logits: Array
  mask: Array | None = None

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def num_tokens(self) -> int:
    return self.probs.shape[0]

  @property
  def num_slots(self) -> int:
    """E * C: the (expert, pick) pairs of the buffers."""
    return self.tokens.size

  @property
  def num_routed_slots(self):
    """The (expert, pick) pairs that hold a token (traced with a mask)."""
    if self.mask is None:
      return self.num_slots
    return jnp.sum(self.tokens < self.num_tokens, dtype=jnp.int32)

  def plan(self, capacity: int | None = None) -> permute_lib.DispatchPlan:
    """The dispatch plan: expert e owns rows e*C:(e+1)*C. `capacity` is unused
    (the routing already holds C tokens per expert)."""
    del capacity
    return permute_lib.expert_choice_plan(self.tokens, self.num_tokens)

  def balance_loss(self, expert_load: Array, **unused) -> Array:  # noqa: D401
    """Zero: every expert takes exactly C tokens, balanced by construction."""
    del expert_load, unused
    return jnp.zeros((), jnp.float32)


def check_capacity_factor(fn: str, name: str, value, *,
                          allow_none: bool = True) -> None:
  """A capacity factor must be a finite float > 0 (or None: dropless)."""
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise ValueError(
        f"{fn}: `{name}` must be a finite number > 0"
        f"{' (or None for dropless)' if allow_none else ''}; got {value!r}.")


def check_min_capacity(fn: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{fn}: `min_capacity` must be an int >= 1; got {value!r}.")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float, *, min_capacity: int = 1) -> int:
  """Static per-expert capacity: ceil(capacity_factor * tokens * top_k / experts),
  at least `min_capacity`.

  Clipped to at most the tokens (so a buffer never holds more rows than there are
  tokens) and at least 1 (for an empty batch too, whose buffers have no rows).
  `capacity_factor` must be finite and > 0, `min_capacity` an int >= 1
  (ValueError naming them otherwise).
  """
  fn = "expert_capacity"
  check_capacity_factor(fn, "capacity_factor", capacity_factor, allow_none=False)
  check_min_capacity(fn, min_capacity)
  cap = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
  return int(max(min(max(cap, min_capacity), num_tokens), 1))


def noise_draws(config: RouterConfig, key: Array | None,
                shape: tuple[int, int]) -> tuple[Array, Array] | None:
  """The random numbers of the config's jitter / noise for logits of `shape`
  [T, E]: (multiplier, standard normal), both float32 of `shape`; None without a
  key or without noise. jmoe.parallel draws them for the whole batch and hands
  each shard its rows, so a shard gets exactly the noise the whole batch would."""
  if key is None or (config.jitter_eps == 0 and config.noise_std == 0):
    return None
  k_jitter, k_noise = jax.random.split(key)
  if config.jitter_eps > 0:
    mult = jax.random.uniform(k_jitter, shape, jnp.float32,
                              1.0 - config.jitter_eps, 1.0 + config.jitter_eps)
  else:
    mult = jnp.ones(shape, jnp.float32)
  if config.noise_std > 0:
    normal = jax.random.normal(k_noise, shape, jnp.float32)
  else:
    normal = jnp.zeros(shape, jnp.float32)
  return mult, normal


def add_noise(logits: Array, config: RouterConfig,
              draws: tuple[Array, Array] | None) -> Array:
  """float32 logits [T, E] with `noise_draws` applied (identity for None)."""
  logits = logits.astype(jnp.float32)
  if draws is None:
    return logits
  mult, normal = draws
  if config.jitter_eps > 0:
    logits = logits * mult
  if config.noise_std > 0:
    logits = logits + config.noise_std * normal
  return logits


def apply_noise(logits: Array, config: RouterConfig, key: Array | None) -> Array:
  """The config's jitter / noise on float32 logits [T, E] (identity without a key)."""
  return add_noise(logits, config, noise_draws(config, key, logits.shape))


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
    mask: Array | None = None,
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
    mask: optional bool [T] (integers: nonzero is True): the tokens to route.
      A False token (padding) is not dispatched (experts -1, weights 0; expert
      choice never picks it) and counts in no loss or metric.

  Returns:
    `Routing` for token choice, `ExpertChoiceRouting` for expert choice.

  Non-finite logits: a token whose logits hold NaN or +inf gets NaN combine
  weights, so its output (and any loss built on it) turns NaN instead of being
  routed silently to arbitrary experts. -inf is allowed and means "this expert is
  unavailable to this token" (probability 0). `moe_ffn` also counts such tokens in
  `MoEAux.nonfinite_tokens`. A token whose logits are all -inf has no expert to
  go to: it is non-finite too (NaN weights, counted).

  No tokens (logits [0, E]) give empty decisions ([0, k]; expert choice [E, 0]).
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
  mask = check_mask(fn, mask, (num_tokens,), "[tokens]")
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
                     mask=mask, fn=fn)


def check_mask(fn: str, mask, shape: tuple[int, ...], layout: str):
  """`mask` as a bool array of `shape` (None stays None); integers: nonzero."""
  if mask is None:
    return None
  if jnp.shape(mask) != tuple(shape):
    raise ValueError(
        f"{fn}: `mask` must have shape {layout}={tuple(shape)}; got"
        f" {jnp.shape(mask)}.")
  dtype = jnp.result_type(mask)
  if dtype == jnp.bool_:
    return jnp.asarray(mask)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.asarray(mask) != 0
  raise TypeError(
      f"{fn}: `mask` must be boolean (True: a real token) or integer (nonzero:"
      f" a real token); got {dtype}.")


def num_unmasked(mask: Array | None, num_tokens: int):
  """Unmasked tokens: num_tokens, or the (traced) count of True in mask."""
  return num_tokens if mask is None else jnp.sum(mask, dtype=jnp.int32)


def nonfinite_tokens(logits: Array, mask: Array | None = None) -> Array:
  """bool [T]: tokens whose logits hold NaN or +inf, or are all -inf (no expert
  available). A single -inf is a legal "unavailable" mark. Masked-out tokens are
  never counted."""
  bad = (jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
         | jnp.all(logits == -jnp.inf, axis=-1))
  return bad if mask is None else bad & mask


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
               capacity_factor: float | None, min_capacity: int) -> int | None:
    """The static per-expert capacity (None: dropless)."""
    raise NotImplementedError

  def select(self, logits: Array, scores: Array, probs: Array,
             config: RouterConfig, *, bias: Array | None, capacity: int | None,
             mask: Array | None, fn: str):
    """The routing decisions from float32 logits, scores and probs [T, E] of the
    tokens where `mask` [T] (None: all) holds."""
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

  def capacity(self, config, num_tokens, num_experts, capacity_factor,
               min_capacity):
    if capacity_factor is None:
      return None
    return expert_capacity(num_tokens, num_experts, config.top_k, capacity_factor,
                           min_capacity=min_capacity)

  def select(self, logits, scores, probs, config, *, bias, capacity, mask, fn):
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
    if mask is not None:
      experts = jnp.where(mask[:, None], experts, -1)
      weights = jnp.where(mask[:, None], weights, 0.0)
    return Routing(experts=experts, weights=weights, probs=probs, logits=logits,
                   mask=mask)


class ExpertChoice(RoutingKind):
  """Each expert picks its top-C tokens (Zhou et al. 2022): balanced by design,
  but a token's routing depends on the whole batch."""

  name = "expert_choice"
  per_token = False
  supports_bias = False

  def check(self, config, fn):
    if config.num_groups != 1:
      raise ValueError(f"{fn}: grouped routing needs kind='token_choice'.")

  def capacity(self, config, num_tokens, num_experts, capacity_factor,
               min_capacity):
    cf = 1.0 if capacity_factor is None else capacity_factor
    return expert_capacity(num_tokens, num_experts, config.top_k, cf,
                           min_capacity=min_capacity)

  def select(self, logits, scores, probs, config, *, bias, capacity, mask, fn):
    del bias
    num_tokens = logits.shape[0]
    if num_tokens == 0:  # an empty batch: no picks
      capacity = 0
    elif not isinstance(capacity, int) or not 1 <= capacity <= num_tokens:
      raise ValueError(
          f"{fn}: expert-choice `capacity` must be an int in [1,"
          f" tokens={num_tokens}]; got {capacity!r}."
      )
    ranked = scores.T if mask is None else jnp.where(mask[None], scores.T, -1.0)
    _, tokens = jax.lax.top_k(ranked, capacity)  # [E, C]
    if mask is not None:  # picks past the unmasked tokens are empty: token T
      tokens = jnp.where(mask[tokens], tokens, num_tokens)
    tokens = jnp.sort(tokens, axis=-1).astype(jnp.int32)
    take = lambda a: jnp.take_along_axis(a, tokens, axis=-1, mode="fill",
                                         fill_value=0)
    weights = take(scores.T) * config.routed_scaling_factor
    bad = jnp.take(nonfinite_tokens(logits), tokens, mode="fill", fill_value=False)
    weights = jnp.where(bad, jnp.nan, weights)
    return ExpertChoiceRouting(tokens=tokens, weights=weights, probs=probs,
                               logits=logits, mask=mask)


ROUTING_KINDS: dict[str, RoutingKind] = {
    k.name: k for k in (TokenChoice(), ExpertChoice())}
KINDS = tuple(ROUTING_KINDS)


def expert_load(experts: Array, num_experts: int) -> Array:
  """int32 [E]: how many (token, slot) pairs chose each expert. Ids outside [0, E)
  are not counted."""
  onehot = experts.reshape(-1)[:, None] == jnp.arange(num_experts)
  return onehot.sum(0, dtype=jnp.int32)


BALANCE_CONVENTIONS = ("switch", "hf")


def balance_factor(convention: str, top_k: int) -> int:
  """The factor of a balance-loss convention over jmoe's ("switch"): 1, or k for
  Hugging Face's ("hf")."""
  checks.check_choice("balance_loss", "convention", convention,
                      BALANCE_CONVENTIONS)
  return top_k if convention == "hf" else 1


def load_balancing_loss(probs: Array, experts: Array, *,
                        mask: Array | None = None,
                        convention: str = "switch") -> Array:
  """Switch / GShard auxiliary load-balancing loss.

    loss = E * sum_e f_e * P_e

  f_e is the fraction of the T*k (token, slot) assignments that went to expert e
  (no gradient), P_e the mean router probability of expert e. It equals 1.0 under
  perfectly uniform routing and grows as routing concentrates.

  Args:
    probs: float [T, E] router probabilities (`Routing.probs`).
    experts: int [T, k] chosen experts (`Routing.experts`); ids outside [0, E)
      are not counted.
    mask: optional bool [T]: only these tokens count (in f and in P).
    convention: "switch" (jmoe's, above) or "hf": Hugging Face's
      `load_balancing_loss_func` (Mixtral, Qwen-MoE, OLMoE), which sums f over
      the k slots, so its value is k times this one (k at uniform routing).
      Coefficients ported from a Hugging Face config need "hf".
  """
  fn = "load_balancing_loss"
  checks.check_rank(fn, "probs", probs, 2, "[tokens, experts]")
  checks.check_rank(fn, "experts", experts, 2, "[tokens, k]")
  checks.check_integer(fn, "experts", experts)
  checks.check_dim(fn, "experts", experts.shape[0], probs.shape[0],
                   "tokens (dim 0) must match probs")
  factor = balance_factor(convention, experts.shape[1])
  mask = check_mask(fn, mask, (probs.shape[0],), "[tokens]")
  if mask is not None:
    experts = jnp.where(mask[:, None], experts, -1)
  counts = expert_load(experts, probs.shape[-1])
  slots = num_unmasked(mask, probs.shape[0]) * experts.shape[1]
  return factor * switch_loss(counts, slots, mean_router_probs(probs, mask))


def mean_router_probs(probs: Array, mask: Array | None = None) -> Array:
  """float32 [E]: P_e, the mean router probability of each expert over the
  (unmasked) tokens; zeros when no token is unmasked."""
  return masked_mean(probs.astype(jnp.float32), mask)


def masked_mean(values: Array, mask: Array | None) -> Array:
  """Mean over axis 0 of values [T, ...] where mask [T] holds (0 if none does)."""
  if mask is None:
    n = values.shape[0]
    return values.sum(axis=0) / max(n, 1)
  m = mask.reshape(mask.shape + (1,) * (values.ndim - 1))
  total = jnp.sum(jnp.where(m, values, 0), axis=0)
  return total / jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)


def switch_loss(counts: Array, num_slots, mean_probs: Array) -> Array:
  """E * sum_e f_e * P_e with f = counts / num_slots (no gradient) and P the mean
  router probabilities [E]: the formula of `load_balancing_loss`, in one place."""
  f = jax.lax.stop_gradient(counts.astype(jnp.float32)) / jnp.maximum(num_slots, 1)
  return mean_probs.shape[-1] * jnp.sum(f * mean_probs)


def token_z(logits: Array) -> Array:
  """float32 [T]: logsumexp(logits)^2 of each token, the z-loss's summand."""
  return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2


def token_entropy(probs: Array) -> Array:
  """float32 [T]: the entropy (nats) of each token's router distribution."""
  p = probs.astype(jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                  axis=-1)


def router_z_loss(logits: Array, mask: Array | None = None) -> Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

  Args:
    logits: float [T, E] router logits.
    mask: optional bool [T]: the mean runs over these tokens only (0 if none,
      and for T = 0).
  """
  fn = "router_z_loss"
  checks.check_rank(fn, "logits", logits, 2, "[tokens, experts]")
  mask = check_mask(fn, mask, (logits.shape[0],), "[tokens]")
  return masked_mean(token_z(logits), mask)


def router_entropy(probs: Array, mask: Array | None = None) -> Array:
  """Mean over (unmasked) tokens of the entropy (nats) of the router
  distribution (0 over no token)."""
  return masked_mean(token_entropy(probs), mask)


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
