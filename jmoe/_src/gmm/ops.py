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
  FALLBACK: str | None              # backend for the dtypes it does not take

called with lhs.dtype == rhs.dtype (== dy.dtype), int32 group_sizes [G] (all
groups, G >= L), an int32 scalar group_offset (never None), static shapes with
m, k, n, L >= 1, and float32 accumulation expected; rows outside the local groups
and rows past sum(group_sizes) are zeros, and so is an empty group's tgmm. `config`
is the backend's own hashable value or None (its default); it reaches the backend
untouched (`GmmOptions`), and is dropped (None) when a fallback backend runs.

What no backend handles, this module does: operand dtype promotion (lhs, rhs and
cotangents to one compute dtype, so a float32 cotangent of bf16 operands is never
rounded to bf16), int32 group sizes, a None group_offset, empty shapes
(min(m, k, n, L) == 0 gives zeros, statically), symbolic shapes (jax.export shape
polymorphism: the kernels need static shapes, so those lower to "xla"), the dtype
fallback, and the varying manual axes of shard_map (operands are cast to vary
over the union of their axes before the bind; the backends see plain types).
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
IMPLEMENTATIONS = ("xla", "reference", "pallas", "pallas_triton",
                   "pallas_interpret", "mosaic", "cpu")
_MOSAIC_MODULE = _BACKENDS["mosaic"][0]


class Backend(NamedTuple):
  """A loaded backend: its module's interface, with fixed keyword arguments bound."""

  name: str
  gmm: Callable[..., Array]
  tgmm: Callable[..., Array]
  supports_dtype: Callable[[Any], bool]
  fallback: str | None


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
                 fallback=getattr(module, "FALLBACK", None))


def resolve(implementation: str, dtype, static_shapes: bool = True) -> str:
  """The backend that runs `implementation` on operands of `dtype`: "xla" for
  symbolic shapes, else the first of implementation, its FALLBACK, ... that takes
  the dtype."""
  if not static_shapes:
    return "xla"
  name, tried = implementation, []
  while not backend(name).supports_dtype(dtype):
    tried.append(name)
    nxt = backend(name).fallback
    if nxt is None or canonical_name(nxt) in tried:
      raise TypeError(f"gmm: no backend takes {jnp.dtype(dtype).name} operands"
                      f" (tried {tried}).")
    name = canonical_name(nxt)
  return name


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


def _lower(fn, ctx, *args):
  """Lowers `fn` (a backend's product) in place of the primitive."""
  ctx = ctx.replace(avals_in=[_plain(a) for a in ctx.avals_in],
                    avals_out=[_plain(a) for a in ctx.avals_out])
  with _unchecked_vma():
    return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)


# ----------------------------------------------------------------------------
# The primitives

gmm_p = jex_core.Primitive("jmoe_gmm")
tgmm_p = jex_core.Primitive("jmoe_tgmm")


def _cast(x, dtype):
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _bind_gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype,
              precision, implementation, options):
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  args = _vary_together(_cast(lhs, dtype), _cast(rhs, dtype), group_sizes,
                        group_offset)
  return gmm_p.bind(*args, transpose_rhs=bool(transpose_rhs),
                    out_dtype=jnp.dtype(out_dtype), precision=precision,
                    implementation=implementation, options=options)


def _bind_tgmm(lhs, dy, group_sizes, group_offset, *, num_local, out_dtype,
               precision, implementation, options):
  dtype = jnp.promote_types(lhs.dtype, dy.dtype)
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
  name = resolve(implementation, lhs.dtype, _static(lhs.shape, rhs.shape))
  config = (options.dlhs if transpose_rhs else options.fwd
            ) if name == implementation else None
  fn = functools.partial(backend(name).gmm, transpose_rhs=transpose_rhs,
                         out_dtype=out_dtype, precision=precision, config=config)
  return _lower(fn, ctx, *args)


def _tgmm_lowering(ctx, *args, num_local, out_dtype, precision, implementation,
                   options):
  lhs, dy = ctx.avals_in[:2]
  name = resolve(implementation, lhs.dtype, _static(lhs.shape, dy.shape))
  config = options.drhs if name == implementation else None
  fn = functools.partial(backend(name).tgmm, num_local=num_local,
                         out_dtype=out_dtype, precision=precision, config=config)
  return _lower(fn, ctx, *args)


def _bilinear_jvp(bind, prim):
  def jvp(primals, tangents, **params):
    a, b, group_sizes, group_offset = primals
    da, db = tangents[:2]
    out = prim.bind(*primals, **params)
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


# ----------------------------------------------------------------------------
# Entry points


def _is_zero(d) -> bool:
  return isinstance(d, (int, np.integer)) and d == 0


def _offset(group_offset) -> Array:
  if group_offset is None:
    return jnp.zeros((), jnp.int32)
  return jnp.reshape(jnp.asarray(group_offset), ()).astype(jnp.int32)


def check_static_groups(fn: str, *counts) -> None:
  if not _static(counts):
    raise TypeError(f"{fn}: the group count (len(group_sizes) and rhs's groups,"
                    f" {counts}) must be static; shape polymorphism over it is"
                    " not supported (as for lax.ragged_dot).")


def _prepare(fn, a, b, group_sizes, group_offset, implementation,
             preferred_element_type):
  a, b = jnp.asarray(a), jnp.asarray(b)
  if preferred_element_type is None:
    preferred_element_type = jnp.result_type(a, b)
  out_dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(preferred_element_type))
  impl = canonical_name(implementation or default_implementation(), fn)
  group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
  return a, b, group_sizes, _offset(group_offset), impl, out_dtype


def gmm(lhs, rhs, group_sizes, group_offset=None, *, transpose_rhs: bool = False,
        precision=None, preferred_element_type=None,
        implementation: str | None = None,
        options: GmmOptions | None = None) -> Array:
  """The internal entry point of `jmoe.gmm` (which validates and calls this).

  Beyond `jmoe.gmm`: `transpose_rhs` (rhs [L, n, k], out = lhs @ rhs[g]^T) and
  `options` (backend configs per product, `GmmOptions`). No argument checks here.
  """
  fn = "gmm"
  lhs, rhs, gs, off, impl, out_dtype = _prepare(
      fn, lhs, rhs, group_sizes, group_offset, implementation,
      preferred_element_type)
  m, k = lhs.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  check_static_groups(fn, gs.shape[0], num_local)
  if any(map(_is_zero, (m, k, n, num_local))):
    # Nothing to multiply: zeros, whose derivatives are zeros.
    return _vary_together(jnp.zeros((m, n), out_dtype), lhs, rhs)[0]
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  resolve(impl, dtype, _static(lhs.shape, rhs.shape))  # fail early, clearly
  return _bind_gmm(lhs, rhs, gs, off, transpose_rhs=transpose_rhs,
                   out_dtype=out_dtype, precision=precision, implementation=impl,
                   options=options or _NO_OPTIONS)


def tgmm(lhs, dy, group_sizes, group_offset=None, *, num_local: int,
         precision=None, preferred_element_type=None,
         implementation: str | None = None,
         options: GmmOptions | None = None) -> Array:
  """out[l] = lhs[rows of group group_offset + l]^T @ dy[same rows]: [L, k, n].

  The weight-gradient product on its own (tests, benchmarks); zeros for empty
  groups. Same conventions as `gmm`.
  """
  fn = "tgmm"
  lhs, dy, gs, off, impl, out_dtype = _prepare(
      fn, lhs, dy, group_sizes, group_offset, implementation,
      preferred_element_type)
  (m, k), n = lhs.shape, dy.shape[1]
  check_static_groups(fn, gs.shape[0], num_local)
  if any(map(_is_zero, (m, k, n, num_local))):
    return _vary_together(jnp.zeros((num_local, k, n), out_dtype), lhs, dy)[0]
  dtype = jnp.promote_types(lhs.dtype, dy.dtype)
  resolve(impl, dtype, _static(lhs.shape, dy.shape))
  return _bind_tgmm(lhs, dy, gs, off, num_local=num_local, out_dtype=out_dtype,
                    precision=precision, implementation=impl,
                    options=options or _NO_OPTIONS)
