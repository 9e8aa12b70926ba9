"""The shared training loop: resume after kill -9 reproduces the uninterrupted run; keep-N; metrics; sharding."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT

from experiments.harness import mesh as mesh_lib
from experiments.harness import metrics as metrics_lib
from experiments.harness import orbax_ckpt, trainer

TASK = os.path.join(ROOT, "tests", "data", "harness_task.py")


def run_task(workdir, steps, kill_at=None, **extra_env):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "DMC_JAX_PROGRESS": "0",
         **extra_env}
  args = [sys.executable, TASK, str(workdir), str(steps)] + ([str(kill_at)] if kill_at else [])
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_history(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}


@pytest.mark.slow  # 22 s: three training processes
def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
  full, crashed = tmp_path / "full", tmp_path / "crashed"
  assert run_task(full, 12).returncode == 0
  r = run_task(crashed, 12, kill_at=8)
  assert r.returncode == -9, r.stderr[-2000:]
  ckpts = sorted(int(d) for d in os.listdir(crashed / "checkpoints") if d.isdigit())
  assert ckpts and max(ckpts) in (3, 6), ckpts  # step 9's checkpoint was never requested
  r = run_task(crashed, 12)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed" in r.stderr
  a, b = losses(full), losses(crashed)
  assert sorted(b) == list(range(1, 13))  # the killed run's steps past its checkpoint were dropped and redone
  resume = max(ckpts) + 1
  assert b[resume] == a[resume]  # the next step after resuming: same data, same RNG, same state
  np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-6)
  assert a[12] < a[1]  # and it trained
  # keep-N, run.json, TensorBoard events, curves
  assert sorted(int(d) for d in os.listdir(full / "checkpoints") if d.isdigit()) == [9, 12]
  assert json.load(open(full / "run.json"))["format"] == "test/1"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(full / "tb"))
  assert os.path.getsize(full / "curves.png") > 1000
  step, state = orbax_ckpt.restore_raw(str(full))
  assert step == 12 and "params" in state


def test_in_process_train_and_resume(tmp_path):
  sys.path.insert(0, os.path.dirname(TASK))
  try:
    import harness_task
  finally:
    sys.path.pop(0)
  res = trainer.train(harness_task.make_task(), trainer.LoopConfig(steps=4, log_every=2, ckpt_every=2), tmp_path)
  assert res.start_step == 0 and [r["step"] for r in res.history] == [2, 4]
  res2 = trainer.train(harness_task.make_task(), trainer.LoopConfig(steps=6, log_every=2, ckpt_every=2), tmp_path)
  assert res2.start_step == 4 and [r["step"] for r in res2.history] == [2, 4, 6]


def test_mesh_and_rules():
  m = mesh_lib.make_mesh((-1, 1, 1))
  assert m.axis_names == mesh_lib.AXES and m.shape["data"] == len(jax.devices())
  with pytest.raises(mesh_lib.MeshError, match="needs 3 devices"):
    mesh_lib.make_mesh((3, 1, 1))
  with pytest.raises(mesh_lib.MeshError, match="at most one -1"):
    mesh_lib.make_mesh((-1, -1, 1))
  rules = dict(mesh_lib.RULES)
  assert rules["activation_batch"] == ("data", "fsdp") and rules["conv_out"] is None


def test_data_parallel_on_4_fake_devices_matches_one_device(tmp_path):
  one = run_task(tmp_path / "one", 6)
  assert one.returncode == 0, one.stderr[-2000:]
  four = run_task(tmp_path / "four", 6, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                  HARNESS_MESH="2,2,1")
  assert four.returncode == 0, four.stderr[-2000:]
  assert "devices 4 kernel sharding P('fsdp', 'tensor')" in four.stderr  # ('embed', 'mlp')
  a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-4)


def test_run_json_errors(tmp_path):
  with pytest.raises(orbax_ckpt.TrainCheckpointError, match="missing"):
    orbax_ckpt.read_run_json(str(tmp_path), "x/1")
  orbax_ckpt.write_run_json(str(tmp_path), {"format": "y/1"})
  with pytest.raises(orbax_ckpt.TrainCheckpointError, match="format 'y/1'"):
    orbax_ckpt.read_run_json(str(tmp_path), "x/1")
  with pytest.raises(orbax_ckpt.TrainCheckpointError, match="no checkpoints"):
    orbax_ckpt.restore_raw(str(tmp_path))
