"""The DMC retrofit step on 8 fake CPU devices: data, fsdp, tensor and mixed meshes give the 1-device losses, and
parameters, optimizer state and activations are split the intended way (per-device shapes in the compiled HLO)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

TASK = os.path.join(ROOT, "tests", "data", "dmc_mesh_task.py")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ROWS, SEQ, VOCAB, FFN, KV, GROUP = 8, 16, 256, 96, 8, 2  # as in dmc_mesh_task.py
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
pytestmark = pytest.mark.slow  # one subprocess compiling five meshes: ~47 CPU-seconds


@pytest.fixture(scope="module")
def runs():
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}", "DMC_JAX_PROGRESS": "0"}
  r = subprocess.run([sys.executable, TASK, "meshes", *(",".join(map(str, m)) for m in MESHES)], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES[1:], ids=["data", "fsdp", "tensor", "mixed"])
def test_mesh_gives_the_one_device_losses(runs, mesh):
  one, many = runs["1,1,1"]["losses"], runs[",".join(map(str, mesh))]["losses"]
  assert len(many) == 3 and many[2] != many[0]  # stage 1, surgery + DMC, stage 3 at the target CR
  np.testing.assert_allclose(many, one, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mesh", MESHES[1:], ids=["data", "fsdp", "tensor", "mixed"])
def test_parameters_and_activations_are_split(runs, mesh):
  data, fsdp, tensor = mesh
  run = runs[",".join(map(str, mesh))]
  # Weights: 'embed' over fsdp, heads / MLP / vocabulary over tensor; Adam's moments follow the parameters.
  assert run["specs"]["q_proj"] == "P(None, 'fsdp', 'tensor', None)"
  assert run["specs"]["gate"] == run["specs"]["mu_gate"] == "P(None, 'fsdp', 'tensor')"
  assert run["shard_shapes"]["q_proj"] == [2, 64 // fsdp, 16 // tensor, 4]
  assert run["shard_shapes"]["lm_head"] == [64 // fsdp, VOCAB // tensor]
  # Activations, as the compiled per-device program holds them: rows over data x fsdp, heads / MLP / vocab over
  # tensor; never the whole batch or whole widths.
  rows = ROWS // (data * fsdp)
  shapes = set(run["hlo_shapes"])
  mlp, attn, logits = f"{rows},{SEQ},{FFN // tensor}", f"{rows},{KV // tensor},{GROUP},{SEQ},{SEQ}", \
      f"{rows},{SEQ},{VOCAB // tensor}"
  assert {mlp, attn, logits} <= shapes, sorted(shapes)
  whole = {f"{ROWS},{SEQ},{FFN}", f"{ROWS},{KV},{GROUP},{SEQ},{SEQ}", f"{ROWS},{SEQ},{VOCAB}"}
  assert whole <= set(runs["1,1,1"]["hlo_shapes"])  # the check can fail: the 1-device program holds them
  assert not whole & shapes, sorted(whole & shapes)
