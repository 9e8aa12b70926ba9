"""Multi-host: two processes forming one 4-device mesh train exactly as one process with 4 devices; settings."""

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import ROOT

from experiments.harness import distributed
from experiments.harness import metrics as metrics_lib

TASK = os.path.join(ROOT, "tests", "data", "dmc_mesh_task.py")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESH = "1,2,2"  # fsdp x tensor: parameter shards and batch rows both span the two processes


def _env(devices):
  return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "DMC_JAX_PROGRESS": "0",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three processes, each compiling the step
def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, TASK, "train", str(tmp_path / "two"), MESH, "--coordinator",
                             f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)], env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  one = subprocess.run([sys.executable, TASK, "train", str(tmp_path / "one"), MESH], env=_env(4),
                       capture_output=True, text=True, timeout=300)
  outs = [p.communicate(timeout=300) for p in procs]
  assert one.returncode == 0, one.stderr[-3000:]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = json.loads(one.stdout.strip().splitlines()[-1])
  multi = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert single["devices"] == 4 and [m["process"] for m in multi] == [0, 1] and multi[0]["devices"] == 4
  assert len(single["losses"]) == 3
  for m in multi:
    assert m["losses"] == pytest.approx(single["losses"], rel=1e-6)
  # One process writes the run's files: each step logged once; both processes' checkpoints were written.
  rows = metrics_lib.read_history(str(tmp_path / "two" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "3"]


def test_settings_from_flags_and_environment(monkeypatch):
  for var in (*distributed.ENV.values(), "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.settings() is None and not distributed.initialize()  # one process: nothing to join
  monkeypatch.setenv("DMC_JAX_COORDINATOR", "h:1")
  monkeypatch.setenv("DMC_JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("DMC_JAX_PROCESS_ID", "3")
  assert distributed.settings() == {"coordinator": "h:1", "num_processes": 4, "process_id": 3}
  assert distributed.settings(process_id=0)["process_id"] == 0  # flags win
  for var in distributed.ENV.values():
    monkeypatch.delenv(var)
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.settings() == {}  # JAX's own cluster detection


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator": "h:1"}, "--num-processes, --process-id missing"),
    ({"coordinator": "h", "num_processes": 2, "process_id": 0}, "expected host:port"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "expected 0 .. 1"),
])
def test_setting_errors_are_one_line(monkeypatch, kwargs, message):
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.settings(**kwargs)


def test_train_cli_rejects_half_given_settings(capsys):
  from experiments.cli import dmc as cli_dmc
  cfg = os.path.join(ROOT, "experiments", "dmc", "configs", "smollm2_135m_cr2.py") + ":tiny"
  assert cli_dmc.main(["train", "--config", cfg, "--coordinator", "h:1"]) == 2
  assert "missing" in capsys.readouterr().err
