"""Training workdirs under faults: one writer (a lock naming its holder), resume only with the same computation,
fallback past a corrupted latest checkpoint, disk full as one line. The harness's tiny MLP task, in-process."""

import dataclasses
import errno
import json
import os
import platform
import subprocess
import sys

import pytest
from helpers import ROOT

from experiments.harness import orbax_ckpt, trainer
from experiments.harness import workdir as workdir_lib
from experiments.harness.errors import TrainCheckpointError


@pytest.fixture(scope="module")
def harness_task():
  """One task for the module: the same step function every run, so JAX compiles it once, not once per run."""
  sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
  try:
    import harness_task
  finally:
    sys.path.pop(0)
  return harness_task.make_task()


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
  """The curves PNG is not what these tests check (and matplotlib's text layout is most of a tiny run's time)."""
  from experiments.harness import metrics
  monkeypatch.setattr(metrics.MetricsWriter, "plot", lambda self, path=None: None)


def _task(task, lr=1e-3, steps=4, **model):
  describe = {"format": "test/1", "model": {"width": 16, **model},
              "experiment": {"train": {"lr": lr, "steps": steps, "log_every": 2}, "workdir": "x"}}
  return dataclasses.replace(task, describe=describe)


def _loop(steps=4, **kw):
  return trainer.LoopConfig(steps=steps, log_every=2, ckpt_every=2, keep=3, async_ckpt=False, **kw)


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
  wd = str(tmp_path)
  other_host = {"pid": 1, "host": "elsewhere.example", "started": "t"}
  json.dump(other_host, open(tmp_path / "lock.json", "w"))
  with pytest.raises(workdir_lib.LockHeld, match=r"in use by pid 1 on host elsewhere.example .*--break-lock"):
    workdir_lib.WorkdirLock(wd).acquire()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  try:  # same host, live pid: refused too
    json.dump({"pid": live.pid, "host": platform.node()}, open(tmp_path / "lock.json", "w"))
    with pytest.raises(workdir_lib.LockHeld, match=f"pid {live.pid}"):
      workdir_lib.WorkdirLock(wd).acquire()
  finally:
    live.kill()
    live.wait()
  # now dead on this host: stale, taken over with a warning naming it
  with workdir_lib.WorkdirLock(wd) as lock:
    assert json.load(open(tmp_path / "lock.json"))["pid"] == os.getpid() and lock.held
  assert f"pid {live.pid}" in caplog.text and "no longer running" in caplog.text
  assert not os.path.exists(tmp_path / "lock.json")  # released
  json.dump(other_host, open(tmp_path / "lock.json", "w"))
  with workdir_lib.WorkdirLock(wd, break_lock=True):
    pass
  assert not workdir_lib.WorkdirLock(wd, enabled=False).held  # processes other than 0 never take it


def test_second_training_process_is_refused_in_one_line(tmp_path):
  # Two processes on one workdir: the second exits (through the CLI's error handling) with one line naming the
  # first's pid and host.
  holder = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; sys.path.insert(0, sys.argv[1]);"
                             "from experiments.harness.workdir import WorkdirLock;"
                             "l = WorkdirLock(sys.argv[2]); l.acquire(); print('held', flush=True); time.sleep(60)",
                             ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    r = subprocess.run([sys.executable, "-c",
                        "import sys; sys.path.insert(0, sys.argv[1]); from experiments.harness.workdir import WorkdirLock;"
                        "from experiments.harness import cli;"
                        "sys.exit(cli.main('t', '', [cli.Command('x', '', lambda p: None,"
                        " lambda a: WorkdirLock(sys.argv[2]).acquire())], ['x']))", ROOT, str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"in use by pid {holder.pid} on host {platform.node()}" in r.stderr
  finally:
    holder.kill()
    holder.wait()


def test_resume_refuses_a_changed_config_and_records_allowed_changes(tmp_path, harness_task):
  wd = str(tmp_path)
  trainer.train(_task(harness_task), _loop(4), wd)
  with pytest.raises(TrainCheckpointError, match=r"resuming at step 4 with a changed config: train.lr: 0.001 -> 0.01"
                                                 r".*--allow-config-change"):
    trainer.train(_task(harness_task, lr=1e-2, steps=6), _loop(6), wd)
  with pytest.raises(TrainCheckpointError, match=r"model.width: 16 -> 32"):  # a changed model preset
    trainer.train(_task(harness_task, width=32), _loop(4), wd)
  assert json.load(open(tmp_path / "run.json"))["experiment"]["train"]["lr"] == 1e-3  # untouched
  # extending train.steps is allowed and recorded; bookkeeping fields (log_every, workdir) are not differences
  res = trainer.train(_task(harness_task, steps=6), _loop(6), wd)
  assert res.start_step == 4
  meta = json.load(open(tmp_path / "run.json"))
  assert meta["experiment"]["train"]["steps"] == 6 and meta["history"][0]["train.steps"] == [4, 6]
  res = trainer.train(_task(harness_task, lr=1e-2, steps=8), _loop(8, allow_config_change=True), wd)
  meta = json.load(open(tmp_path / "run.json"))
  assert res.start_step == 6 and meta["history"][-1]["changes"] == {"experiment.train.lr": [1e-3, 1e-2]}
  assert len(meta["history"]) == 3


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, harness_task, caplog, capsys):
  wd = str(tmp_path)
  trainer.train(_task(harness_task), _loop(4), wd)
  ckpts = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  # an emptied _METADATA in the latest checkpoint
  metas = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / "4") for f in fs if f == "_METADATA"]
  assert metas
  for m in metas:
    open(m, "w").close()
  res = trainer.train(_task(harness_task), _loop(4), wd)
  assert res.start_step == 2 and "checkpoint step 4 is unreadable" in caplog.text
  assert "4.corrupt-0" in os.listdir(ckpts) and "4" in os.listdir(ckpts)  # moved aside, then retrained
  step, _ = orbax_ckpt.restore_raw(wd)
  assert step == 4
  # a truncated array file in the latest checkpoint: the loader falls back too
  files = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / "4" / "state") for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  caplog.clear()
  step, _ = orbax_ckpt.restore_raw(wd)
  assert step == 2 and "checkpoint step 4 is unreadable" in caplog.text
  # every checkpoint broken: one line, for training and for restore_raw (sdc-jax eval's loader)
  for d in ("2", "4"):
    for root, _, fs in os.walk(ckpts / d):
      for f in fs:
        if f == "_METADATA":
          open(os.path.join(root, f), "w").close()
  with pytest.raises(TrainCheckpointError, match=r"no intact checkpoint \(steps \[4, 2\] are unreadable\)"):
    orbax_ckpt.restore_raw(wd)
  with pytest.raises(TrainCheckpointError, match="no intact checkpoint"):
    trainer.train(_task(harness_task), _loop(4), wd)
  # `sdc-jax eval` on such a run: one line, exit 2 (it restores through the same fallback)
  from experiments.cli import sdc as cli_sdc
  from experiments.sdc import run as sdc_run
  from sdc_jax.model import SDCNetConfig
  orbax_ckpt.write_run_json(wd, {"format": sdc_run.FORMAT, "model": SDCNetConfig().to_dict(), "data": {}})
  capsys.readouterr()  # only what the command prints
  assert cli_sdc.main(["eval", wd]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "no intact checkpoint" in err[-1] and "error:" in err[-1] and not any("Traceback" in l for l in err)


def test_disk_full_is_one_line_and_loses_nothing(tmp_path, harness_task, monkeypatch):
  wd = str(tmp_path)
  trainer.train(_task(harness_task), _loop(2), wd)
  real_save = orbax_ckpt.Checkpointer.save

  def full(self, step, *a, **k):
    if step >= 4:
      raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, str(step)))
    return real_save(self, step, *a, **k)
  monkeypatch.setattr(orbax_ckpt.Checkpointer, "save", full)
  with pytest.raises(TrainCheckpointError, match=r"disk full .* free space and rerun to resume") as e:
    trainer.train(_task(harness_task, steps=6), _loop(6), wd)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # the finished checkpoint survived
  assert not os.path.exists(tmp_path / "lock.json")  # and the lock was released
  monkeypatch.setattr(orbax_ckpt.Checkpointer, "save", real_save)
  assert trainer.train(_task(harness_task, steps=6), _loop(6), wd).start_step == 2


def test_kill_during_pruning_leaves_nothing_to_warn_about(tmp_path):
  # Pruning renames a step into checkpoints/pruned/ (atomic) before deleting it; a run killed while deleting
  # leaves a partial folder there, which the next run removes before Orbax looks at the directory.
  partial = tmp_path / "checkpoints" / "pruned" / "2" / "state"
  partial.mkdir(parents=True)
  (partial / "d").write_bytes(b"half-deleted")
  c = orbax_ckpt.Checkpointer(str(tmp_path), async_save=False)
  try:
    assert not (tmp_path / "checkpoints" / "pruned").exists() and list(c.manager.all_steps()) == []
  finally:
    c.close()
