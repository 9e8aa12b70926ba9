"""Fuzzing the converters: random truncations and byte flips of the small golden files. Every run ends in a
success (a checkpoint that loads, and byte-identical when converted again) or exit 2 with at most 3 lines on
stderr — never a crash, a hang or a traceback.
All cases run in one worker process (so a segfault is a failure here, not the end of pytest), bounded in time."""

import json
import os
import subprocess
import sys

from helpers import ROOT

WORKER = r'''
import contextlib, io, json, os, shutil, sys, tempfile
import numpy as np
from experiments.cli import dmc as cli
from dmc_jax import checkpoint
golden = os.path.join(sys.argv[1], "tests", "golden")
cases = int(sys.argv[2])
rng = np.random.default_rng(15)
work = tempfile.mkdtemp()
sources = [("gguf", os.path.join(golden, "spm", "tiny_spm.gguf"), None),
           ("hf", os.path.join(golden, "hf_llama2_mha"), "model.safetensors"),
           ("meta", os.path.join(golden, "meta_llama2_1shard"), "consolidated.00.pth")]
for i in range(cases):
  fmt, src, member = sources[i % len(sources)]
  case = os.path.join(work, f"c{i}")
  if member:
    shutil.copytree(src, case)
    target = os.path.join(case, member)
  else:
    os.makedirs(case)
    target = os.path.join(case, "m.gguf")
    shutil.copy(src, target)
  data = bytearray(open(target, "rb").read())
  # the headers and tables are where the parsing is: mutate mostly the first 16 KB
  hot = min(len(data), 16384)
  if rng.random() < 0.4:
    cut = int(rng.integers(0, len(data)))
    data = data[:cut]
    what = f"truncated to {cut}"
  else:
    flips = []
    for _ in range(int(rng.integers(1, 6))):
      at = int(rng.integers(0, hot if rng.random() < 0.8 else len(data)))
      data[at] = int(rng.integers(0, 256))
      flips.append(at)
    what = f"bytes changed at {flips}"
  open(target, "wb").write(bytes(data))
  err = io.StringIO()
  out = os.path.join(work, f"o{i}")
  with contextlib.redirect_stderr(err):
    try:
      rc = cli.main(["convert", case if member else target, "--from", fmt, "--out", out])
    except BaseException as e:  # a traceback escaping the CLI is a failure of the test
      import traceback
      traceback.print_exc(file=err)
      rc = "raised " + type(e).__name__
  loaded = None
  if rc == 0:
    try:
      checkpoint.Checkpoint(out).load_params()
      # and the same input converts to the same bytes again (the output depends on the input alone)
      with contextlib.redirect_stderr(io.StringIO()):
        rc2 = cli.main(["convert", case if member else target, "--from", fmt, "--out", out + "b"])
      same = rc2 == 0 and all(open(os.path.join(out, f), "rb").read() == open(os.path.join(out + "b", f), "rb").read()
                              for f in os.listdir(out) if f != "provenance.json")
      loaded = True if same else f"second conversion differs (rc {rc2})"
      shutil.rmtree(out + "b", ignore_errors=True)
    except Exception as e:
      loaded = f"{type(e).__name__}: {e}"
  print(json.dumps({"case": i, "format": fmt, "what": what, "rc": rc, "stderr": err.getvalue(), "loaded": loaded}),
        flush=True)
  shutil.rmtree(case, ignore_errors=True)
  shutil.rmtree(out, ignore_errors=True)
'''


def test_random_truncations_and_flips_end_in_success_or_one_line():
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "DMC_JAX_PROGRESS": "0",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", WORKER, ROOT, "36"], env=env, capture_output=True, text=True,
                     timeout=120)
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert r.returncode == 0, f"worker died ({r.returncode}) after case {len(rows) - 1}: {r.stderr[-1500:]}"
  assert len(rows) == 36
  for row in rows:
    err = [l for l in row["stderr"].splitlines() if l.strip()]
    assert row["rc"] in (0, 2), row
    assert "Traceback" not in row["stderr"], row
    if row["rc"] == 2:
      assert 1 <= len(err) <= 3 and "error:" in err[-1], row
    else:
      assert row["loaded"] is True, row
  assert {r["rc"] for r in rows} >= {2}  # the mutations do reach the checks
