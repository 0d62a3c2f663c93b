"""Benchmark shapes and routings, named once (tests and benchmarks import them).

A `GmmSpec` is one grouped matmul as an MoE layer runs it: `rows` = tokens x top-k
rows sorted by expert, `num_groups` experts, each a [k, n] matrix. `routing_sizes`
makes the rows per expert for a named routing with a fixed seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class GmmSpec:
  """One benchmark case.

  Attributes:
    name: short id.
    rows: m, rows of lhs (tokens x top-k).
    num_groups: experts.
    k: contraction (d_model for the up projection).
    n: output columns.
    bwd: time forward + both gradients (3x the forward FLOPs).
    decode: weight-streaming case: report weight bytes / time.
    note: where the shape comes from.
  """

  name: str
  rows: int
  num_groups: int
  k: int
  n: int
  bwd: bool = False
  decode: bool = False
  note: str = ""

  @property
  def flops(self) -> float:
    """Useful FLOPs: 2*rows*k*n forward; forward + dlhs + drhs is 3x."""
    return 2.0 * self.rows * self.k * self.n * (3 if self.bwd else 1)

  def weight_bytes(self, itemsize: int = 2) -> int:
    return self.num_groups * self.k * self.n * itemsize

  def act_bytes(self, itemsize: int = 2) -> int:
    """lhs read + out written (forward)."""
    return self.rows * (self.k + self.n) * itemsize


SPECS: dict[str, GmmSpec] = {s.name: s for s in [
    GmmSpec(name="mixtral_fwd", rows=16384, num_groups=8, k=4096, n=14336,
            note="Mixtral 8x7B up-projection, 8192 tokens x top-2"),
    GmmSpec(name="olmoe_fwd", rows=131072, num_groups=64, k=2048, n=1024,
            note="OLMoE 1B-7B up-projection, 16384 tokens x top-8"),
    GmmSpec(name="deepseek_fwd", rows=65536, num_groups=256, k=7168, n=2048,
            note="DeepSeek-V3 routed-expert up-projection, 8192 tokens x top-8"),
    GmmSpec(name="mixtral_fwdbwd", rows=16384, num_groups=8, k=4096, n=14336,
            bwd=True, note="Mixtral up-projection, forward + dlhs + drhs"),
    GmmSpec(name="olmoe_fwdbwd", rows=131072, num_groups=64, k=2048, n=1024,
            bwd=True, note="OLMoE up-projection, forward + dlhs + drhs"),
    GmmSpec(name="decode", rows=256, num_groups=8, k=4096, n=14336, decode=True,
            note="decode: 128 tokens x top-2 on Mixtral weights"),
]}

# Tiny versions for `--cpu-smoke` (the Pallas interpreter on CPU).
CPU_SMOKE_SPECS: dict[str, GmmSpec] = {s.name: s for s in [
    GmmSpec(name="tiny_fwd", rows=128, num_groups=4, k=64, n=64),
    GmmSpec(name="tiny_fwdbwd", rows=128, num_groups=4, k=64, n=64, bwd=True),
    GmmSpec(name="tiny_decode", rows=32, num_groups=4, k=64, n=128, decode=True),
]}

# `--cpu` (XLA:CPU, the "cpu" backend against ragged_dot and a dense matmul).
CPU_SPECS: dict[str, GmmSpec] = {s.name: s for s in [
    GmmSpec(name="cpu_tiny_fwd", rows=4096, num_groups=8, k=128, n=128,
            note="examples/train_lm.py --preset cpu-tiny: 2048 tokens x top-2,"
                 " d_model 128, d_ff 128 (each of gate, up and down)"),
    GmmSpec(name="cpu_tiny_fwdbwd", rows=4096, num_groups=8, k=128, n=128,
            bwd=True, note="cpu-tiny, forward + dlhs + drhs"),
    GmmSpec(name="cpu_wide_fwdbwd", rows=4096, num_groups=8, k=512, n=1024,
            bwd=True, note="2048 tokens x top-2, d_model 512, d_ff 1024"),
    GmmSpec(name="cpu_64e_fwdbwd", rows=4096, num_groups=64, k=128, n=128,
            bwd=True, note="cpu-tiny rows over 64 experts (64 rows each)"),
]}

ROUTINGS = ("balanced", "skewed")


def routing_sizes(rows: int, num_groups: int, routing: str,
                  seed: int = 0) -> np.ndarray:
  """int32 [num_groups] rows per expert, summing to `rows`.

  balanced: multinomial with equal probabilities (a well-balanced router: sizes
    near rows/G, boundaries not tile-aligned).
  skewed: Zipf-like probabilities p_r ~ 1/r^1.2 over a random expert order, with
    the least likely quarter of the experts (at least one) given no rows: some
    experts are empty and one holds a large share.
  """
  rng = np.random.default_rng(seed)
  if routing == "balanced":
    p = np.full(num_groups, 1.0 / num_groups)
  elif routing == "skewed":
    ranks = np.arange(1, num_groups + 1, dtype=np.float64)
    p = ranks ** -1.2
    p[-max(1, num_groups // 4):] = 0.0
    p = p[rng.permutation(num_groups)]
    p /= p.sum()
  else:
    raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
  sizes = rng.multinomial(rows, p).astype(np.int32)
  assert sizes.sum() == rows
  return sizes
