"""--profile: a jax.profiler trace of the chosen steps only, with the named scopes of docs/profiling.md."""

import glob
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from experiments.cli import dmc as cli_dmc
from experiments.harness import profiling

CONFIG = os.path.join(ROOT,
                      "experiments", "dmc", "configs", "smollm2_135m_cr2.py")


def _one_run(directory):
  runs = glob.glob(os.path.join(directory, "plugins", "profile", "*"))
  assert len(runs) == 1, runs
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb")) and profiling.trace_files(runs[0])
  return runs[0], profiling.read_events(runs[0])


def _steps(events, name):
  return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name and "step_num" in e.get("args", {}))


def _scopes(events):
  return {e["args"]["scope"] for e in events if "scope" in e.get("args", {})}


def test_generate_dmc_traces_the_window_with_decode_scopes(tiny_checkpoint, tmp_path):
  prof = tmp_path / "prof"
  argv = ["generate", tiny_checkpoint, "--cache", "dmc", "--dmc-force-cr", "4", "--max-new-tokens", "8",
          "--ignore-eos", "--prompt", "The capital of France is"]
  # A process of its own: the trace's plane lists every module the process compiled, by name, and other tests'
  # vanilla Generators compile a jit__step_fn too (profiling.hlo_scopes).
  proc = subprocess.run([sys.executable, "-m", "experiments.cli.dmc", *argv, "--profile", str(prof),
                         "--profile-steps", "3:5"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  run, events = _one_run(prof)
  assert f"[profile] trace of decode steps 3-4 → {run}" in proc.stderr
  assert _steps(events, "decode") == [3, 4]  # only the window: no compile, no prefill, no later step
  scopes = _scopes(events)
  for want in ("decode_step/layers/attention/dmc_update", "decode_step/layers/attention/paged_attention",
               "decode_step/layers/mlp", "decode_step/logits", "decode_step/sample"):
    assert any(s.startswith(want) for s in scopes), (want, sorted(scopes))
  assert not any(s.startswith("prefill") for s in scopes)  # the prefill ran before the window


@pytest.mark.slow  # a whole toy retrofit (5 steps, export, eval): ~3 min on a loaded 2-core CPU
def test_train_traces_the_window_with_retrofit_scopes(tmp_path, smollm2_ckpt, capsys):
  prof = tmp_path / "prof"
  argv = ["train", "--config", f"{CONFIG}:toy", f"--config.workdir={tmp_path / 'run'}",
          f"--config.data.data_dir={tmp_path / 'data'}", f"--config.model.tokenizer_from={smollm2_ckpt}",
          "--config.train.steps=5", "--config.train.stage1_steps=2", "--config.train.ramp_steps=1"]
  assert cli_dmc.main(argv + ["--profile", str(prof), "--profile-steps", "3:5"]) == 0
  run, events = _one_run(prof)
  assert f"[profile] trace of optimizer steps 3-4 → {run}" in capsys.readouterr().err
  assert _steps(events, "train") == [3, 4]  # stage 2 (CR loss on); step 5 and the final eval run untraced
  scopes = _scopes(events)
  for want in ("forward_backward/forward/layers/attention", "forward_backward/backward/forward/layers",
               "forward_backward/cr_loss", "forward_backward/backward/cr_loss", "optimizer"):
    assert any(s.startswith(want) for s in scopes), (want, sorted(scopes))


def test_nothing_is_written_without_profile(tiny_checkpoint, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  started = []
  import jax
  monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: started.append(a))
  assert cli_dmc.main(["generate", tiny_checkpoint, "--max-new-tokens", "5", "--ignore-eos", "--prompt", "Hi"]) == 0
  assert not started and not os.listdir(tmp_path)


@pytest.mark.parametrize("steps", ["5", "0:3", "4:4", "a:b", "3:"])
def test_bad_window_is_one_line_error(tiny_checkpoint, tmp_path, capsys, steps):
  assert cli_dmc.main(["generate", tiny_checkpoint, "--prompt", "Hi", "--profile", str(tmp_path),
                       "--profile-steps", steps]) == 2
  assert "--profile-steps" in capsys.readouterr().err


def test_window_needs_profile(tiny_checkpoint, capsys):
  assert cli_dmc.main(["generate", tiny_checkpoint, "--prompt", "Hi", "--profile-steps", "2:4"]) == 2
  assert "needs --profile" in capsys.readouterr().err
