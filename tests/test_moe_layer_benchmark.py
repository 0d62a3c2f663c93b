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
          "combine fwd", "combine bwd"} <= set(disp["by_stage"])
  assert sum(disp["by_stage"].values()) == pytest.approx(
      disp["device_busy_ms"], rel=1e-2, abs=1e-3)
  assert all(k["ms"] > 0 for k in disp["top_kernels"])
  # The dense FFN has no MoE scope: all of it is "other".
  assert not any(s.split()[0] in ("router", "dispatch", "experts", "combine")
                 for s in rec["profile"]["dense"]["by_stage"])
  assert rec["dispatch_ms"] > 0 and rec["dense_ms"] > 0


@pytest.mark.cpu
def test_dense_ceiling_runs_all_nine_products():
  # The ceiling is timed as value_and_grad: its forward output is computed, so
  # XLA keeps all 3 forward and 6 backward products (with `jax.grad` alone it
  # dropped the down projection's forward: 8 dots, 8/9 of the active FLOPs).
  spec = moe_layer.SMOKE["tiny"]
  params, dense, xs, cs = moe_layer.make_inputs(spec, 1)
  fns = moe_layer.build(spec, None)
  compiled = fns["dense"].lower(xs[0], dense, cs[0]).compile()
  assert compiled.as_text().count(" dot(") == 9
  ratio = moe_layer.dense_flops_ratio(spec, fns["dense"], (xs[0], dense, cs[0]))
  assert ratio == pytest.approx(1.0, abs=0.05)
  # The moe path computes the same loss value it differentiates.
  loss, grads = fns["moe"](xs[0], params, cs[0])
  assert loss.shape == () and len(grads) == 2
