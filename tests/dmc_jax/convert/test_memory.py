"""Conversion streams tensors: peak RSS stays near one shard, not the whole checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dmc_jax.config import LlamaConfig, to_hf_config
from dmc_jax.convert.layout import hf_shapes
from dmc_jax.convert.tensors import LazyTensor, write_sharded

# ≈ 1.0 GB of float32 in 4 shards of ≈ 250 MB; the largest tensor (embedding) is 64 MB.
CFG = LlamaConfig(vocab_size=16384, d_model=1024, n_layers=12, n_heads=8, n_kv_heads=8, ffn_dim=4096)
SHARD = 250 * 2**20

_PROBE = r"""
import sys
from dmc_jax import checkpoint
from dmc_jax.convert import hf
import jax  # imported by the converter anyway; count it in the baseline

def status(key):  # this process's own counters (ru_maxrss would include the forking parent's peak)
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024

# Growth is measured from the current RSS (not the import-time peak), so it can only be overstated.
base = status("VmRSS")
checkpoint.write(sys.argv[2], hf.read(sys.argv[1]), max_shard_bytes=int(sys.argv[3]))
print(base, status("VmHWM"))
"""


@pytest.mark.slow
def test_peak_rss_while_converting_a_sharded_checkpoint(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  json.dump(to_hf_config(CFG), open(src / "config.json", "w"))

  def make(shape, seed):
    # Cheap but non-constant contents (a ramp), generated lazily so the test itself stays small.
    return lambda: (np.arange(np.prod(shape), dtype=np.float32) * (1e-6 * (seed + 1))).reshape(shape)
  lazy = [LazyTensor(n, s, np.dtype(np.float32), make(s, i)) for i, (n, s) in enumerate(hf_shapes(CFG).items())]
  total = sum(t.nbytes for t in lazy)
  files = list(write_sharded(str(src), "model", lazy, SHARD))
  assert len(files) >= 4 and all(os.path.getsize(src / f) >= 200 * 2**20 for f in files[:-1])

  out = subprocess.run([sys.executable, "-c", _PROBE, str(src), str(tmp_path / "out"), str(SHARD)],
                       capture_output=True, text=True, check=True)
  base, peak = map(int, out.stdout.split())
  growth = peak - base
  largest_shard = max(os.path.getsize(src / f) for f in files)
  print(f"total {total / 2**20:.0f} MiB, largest shard {largest_shard / 2**20:.0f} MiB, "
        f"RSS growth {growth / 2**20:.0f} MiB")
  assert growth < largest_shard, "conversion should hold about one tensor, never a whole shard"
  assert growth < 0.25 * total
  # The output is complete and readable.
  from dmc_jax import checkpoint
  assert len(checkpoint.Checkpoint(str(tmp_path / "out")).lazy_tensors()) == len(lazy)
