"""HF directory → checkpoint → HF directory, and every bad-input path of the HF reader."""

import json
import os

import numpy as np
import pytest
from helpers import random_hf_model, write_hf_dir

from dmc_jax import checkpoint
from dmc_jax.config import LlamaConfig
from dmc_jax.convert import hf
from dmc_jax.convert.tensors import ConversionError, read_sharded
from experiments.cli import dmc as cli_dmc

CFG = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, head_dim=16)


def _convert(src, out, **kw):
  return checkpoint.write(str(out), hf.read(str(src)), **kw)


@pytest.mark.parametrize("shards, tied", [(1, False), (3, False), (2, True)])
def test_hf_to_ours_to_hf_is_bit_exact(tmp_path, shards, tied):
  cfg = CFG.replace(tie_embeddings=tied)
  tensors = random_hf_model(cfg)
  src = write_hf_dir(tmp_path / "src", cfg, tensors, shards=shards)
  if shards > 1:
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
  ckpt = _convert(src, tmp_path / "ckpt")
  assert cli_dmc.main(["export-hf", ckpt, "--out", str(tmp_path / "back")]) == 0
  back = read_sharded(str(tmp_path / "back"), "model")
  assert set(back) == set(tensors)
  for name, a in tensors.items():
    b = back[name].load()
    assert b.dtype == a.dtype and b.shape == a.shape
    assert a.tobytes() == b.tobytes(), name
  exported = json.load(open(tmp_path / "back" / "config.json"))
  assert exported["tie_word_embeddings"] == tied and exported["head_dim"] == 16


def test_bf16_source_stays_bf16_and_dtype_option_casts(tmp_path):
  import ml_dtypes
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_model(CFG).items()}
  src = write_hf_dir(tmp_path / "src", CFG, tensors)
  ck = checkpoint.Checkpoint(_convert(src, tmp_path / "a"))
  assert ck.config.param_dtype == "bfloat16"
  assert next(iter(ck.lazy_tensors().values())).dtype == np.dtype(ml_dtypes.bfloat16)
  ck32 = checkpoint.Checkpoint(_convert(src, tmp_path / "b", dtype="float32"))
  p = ck32.load_params()["params"]
  assert p["embed"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(p["embed"]["kernel"], tensors["model.embed_tokens.weight"].astype(np.float32))


def _bad_source(tmp_path, mutate):
  tensors = random_hf_model(CFG)
  cfg = CFG
  result = mutate(tensors, cfg)
  if result is not None:
    tensors, cfg = result
  return write_hf_dir(tmp_path / "src", cfg, tensors)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, c: [t.pop("model.layers.1.mlp.up_proj.weight"), None][1],
     "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t, c: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((16, 32), np.float32)),
     r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \[16, 32\], expected \[32, 32\]"),
    (lambda t, c: t.__setitem__("model.layers.2.mlp.up_proj.weight", np.zeros((48, 32), np.float32)),
     "unexpected tensor 'model.layers.2.mlp.up_proj.weight'"),
    (lambda t, c: (t, c.replace(vocab_size=65)),
     r"'model.embed_tokens.weight' has shape \[64, 32\], expected \[65, 32\]"),
])
def test_bad_tensors_give_one_line_errors_and_write_nothing(tmp_path, mutate, message):
  src = _bad_source(tmp_path, mutate)
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=message) as e:
    _convert(src, out)
  assert "\n" not in str(e.value)
  assert not out.exists() and os.listdir(tmp_path) == ["src"]  # no temp directory left behind either


def test_config_weights_mismatch_in_layer_count(tmp_path):
  src = write_hf_dir(tmp_path / "src", CFG, random_hf_model(CFG))
  cfg_path = tmp_path / "src" / "config.json"
  hf_cfg = json.load(open(cfg_path))
  hf_cfg["num_hidden_layers"] = 3
  json.dump(hf_cfg, open(cfg_path, "w"))
  with pytest.raises(ConversionError, match=r"config.json: missing tensor 'model.layers.2"):
    _convert(src, tmp_path / "out")


def test_truncated_safetensors(tmp_path):
  src = write_hf_dir(tmp_path / "src", CFG, random_hf_model(CFG))
  path = os.path.join(src, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(ConversionError, match=r"model.safetensors: truncated: tensor .* needs \d+ bytes at offset \d+, file has \d+"):
    _convert(src, tmp_path / "out")
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(ConversionError, match="no header"):
    _convert(src, tmp_path / "out")


def test_missing_config_and_bin_only_directories(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="config.json: not found"):
    hf.read(str(tmp_path / "empty"))
  src = write_hf_dir(tmp_path / "src", CFG, random_hf_model(CFG))
  os.remove(os.path.join(src, "model.safetensors"))
  open(os.path.join(src, "pytorch_model.bin"), "wb").close()
  with pytest.raises(ConversionError, match="PyTorch .bin weights are not read"):
    hf.read(src)


def test_existing_output_is_kept_unless_forced(tmp_path):
  src = write_hf_dir(tmp_path / "src", CFG, random_hf_model(CFG))
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  with pytest.raises(checkpoint.CheckpointError, match="exists and is not empty"):
    _convert(src, out)
  assert (out / "precious.txt").read_text() == "keep me"
  _convert(src, out, force=True)
  assert not (out / "precious.txt").exists() and (out / "checkpoint.json").exists()


def test_cli_convert_reports_one_line_error(tmp_path, capsys):
  src = _bad_source(tmp_path, lambda t, c: [t.pop("model.norm.weight"), None][1])
  assert cli_dmc.main(["convert", "--from", "hf", src, "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "missing tensor 'model.norm.weight'" in err[0]
  assert not (tmp_path / "o").exists()
