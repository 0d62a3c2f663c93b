"""benchmarks.moe_layer --profile on CPU: the layer's stages are found in a trace.

The GPU figures in benchmarks/results come from this code path; here it runs on
small shapes on XLA:CPU, where the same named scopes reach the HLO metadata.
"""

import json

import pytest

from benchmarks import moe_layer


@pytest.mark.cpu
def test_layer_profile_attributes_the_stages(tmp_path, monkeypatch):
  # --cpu (the default CPU backend) on the smoke case's small shapes.
  monkeypatch.setattr(moe_layer, "CPU_CASES", moe_layer.SMOKE)
  out = tmp_path / "layer.json"
  assert moe_layer.main(["--cpu", "--quick", "--profile", "--methods", "dense",
                         "dispatch", "--out", str(out)]) == 0
  rec = json.loads(out.read_text())["records"][0]
  assert set(rec["profile"]) == {"dense", "dispatch"}  # --methods is honoured
  assert "moe_ms" not in rec
  disp = rec["profile"]["dispatch"]
  # Every stage of the routing + permutation path, forward and backward.
  assert {"router fwd", "router bwd", "dispatch fwd", "dispatch bwd",
          "combine bwd"} <= set(disp["by_stage"])
  assert sum(disp["by_stage"].values()) == pytest.approx(
      disp["device_busy_ms"], rel=1e-2, abs=1e-3)
  assert all(k["ms"] > 0 for k in disp["top_kernels"])
  # The dense FFN has no MoE scope: all of it is "other".
  assert not any(s.split()[0] in ("router", "dispatch", "experts", "combine")
                 for s in rec["profile"]["dense"]["by_stage"])
  assert rec["dispatch_ms"] > 0 and rec["dense_ms"] > 0
