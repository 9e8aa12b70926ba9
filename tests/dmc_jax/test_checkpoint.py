import json
import os

import numpy as np
import pytest

from conftest import random_hf_model, write_hf_dir
from dmc_jax.config import LlamaConfig
from dmc_jax.convert import hf
from dmc_jax import checkpoint

CFG = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48)


@pytest.fixture
def ckpt_dir(tmp_path):
  src = write_hf_dir(tmp_path / "src", CFG, random_hf_model(CFG))
  return checkpoint.write(str(tmp_path / "ckpt"), hf.read(src))


def test_checkpoint_describes_itself(ckpt_dir):
  meta = json.load(open(os.path.join(ckpt_dir, "checkpoint.json")))
  assert meta["format"] == checkpoint.FORMAT
  assert LlamaConfig.from_dict(meta["model"]) == CFG
  prov = json.load(open(os.path.join(ckpt_dir, "provenance.json")))
  assert prov["source"]["format"] == "hf" and "jax" in prov["versions"]
  ck = checkpoint.Checkpoint(ckpt_dir)
  params = ck.load_params()["params"]
  assert params["layers_1"]["attn"]["q_proj"]["kernel"].shape == (32, 4, 8)
  scanned = ck.load_params(scan_layers=True)["params"]
  assert scanned["layers"]["layer"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)


def test_sharded_checkpoint_reads_like_a_single_file(tmp_path, ckpt_dir):
  one = checkpoint.Checkpoint(ckpt_dir).load_params()
  many = checkpoint.write(str(tmp_path / "sharded"), hf.read(str(tmp_path / "src")), 
                          max_shard_bytes=20_000)
  assert len([f for f in os.listdir(many) if f.endswith(".safetensors")]) > 2
  two = checkpoint.Checkpoint(many).load_params()
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(one), _leaves(two)))


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="other/9"), "format 'other/9'"),
    (lambda m: m["model"].update(n_layer=3), r"unknown key\(s\) \['n_layer'\]"),
    (lambda m: m["model"].update(n_layers=3), "missing parameter 'layers_2/"),
    (lambda m: m["model"].update(ffn_dim=40), "has shape \\[32, 48\\], expected \\[32, 40\\]"),
])
def test_bad_checkpoint_metadata(ckpt_dir, edit, message):
  path = os.path.join(ckpt_dir, "checkpoint.json")
  meta = json.load(open(path))
  edit(meta)
  json.dump(meta, open(path, "w"))
  with pytest.raises((checkpoint.CheckpointError, ValueError), match=message):
    checkpoint.Checkpoint(ckpt_dir).load_params()


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint.json: missing"):
    checkpoint.Checkpoint(str(tmp_path))


def test_interrupted_write_leaves_nothing(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with checkpoint.atomic_directory(str(out)) as tmp:
      open(os.path.join(tmp, "half.bin"), "wb").write(b"x")
      raise RuntimeError("killed")
  assert os.listdir(tmp_path) == []
