"""Reading a jax.profiler trace back: device kernels, and the HLO op each runs.

Shared by benchmarks.train_step_profile (a training step) and benchmarks.moe_layer
--profile (one layer). Every device event (a GPU kernel; on CPU an HLO op of the
host's XLA thunks) names its HLO instruction; the compiled program's HLO text gives
that instruction's `op_name` metadata, which holds the `jax.named_scope`s of the
code that produced it (the backward's under `transpose(...)`). XLA's command
buffers must be off (`COMMAND_BUFFERS_OFF` in XLA_FLAGS before the backend starts),
or a whole CUDA graph is one event.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import jax

COMMAND_BUFFERS_OFF = " --xla_gpu_enable_command_buffer="


def disable_command_buffers() -> None:
  """Appends the flag to XLA_FLAGS; call before the first jax.devices()."""
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + COMMAND_BUFFERS_OFF


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> op_name metadata. A fusion without metadata of its
  own takes the most common op_name among its fused computation's instructions."""
  names, by_comp, calls = {}, collections.defaultdict(list), {}
  comp = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      names[m.group(1)] = m.group(2)
      if comp:
        by_comp[comp].append(m.group(2))
    n = _NAME.match(line)
    c = _CALLS.search(line)
    if n and c:
      calls[n.group(1)] = c.group(1)
  for inst, callee in calls.items():
    if inst not in names and by_comp.get(callee):
      names[inst] = collections.Counter(by_comp[callee]).most_common(1)[0][0]
  return names


def device_events(trace_dir: str):
  """(name, hlo_op, duration_ns, line, start_ns) of the trace's device ops."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise RuntimeError(f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  out, lines_seen = [], collections.Counter()
  gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
  planes = gpu or [p for p in data.planes if p.name.startswith("/host:CPU")]
  for plane in planes:
    for line in plane.lines:
      # GPU: the stream lines hold kernels (skip the derived module/op lines).
      if gpu and not line.name.lower().startswith("stream"):
        continue
      for ev in line.events:
        stats = {k: v for k, v in ev.stats}
        hlo_op = stats.get("hlo_op")
        if hlo_op is None and not gpu:
          continue  # host events that are not XLA ops
        out.append((ev.name, hlo_op, ev.duration_ns, line.name, ev.start_ns))
        lines_seen[f"{plane.name} | {line.name}"] += 1
  return out, dict(lines_seen)


def op_name_of(event_name: str, hlo_op: str | None, names: dict[str, str]):
  """The op_name of a device event (None when the HLO does not name it)."""
  op_name = names.get(hlo_op) if hlo_op else None
  if op_name is None:  # a kernel named after its fusion: "loop_add_fusion_16"
    op_name = names.get(re.sub(r"_(\d+)$", r".\1", event_name)) or names.get(event_name)
  return op_name


def trace_events(run, names: dict[str, str], trace_dir: str | None = None):
  """Runs `run()` (which must block on its results) under jax.profiler.trace and
  returns [(kernel name, op_name or None, duration_ns, start_ns)] of the device
  events, in start order."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="jmoe_profile_")
  with jax.profiler.trace(trace_dir):
    run()
  events, _ = device_events(trace_dir)
  return sorted(((n, op_name_of(n, h, names), d, t) for n, h, d, _, t in events),
                key=lambda e: e[3])


def idle_gaps(events) -> dict:
  """Idle device time of a trace: its span less the union of the kernels'
  intervals (all streams together), and every gap between two busy stretches as
  (ns, kernel before it, kernel after it, the after kernel's op_name), largest
  first. `events`: (name, op_name, duration_ns, start_ns), any order."""
  evs = sorted(events, key=lambda e: e[3])
  if not evs:
    return dict(span_ns=0, idle_ns=0, gaps=[])
  t0, t_end = evs[0][3], max(t + d for _, _, d, t in evs)
  busy, cur_s, cur_e, prev, gaps = 0, None, None, None, []
  for name, op_name, dur, start in evs:
    if cur_e is None or start > cur_e:
      if cur_e is not None:
        busy += cur_e - cur_s
        gaps.append((start - cur_e, prev, name, op_name))
      cur_s, cur_e = start, start + dur
    else:
      cur_e = max(cur_e, start + dur)
    prev = name
  busy += cur_e - cur_s
  gaps.sort(key=lambda g: -g[0])
  return dict(span_ns=t_end - t0, idle_ns=t_end - t0 - busy, gaps=gaps)
