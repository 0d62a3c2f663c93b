"""The MoE layer's parameters: one table, read by every layer above the core.

`MOE_PARAMS` names each parameter of one MoE layer once: its path in `MoEParams`,
its shape in the letters of `MoELayout.sizes`, its logical axis names, when it
exists, how it starts and where the NNX module keeps it. `init_params` and
`check_params` (here), `jmoe.nn.MoE`, `jmoe.linen.MoE`,
`jmoe.parallel.ExpertParallel.param_specs` and `jmoe.hf` all read it:

  path           shape  logical axes            group    exists when    NNX path
  router         D E    embed, expert           router   always         router.kernel
  w_gate         E D F  expert, embed, mlp      experts  glu
  w_up           E D F  expert, embed, mlp      experts  always
  w_down         E F D  expert, mlp, embed      experts  always
  shared.w_gate  D S    embed, mlp              shared   shared, glu
  shared.w_up    D S    embed, mlp              shared   shared
  shared.w_down  S D    mlp, embed              shared   shared
  shared_gate    D 1    embed, None             shared   shared_gate
  router_bias    E      expert                  router   router_bias    router.bias

D d_model, E experts, F each expert's width, S the shared experts' width, 1 a
literal 1. Weights start as fan-in scaled normals (fan-in = the second-to-last
axis); `router_bias` starts at zero and is state, not a trained weight (float32,
an `ExpertBias` in NNX, the "expert_bias" collection in Linen). The shared rows
are `FFN_PARAMS`, the dense FFN's table, with F read as S.

A new parameter is one row here and one `MoEParams` field (plus the math that
uses it, and a `MoELayout` flag if it is optional).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jmoe._src import checks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Activation:
  """An expert activation: an elementwise function and whether it gates.

  The FFN's hidden state is fn(x @ w_gate) * (x @ w_up) when `glu` (then the
  `w_gate` rows of the tables exist), else fn(x @ w_up). `fn` runs in float32 on
  arrays of any shape and must be elementwise. Frozen and hashable (the function
  hashes by identity), so it can sit in a `MoEConfig`:

    MoEConfig(activation=Activation(jax.nn.gelu, glu=True))   # = "geglu_tanh"
    MoEConfig(activation=jax.nn.silu)    # a bare callable: not gated (glu=False)
  """

  fn: Callable[[Array], Array]
  glu: bool = False


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


# The named activations. "gelu" / "geglu" are the exact (erf) GELU; the "_tanh"
# ones its tanh approximation (Hugging Face's "gelu_pytorch_tanh", gemma's GeGLU).
NAMED_ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(jax.nn.silu, glu=True),
    "geglu": Activation(_gelu, glu=True),
    "geglu_tanh": Activation(_gelu_tanh, glu=True),
    "gelu": Activation(_gelu),
    "gelu_tanh": Activation(_gelu_tanh),
    "relu": Activation(jax.nn.relu),
}
ACTIVATIONS = tuple(NAMED_ACTIVATIONS)
GLU = tuple(n for n, a in NAMED_ACTIVATIONS.items() if a.glu)


def activation_of(activation, fn: str = "activation") -> Activation:
  """The `Activation` of a name in `ACTIVATIONS`, an `Activation`, or a bare
  elementwise callable (not gated). Raises ValueError / TypeError naming `fn`."""
  if isinstance(activation, Activation):
    return activation
  if isinstance(activation, str):
    checks.check_choice(fn, "activation", activation, ACTIVATIONS)
    return NAMED_ACTIVATIONS[activation]
  if callable(activation):
    return Activation(activation)
  raise TypeError(
      f"{fn}: `activation` must be one of {ACTIVATIONS}, a jmoe.Activation or an"
      f" elementwise callable; got {activation!r}.")


def is_glu(activation) -> bool:
  """Whether `activation` (see `activation_of`) is gated: w_gate exists."""
  return activation_of(activation).glu


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FFNParams:
  """A dense feed-forward block (a shared expert, or a dense layer).

  w_up: [D, F]; w_down: [F, D]; w_gate: [D, F] for GLU activations, else None.
  The hidden state is act(x @ w_gate) * (x @ w_up) (GLU) or act(x @ w_up).
  """

  w_up: Array
  w_down: Array
  w_gate: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEParams:
  """Parameters of one MoE layer (the rows of `MOE_PARAMS`).

  Attributes:
    router: [D, E] router weight (logits = x @ router, computed in float32).
    w_up: [E, D, F] expert up projections.
    w_down: [E, F, D] expert down projections.
    w_gate: [E, D, F] expert gate projections (GLU activations), else None.
    router_bias: optional [E] selection-only bias (aux-loss-free balancing).
    shared: optional `FFNParams` of the always-on shared expert(s); several shared
      experts are one FFN of their summed width.
    shared_gate: optional [D, 1]: the shared output is scaled by
      sigmoid(x @ shared_gate) per token (Qwen2-MoE).
  """

  router: Array
  w_up: Array
  w_down: Array
  w_gate: Array | None = None
  router_bias: Array | None = None
  shared: FFNParams | None = None
  shared_gate: Array | None = None

  @property
  def num_experts(self) -> int:
    return self.w_up.shape[0]


# Letter -> the size's name in error messages.
_LETTERS = {"D": "d_model", "E": "experts", "F": "d_ff", "S": "d_shared", "1": "1"}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One row of a parameter table.

  Attributes:
    path: the `MoEParams` (or `FFNParams`) field, "shared.w_up" for a nested one.
    shape: one letter per axis (see the module docstring).
    axes: one logical axis name (or None) per axis, for sharding rules.
    group: "router", "experts" (one slice per expert along the leading axis:
      what expert parallelism splits), "shared" or "ffn".
    when: flags of the layout that must all hold for the parameter to exist.
    init: "fan_in" (normal / sqrt(shape[-2])) or "zeros".
    trainable: False for state that is not a trained weight (the router bias).
    module: its path in the NNX module when that differs from `path`.
    seed: which of `init_params`' keys draws it (fixed, so seeds keep values).
  """

  path: str
  shape: str
  axes: tuple[str | None, ...]
  group: str
  when: tuple[str, ...] = ()
  init: str = "fan_in"
  trainable: bool = True
  module: str | None = None
  seed: int | None = None

  @property
  def name(self) -> str:
    return self.path.rsplit(".", 1)[-1]

  @property
  def module_path(self) -> tuple[str, ...]:
    return tuple((self.module or self.path).split("."))

  def present(self, flags: Mapping[str, bool]) -> bool:
    return all(flags[w] for w in self.when)

  def shape_of(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(sizes[c] for c in self.shape)

  @property
  def layout(self) -> str:
    """The axes by name, e.g. "[experts, d_model, d_ff]"."""
    return "[" + ", ".join(_LETTERS[c] for c in self.shape) + "]"


FFN_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("w_gate", "DF", ("embed", "mlp"), "ffn", when=("glu",)),
    ParamSpec("w_up", "DF", ("embed", "mlp"), "ffn"),
    ParamSpec("w_down", "FD", ("mlp", "embed"), "ffn"),
)


def _shared(spec: ParamSpec, seed: int) -> ParamSpec:
  return dataclasses.replace(
      spec, path="shared." + spec.path, shape=spec.shape.replace("F", "S"),
      group="shared", when=("shared",) + spec.when, seed=seed)


MOE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("router", "DE", ("embed", "expert"), "router",
              module="router.kernel", seed=0),
    ParamSpec("w_gate", "EDF", ("expert", "embed", "mlp"), "experts",
              when=("glu",), seed=3),
    ParamSpec("w_up", "EDF", ("expert", "embed", "mlp"), "experts", seed=1),
    ParamSpec("w_down", "EFD", ("expert", "mlp", "embed"), "experts", seed=2),
    *(_shared(s, seed) for s, seed in zip(FFN_PARAMS, (6, 4, 5))),
    ParamSpec("shared_gate", "D1", ("embed", None), "shared",
              when=("shared_gate",), seed=7),
    ParamSpec("router_bias", "E", ("expert",), "router", when=("router_bias",),
              init="zeros", trainable=False, module="router.bias"),
)

PARAMS_BY_PATH: dict[str, ParamSpec] = {s.path: s for s in MOE_PARAMS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoELayout:
  """Sizes and optional parts of one MoE layer: which `MOE_PARAMS` rows exist and
  their shapes. Plain data: frozen and hashable.

  Attributes:
    d_model, d_ff, num_experts: D, F, E.
    glu: a gated activation ("swiglu", "geglu"): the w_gate rows exist.
    shared_d_ff: S, the shared expert(s)' width; 0 for none.
    shared_gate: the shared output is gated by sigmoid(x @ shared_gate).
    router_bias: the router keeps a selection-only bias.
  """

  d_model: int
  d_ff: int
  num_experts: int
  glu: bool = True
  shared_d_ff: int = 0
  shared_gate: bool = False
  router_bias: bool = False

  def __post_init__(self):
    for name in ("d_model", "d_ff", "num_experts"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"MoELayout: `{name}` must be a positive int; got {v!r}.")
    if not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 0:
      raise ValueError(
          f"MoELayout: `shared_d_ff` must be an int >= 0; got {self.shared_d_ff!r}.")
    if self.shared_gate and not self.shared_d_ff:
      raise ValueError(
          "MoELayout: `shared_gate` needs a shared expert (shared_d_ff > 0).")

  @classmethod
  def of(cls, params: MoEParams) -> MoELayout:
    """The layout of existing parameters."""
    e, d, f = params.w_up.shape
    return cls(d_model=d, d_ff=f, num_experts=e, glu=params.w_gate is not None,
               shared_d_ff=0 if params.shared is None else params.shared.w_up.shape[1],
               shared_gate=params.shared_gate is not None,
               router_bias=params.router_bias is not None)

  @property
  def shared(self) -> bool:
    return self.shared_d_ff > 0

  @property
  def sizes(self) -> dict[str, int]:
    return {"D": self.d_model, "E": self.num_experts, "F": self.d_ff,
            "S": self.shared_d_ff, "1": 1}

  @property
  def flags(self) -> dict[str, bool]:
    return {"glu": self.glu, "shared": self.shared,
            "shared_gate": self.shared_gate, "router_bias": self.router_bias}

  def rows(self) -> tuple[ParamSpec, ...]:
    """The `MOE_PARAMS` rows this layer has, in table order."""
    return tuple(s for s in MOE_PARAMS if s.present(self.flags))

  def shape(self, path: str) -> tuple[int, ...]:
    return PARAMS_BY_PATH[path].shape_of(self.sizes)

  def options(self) -> dict[str, Any]:
    """The optional parts as keywords (what `init_params`, `jmoe.nn.MoE` take)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name in LAYOUT_OPTIONS}


# The optional parts a caller switches on by keyword (sizes and `glu`, which the
# activation decides, are not options).
LAYOUT_OPTIONS = tuple(f.name for f in dataclasses.fields(MoELayout)
                       if f.name not in ("d_model", "d_ff", "num_experts", "glu"))


def get_param(params: MoEParams, path: str) -> Array | None:
  """The array at `path` ("shared.w_up"), or None where it (or its parent) is."""
  value = params
  for name in path.split("."):
    value = getattr(value, name)
    if value is None:
      return None
  return value


def params_from_flat(values: Mapping[str, Array]) -> MoEParams:
  """`MoEParams` from {path: array} (absent paths are None)."""
  top = {p: v for p, v in values.items() if "." not in p}
  shared = {p.split(".", 1)[1]: v for p, v in values.items()
            if p.startswith("shared.")}
  return MoEParams(**top, shared=FFNParams(**shared) if shared else None)


def map_params(fn: Callable[[ParamSpec, Array], Any], params: MoEParams) -> MoEParams:
  """`MoEParams` of fn(row, array) for every present array (None stays None)."""
  values = {s.path: get_param(params, s.path) for s in MOE_PARAMS}
  return params_from_flat({p: fn(PARAMS_BY_PATH[p], v) for p, v in values.items()
                           if v is not None})


def init_params(key: Array, d_model: int, d_ff: int, num_experts: int, *,
                activation="swiglu", dtype=jnp.float32,
                **options) -> MoEParams:
  """Random `MoEParams` (fan-in scaled normal), handy for tests and examples.

  Args:
    key: PRNG key.
    d_model, d_ff, num_experts: D, F, E.
    activation: the expert activation, a name in `ACTIVATIONS`, an `Activation`
      or a callable (GLU ones get `w_gate`).
    dtype: of the weights (the router bias is float32).
    **options: the optional parts, fields of `MoELayout` (`shared_d_ff`,
      `shared_gate`, `router_bias`).
  """
  activation_of(activation, "init_params")
  layout = MoELayout(d_model=d_model, d_ff=d_ff, num_experts=num_experts,
                     glu=is_glu(activation), **options)
  keys = jax.random.split(key, 1 + max(s.seed for s in MOE_PARAMS
                                       if s.seed is not None))
  values = {}
  for s in layout.rows():
    shape = s.shape_of(layout.sizes)
    if s.init == "zeros":
      values[s.path] = jnp.zeros(shape, dtype if s.trainable else jnp.float32)
    else:
      values[s.path] = (jax.random.normal(keys[s.seed], shape, jnp.float32)
                        / jnp.sqrt(shape[-2])).astype(dtype)
  return params_from_flat(values)


def check_params(fn: str, x: Array, params: MoEParams, activation) -> None:
  """Static shape/dtype checks of `x` and `params` against the table."""
  checks.check_min_rank(fn, "x", x, 2, "[..., d_model]")
  checks.check_floating(fn, "x", x)
  checks.check_rank(fn, "params.w_up", params.w_up, 3, "[experts, d_model, d_ff]")
  if params.shared is not None:
    checks.check_rank(fn, "params.shared.w_up", params.shared.w_up, 2,
                      "[d_model, d_shared]")
  if params.shared_gate is not None and params.shared is None:
    raise ValueError(f"{fn}: `params.shared_gate` given without `params.shared`.")
  e, _, f = params.w_up.shape
  layout = MoELayout(
      d_model=x.shape[-1], d_ff=f, num_experts=e, glu=is_glu(activation),
      shared_d_ff=0 if params.shared is None else params.shared.w_up.shape[1],
      shared_gate=params.shared_gate is not None,
      router_bias=params.router_bias is not None)
  where = (f"d_model from x {x.shape}, experts and d_ff from params.w_up"
           f" {params.w_up.shape}")
  for s in layout.rows():
    value, want = get_param(params, s.path), s.shape_of(layout.sizes)
    if value is None:  # only an activation-dependent row can be missing here
      raise ValueError(
          f"{fn}: activation {activation!r} needs `params.{s.path}` of shape"
          f" {s.layout}={want}; got None.")
    if tuple(value.shape) != want:
      raise ValueError(
          f"{fn}: `params.{s.path}` must have shape {s.layout}={want} ({where});"
          f" got {tuple(value.shape)}.")


def upcycle_ffn(ffn, num_experts: int, *, key: Array | None = None,
                router: Array | None = None,
                router_bias: bool = False) -> MoEParams:
  """Sparse upcycling (Komatsuzaki et al. 2023): `MoEParams` whose every expert
  is a copy of a dense FFN, so the MoE layer starts as the dense layer.

  Args:
    ffn: the dense FFN: `FFNParams`, anything whose `params()` returns them (a
      `jmoe.nn.FeedForward`), or a mapping of arrays {"w_up": [D, F], "w_down":
      [F, D], and for a gated FFN "w_gate": [D, F]}.
    num_experts: E, a positive int.
    key: PRNG key of the router, drawn like `init_params`' (fan-in normal);
      required unless `router` is given.
    router: optional router weight [D, E] to use instead.
    router_bias: add a zero selection bias [E] (float32).

  Returns:
    `MoEParams` in the FFN's dtype: w_up, w_gate [E, D, F] and w_down [E, F, D]
    the FFN's weights repeated E times; no shared expert.

  Exactness: every expert computes FFN(x), so `moe_ffn` gives FFN(x) times the
  sum of the token's combine weights. That sum is 1, and the layer equals the
  dense FFN (up to float rounding of the weighted sum) whatever the router, for
  token-choice routing whose weights are normalised and unscaled: `RouterConfig(
  order="topk_softmax")` (Mixtral) or `normalize=True`, with
  `routed_scaling_factor=1.0` and no pair dropped for capacity. Unnormalised
  softmax weights sum to less than 1 (top-k of E probabilities).
  """
  fn = "upcycle_ffn"
  if isinstance(ffn, Mapping):
    unknown = sorted(set(ffn) - {"w_up", "w_down", "w_gate"})
    if unknown:
      raise ValueError(
          f"{fn}: unknown weight(s) {unknown}; expected w_up, w_down, w_gate.")
    ffn = FFNParams(**ffn)
  elif not isinstance(ffn, FFNParams) and callable(getattr(ffn, "params", None)):
    ffn = ffn.params()
  if not isinstance(ffn, FFNParams):
    raise TypeError(
        f"{fn}: `ffn` must be FFNParams, a jmoe.nn.FeedForward or a mapping of"
        f" w_up / w_down / w_gate arrays; got {type(ffn)}.")
  if not isinstance(num_experts, int) or num_experts <= 0:
    raise ValueError(
        f"{fn}: `num_experts` must be a positive int; got {num_experts!r}.")
  checks.check_rank(fn, "w_up", ffn.w_up, 2, "[d_model, d_ff]")
  d, f = ffn.w_up.shape
  for name, want in (("w_down", (f, d)), ("w_gate", (d, f))):
    value = getattr(ffn, name)
    if value is not None and tuple(jnp.shape(value)) != want:
      raise ValueError(
          f"{fn}: `{name}` must have shape {want} (from w_up [d_model, d_ff]="
          f"{(d, f)}); got {tuple(jnp.shape(value))}.")
  dtype = jnp.result_type(ffn.w_up)
  if router is None:
    if key is None:
      raise ValueError(f"{fn}: pass `key` (to draw the router) or `router`.")
    router = (jax.random.normal(key, (d, num_experts), jnp.float32)
              / jnp.sqrt(d)).astype(dtype)
  elif tuple(jnp.shape(router)) != (d, num_experts):
    raise ValueError(
        f"{fn}: `router` must have shape [d_model, experts]={(d, num_experts)};"
        f" got {tuple(jnp.shape(router))}.")
  tile = lambda w: None if w is None else jnp.broadcast_to(
      jnp.asarray(w), (num_experts,) + tuple(jnp.shape(w)))
  return MoEParams(
      router=jnp.asarray(router), w_up=tile(ffn.w_up), w_down=tile(ffn.w_down),
      w_gate=tile(ffn.w_gate),
      router_bias=jnp.zeros((num_experts,), jnp.float32) if router_bias else None)
