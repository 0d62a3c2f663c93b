"""The compiled HLO of a layer-benchmark method, and the fusions whose name
matches a pattern (what a profile's kernel name hides: its operands and ops).

  python -m benchmarks.layer_hlo --case olmoe --method moe \
      --fusion input_add_reduce_fusion [--out FILE]
"""

from __future__ import annotations

import argparse
import re

import jax

from benchmarks import moe_layer


def fusion_bodies(text: str, pattern: str) -> list[str]:
  """The computations called by the fusions matching `pattern` (the whole
  `fused_computation` blocks), and the fusion instructions themselves."""
  out = []
  for line in text.splitlines():
    if re.search(rf"\b{pattern}\b = ", line):
      out.append(line.strip())
      m = re.search(r"calls=(%?[\w.\-]+)", line)
      if m:
        name = m.group(1).lstrip("%")
        body = re.search(rf"(^%?{re.escape(name)} [^\n]*\{{\n.*?^\}})", text,
                         re.S | re.M)
        if body:
          out.append(body.group(1))
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--case", default="olmoe")
  p.add_argument("--method", default="moe")
  p.add_argument("--fusion", default="input_add_reduce_fusion")
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  spec = moe_layer.CASES[a.case]
  params, _, xs, cs = moe_layer.make_inputs(spec, 1)
  fn = moe_layer.build(spec, None)[a.method]
  text = fn.lower(xs[0], params, cs[0]).compile().as_text()
  found = fusion_bodies(text, a.fusion)
  report = "\n\n".join(found) or f"no fusion matching {a.fusion}"
  if a.out:
    with open(a.out, "w") as f:
      f.write(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, "
              f"{a.case} {a.method}\n{report}\n")
  print(report[:20000])


if __name__ == "__main__":
  main()
