"""The grouped matmul as two JAX primitives, wired once for every backend.

As jax's megablox separates its kernels (`gmm.py`) from their differentiation
(`ops.py`), a backend here supplies only its products and this module supplies
every transformation, as `lax.ragged_dot_general_p` does for XLA's:

  gmm_p   out[m, n]     = lhs[m, k] @ rhs[g][k, n]           (transpose_rhs=False)
          out[m, n]     = lhs[m, k] @ rhs[g][n, k]^T         (transpose_rhs=True)
  tgmm_p  out[l][k, n]  = lhs[rows_l, k]^T @ dy[rows_l, n]

with g the local group of row i (group_offset .. group_offset + L - 1 of
group_sizes); rows of other groups and rows past sum(group_sizes) give zeros.

Both are bilinear, and their transposes close over each other: gmm's transpose
w.r.t. lhs is gmm with the flag flipped, w.r.t. rhs a tgmm; tgmm's are gmm with
transpose_rhs (w.r.t. lhs) and gmm (w.r.t. dy). So jvp, jacfwd, vjp, grad of grad
and hessian-vector products all come out as the same three kernels. Each primitive
has an abstract-eval rule (which also types the output's varying manual axes under
`shard_map(check_vma=True)`), a JVP, a transpose, a batching rule (`vmap`: a
`lax.map` over the batch, one launch per element) and a lowering through
`mlir.lower_fun` to the chosen backend.

The backend interface. A backend is a module exposing

  gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, precision,
      config=None) -> [m, n]
  tgmm(lhs, dy, group_sizes, group_offset, *, num_local, out_dtype, precision,
       config=None) -> [num_local, k, n]
  supports_dtype(dtype) -> bool     # operand dtypes its kernels take
  supports_precision(precision, dtype) -> bool   # optional (default: all)
  FALLBACK: str | None              # backend for what it does not take

called with lhs.dtype == rhs.dtype (== dy.dtype), int32 group_sizes [G] (all
groups, G >= L) that are >= 0 and sum to at most m, an int32 scalar group_offset
in [-L, G] (never None), static shapes with m, k, n, L >= 1, a canonical
`precision` (None, a pair of `lax.Precision`, a `lax.DotAlgorithmPreset` or a
`lax.DotAlgorithm`) that it honours, and accumulation expected in
`accumulation_dtype(lhs.dtype)`. Rows outside the local groups and rows past
sum(group_sizes) are zeros, and so is an empty group's tgmm; a non-finite value
reaches only the products that read it (rows of other groups never see it).
`config` is the backend's own hashable value or None (its default); it reaches the
backend untouched (`GmmOptions`), and is dropped (None) when a fallback runs.

What no backend handles, this module does: the result dtype (lax.dot_general's
rule, as lax.ragged_dot), operand promotion (lhs, rhs and cotangents to one
compute dtype, so a float32 cotangent of bf16 operands is never rounded to bf16),
the precision (canonicalized as lax does, `jax_default_matmul_precision`
included), group sizes and offsets (to int32, normalized as above, and checked
with `checkify.debug_check`), a None group_offset, empty shapes
(min(m, k, n, L) == 0 gives zeros, statically), symbolic shapes (jax.export shape
polymorphism: the kernels need static shapes, so those lower to "xla"), the dtype
and precision fallback, `out_sharding` and explicit mesh axes (the products run
inside `jax.sharding.auto_axes`), and the varying manual axes of shard_map
(operands are cast to vary over the union of their axes before the bind; the
backends see plain types).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from jmoe._src import checks

Array = jax.Array

# ----------------------------------------------------------------------------
# Backends

# name -> (module, extra keyword arguments of its gmm/tgmm). Modules are imported
# on first use, so `import jmoe` never depends on Pallas or on a GPU toolchain.
_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "xla": ("jmoe._src.gmm.xla", {}),
    "reference": ("jmoe._src.gmm.reference", {}),
    "pallas": ("jmoe._src.gmm.pallas_triton", {}),
    "pallas_interpret": ("jmoe._src.gmm.pallas_triton", {"interpret": True}),
    "mosaic": ("jmoe._src.gmm.pallas_mosaic_gpu", {}),
    "cpu": ("jmoe._src.gmm.cpu", {}),
}
_ALIASES = {"pallas_triton": "pallas"}
# Lowering platforms of the compiled kernels; the other backends lower anywhere.
_PLATFORMS = {"pallas": ("cuda", "rocm"), "mosaic": ("cuda",)}
IMPLEMENTATIONS = ("xla", "reference", "pallas", "pallas_triton",
                   "pallas_interpret", "mosaic", "cpu")
_MOSAIC_MODULE = _BACKENDS["mosaic"][0]


class Backend(NamedTuple):
  """A loaded backend: its module's interface, with fixed keyword arguments bound."""

  name: str
  gmm: Callable[..., Array]
  tgmm: Callable[..., Array]
  supports_dtype: Callable[[Any], bool]
  supports_precision: Callable[[Any, Any], bool]
  fallback: str | None
  gmm_sum: Callable[..., Array] | None = None  # one-launch sum of two products


def canonical_name(implementation: str, fn: str = "gmm") -> str:
  checks.check_choice(fn, "implementation", implementation, IMPLEMENTATIONS)
  return _ALIASES.get(implementation, implementation)


@functools.cache
def backend(name: str) -> Backend:
  """The backend registered under `name` (canonical), imported on first use."""
  module_name, kwargs = _BACKENDS[name]
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
        f"gmm: implementation={name!r} needs the module {module_name}, which"
        f" cannot be imported here ({type(e).__name__}: {e}).") from e
  bind = lambda f: functools.partial(f, **kwargs) if kwargs else f
  return Backend(name=name, gmm=bind(module.gmm), tgmm=bind(module.tgmm),
                 supports_dtype=module.supports_dtype,
                 supports_precision=getattr(module, "supports_precision",
                                            lambda precision, dtype: True),
                 fallback=getattr(module, "FALLBACK", None),
                 gmm_sum=(bind(module.gmm_sum) if hasattr(module, "gmm_sum")
                          else None))


def resolve(implementation: str, dtype, static_shapes: bool = True,
            precision=None) -> str:
  """The backend that runs `implementation` on operands of `dtype` with the
  (canonical) `precision`: "xla" for symbolic shapes, else the first of
  implementation, its FALLBACK, ... that takes both."""
  if not static_shapes:
    return "xla"
  name, tried = implementation, []
  while not (backend(name).supports_dtype(dtype)
             and backend(name).supports_precision(precision, dtype)):
    tried.append(name)
    nxt = backend(name).fallback
    if nxt is None or canonical_name(nxt) in tried:
      what = (f"{jnp.dtype(dtype).name} operands" if precision is None else
              f"{jnp.dtype(dtype).name} operands with precision={precision}")
      raise checks.ShapeDtypeError(f"gmm: no backend takes {what} (tried"
                                   f" {tried}).")
    name = canonical_name(nxt)
  return name


# ----------------------------------------------------------------------------
# Dtypes and precision: lax.ragged_dot's rules

_DOT_DIMS = (((1,), (0,)), ((), ()))


def _sds(dtype):
  return jax.ShapeDtypeStruct((1, 1), dtype)


@functools.cache
def _lax_result_dtype(lhs_dtype, rhs_dtype, preferred, precision):
  dot = functools.partial(lax.dot_general, dimension_numbers=_DOT_DIMS,
                          precision=precision, preferred_element_type=preferred)
  return jnp.dtype(jax.eval_shape(dot, _sds(lhs_dtype), _sds(rhs_dtype)).dtype)


def result_dtype(lhs_dtype, rhs_dtype, preferred_element_type=None,
                 precision=None):
  """The dtype `lax.ragged_dot` gives these operands: lax.dot_general's rule (the
  operand dtype with more exponent, then mantissa, then bits wins: f16 x bf16 ->
  bf16, int8 x bf16 -> bf16, int8 x int8 -> int8), or `preferred_element_type`.
  Raises lax's TypeError for pairs lax refuses."""
  preferred = (None if preferred_element_type is None
               else jnp.dtype(preferred_element_type))
  return _lax_result_dtype(jnp.dtype(lhs_dtype), jnp.dtype(rhs_dtype), preferred,
                           precision)


def _widen(dtype):
  """Sub-byte integers to 8 bits and 8-bit or narrower floats to bfloat16, both
  exact: jnp refuses to promote them implicitly, lax.dot_general takes them."""
  if jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits < 8:
    return jnp.dtype(jnp.int8 if jnp.iinfo(dtype).min < 0 else jnp.uint8)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits <= 8:
    return jnp.dtype(jnp.bfloat16)
  return dtype


def compute_dtype(lhs_dtype, rhs_dtype):
  """The one dtype both operands are cast to before the products: the smallest
  that holds both exactly where jnp's promotion finds one (int8 x bf16 -> bf16,
  f16 x bf16 -> float32, uint8 x int8 -> int16). Operands of one dtype keep it,
  except sub-byte integers (computed as 8-bit)."""
  a, b = jnp.dtype(lhs_dtype), jnp.dtype(rhs_dtype)
  if a == b and not (jnp.issubdtype(a, jnp.integer) and jnp.iinfo(a).bits < 8):
    return a
  return jnp.promote_types(_widen(a), _widen(b))


def accumulation_dtype(dtype):
  """What a backend accumulates products of `dtype` operands in: float32 for
  16- and 32-bit floats (float64, complex: their own width), int32 for bool and
  integers up to 32 bits (int64 for 64-bit ones). Integer results wrap as lax's
  do (modular arithmetic, whatever the accumulator's width)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(jnp.int64 if dtype.itemsize == 8 else jnp.int32)


@functools.cache
def _canonical_precision(precision, default_config):
  del default_config  # part of the cache key: precision=None reads it
  jaxpr = jax.make_jaxpr(functools.partial(
      lax.dot_general, dimension_numbers=_DOT_DIMS, precision=precision))(
          _sds(jnp.float32), _sds(jnp.float32))
  return jaxpr.eqns[0].params["precision"]


def canonical_precision(precision):
  """`precision` as lax.dot_general holds it (None, a pair of `lax.Precision`, a
  `lax.DotAlgorithmPreset` or a `lax.DotAlgorithm`), read now: None takes
  `jax_default_matmul_precision`, as lax does when it binds. Raises lax's
  ValueError for values lax refuses."""
  if isinstance(precision, list):
    precision = tuple(precision)
  default = jax.config.jax_default_matmul_precision if precision is None else None
  try:
    hash(precision)
  except TypeError:
    return _canonical_precision.__wrapped__(precision, default)
  return _canonical_precision(precision, default)



def _is_hopper(device) -> bool:
  cc = getattr(device, "compute_capability", None)
  if cc is not None:
    return str(cc).startswith("9")
  kind = getattr(device, "device_kind", "")
  return any(h in kind for h in ("H100", "H200", "H800", "H20"))


@functools.cache
def _mosaic_present() -> bool:
  return importlib.util.find_spec(_MOSAIC_MODULE) is not None


def default_implementation() -> str:
  """The backend `gmm` uses when `implementation=None`: the Mosaic-GPU kernels on
  Hopper (compute capability 9.x; "pallas" while that module is absent), the
  Pallas-Triton kernels on other NVIDIA GPUs (XLA's ragged_dot does G times the
  work there), "cpu" on CPU (the tile loops where they beat ragged_dot, which
  does G times the work there too; ragged_dot itself for one group or under 4
  rows per group: `cpu.loops_pay`), XLA elsewhere."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return "cpu"
  if device.platform != "gpu":
    return "xla"
  if _is_hopper(device) and _mosaic_present():
    return "mosaic"
  return "pallas"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GmmOptions:
  """Backend configs per product, passed to the backend untouched (tests and
  benchmarks; `jmoe.gmm` always uses the defaults).

  A product is named by its kind, wherever it appears (a forward product inside a
  second-order gradient is still `fwd`):

  Attributes:
    fwd: config of gmm (transpose_rhs=False): the forward pass.
    dlhs: config of gmm with transpose_rhs=True: the input gradient.
    drhs: config of tgmm: the weight gradient.
  """

  fwd: Hashable = None
  dlhs: Hashable = None
  drhs: Hashable = None

  @classmethod
  def every(cls, config: Hashable) -> "GmmOptions":
    """The same config for all three products."""
    return cls(fwd=config, dlhs=config, drhs=config)


_NO_OPTIONS = GmmOptions()


# ----------------------------------------------------------------------------
# Types: static shapes, varying manual axes


def _static(*shapes) -> bool:
  return all(isinstance(d, (int, np.integer)) for s in shapes for d in s)


def _varying(x) -> frozenset:
  mat = getattr(jax.typeof(x), "mat", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def _vary_together(*xs):
  """xs cast to vary over the union of their manual mesh axes (shard_map with
  check_vma): the primitives take operands of one type. Identity outside."""
  axes = frozenset().union(*map(_varying, xs))
  if not axes:
    return xs
  out = []
  for x in xs:
    missing = tuple(sorted(axes - _varying(x), key=str))
    out.append(lax.pcast(x, missing, to="varying") if missing else x)
  return tuple(out)


def _shaped(like, shape, dtype):
  """An abstract value of `shape`, `dtype` varying over `like`'s manual axes."""
  mat = getattr(like, "mat", None)
  if mat is None or mat.empty:
    return jax.core.ShapedArray(shape, dtype)
  sharding = jax.sharding.NamedSharding(
      like.sharding.mesh, jax.sharding.PartitionSpec(*[None] * len(shape)))
  return jax.core.ShapedArray(shape, dtype, sharding=sharding,
                              manual_axis_type=mat)


def _plain(aval):
  """aval without varying manual axes: what a backend is traced with."""
  mat = getattr(aval, "mat", None)
  if mat is None or mat.empty:
    return aval
  return aval.update_manual_axis_type(jax.sharding.ManualAxisType())


def _unchecked_vma():
  """Turns off shard_map's varying-axes check while a backend is traced for
  lowering (shard_map's lowering turns it on): the primitive has typed its output
  already, and the backend sees plain types. This is what `pallas_call` does for
  its own kernel bodies (jax 0.10, 0.11: the flag is internal)."""
  from jax._src import config as jax_config  # noqa: PLC0415
  flag = getattr(jax_config, "_check_vma", None)
  return flag(False) if flag is not None else contextlib.nullcontext()


def check_platforms(implementation: str, name: str, platforms) -> None:
  """A clear error where backend `name` (the one running `implementation`) has
  kernels that cannot lower for `platforms`, instead of Pallas's own "Only
  interpret mode is supported on CPU backend"."""
  ok = _PLATFORMS.get(name)
  bad = [p for p in platforms if ok is not None and p not in ok]
  if bad:
    via = "" if name == implementation else f" (here its fallback {name!r})"
    raise ValueError(
        f"gmm: implementation={implementation!r}{via} runs compiled GPU kernels"
        f" (lowering for {'/'.join(ok)}) and cannot run on {'/'.join(bad)}; use"
        " implementation=None (the best backend here), \"xla\", or"
        " \"pallas_interpret\" (the Pallas-Triton kernels in the Pallas"
        " interpreter, for tests).")


def _lower(fn, ctx, *args, multiple_results: bool = False):
  """Lowers `fn` (a backend's product) in place of the primitive."""
  ctx = ctx.replace(avals_in=[_plain(a) for a in ctx.avals_in],
                    avals_out=[_plain(a) for a in ctx.avals_out])
  with _unchecked_vma():
    return mlir.lower_fun(fn, multiple_results=multiple_results)(ctx, *args)


# ----------------------------------------------------------------------------
# The primitives

gmm_p = jex_core.Primitive("jmoe_gmm")
tgmm_p = jex_core.Primitive("jmoe_tgmm")


def _cast(x, dtype):
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _bind_gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype,
              precision, implementation, options):
  dtype = compute_dtype(lhs.dtype, rhs.dtype)
  args = _vary_together(_cast(lhs, dtype), _cast(rhs, dtype), group_sizes,
                        group_offset)
  return gmm_p.bind(*args, transpose_rhs=bool(transpose_rhs),
                    out_dtype=jnp.dtype(out_dtype), precision=precision,
                    implementation=implementation, options=options)


def _bind_tgmm(lhs, dy, group_sizes, group_offset, *, num_local, out_dtype,
               precision, implementation, options):
  dtype = compute_dtype(lhs.dtype, dy.dtype)
  args = _vary_together(_cast(lhs, dtype), _cast(dy, dtype), group_sizes,
                        group_offset)
  return tgmm_p.bind(*args, num_local=int(num_local),
                     out_dtype=jnp.dtype(out_dtype), precision=precision,
                     implementation=implementation, options=options)


def _gmm_abstract_eval(lhs, rhs, group_sizes, group_offset, *, transpose_rhs,
                       out_dtype, **_):
  del group_sizes, group_offset
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  return _shaped(lhs, (lhs.shape[0], n), out_dtype)


def _tgmm_abstract_eval(lhs, dy, group_sizes, group_offset, *, num_local,
                        out_dtype, **_):
  del group_sizes, group_offset
  return _shaped(lhs, (num_local, lhs.shape[1], dy.shape[1]), out_dtype)


def _gmm_lowering(ctx, *args, transpose_rhs, out_dtype, precision,
                  implementation, options):
  lhs, rhs = ctx.avals_in[:2]
  name = resolve(implementation, lhs.dtype, _static(lhs.shape, rhs.shape),
                 precision)
  config = (options.dlhs if transpose_rhs else options.fwd
            ) if name == implementation else None
  check_platforms(implementation, name, ctx.module_context.platforms)
  fn = functools.partial(backend(name).gmm, transpose_rhs=transpose_rhs,
                         out_dtype=out_dtype, precision=precision, config=config)
  return _lower(fn, ctx, *args)


def _tgmm_lowering(ctx, *args, num_local, out_dtype, precision, implementation,
                   options):
  lhs, dy = ctx.avals_in[:2]
  name = resolve(implementation, lhs.dtype, _static(lhs.shape, dy.shape),
                 precision)
  config = options.drhs if name == implementation else None
  check_platforms(implementation, name, ctx.module_context.platforms)
  fn = functools.partial(backend(name).tgmm, num_local=num_local,
                         out_dtype=out_dtype, precision=precision, config=config)
  return _lower(fn, ctx, *args)


def _bilinear_jvp(bind, prim):
  def jvp(primals, tangents, **params):
    a, b, group_sizes, group_offset = primals
    da, db = tangents[:2]
    out = prim.bind(*primals, **params)
    if not jnp.issubdtype(params["out_dtype"], jnp.inexact):
      return out, ad.Zero(jax.typeof(out).to_tangent_aval())  # float0
    terms = []
    if type(da) is not ad.Zero:
      terms.append(bind(da, b, group_sizes, group_offset, **params))
    if type(db) is not ad.Zero:
      terms.append(bind(a, db, group_sizes, group_offset, **params))
    if not terms:
      return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]
  return jvp


def _gmm_transpose(ct, lhs, rhs, group_sizes, group_offset, *, transpose_rhs,
                   out_dtype, precision, implementation, options):
  del out_dtype
  if type(ct) is ad.Zero:
    return [None] * 4
  kw = dict(precision=precision, implementation=implementation, options=options)
  dlhs = drhs = None
  if ad.is_undefined_primal(lhs):
    # out = lhs @ rhs[g] -> dlhs = ct @ rhs[g]^T; out = lhs @ rhs[g]^T -> ct @ rhs[g].
    dlhs = _bind_gmm(ct, rhs, group_sizes, group_offset,
                     transpose_rhs=not transpose_rhs, out_dtype=lhs.aval.dtype,
                     **kw)
  if ad.is_undefined_primal(rhs):
    # drhs[l] = lhs[rows_l]^T @ ct[rows_l] ([k, n]), or its transpose ([n, k]).
    a, b = (ct, lhs) if transpose_rhs else (lhs, ct)
    drhs = _bind_tgmm(a, b, group_sizes, group_offset,
                      num_local=rhs.aval.shape[0], out_dtype=rhs.aval.dtype, **kw)
  return [dlhs, drhs, None, None]


def _tgmm_transpose(ct, lhs, dy, group_sizes, group_offset, *, num_local,
                    out_dtype, precision, implementation, options):
  del num_local, out_dtype
  if type(ct) is ad.Zero:
    return [None] * 4
  kw = dict(precision=precision, implementation=implementation, options=options)
  dlhs = ddy = None
  if ad.is_undefined_primal(lhs):  # dlhs[rows_l] = dy[rows_l] @ ct[l]^T
    dlhs = _bind_gmm(dy, ct, group_sizes, group_offset, transpose_rhs=True,
                     out_dtype=lhs.aval.dtype, **kw)
  if ad.is_undefined_primal(dy):   # ddy[rows_l] = lhs[rows_l] @ ct[l]
    ddy = _bind_gmm(lhs, ct, group_sizes, group_offset, transpose_rhs=False,
                    out_dtype=dy.aval.dtype, **kw)
  return [dlhs, ddy, None, None]


def _batch(prim, args, dims, **params):
  """vmap: one launch per batch element (`lax.map`); unbatched operands are shared
  (closed over), never broadcast."""
  args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  mapped = [d is not None for d in dims]

  def one(xs):
    it = iter(xs)
    return prim.bind(*[next(it) if m else a for a, m in zip(args, mapped)],
                     **params)

  return lax.map(one, [a for a, m in zip(args, mapped) if m]), 0


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eager(prim, params, *args):
  return prim.bind(*args, **dict(params))


def _register(prim, abstract_eval, jvp, transpose, lowering):
  prim.def_abstract_eval(abstract_eval)
  # Eager calls run one jitted bind, cached on (primitive, params, avals): no
  # recompilation on repeated calls.
  prim.def_impl(lambda *args, **params: _eager(
      prim, tuple(sorted(params.items())), *args))
  ad.primitive_jvps[prim] = jvp
  ad.primitive_transposes[prim] = transpose
  batching.primitive_batchers[prim] = functools.partial(_batch, prim)
  mlir.register_lowering(prim, lowering)


_register(gmm_p, _gmm_abstract_eval, _bilinear_jvp(_bind_gmm, gmm_p),
          _gmm_transpose, _gmm_lowering)
_register(tgmm_p, _tgmm_abstract_eval, _bilinear_jvp(_bind_tgmm, tgmm_p),
          _tgmm_transpose, _tgmm_lowering)


# -- Two products sharing their lhs (SwiGLU's gate and up), and their transpose.
#
# gmm_pair(lhs, rhs_a, rhs_b) = (lhs @ rhs_a[g], lhs @ rhs_b[g]) is one primitive,
# so that its transpose in lhs is ONE product, gmm_sum(ct_a, rhs_a^T, ct_b,
# rhs_b^T) = ct_a @ rhs_a[g]^T + ct_b @ rhs_b[g]^T: a backend with `gmm_sum`
# (Mosaic) runs it as one kernel with one output, instead of two [m, k] input
# gradients that the AD adds (two writes and two reads of the rows' gradient).

gmm_pair_p = jex_core.Primitive("jmoe_gmm_pair")
gmm_pair_p.multiple_results = True
gmm_sum_p = jex_core.Primitive("jmoe_gmm_sum")


def _bind_pair(lhs, rhs_a, rhs_b, group_sizes, group_offset, *, out_dtype,
               precision, implementation, options):
  dtype = compute_dtype(lhs.dtype, rhs_a.dtype)
  args = _vary_together(_cast(lhs, dtype), _cast(rhs_a, dtype),
                        _cast(rhs_b, dtype), group_sizes, group_offset)
  return gmm_pair_p.bind(*args, out_dtype=jnp.dtype(out_dtype),
                         precision=precision, implementation=implementation,
                         options=options)


def _bind_sum(lhs, rhs, lhs2, rhs2, group_sizes, group_offset, *, transpose_rhs,
              out_dtype, precision, implementation, options):
  dtype = compute_dtype(lhs.dtype, rhs.dtype)
  args = _vary_together(_cast(lhs, dtype), _cast(rhs, dtype), _cast(lhs2, dtype),
                        _cast(rhs2, dtype), group_sizes, group_offset)
  return gmm_sum_p.bind(*args, transpose_rhs=bool(transpose_rhs),
                        out_dtype=jnp.dtype(out_dtype), precision=precision,
                        implementation=implementation, options=options)


def _pair_abstract_eval(lhs, rhs_a, rhs_b, group_sizes, group_offset, *,
                        out_dtype, **_):
  del group_sizes, group_offset
  return [_shaped(lhs, (lhs.shape[0], r.shape[2]), out_dtype)
          for r in (rhs_a, rhs_b)]


def _sum_abstract_eval(lhs, rhs, lhs2, rhs2, group_sizes, group_offset, *,
                       transpose_rhs, out_dtype, **_):
  del lhs2, rhs2, group_sizes, group_offset
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  return _shaped(lhs, (lhs.shape[0], n), out_dtype)


def _pair_lowering(ctx, *args, out_dtype, precision, implementation, options):
  lhs, rhs_a, rhs_b = ctx.avals_in[:3]
  name = resolve(implementation, lhs.dtype,
                 _static(lhs.shape, rhs_a.shape, rhs_b.shape), precision)
  config = options.fwd if name == implementation else None
  check_platforms(implementation, name, ctx.module_context.platforms)
  mm = functools.partial(backend(name).gmm, transpose_rhs=False,
                         out_dtype=out_dtype, precision=precision, config=config)

  def fn(lhs, rhs_a, rhs_b, group_sizes, group_offset):
    return [mm(lhs, rhs_a, group_sizes, group_offset),
            mm(lhs, rhs_b, group_sizes, group_offset)]
  return _lower(fn, ctx, *args, multiple_results=True)


def _sum_lowering(ctx, *args, transpose_rhs, out_dtype, precision,
                  implementation, options):
  avals = ctx.avals_in[:4]
  name = resolve(implementation, avals[0].dtype,
                 _static(*(a.shape for a in avals)), precision)
  config = ((options.dlhs if transpose_rhs else options.fwd)
            if name == implementation else None)
  check_platforms(implementation, name, ctx.module_context.platforms)
  b = backend(name)
  if b.gmm_sum is not None:
    fn = functools.partial(b.gmm_sum, transpose_rhs=transpose_rhs,
                           out_dtype=out_dtype, precision=precision,
                           config=config)
  else:
    acc = functools.partial(b.gmm, transpose_rhs=transpose_rhs,
                            out_dtype=accumulation_dtype(avals[0].dtype),
                            precision=precision, config=config)

    def fn(lhs, rhs, lhs2, rhs2, group_sizes, group_offset):
      return (acc(lhs, rhs, group_sizes, group_offset)
              + acc(lhs2, rhs2, group_sizes, group_offset)).astype(out_dtype)
  return _lower(fn, ctx, *args)


def _gmm_term(a, b, group_sizes, group_offset, *, transpose_rhs, params):
  return _bind_gmm(a, b, group_sizes, group_offset, transpose_rhs=transpose_rhs,
                   **params)


def _pair_jvp(primals, tangents, **params):
  lhs, rhs_a, rhs_b, group_sizes, group_offset = primals
  dl, da, db = tangents[:3]
  out = gmm_pair_p.bind(*primals, **params)
  zero = lambda o: jnp.zeros_like(o)
  if not jnp.issubdtype(params["out_dtype"], jnp.inexact):
    return out, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
  ta, tb = (_bind_pair(dl, rhs_a, rhs_b, group_sizes, group_offset, **params)
            if type(dl) is not ad.Zero else (None, None))
  for t, (w, dw) in enumerate(((rhs_a, da), (rhs_b, db))):
    if type(dw) is ad.Zero:
      continue
    term = _gmm_term(lhs, dw, group_sizes, group_offset, transpose_rhs=False,
                     params=params)
    if t == 0:
      ta = term if ta is None else ta + term
    else:
      tb = term if tb is None else tb + term
  return out, [zero(out[0]) if ta is None else ta,
               zero(out[1]) if tb is None else tb]


def _sum_jvp(primals, tangents, *, transpose_rhs, **params):
  lhs, rhs, lhs2, rhs2, group_sizes, group_offset = primals
  out = gmm_sum_p.bind(*primals, transpose_rhs=transpose_rhs, **params)
  if not jnp.issubdtype(params["out_dtype"], jnp.inexact):
    return out, ad.Zero(jax.typeof(out).to_tangent_aval())
  terms = []
  for a, b, da, db in ((lhs, rhs, *tangents[0:2]), (lhs2, rhs2, *tangents[2:4])):
    if type(da) is not ad.Zero:
      terms.append(_gmm_term(da, b, group_sizes, group_offset,
                             transpose_rhs=transpose_rhs, params=params))
    if type(db) is not ad.Zero:
      terms.append(_gmm_term(a, db, group_sizes, group_offset,
                             transpose_rhs=transpose_rhs, params=params))
  if not terms:
    return out, jnp.zeros_like(out)
  return out, functools.reduce(lambda x, y: x + y, terms)


def _pair_transpose(cts, lhs, rhs_a, rhs_b, group_sizes, group_offset, *,
                    out_dtype, precision, implementation, options):
  del out_dtype
  ct_a, ct_b = cts
  kw = dict(precision=precision, implementation=implementation, options=options)
  live = [(c, w) for c, w in ((ct_a, rhs_a), (ct_b, rhs_b))
          if type(c) is not ad.Zero]
  dlhs = drhs_a = drhs_b = None
  if ad.is_undefined_primal(lhs) and live:
    dtype = lhs.aval.dtype
    if len(live) == 2:  # the one product of the pair's input gradient
      dlhs = _bind_sum(ct_a, rhs_a, ct_b, rhs_b, group_sizes, group_offset,
                       transpose_rhs=True, out_dtype=dtype, **kw)
    else:
      (c, w), = live
      dlhs = _bind_gmm(c, w, group_sizes, group_offset, transpose_rhs=True,
                       out_dtype=dtype, **kw)
  for i, (c, w) in enumerate(((ct_a, rhs_a), (ct_b, rhs_b))):
    if ad.is_undefined_primal(w) and type(c) is not ad.Zero:
      d = _bind_tgmm(lhs, c, group_sizes, group_offset, num_local=w.aval.shape[0],
                     out_dtype=w.aval.dtype, **kw)
      if i == 0:
        drhs_a = d
      else:
        drhs_b = d
  return [dlhs, drhs_a, drhs_b, None, None]


def _sum_transpose(ct, lhs, rhs, lhs2, rhs2, group_sizes, group_offset, *,
                   transpose_rhs, out_dtype, precision, implementation, options):
  kw = dict(transpose_rhs=transpose_rhs, out_dtype=out_dtype, precision=precision,
            implementation=implementation, options=options)
  d1 = _gmm_transpose(ct, lhs, rhs, group_sizes, group_offset, **kw)[:2]
  d2 = _gmm_transpose(ct, lhs2, rhs2, group_sizes, group_offset, **kw)[:2]
  return [*d1, *d2, None, None]


def _batch_multi(prim, args, dims, **params):
  outs, _ = _batch(prim, args, dims, **params)
  return outs, [0] * len(outs)


_register(gmm_pair_p, _pair_abstract_eval, _pair_jvp, _pair_transpose,
          _pair_lowering)
batching.primitive_batchers[gmm_pair_p] = functools.partial(_batch_multi,
                                                            gmm_pair_p)
_register(gmm_sum_p, _sum_abstract_eval, _sum_jvp, _sum_transpose, _sum_lowering)


# ----------------------------------------------------------------------------
# Entry points


def _is_zero(d) -> bool:
  return isinstance(d, (int, np.integer)) and d == 0


def check_static_groups(fn: str, *counts) -> None:
  if not _static(counts):
    raise checks.ShapeDtypeError(
        f"{fn}: the group count (len(group_sizes) and rhs's groups, {counts})"
        " must be static; shape polymorphism over it is not supported (as for"
        " lax.ragged_dot).")


def _to_int32(x, lo, hi):
  """x as int32; integers wider than int32 are first clipped to [lo, hi] (which
  int32 holds), so a large value stays large instead of wrapping."""
  if jnp.iinfo(x.dtype).max > jnp.iinfo(jnp.int32).max:
    x = jnp.clip(x, lo if jnp.iinfo(x.dtype).min < 0 else 0, hi)
  return x.astype(jnp.int32)


def _group_sizes(fn: str, group_sizes, m) -> Array:
  """The group sizes every backend reads: int32, a negative size read as 0, and
  groups cut at row m (the group that crosses it is shortened, later ones are
  empty), so they are >= 0 and sum to at most m. Both problems are reported under
  `checkify.checkify` (user checks); elsewhere the checks are dropped."""
  gs = _to_int32(jnp.asarray(group_sizes), -1, m + 1)
  if not gs.shape[0]:
    return gs
  # Group ends with a saturating add (exact, no int32 overflow for any sizes).
  cap = m + 1
  ends = lax.associative_scan(lambda a, b: jnp.minimum(a + b, cap),
                              jnp.clip(gs, 0, cap))
  checkify.debug_check(
      jnp.all(gs >= 0),
      f"{fn}: `group_sizes` must be >= 0; got {{}}. (A negative size is read"
      " as 0.)", gs)
  checkify.debug_check(
      ends[-1] <= m,
      f"{fn}: sum(group_sizes) must be <= m={m}, the rows of lhs; got"
      f" group_sizes {{}}. (Groups are cut at row m.)", gs)
  ends = jnp.minimum(ends, m)
  return jnp.diff(ends, prepend=jnp.zeros((1,), jnp.int32))


def _group_offset(fn: str, group_offset, num_groups: int, num_local: int
                  ) -> Array:
  """The offset every backend reads: int32 in [-L, G] (every offset outside
  [0, G - L] leaves some local groups without a group of group_sizes: those are
  empty, and clipping to [-L, G] keeps exactly that). Reported under
  `checkify.checkify` when outside [0, G - L]."""
  if group_offset is None:
    return jnp.zeros((), jnp.int32)
  off = _to_int32(jnp.reshape(jnp.asarray(group_offset), ()), -num_local - 1,
                  num_groups + 1)
  checkify.debug_check(
      (off >= 0) & (off <= num_groups - num_local),
      f"{fn}: `group_offset` must be in [0, {num_groups - num_local}] (rhs holds"
      f" {num_local} of the {num_groups} groups of group_sizes); got {{}}."
      " (Local groups that are not groups of group_sizes are empty.)", off)
  return jnp.clip(off, -num_local, num_groups)


# -- out_sharding and explicit mesh axes


def _mesh_of(x):
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return None if mesh is None or mesh.empty else mesh


def _explicit_mesh(out_sharding, *xs):
  """The (abstract) mesh whose Explicit axes the result is typed over: the
  context mesh, else the operands' or out_sharding's; None when no axis is
  Explicit."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    meshes = [_mesh_of(x) for x in xs]
    if isinstance(out_sharding, jax.sharding.NamedSharding):
      meshes.append(out_sharding.mesh.abstract_mesh
                    if hasattr(out_sharding.mesh, "abstract_mesh")
                    else out_sharding.mesh)
    mesh = next((m for m in meshes if m is not None), mesh)
  return None if mesh.empty or not mesh.explicit_axes else mesh


def _spec(x, ndim: int) -> tuple:
  spec = tuple(getattr(jax.typeof(x).sharding, "spec", ()))
  return spec + (None,) * (ndim - len(spec))


def _axes(entry) -> set:
  if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED:
    return set()
  return {entry} if isinstance(entry, str) else set(entry)


def _default_out_spec(fn: str, lhs, rhs, n_axis: int):
  """Rows sharded as lhs's rows, columns as rhs's columns (dot_general's rule for
  the non-contracting dimensions)."""
  rows, cols = _spec(lhs, 2)[0], _spec(rhs, 3)[n_axis]
  if _axes(rows) & _axes(cols):
    raise ValueError(
        f"{fn}: cannot infer the output's sharding: lhs's rows and rhs's columns"
        f" are both sharded over {sorted(_axes(rows) & _axes(cols))}; pass"
        " `out_sharding`.")
  return jax.sharding.PartitionSpec(rows, cols)


def _sharded(fn: str, compute, args, out_sharding, n_axis: int,
             num_out: int | None = None):
  """compute(*args) with the result typed as lax.ragged_dot's: over Explicit mesh
  axes the products run inside `jax.sharding.auto_axes` (XLA partitions them as
  it partitions lax.ragged_dot on Auto axes) and the result gets `out_sharding`
  (default: `_default_out_spec`); elsewhere `out_sharding` is applied with
  `jax.sharding.reshard`, which refuses what lax refuses (a PartitionSpec outside
  a mesh context, Auto axis names)."""
  lhs, rhs = args[:2]
  mesh = _explicit_mesh(out_sharding, lhs, rhs)
  if mesh is None:
    out = compute(*args)
    return out if out_sharding is None else jax.sharding.reshard(out,
                                                                out_sharding)
  spec = out_sharding
  if spec is None:
    spec = _default_out_spec(fn, lhs, rhs, n_axis)
  if num_out is not None:  # compute returns a tuple of like-sharded results
    spec = (spec,) * num_out
  run = jax.sharding.auto_axes(compute, out_sharding=spec)
  if jax.sharding.get_abstract_mesh().empty and not isinstance(
      spec, jax.sharding.NamedSharding):
    with jax.sharding.use_abstract_mesh(mesh):
      return run(*args)
  return run(*args)


def gmm(lhs, rhs, group_sizes, group_offset=None, *, transpose_rhs: bool = False,
        precision=None, preferred_element_type=None,
        implementation: str | None = None,
        options: GmmOptions | None = None, out_sharding=None) -> Array:
  """The internal entry point of `jmoe.gmm` (which validates and calls this).

  Beyond `jmoe.gmm`: `transpose_rhs` (rhs [L, n, k], out = lhs @ rhs[g]^T) and
  `options` (backend configs per product, `GmmOptions`). No argument checks here
  beyond lax's own (the dtype rule, the precision); the value checks of
  `_group_sizes` and `_group_offset` run under `checkify.checkify`.
  """
  fn = "gmm"
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  precision = canonical_precision(precision)
  out_dtype = result_dtype(lhs.dtype, rhs.dtype, preferred_element_type,
                           precision)
  impl = canonical_name(implementation or default_implementation(), fn)
  m = lhs.shape[0]
  num_local = rhs.shape[0]
  n_axis = 1 if transpose_rhs else 2
  group_sizes = jnp.asarray(group_sizes)
  check_static_groups(fn, group_sizes.shape[0], num_local)
  has_offset = group_offset is not None
  offset = jnp.asarray(group_offset if has_offset else 0)

  def compute(lhs, rhs, group_sizes, offset):
    gs = _group_sizes(fn, group_sizes, m)
    off = _group_offset(fn, offset if has_offset else None, gs.shape[0],
                        num_local)
    k, n = lhs.shape[1], rhs.shape[n_axis]
    if any(map(_is_zero, (m, k, n, num_local))):
      # Nothing to multiply: zeros, whose derivatives are zeros.
      return _vary_together(jnp.zeros((m, n), out_dtype), lhs, rhs)[0]
    dtype = compute_dtype(lhs.dtype, rhs.dtype)
    resolve(impl, dtype, _static(lhs.shape, rhs.shape), precision)  # fail early
    return _bind_gmm(lhs, rhs, gs, off, transpose_rhs=transpose_rhs,
                     out_dtype=out_dtype, precision=precision,
                     implementation=impl, options=options or _NO_OPTIONS)

  return _sharded(fn, compute, (lhs, rhs, group_sizes, offset), out_sharding,
                  n_axis)


def tgmm(lhs, dy, group_sizes, group_offset=None, *, num_local: int,
         precision=None, preferred_element_type=None,
         implementation: str | None = None,
         options: GmmOptions | None = None) -> Array:
  """out[l] = lhs[rows of group group_offset + l]^T @ dy[same rows]: [L, k, n].

  The weight-gradient product on its own (tests, benchmarks); zeros for empty
  groups. Same conventions as `gmm`, and the same bad-input answers: shape and
  dtype mistakes are a `ShapeDtypeError` naming the argument.
  """
  fn = "tgmm"
  checks.check_rank(fn, "lhs", lhs, 2, "[m, k]")
  checks.check_rank(fn, "dy", dy, 2, "[m, n]")
  checks.check_rank(fn, "group_sizes", group_sizes, 1, "[groups]")
  checks.check_numeric(fn, "lhs", lhs)
  checks.check_numeric(fn, "dy", dy)
  checks.check_integer(fn, "group_sizes", group_sizes)
  checks.check_dim(fn, "dy", np.shape(dy)[0], np.shape(lhs)[0],
                   "rows (lhs [m, k] and dy [m, n] share m)")
  if group_offset is None:
    checks.check_dim(fn, "group_sizes", np.shape(group_sizes)[0], num_local,
                     "length (num_local groups, no group_offset)")
  lhs, dy = jnp.asarray(lhs), jnp.asarray(dy)
  precision = canonical_precision(precision)
  out_dtype = result_dtype(lhs.dtype, dy.dtype, preferred_element_type,
                           precision)
  impl = canonical_name(implementation or default_implementation(), fn)
  (m, k), n = lhs.shape, dy.shape[1]
  group_sizes = jnp.asarray(group_sizes)
  check_static_groups(fn, group_sizes.shape[0], num_local)
  gs = _group_sizes(fn, group_sizes, m)
  off = _group_offset(fn, group_offset, gs.shape[0], num_local)
  if any(map(_is_zero, (m, k, n, num_local))):
    return _vary_together(jnp.zeros((num_local, k, n), out_dtype), lhs, dy)[0]
  dtype = compute_dtype(lhs.dtype, dy.dtype)
  resolve(impl, dtype, _static(lhs.shape, dy.shape), precision)
  return _bind_tgmm(lhs, dy, gs, off, num_local=num_local, out_dtype=out_dtype,
                    precision=precision, implementation=impl,
                    options=options or _NO_OPTIONS)


def gmm_pair(lhs, rhs_a, rhs_b, group_sizes, group_offset=None, *,
             implementation: str | None = None,
             options: GmmOptions | None = None) -> tuple[Array, Array]:
  """(gmm(lhs, rhs_a), gmm(lhs, rhs_b)): two products of one lhs, as one primitive.

  The same values, dtypes and derivatives as the two `gmm` calls; what differs is
  the input gradient: the transpose in lhs is one product (`gmm_sum_p`, one
  kernel on the Mosaic backend) instead of two summed by the AD. rhs_a and rhs_b
  are [L, k, n_a] and [L, k, n_b] of one dtype (`jmoe.expert_ffn` passes SwiGLU's
  gate and up weights). Arguments are checked by the caller (`api.gmm`'s checks).
  """
  fn = "gmm"
  lhs, rhs_a, rhs_b = map(jnp.asarray, (lhs, rhs_a, rhs_b))
  out_dtype = result_dtype(lhs.dtype, rhs_a.dtype, None, None)
  impl = canonical_name(implementation or default_implementation(), fn)
  m = lhs.shape[0]
  num_local = rhs_a.shape[0]
  group_sizes = jnp.asarray(group_sizes)
  check_static_groups(fn, group_sizes.shape[0], num_local)
  has_offset = group_offset is not None
  offset = jnp.asarray(group_offset if has_offset else 0)

  def compute(lhs, rhs_a, rhs_b, group_sizes, offset):
    gs = _group_sizes(fn, group_sizes, m)
    off = _group_offset(fn, offset if has_offset else None, gs.shape[0],
                        num_local)
    k = lhs.shape[1]
    if any(map(_is_zero, (m, k, rhs_a.shape[2], rhs_b.shape[2], num_local))):
      return tuple(gmm(lhs, r, group_sizes, offset if has_offset else None,
                       implementation=impl, options=options)
                   for r in (rhs_a, rhs_b))
    dtype = compute_dtype(lhs.dtype, rhs_a.dtype)
    resolve(impl, dtype, _static(lhs.shape, rhs_a.shape, rhs_b.shape))
    return tuple(_bind_pair(lhs, rhs_a, rhs_b, gs, off, out_dtype=out_dtype,
                            precision=None, implementation=impl,
                            options=options or _NO_OPTIONS))

  return _sharded(fn, compute, (lhs, rhs_a, rhs_b, group_sizes, offset), None,
                  2, num_out=2)
