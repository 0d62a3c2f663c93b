"""Argument checks shared by the public functions.

Every check runs on static information (shapes, dtypes, Python values) so it costs
nothing under `jax.jit` and never syncs with the host. Messages name the function, the
argument, what was expected and what arrived.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np


class ShapeDtypeError(ValueError, TypeError):
  """An argument has the wrong shape, rank or dtype.

  It is both a `ValueError` (what jmoe raised for shapes before) and a `TypeError`
  (what `jax.lax` raises for the same mistakes, e.g. `lax.ragged_dot`), so code
  written against either catches it. The message names the function, the
  argument, the expected shape or dtype and what arrived.
  """


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(fn: str, name: str, x: Any, rank: int, layout: str) -> None:
  if np.ndim(x) != rank:
    raise ShapeDtypeError(
        f"{fn}: `{name}` must have rank {rank} with layout {layout}; got shape"
        f" {_shape(x)}."
    )


def check_min_rank(fn: str, name: str, x: Any, rank: int, layout: str) -> None:
  if np.ndim(x) < rank:
    raise ShapeDtypeError(
        f"{fn}: `{name}` must have rank >= {rank} with layout {layout}; got"
        f" shape {_shape(x)}."
    )


def check_floating(fn: str, name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ShapeDtypeError(
        f"{fn}: `{name}` must have a floating dtype (float32, bfloat16, float16);"
        f" got {dtype}."
    )


def check_numeric(fn: str, name: str, x: Any) -> None:
  """bool, integer, floating or complex: the dtypes `jax.lax.dot_general` takes."""
  try:
    dtype = jnp.result_type(x)
  except TypeError as e:
    raise ShapeDtypeError(f"{fn}: `{name}` must be a numeric array; got"
                          f" {type(x).__name__} ({e}).") from e
  if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
    raise ShapeDtypeError(
        f"{fn}: `{name}` must have a numeric dtype (bool, integer, floating or"
        f" complex); got {dtype}."
    )


def check_integer(fn: str, name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ShapeDtypeError(
        f"{fn}: `{name}` must have an integer dtype (int32); got {dtype}."
    )


def check_choice(fn: str, name: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(
        f"{fn}: unknown `{name}`={value!r}; expected one of {choices}."
    )


def check_dim(fn: str, name: str, got: int, want: int, what: str) -> None:
  if got != want:
    raise ShapeDtypeError(f"{fn}: `{name}` {what}: expected {want}, got {got}.")
