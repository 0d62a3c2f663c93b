"""Byte-level language-modelling data that exists on every machine: Python source.

The corpus is the running interpreter's own `.py` files: its standard library
(`sysconfig.get_paths()["stdlib"]`), optionally the standard library's test suite and
the installed site-packages. Nothing is downloaded.

* Tokens are bytes (vocabulary 256); files are joined with a NUL byte (0), which never
  occurs in Python source, as the end-of-document mark.
* The held-out split is FIXED per file: a file is held out iff
  sha1(source/relative_path) mod 10_000 < heldout_frac * 10_000.
* Files are read in sha1 order (a pseudo-random, machine-independent order of the
  relative paths), skipping files whose bytes were already seen (site-packages
  vendor copies), until `max_bytes` are read: a cap picks a random subset of files,
  not the alphabetically first ones.
* Each split is one byte stream packed into non-overlapping windows of seq_len + 1
  bytes (inputs = window[:-1], targets = window[1:]).
* The training order is a pure function of (seed, step): epoch e visits the windows
  in the permutation drawn by numpy's PCG64 seeded with (seed, e); step s takes the
  samples s*B .. s*B + B - 1 of that endless sequence of epochs (`batch_indices`).

`load_corpus` is cached per process (`functools.lru_cache`): building it reads the
files once (a few seconds); tests and `--compare` runs reuse the arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import site
import sys
import sysconfig
import time

import numpy as np

VOCAB_SIZE = 256
EOD = 0  # end-of-document byte between files
SOURCES = ("stdlib", "stdlib-tests", "site-packages")
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Packed byte windows of the two splits.

  Attributes:
    train: uint8 [n_train, seq_len + 1] windows.
    heldout: uint8 [n_heldout, seq_len + 1] windows.
    info: description (files and bytes per split, sources, build seconds).
  """

  train: np.ndarray
  heldout: np.ndarray
  info: dict


def _site_dirs() -> list[str]:
  dirs = []
  for d in ([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
            + list(getattr(site, "getsitepackages", lambda: [])())):
    d = os.path.realpath(d)
    if os.path.isdir(d) and d not in dirs:
      dirs.append(d)
  return dirs


def list_files(sources: tuple[str, ...]) -> list[tuple[str, str]]:
  """(key, absolute path) of every `.py` file of `sources`; key = source/relpath."""
  for s in sources:
    if s not in SOURCES:
      raise ValueError(f"lm_data: unknown source {s!r}; choose from {SOURCES}.")
  out = []
  stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
  roots = []
  if "stdlib" in sources or "stdlib-tests" in sources:
    roots.append(("stdlib", stdlib))
  if "site-packages" in sources:
    roots += [("site-packages", d) for d in _site_dirs()]
  for name, root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
      rel_dir = os.path.relpath(dirpath, root)
      parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
      if name == "stdlib":
        is_test = any(p in _TEST_DIRS for p in parts)
        if is_test and "stdlib-tests" not in sources:
          continue
        if not is_test and "stdlib" not in sources:
          continue
      for f in sorted(filenames):
        if f.endswith(".py"):
          rel = "/".join(parts + (f,))
          out.append((f"{name}/{rel}", os.path.join(dirpath, f)))
  return out


def _hash(key: str) -> int:
  return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def _pack(chunks: list[bytes], seq_len: int) -> np.ndarray:
  stream = np.frombuffer(b"".join(chunks), np.uint8)
  n = max((stream.size - 1) // seq_len, 0)
  if n == 0:
    return np.zeros((0, seq_len + 1), np.uint8)
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


@functools.lru_cache(maxsize=4)
def load_corpus(seq_len: int, *, sources: tuple[str, ...] = ("stdlib",),
                max_bytes: int = 1 << 62, heldout_frac: float = 0.05) -> Corpus:
  """Reads, splits and packs the corpus (cached per argument tuple).

  Args:
    seq_len: S; windows hold S + 1 bytes.
    sources: any of "stdlib" (without tests), "stdlib-tests", "site-packages".
    max_bytes: stop reading once this many bytes (both splits) are read.
    heldout_frac: share of files held out (by path hash).
  """
  t0 = time.perf_counter()
  files = sorted(list_files(tuple(sources)), key=lambda kp: (_hash(kp[0]), kp[0]))
  threshold = int(round(heldout_frac * 10_000))
  chunks = {"train": [], "heldout": []}
  counts = {"train": 0, "heldout": 0}
  seen, total = set(), 0
  for key, path in files:
    if total >= max_bytes:
      break
    try:
      with open(path, "rb") as fh:
        data = fh.read()
    except OSError:
      continue
    digest = hashlib.sha1(data).digest()
    if not data or digest in seen:
      continue
    seen.add(digest)
    split = "heldout" if _hash(key) % 10_000 < threshold else "train"
    chunks[split].append(data + bytes([EOD]))
    counts[split] += 1
    total += len(data) + 1
  train, heldout = _pack(chunks["train"], seq_len), _pack(chunks["heldout"], seq_len)
  if len(train) == 0 or len(heldout) == 0:
    raise RuntimeError(
        f"lm_data: too little data ({counts} files, {total} bytes) from sources"
        f" {sources}; stdlib at {sysconfig.get_paths()['stdlib']}.")
  info = dict(
      sources=list(sources), python=sys.version.split()[0],
      stdlib=sysconfig.get_paths()["stdlib"], files_listed=len(files),
      train_files=counts["train"], heldout_files=counts["heldout"],
      train_bytes=int(sum(map(len, chunks["train"]))),
      heldout_bytes=int(sum(map(len, chunks["heldout"]))),
      train_windows=len(train), heldout_windows=len(heldout),
      build_s=round(time.perf_counter() - t0, 2))
  train.setflags(write=False)
  heldout.setflags(write=False)
  return Corpus(train=train, heldout=heldout, info=info)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """Window indices [batch_size] of training step `step`: a pure function.

  Samples step*B .. step*B + B - 1 of the endless sequence "epoch 0's permutation,
  epoch 1's permutation, ...", each epoch's permutation drawn from (seed, epoch).
  """
  epochs, pos = np.divmod(step * batch_size + np.arange(batch_size), n)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _epoch_permutation(seed, int(epoch), n)[pos[sel]]
  return out


def eval_indices(n: int, count: int) -> np.ndarray:
  """A fixed, evenly spaced subset of `count` held-out windows (all if fewer)."""
  if count >= n:
    return np.arange(n)
  return np.linspace(0, n - 1, count).round().astype(np.int64)


def unigram_bits_per_byte(targets: np.ndarray) -> float:
  """Entropy (bits) of the byte distribution of `targets` under itself."""
  counts = np.bincount(np.asarray(targets, np.int64).ravel(), minlength=VOCAB_SIZE)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())
