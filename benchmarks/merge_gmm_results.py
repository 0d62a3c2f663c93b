"""Merges the H200 gmm benchmark runs of 2026-11-29 into results/h200_gmm.json.

Three runs (raw files in results/raw/) were needed because of the device-time
budget: XLA's ragged_dot fwd+bwd never finished compiling within the call's limit
and the first full run timed out there, so ragged_dot ran in its own process, and
the decode case in a third call. Every record keeps the dense ceiling measured in
its own run (vs_dense) and names the run it comes from.

  python -m benchmarks.merge_gmm_results
"""

import json
import os

HERE = os.path.join(os.path.dirname(__file__), "results")
RUNS = {
    "run2_main": "raw/h200_gmm_run2_main.json",      # dense/jmoe/mgpu, 5 cases
    "run2_ragged": "raw/h200_gmm_run2_ragged.json",  # dense + lax.ragged_dot
    "run3_decode": "raw/h200_gmm_run3_decode.json",  # decode: dense/hbm/jmoe/mgpu
}
SPECS = ["mixtral_fwd", "olmoe_fwd", "deepseek_fwd", "mixtral_fwdbwd",
         "olmoe_fwdbwd", "decode"]


def from_log(path, case, run):
  """Rows of the run log for a case whose JSON write the time limit cut off."""
  out = []
  with open(os.path.join(HERE, path)) as f:
    for line in f:
      p = line.split()
      if len(p) >= 6 and p[0] == case and p[2] in ("dense", "jmoe"):
        out.append(dict(case=case, routing=p[1], method=p[2], ms=float(p[3]),
                        tflops=float(p[4]), vs_dense=float(p[5]),
                        rel_err=float(p[8]), run=run,
                        note="parsed from the run log: the run was stopped"
                        " before this case's JSON write"))
  return out


def main():
  records, runs = [], {}
  for name, path in RUNS.items():
    with open(os.path.join(HERE, path)) as f:
      d = json.load(f)
    runs[name] = {k: d[k] for k in ("device", "jax_version", "date", "argv")}
    for r in d["records"]:
      keep = (name == "run2_main" and r["case"] != "decode"
              or name == "run2_ragged" and r["method"] == "ragged_dot"
              or name == "run3_decode" and r["case"] == "decode")
      if keep:
        records.append(dict(r, run=name))
  records += from_log("raw/h200_gmm_run2_main.log", "olmoe_fwdbwd", "run2_main")
  have = {(r["case"], r["routing"], r["method"]) for r in records}
  for case in ("mixtral_fwdbwd", "olmoe_fwdbwd"):
    for routing in ("balanced", "skewed"):
      if (case, routing, "ragged_dot") not in have:
        records.append(dict(case=case, routing=routing, method="ragged_dot",
                            run="run2_ragged", error="not measured: XLA's compile"
                            " of ragged_dot fwd+bwd did not finish within the"
                            " call's time limit (150-250 s)"))
  if ("olmoe_fwdbwd", "skewed", "jmoe") not in have:
    records.append(dict(case="olmoe_fwdbwd", routing="skewed", method="jmoe",
                        run="run2_main", error="not measured: run2 hit its time"
                        " limit here (balanced routing was measured)"))
  order = {c: i for i, c in enumerate(SPECS)}
  records.sort(key=lambda r: (order[r["case"]], r["routing"], r["method"]))
  first = runs["run2_main"]
  out = dict(device=first["device"], jax_version=first["jax_version"],
             date=first["date"][:10], runs=runs,
             note=__doc__.split("\n\n")[1].replace("\n", " "), records=records)
  with open(os.path.join(HERE, "h200_gmm.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(f"{len(records)} records -> results/h200_gmm.json")


if __name__ == "__main__":
  main()
