import json
import os

import numpy as np
import pytest
from helpers import random_hf_model, write_hf_dir

from dmc_jax import checkpoint
from dmc_jax.config import LlamaConfig
from dmc_jax.convert import hf

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


# -- format /2: checksums, parameter digest, compression, chat template, the /1 upgrade -------------------------


def test_a_flipped_byte_in_a_tensor_file_is_refused_in_one_line(ckpt_dir):
  path = os.path.join(ckpt_dir, "params.safetensors")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) - 3)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 0x01]))
  with pytest.raises(checkpoint.CheckpointError, match=r"params.safetensors: sha256 mismatch") as e:
    checkpoint.Checkpoint(ckpt_dir).load_params()
  assert "\n" not in str(e.value)
  # verify=False loads it anyway (and the flipped value is really there)
  checkpoint.Checkpoint(ckpt_dir, verify=False).load_params()


def test_a_truncated_or_missing_file_is_refused(ckpt_dir):
  path = os.path.join(ckpt_dir, "params.safetensors")
  os.truncate(path, os.path.getsize(path) - 8)
  with pytest.raises(checkpoint.CheckpointError, match="bytes, checkpoint.json says"):
    checkpoint.Checkpoint(ckpt_dir).lazy_tensors()
  os.remove(path)
  with pytest.raises(checkpoint.CheckpointError, match="params.safetensors: missing"):
    checkpoint.Checkpoint(ckpt_dir).lazy_tensors()


def test_parameter_digest_ignores_sharding_and_names_the_dtype(tmp_path, ckpt_dir):
  one = checkpoint.Checkpoint(ckpt_dir)
  many = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "sharded"), hf.read(str(tmp_path / "src")),
                                                max_shard_bytes=20_000))
  assert one.param_digest == many.param_digest and one.param_digest.startswith("sha256:")
  assert "params.safetensors.index.json" in many.meta["files"]
  bf16 = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "bf16"), hf.read(str(tmp_path / "src")),
                                                dtype="bfloat16"))
  assert bf16.param_digest != one.param_digest and bf16.meta["param_dtype"] == "bfloat16"
  # The digest is over values: recomputing it from the tensors gives the stored one.
  d = checkpoint.ParamDigest()
  for name, t in one.lazy_tensors().items():
    d.add(name, t.checked_load())
  assert d.hexdigest() == one.param_digest


def test_v1_checkpoint_loads_with_a_warning_and_converts_to_v2(tmp_path, ckpt_dir, caplog):
  import dmc_jax
  meta_path = os.path.join(ckpt_dir, "checkpoint.json")
  meta = json.load(open(meta_path))
  digest = meta["param_digest"]
  for k in ("files", "param_digest", "param_dtype", "chat_template", "compression"):
    meta.pop(k)
  meta.update(format=checkpoint.FORMAT_V1, dmc={"window": 4})
  json.dump(meta, open(meta_path, "w"))
  with caplog.at_level("WARNING"):
    old = checkpoint.Checkpoint(ckpt_dir)
  assert f"dmc-jax convert --from dmc-jax {ckpt_dir} --out NEW" in caplog.text
  assert old.dmc == {"window": 4} and old.param_digest == digest
  new = checkpoint.Checkpoint(dmc_jax.convert(ckpt_dir, str(tmp_path / "v2"), source="dmc-jax"))
  assert new.format == checkpoint.FORMAT and new.param_digest == digest
  assert new.compression == {"method": "dmc", "window": 4}
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(old.load_params()), _leaves(new.load_params())))


def test_compression_must_name_a_known_method(ckpt_dir):
  path = os.path.join(ckpt_dir, "checkpoint.json")
  meta = json.load(open(path))
  meta["compression"] = {"method": "zip"}
  json.dump(meta, open(path, "w"))
  with pytest.raises(checkpoint.CheckpointError, match="compression: expected null or an object with method"):
    checkpoint.Checkpoint(ckpt_dir)


def test_chat_template_comes_from_the_source(tmp_path, golden_dir):
  import shutil
  src = write_hf_dir(tmp_path / "src", CFG, random_hf_model(CFG))
  shutil.copy(os.path.join(golden_dir, "smollm2", "hf_tokenizer", "tokenizer_config.json"), src)
  want = json.load(open(os.path.join(src, "tokenizer_config.json"))).get("chat_template")
  if want is None:  # transformers >= 4.43 saves the template beside the config
    shutil.copy(os.path.join(golden_dir, "smollm2", "hf_tokenizer", "chat_template.jinja"), src)
    want = open(os.path.join(src, "chat_template.jinja")).read()
  ck = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "ck"), hf.read(src)))
  assert ck.chat_template == want and "im_start" in want


def test_gguf_chat_template_is_kept(smollm2_ckpt):
  t = checkpoint.Checkpoint(smollm2_ckpt).chat_template
  assert t and "<|im_start|>" in t and "messages" in t


def test_an_integer_parameter_is_refused(ckpt_dir):
  path = os.path.join(ckpt_dir, "params.safetensors")
  data = bytearray(open(path, "rb").read())
  n = int.from_bytes(data[:8], "little")
  header = data[8:8 + n].replace(b'"dtype":"F32"', b'"dtype":"I32"', 1)  # same size: the table stays valid
  data[8:8 + n] = header
  open(path, "wb").write(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match=r"is int32, expected a float dtype"):
    checkpoint.Checkpoint(ckpt_dir, verify=False).lazy_tensors()
