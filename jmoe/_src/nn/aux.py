"""A whole model's MoE aux, the way Flax collects intermediates.

Every MoE layer (`jmoe.nn.MoE`, `jmoe.linen.MoE`) sows its `jmoe.MoEAux` under the
name "moe_aux": NNX in `nnx.Intermediate` (inside `nnx.capture`), Linen in the
"intermediates" collection (when it is mutable). From those records:

  y, inter = nnx.capture(model, nnx.Intermediate)(x)     # NNX
  y, state = model.apply(variables, x, mutable=["intermediates"])   # Linen
  aux = jmoe.nn.collect_aux(inter)            # (or state["intermediates"])
  loss = task_loss + jmoe.nn.total_aux_loss(aux, balance_coef=0.01, z_coef=1e-3)
  jmoe.nn.update_router_biases(model, inter)  # or jmoe.linen.update_router_biases

Order. Records are taken in path order (the order of `nnx.iter_modules`; for Linen
the sorted module paths), then call order within a module. `collect_aux` stacks
them along a new leading axis: for layers called once, row i is the i-th MoE layer
(`moe_layers(model)` in NNX), the order `MoETransformerLM` returns its aux in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jmoe._src import moe as moe_lib
from jmoe._src import routing as routing_lib
from jmoe._src.nn.moe import AUX_NAME, MoE

Array = jax.Array
Path = tuple


def path_key(path: Path):
  """Sort key of a module path: ints (list indices) numerically, before names."""
  return tuple((0, k, "") if isinstance(k, int) else (1, 0, str(k)) for k in path)


def aux_entries(intermediates) -> list[tuple[Path, tuple[moe_lib.MoEAux, ...]]]:
  """(module path, the MoEAux of each of its calls) for every "moe_aux" record in
  an NNX capture `State` or a Linen "intermediates" dict, in path order."""
  found = []

  def walk(node, path):
    if isinstance(node, nnx.Variable):
      node = node.get_value()
    if isinstance(node, Mapping):
      for k, v in node.items():
        if k == AUX_NAME:
          v = v.get_value() if isinstance(v, nnx.Variable) else v
          calls = tuple(v) if isinstance(v, (tuple, list)) else (v,)
          if not all(isinstance(a, moe_lib.MoEAux) for a in calls):
            raise TypeError(
                f"collect_aux: the {AUX_NAME!r} record at {path} holds"
                f" {[type(a).__name__ for a in calls]}, not jmoe.MoEAux values.")
          found.append((path, calls))
        else:
          walk(v, path + (k,))

  if isinstance(intermediates, Mapping) and "intermediates" in intermediates \
      and not any(k == AUX_NAME for k in intermediates):
    intermediates = intermediates["intermediates"]  # a whole Linen state
  walk(intermediates, ())
  return sorted(found, key=lambda e: path_key(e[0]))


def stack_aux(auxes: Sequence[moe_lib.MoEAux]) -> moe_lib.MoEAux | None:
  """MoEAux values stacked along a new leading axis; None for none."""
  auxes = list(auxes)
  if not auxes:
    return None
  return jax.tree.map(lambda *a: jnp.stack(a), *auxes)


def collect_aux(intermediates) -> moe_lib.MoEAux | None:
  """A whole model's aux as one `jmoe.MoEAux` stacked over its MoE layer calls.

  Args:
    intermediates: what `nnx.capture(model, nnx.Intermediate)` returned, or a
      Linen "intermediates" collection (or the state dict holding it).

  Returns:
    `MoEAux` with a leading axis of one row per recorded call (path order, then
    call order; see the module docstring): `balance_loss` [L],
    `tokens_per_expert` [L, E], ... None when no MoE layer recorded anything.
  """
  return stack_aux([a for _, calls in aux_entries(intermediates) for a in calls])


def total_aux_loss(aux: moe_lib.MoEAux | None, *, balance_coef: float = 0.01,
                   z_coef: float = 0.001) -> Array:
  """The weighted auxiliary loss: balance_coef * sum(balance_loss) + z_coef *
  sum(z_loss), summed over every layer (and call) of a stacked record.

  The defaults are the Switch / ST-MoE coefficients (jmoe's balance loss is 1.0
  for uniform routing). float32 []; 0.0 for aux None (no MoE layers).
  """
  if aux is None:
    return jnp.zeros((), jnp.float32)
  if not isinstance(aux, moe_lib.MoEAux):
    raise TypeError(f"total_aux_loss: `aux` must be a jmoe.MoEAux; got {type(aux)}.")
  return (balance_coef * jnp.sum(aux.balance_loss.astype(jnp.float32))
          + z_coef * jnp.sum(aux.z_loss.astype(jnp.float32)))


def moe_layers(model: nnx.Module) -> list[tuple[Path, MoE]]:
  """(path, module) of every `jmoe.nn.MoE` in `model` (itself included), in path
  order: the order of the rows of `collect_aux` for layers called once."""
  return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, MoE)]


def tokens_by_path(fn: str, record, paths: Sequence[Path]) -> list[Array | None]:
  """The load [E] to step each of `paths` by, from a record (see
  `update_router_biases`); None where a path has no record."""
  if isinstance(record, Mapping):  # intermediates: match by path, sum calls
    entries = {p: calls for p, calls in aux_entries(record)}
    return [None if p not in entries else
            sum(a.tokens_per_expert for a in entries[p]) for p in paths]
  tokens = record.tokens_per_expert if isinstance(record, moe_lib.MoEAux) else record
  if np.ndim(tokens) != 2 or np.shape(tokens)[0] != len(paths):
    raise ValueError(
        f"{fn}: a stacked record needs one row per MoE layer: tokens_per_expert"
        f" of shape [{len(paths)}, experts]; got {np.shape(tokens)}. (Pass the"
        " intermediates themselves to match layers by path.)")
  return [tokens[i] for i in range(len(paths))]


def update_router_biases(model: nnx.Module, record, *,
                         rate: float = 1e-3) -> int:
  """One `jmoe.update_expert_bias` step of every router bias in an NNX model.

  Args:
    model: any `nnx.Module` holding `jmoe.nn.MoE` layers (router_bias=True ones
      are stepped, the others skipped).
    record: the intermediates of `nnx.capture(model, nnx.Intermediate)` (matched
      by path; a layer's calls are summed; layers with no record are left
      alone), or a stacked record with one row per `moe_layers(model)` entry: a
      `jmoe.MoEAux` (`collect_aux`, or `MoETransformerLM`'s aux) or its
      tokens_per_expert [L, E].
    rate: the update speed.

  Returns:
    The number of biases stepped. Raises ValueError when the model has none.
  """
  fn = "update_router_biases"
  layers = moe_layers(model)
  if not any(m.router.bias is not None for _, m in layers):
    raise ValueError(f"{fn}: the model has no MoE layer with a router bias"
                     " (router_bias=True).")
  stepped = 0
  tokens = tokens_by_path(fn, record, [p for p, _ in layers])
  for (_, m), t in zip(layers, tokens):
    if m.router.bias is None or t is None:
      continue
    b = m.router.bias
    b[...] = routing_lib.update_expert_bias(b[...], t, rate=rate)
    stepped += 1
  return stepped
