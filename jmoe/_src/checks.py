"""Argument checks shared by the public functions.

Every check runs on static information (shapes, dtypes, Python values) so it costs
nothing under `jax.jit` and never syncs with the host. Messages name the function, the
argument, what was expected and what arrived.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(fn: str, name: str, x: Any, rank: int, layout: str) -> None:
  if np.ndim(x) != rank:
    raise ValueError(
        f"{fn}: `{name}` must have rank {rank} with layout {layout}; got shape"
        f" {_shape(x)}."
    )


def check_min_rank(fn: str, name: str, x: Any, rank: int, layout: str) -> None:
  if np.ndim(x) < rank:
    raise ValueError(
        f"{fn}: `{name}` must have rank >= {rank} with layout {layout}; got"
        f" shape {_shape(x)}."
    )


def check_floating(fn: str, name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{fn}: `{name}` must have a floating dtype (float32, bfloat16, float16);"
        f" got {dtype}."
    )


def check_integer(fn: str, name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
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
    raise ValueError(f"{fn}: `{name}` {what}: expected {want}, got {got}.")
