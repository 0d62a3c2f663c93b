"""Tests of examples/train_lm.py: a smoke run, exact resumption, extending a run's
steps, the dense twin, the --compare command line and its one-line answers to
mistakes, all on the tiny ci-smoke preset (one compile of each model and schedule
length per process: train_lm caches its compiled steps)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import matplotlib.figure
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples"))
import lm_data  # noqa: E402
import train_lm  # noqa: E402

from tests.utils import assert_rel  # noqa: E402

CFG = train_lm.PRESETS["ci-smoke"]  # 8 steps, checkpoints every 4
_QUIET = dict(progress=False, measure_matmul=False)


def _leaves_equal(a, b):
  pa = jax.tree_util.tree_leaves_with_path(a)
  pb = jax.tree_util.tree_leaves_with_path(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(pa, pb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def test_data_is_fixed_and_order_is_a_function_of_seed_and_step():
  corpus = lm_data.load_corpus(CFG.seq_len, sources=CFG.sources,
                               max_bytes=CFG.max_bytes)
  assert corpus.train.dtype == np.uint8
  assert corpus.train.shape[1] == CFG.seq_len + 1
  assert corpus.info["heldout_files"] > 0 and corpus.info["train_files"] > 0
  # Windows are consecutive slices of one byte stream (the last target of one is
  # the first input of the next), files separated by the end-of-document byte.
  np.testing.assert_array_equal(corpus.train[:-1, -1], corpus.train[1:, 0])
  assert (corpus.train == lm_data.EOD).any()
  n = len(corpus.train)
  a = lm_data.batch_indices(3, 17, 8, n)
  np.testing.assert_array_equal(a, lm_data.batch_indices(3, 17, 8, n))
  assert not np.array_equal(a, lm_data.batch_indices(4, 17, 8, n))
  # One epoch of a small set visits every window once, the next epoch reshuffles.
  epoch0 = np.concatenate([lm_data.batch_indices(0, s, 5, 20) for s in range(4)])
  epoch1 = np.concatenate([lm_data.batch_indices(0, s, 5, 20) for s in range(4, 8)])
  assert sorted(epoch0) == list(range(20)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  # The unigram baseline is the entropy of the byte histogram.
  assert lm_data.unigram_bits_per_byte(np.array([1, 2, 3, 4])) == pytest.approx(2.0)


def test_dense_twin_has_the_same_active_flops():
  _, moe = train_lm.init_state(CFG)
  _, dense = train_lm.init_state(dataclasses.replace(CFG, dense=True))
  c_moe = train_lm.param_counts(CFG, moe["params"])
  c_dense = train_lm.param_counts(CFG, dense["params"])
  router = CFG.num_layers * CFG.d_model * CFG.num_experts
  assert c_moe["params_active"] - router == c_dense["params_active"]
  assert c_moe["params_total"] > c_dense["params_total"]
  w = dense["params"]["blocks"][0]["mlp"]["w_up"]
  assert w.shape == (CFG.d_model, CFG.d_ff * CFG.top_k)
  assert w.dtype == np.float32  # float32 params, bf16 activations


@pytest.fixture
def plot_limits(monkeypatch):
  """{file name: [(xlim, ylim) of each plotting axes]} of every figure saved."""
  saved = {}
  savefig = matplotlib.figure.Figure.savefig

  def record(fig, path, *args, **kwargs):
    saved[os.path.basename(path)] = [
        (ax.get_xlim(), ax.get_ylim()) for ax in fig.axes
        if ax.has_data() and ax.get_label() != "<colorbar>"]
    return savefig(fig, path, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
  return saved


def _assert_loss_plot_fits(limits, history, baseline):
  """Finite limits that hold every logged point (and the unigram line)."""
  ((x0, x1), (y0, y1)), = limits
  assert all(map(math.isfinite, (x0, x1, y0, y1))), limits
  points = [(r["step"], r[k]) for r in history
            for k in ("train_bpb", "heldout_bpb") if k in r]
  assert points
  for x, y in points:
    assert x0 <= x <= x1 and y0 <= y <= y1, ((x, y), limits)
  assert y0 <= baseline <= y1
  # Fitted, not merely containing: the points span most of the height.
  ys = [y for _, y in points] + [baseline]
  assert max(ys) - min(ys) > 0.8 * (y1 - y0), (ys, limits)


def test_schedule_is_optaxs_warmup_cosine_for_any_length():
  import optax
  for cfg in (CFG, train_lm.PRESETS["cpu-tiny"],
              dataclasses.replace(CFG, warmup_steps=0)):
    ref = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)
    steps = np.arange(cfg.steps + 3)
    ours = jax.jit(train_lm.lr_schedule(cfg, jax.numpy.int32(cfg.steps)))
    assert_rel(ours(steps), ref(steps), what=f"lr of {cfg.steps} steps")


def test_smoke_run_writes_plots_checkpoint_and_results(tmp_path, plot_limits):
  run = train_lm.train(CFG, str(tmp_path), **_QUIET)
  r = run.results
  assert r["steps"] == CFG.steps == int(run.state["step"])
  assert int(run.state["data_position"]) == CFG.steps * CFG.batch_size
  losses = [h["loss"] for h in run.history if "loss" in h]
  assert len(losses) == CFG.steps // CFG.log_every
  assert all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0], losses
  assert math.isfinite(r["heldout_bits_per_byte"])
  assert r["heldout_bits_per_byte"] < 8.0  # below a uniform byte guess
  assert 3.0 < r["unigram_bits_per_byte"] < 6.0
  assert r["tokens_seen"] == CFG.steps * CFG.batch_size * CFG.seq_len
  assert r["flops_per_token"] > 6 * r["params_active"]
  share = np.array([h["expert_share"] for h in run.history if "expert_share" in h])
  assert share.shape[1:] == (CFG.num_layers, CFG.num_experts)
  # Not a dtype tolerance: train_lm logs each share rounded to 5 decimals.
  np.testing.assert_allclose(share.sum(-1), 1.0, atol=1e-4)
  for name in ("loss.png", "experts.png", "results.json", "metrics.jsonl"):
    assert (tmp_path / name).stat().st_size > 0, name
  # The axes fit the data: every point of loss.png lies inside its limits
  # (ci-smoke's losses, ~7-9 bits per byte, were once all above the y-limit).
  _assert_loss_plot_fits(plot_limits["loss.png"], run.history,
                         r["unigram_bits_per_byte"])
  assert len(plot_limits["experts.png"]) == CFG.num_layers
  for (x0, x1), _ in plot_limits["experts.png"]:  # every logged step shows
    assert x0 <= CFG.log_every and x1 >= CFG.steps
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["heldout_bits_per_byte"] == r["heldout_bits_per_byte"]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "8"]
  # No datasheet peak for a CPU, so no MFU against one (nor a matmul, not asked).
  if jax.devices()[0].platform == "cpu":
    assert r["peak_tflops"] is None and r["mfu_vs_peak"] is None
  assert r["mfu_vs_measured_matmul"] is None
  # A fresh run refuses a directory that holds a run.
  with pytest.raises(train_lm.UsageError, match="holds an earlier run"):
    train_lm.train(CFG, str(tmp_path), plots=False, **_QUIET)


def test_resume_continues_exactly(tmp_path):
  straight = train_lm.train(CFG, str(tmp_path / "a"), progress=False, plots=False,
                            measure_matmul=False)
  half = CFG.steps // 2
  first = train_lm.train(CFG, str(tmp_path / "b"), stop_at=half, progress=False,
                         plots=False, measure_matmul=False)
  assert int(first.state["step"]) == half
  resumed = train_lm.train(CFG, str(tmp_path / "b"), resume=True, progress=False,
                           plots=False, measure_matmul=False)
  assert int(resumed.state["step"]) == CFG.steps
  # Parameters, optimizer state, step, data position and PRNG key: bitwise equal.
  _leaves_equal(straight.state, resumed.state)
  assert not np.array_equal(np.asarray(first.state["key"]),
                            np.asarray(resumed.state["key"]))
  # The metric history continues too.
  logged = lambda run: [(h["step"], h["loss"]) for h in run.history if "loss" in h]
  assert logged(straight) == logged(resumed)
  # A resumption with another model refuses, as does one ending before the
  # checkpoint.
  with pytest.raises(train_lm.UsageError, match="different configuration.*d_ff"):
    train_lm.train(dataclasses.replace(CFG, d_ff=48), str(tmp_path / "b"),
                   resume=True, plots=False, **_QUIET)
  with pytest.raises(train_lm.UsageError, match="ends before the checkpoint"):
    train_lm.train(dataclasses.replace(CFG, steps=CFG.steps - 1),
                   str(tmp_path / "b"), resume=True, plots=False, **_QUIET)


def test_extending_steps_equals_a_longer_run_when_the_schedule_allows(tmp_path):
  # With a floor at the peak rate, the schedule after warm-up is the same
  # constant for any length. A finished 4-step run resumed with --steps 8 must
  # then be bitwise the straight 8-step run: the extension continues the data
  # order, PRNG key, optimizer state and metric history exactly.
  flat = dataclasses.replace(CFG, min_lr_ratio=1.0)
  half = dataclasses.replace(flat, steps=CFG.steps // 2)
  straight = train_lm.train(flat, str(tmp_path / "a"), plots=False, **_QUIET)
  short = train_lm.train(half, str(tmp_path / "b"), plots=False, **_QUIET)
  assert int(short.state["step"]) == half.steps
  extended = train_lm.train(flat, str(tmp_path / "b"), resume=True, plots=False,
                            **_QUIET)
  assert extended.results["steps"] == flat.steps
  _leaves_equal(straight.state, extended.state)
  logged = lambda run: [(h["step"], h["loss"]) for h in run.history if "loss" in h]
  assert logged(straight) == logged(extended)


def test_extending_steps_follows_the_new_totals_schedule(tmp_path, plot_limits):
  # A finished run (at the schedule's floor) resumed with twice its steps: it
  # continues from its checkpoint to the new total, on the schedule of the new
  # total, whose rate at the resume point is above the old floor.
  half = dataclasses.replace(CFG, steps=CFG.steps // 2)
  short = train_lm.train(half, str(tmp_path), plots=False, **_QUIET)
  extended = train_lm.train(CFG, str(tmp_path), resume=True, **_QUIET)
  assert extended.results["steps"] == int(extended.state["step"]) == CFG.steps
  assert int(extended.state["data_position"]) == CFG.steps * CFG.batch_size
  history = extended.history
  assert history[:len(short.history)] == short.history  # the run's own past
  new = [h for h in history if "loss" in h and h["step"] > half.steps]
  assert [h["step"] for h in new] == list(range(
      half.steps + CFG.log_every, CFG.steps + 1, CFG.log_every))
  old_schedule, schedule = train_lm.lr_schedule(half), train_lm.lr_schedule(CFG)
  floor = CFG.lr * CFG.min_lr_ratio
  assert_rel(old_schedule(half.steps), floor, what="old floor")
  for h in new:  # the logged rate is that of the interval's last update
    assert_rel(h["lr"], schedule(h["step"] - 1), what=f"lr at {h['step']}")
    assert h["lr"] > 1.2 * floor  # not the old run's floor
  assert_rel(schedule(CFG.steps), floor, what="new floor")
  _assert_loss_plot_fits(plot_limits["loss.png"], history,
                         extended.results["unigram_bits_per_byte"])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["config"]["steps"] == CFG.steps
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "8"]


def test_compare_command_line(tmp_path, capsys, plot_limits):
  out = tmp_path / "out" / "cmp.json"
  run_dir = str(tmp_path / "run")
  res = train_lm.main(["--preset", "ci-smoke", "--compare",
                       "--run-dir", run_dir, "--out-json", str(out)])
  lines = capsys.readouterr().out.splitlines()
  # The run directory, printed first and last (after the device line).
  assert lines[1] == f"run dir: {run_dir}", lines
  assert lines[-1].startswith(f"run dir: {run_dir} ("), lines
  saved = json.loads(out.read_text())
  assert saved["comparison"] == res["comparison"]
  assert saved["moe"]["mode"] == "moe" and saved["dense"]["mode"] == "dense"
  assert saved["moe"]["steps"] == saved["dense"]["steps"] == CFG.steps
  assert saved["moe"]["tokens_seen"] == saved["dense"]["tokens_seen"]
  assert saved["moe"]["flops_per_token"] == pytest.approx(
      saved["dense"]["flops_per_token"], rel=0.02)
  for key in ("mfu_vs_measured_matmul", "tokens_per_s", "matmul",
              "compile_s", "wall_clock_s", "jax_version", "device_kind", "date"):
    assert saved["moe"][key] is not None, key
  # MFU only against ceilings of this device: a matmul measured here, and its
  # datasheet peak where train_lm knows one (none for a CPU; 989 TFLOP/s is an
  # H100/H200's).
  assert saved["moe"]["matmul"]["n"] > 0 and saved["moe"]["matmul"]["tflops"] > 0
  assert saved["comparison"]["mfu_vs_measured_matmul_moe"] > 0
  device = jax.devices()[0]
  peak = train_lm.peak_tflops(device.device_kind, CFG.dtype)
  assert saved["moe"]["peak_tflops"] == peak
  done = [line for line in lines if line.startswith("[moe] done:")]
  assert len(done) == 1 and "matmul measured here" in done[0], lines
  if device.platform == "cpu":
    assert peak is None and saved["comparison"]["mfu_moe"] is None
    assert not any("989" in line for line in lines), done
  assert train_lm.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
  assert train_lm.peak_tflops("NVIDIA H200", "float32") is None
  assert train_lm.peak_tflops("cpu", "bfloat16") is None
  both = [json.loads(line) for mode in ("moe", "dense")
          for line in open(os.path.join(run_dir, mode, "metrics.jsonl"))]
  _assert_loss_plot_fits(plot_limits["compare.png"], both,
                         res["comparison"]["unigram_bits_per_byte"])
  names = sorted(os.listdir(out.parent))
  assert names == ["cmp.json", "cmp_compare.png", "cmp_dense_loss.png",
                   "cmp_moe_experts.png", "cmp_moe_loss.png"], names


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """The directory of a finished ci-smoke run started with --seed 1 (checkpoints
  at steps 4 and 8)."""
  run_dir = str(tmp_path_factory.mktemp("finished"))
  train_lm.train(dataclasses.replace(CFG, seed=1), run_dir, plots=False,
                 preset="ci-smoke", **_QUIET)
  return run_dir


def test_resume_defaults_to_the_runs_own_configuration(finished_run, capsys):
  # No --preset, --seed or --steps: the run's own (ci-smoke, 1, 8). It is finished,
  # so nothing is trained; its checkpoint is evaluated again.
  res = train_lm.main(["--run-dir", finished_run, "--resume", "--no-plots"])
  assert res["preset"] == "ci-smoke" and res["config"]["seed"] == 1
  assert res["steps"] == CFG.steps and not res["stopped_early"]
  assert f"resumed at step {CFG.steps} of {CFG.steps}" in capsys.readouterr().out


# Mistakes on the command line, and the start of the one-line answer to each.
MISTAKES = {
    "bad preset": (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    "zero steps": (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    "text for a number": (["--lr", "fast"], "argument --lr: expected a number"),
    "resume without run dir": (["--resume"], "--resume needs --run-dir"),
    "resume a missing dir": (["--run-dir", "{missing}", "--resume"], "--run-dir"),
    "resume a dir without checkpoints": (["--run-dir", "{empty}", "--resume"],
                                         "{empty} holds no checkpoint"),
    "fresh run into a used dir": (["--run-dir", "{run}", "--preset", "ci-smoke"],
                                  "{run} holds an earlier run"),
    "resume before the checkpoint": (["--run-dir", "{run}", "--resume",
                                      "--steps", "4"],
                                     "--steps 4 ends before the checkpoint at step 8"),
    "resume another config": (["--run-dir", "{run}", "--resume", "--batch-size",
                               "4"], "--resume with a different configuration"),
    "resume another preset": (["--run-dir", "{run}", "--resume", "--preset",
                               "cpu-tiny"],
                              "--resume with a different configuration (the run"
                              " began as --preset ci-smoke)"),
    "dense and compare": (["--dense", "--compare"], "--dense and --compare"),
    "run dir is a file": (["--run-dir", "{file}"], "--run-dir {file} is a file"),
    "out json under a file": (["--run-dir", "{empty}", "--out-json",
                               "{file}/r.json"], "--out-json's folder {file} is a file"),
    "out json is a directory": (["--run-dir", "{empty}", "--out-json", "{empty}"],
                                "--out-json {empty} is a directory"),
    "windows longer than the data": (["--run-dir", "{empty}", "--preset",
                                      "ci-smoke", "--seq-len", "4000000"],
                                     "lm_data: too little data"),
}


def _mistake(name, finished_run, tmp_path):
  (tmp_path / "empty").mkdir(exist_ok=True)
  (tmp_path / "a_file").write_text("")
  dirs = dict(run=finished_run, missing=str(tmp_path / "missing"),
              empty=str(tmp_path / "empty"), file=str(tmp_path / "a_file"))
  argv, answer = MISTAKES[name]
  return [a.format(**dirs) for a in argv], answer.format(**dirs)


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_command_line_mistakes_are_answered(name, finished_run, tmp_path):
  argv, answer = _mistake(name, finished_run, tmp_path)
  with pytest.raises(train_lm.UsageError) as e:
    train_lm.main(argv + ["--no-progress", "--no-plots"])
  assert str(e.value).startswith(answer), str(e.value)
  assert "\n" not in str(e.value)
  # Nothing was trained or overwritten.
  assert sorted(os.listdir(os.path.join(finished_run, "ckpt"))) == ["4", "8"]


@pytest.mark.parametrize("name", ["bad preset", "resume before the checkpoint"])
def test_script_answers_mistakes_in_one_line_with_exit_code_2(name, finished_run,
                                                              tmp_path):
  argv, answer = _mistake(name, finished_run, tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "examples", "train_lm.py"), *argv],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines()
            if line.startswith("train_lm:")]
  assert errors == [f"train_lm: error: {errors[0][len('train_lm: error: '):]}"]
  assert errors[0].startswith(f"train_lm: error: {answer}"), proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.skipif(jax.devices()[0].platform == "gpu",
                    reason="the Pallas-Triton kernel lowers on a GPU")
def test_gpu_kernel_failure_falls_back_to_xla(tmp_path, monkeypatch):
  # On a GPU, jmoe's default grouped matmul is the Pallas-Triton kernel. If it fails
  # to compile or run, the run falls back to XLA's ragged_dot and says so. Here the
  # non-interpreted Pallas kernel cannot lower on CPU: the same failure path.
  monkeypatch.setattr(train_lm.jmoe, "default_gmm_implementation", lambda: "pallas")
  cfg = dataclasses.replace(CFG, steps=2, log_every=1, eval_every=0, ckpt_every=-1)
  run = train_lm.train(cfg, str(tmp_path), progress=False, plots=False,
                       measure_matmul=False)
  assert run.results["gmm_implementation"] == "xla (fallback)"
  assert run.results["config"]["gmm_implementation"] == "xla"
  assert all(math.isfinite(h["loss"]) for h in run.history if "loss" in h)
  assert not os.path.exists(tmp_path / "ckpt") or not os.listdir(tmp_path / "ckpt")


def test_gmm_check_compares_kernels_at_the_run_shapes():
  cfg = dataclasses.replace(CFG, batch_size=2, seq_len=16)
  errors = train_lm.check_gmm(cfg, "pallas_interpret")
  assert set(errors) == {"y", "dx", "dw_up", "dw_down"}
  assert max(errors.values()) < 5e-2, errors
  with pytest.raises(FloatingPointError, match="disagrees"):
    train_lm.check_gmm(cfg, "pallas_interpret", tol=-1.0)


def test_examples_use_only_the_public_api():
  examples = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "examples")
  for name in sorted(os.listdir(examples)):
    if name.endswith(".py"):
      with open(os.path.join(examples, name)) as f:
        assert "_src" not in f.read(), f"examples/{name} imports jmoe._src"


def test_step_profile_attributes_the_step_to_scopes(tmp_path):
  """benchmarks/train_step_profile.py on ci-smoke: a trace read back, every
  named scope of the model found in it, fractions summing to one."""
  from benchmarks import train_step_profile
  out = train_step_profile.main([
      "--preset", "ci-smoke", "--steps", "2", "--trace-steps", "1",
      "--command-buffers", "--out", str(tmp_path / "p.json")])
  rows = {r["scope"]: r for r in out["time_by_scope"]}
  for label in ("attention core (sdpa)", "moe expert FFNs (grouped matmuls + act)",
                "moe dispatch (plan + permute)", "optimizer (clip + AdamW)"):
    assert rows[label]["ms_per_step"] > 0, label
  assert abs(sum(r["fraction"] for r in rows.values()) - 1) < 1e-3
  assert rows.get("unattributed", {"fraction": 0})["fraction"] < 0.5
  assert json.load(open(tmp_path / "p.json"))["mode"] == "moe"


def test_idle_gaps_are_the_span_less_the_union_of_kernels():
  """The profiles' idle time on hand-made events: two streams that overlap, gaps
  of known length, each charged to the kernel after it."""
  from benchmarks.train_step_profile import idle_by_kernel
  names = {"f.1": "jit(step)/layer0/moe/router/dot", "f.2": "jit(step)/optimizer/add"}
  ev = [  # (name, hlo_op, duration_ns, line, start_ns)
      ("k_a", "f.1", 10, "s1", 0), ("k_b", "f.2", 5, "s1", 30),   # gap 20
      ("k_c", "f.1", 50, "s1", 35), ("k_d", "f.1", 5, "s1", 40),  # inside k_c
      ("k_x", None, 10, "s2", 50),                                # inside k_c
      ("k_x", None, 10, "s2", 88),                                # gap 3
      ("k_b", "f.2", 5, "s1", 100)]                               # gap 2
  g = idle_by_kernel(ev, names)
  assert g["idle_ns"] == 20 + 3 + 2
  assert g["span_ns"] == 105
  top = dict(g["top"])
  assert top == {"optimizer (clip + AdamW) | k_b": (22, 2),
                 "unattributed | k_x": (3, 1)}


def test_expert_parallel_run_matches_one_device(tmp_path):
  """--expert-parallel 4 on the 8 fake CPU devices (a (2, 4) data x expert mesh):
  the same losses and final parameters as the one-device run, in float32; the
  experts' weights split over "expert", the results per device."""
  cfg = dataclasses.replace(CFG, dtype="float32", steps=4, eval_every=0,
                            ckpt_every=-1, log_every=1)
  one = train_lm.train(cfg, str(tmp_path / "one"), plots=False, **_QUIET)
  ep = train_lm.train(dataclasses.replace(cfg, expert_parallel=4),
                      str(tmp_path / "ep"), plots=False, **_QUIET)
  w = ep.state["params"]["blocks"][0]["mlp"]["w_up"]
  assert w.sharding.spec[0] == "expert"
  assert w.addressable_shards[0].data.shape[0] == CFG.num_experts // 4
  assert ep.results["devices_used"] == 8 and ep.results["mesh"] == dict(
      data=2, expert=4)
  assert ep.results["tokens_per_s_per_device"] == pytest.approx(
      ep.results["tokens_per_s"] / 8)
  np.testing.assert_allclose([r["loss"] for r in ep.history],
                             [r["loss"] for r in one.history], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ep.state["params"]),
                  jax.tree.leaves(one.state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  with pytest.raises(train_lm.UsageError, match="must divide the 4 experts"):
    train_lm.init_state(dataclasses.replace(cfg, expert_parallel=8))
