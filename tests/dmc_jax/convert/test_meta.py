"""Meta consolidated.*.pth checkpoints, read without torch, compute the same function as their HF twins."""

import os
import pickle
import zipfile

import numpy as np
import pytest

from dmc_jax import checkpoint
from dmc_jax.convert import meta
from dmc_jax.convert.tensors import ConversionError
from dmc_jax.model.llama import Llama

META = ["meta_llama2_1shard", "meta_llama2_2shard", "meta_llama3_1shard", "meta_llama3_2shard",
        "meta_llama2_1shard_bf16"]


@pytest.mark.parametrize("name", META)
def test_meta_checkpoints_match_their_hf_twins(tmp_path, golden_dir, name):
  src = os.path.join(golden_dir, name)
  ck = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "ck"), meta.read(src)))
  if name.endswith("bf16"):
    assert ck.config.param_dtype == "bfloat16"
  for golden in ("golden.npz", "golden_long.npz"):
    if not os.path.exists(os.path.join(src, golden)):
      continue
    z = np.load(os.path.join(src, golden))
    out = Llama(ck.config.replace(param_dtype="float32")).apply(
        {"params": _f32(ck.load_params()["params"])}, z["input_ids"])
    assert np.abs(np.asarray(out) - z["logits"]).max() <= 1e-4, (name, golden)


def _f32(tree):
  import jax
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def test_llama3_layout_and_scaled_rope(golden_dir):
  one = meta.read(os.path.join(golden_dir, "meta_llama3_1shard")).config
  two = meta.read(os.path.join(golden_dir, "meta_llama3_2shard")).config
  assert one == two and one.n_kv_heads == 2 and one.rope_scaling.original_max_position_embeddings == 8192
  assert meta.read(os.path.join(golden_dir, "meta_llama2_2shard")).config.rope_scaling is None


def _torch_like_zip(path, pickled: bytes, storages: dict[str, bytes] = None):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickled)
    for key, data in (storages or {}).items():
      z.writestr(f"archive/data/{key}", data)
    z.writestr("archive/version", "3\n")


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch PWNED",))


def test_pickle_with_a_foreign_global_is_refused_without_running_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _torch_like_zip(tmp_path / "consolidated.00.pth", pickle.dumps({"tok_embeddings.weight": _Evil()}))
  with pytest.raises(ConversionError, match=r"consolidated.00.pth: refusing pickled global (posix|os)\.system"):
    meta.read_pth(str(tmp_path / "consolidated.00.pth"))
  assert not (tmp_path / "PWNED").exists()


def test_truncated_and_non_zip_files(tmp_path, golden_dir):
  good = open(os.path.join(golden_dir, "meta_llama2_1shard", "consolidated.00.pth"), "rb").read()
  (tmp_path / "a.pth").write_bytes(good[: len(good) // 2])
  with pytest.raises(ConversionError, match="a.pth: not a readable torch zip checkpoint"):
    meta.read_pth(str(tmp_path / "a.pth"))
  (tmp_path / "b.pth").write_bytes(b"\x80\x02}q\x00.")  # a legacy (non-zip) pickle
  with pytest.raises(ConversionError, match="legacy"):
    meta.read_pth(str(tmp_path / "b.pth"))


def test_missing_params_json_and_mismatched_shards(tmp_path, golden_dir):
  import shutil
  src = tmp_path / "m"
  shutil.copytree(os.path.join(golden_dir, "meta_llama2_2shard"), src)
  os.remove(src / "params.json")
  with pytest.raises(ConversionError, match="params.json: not found"):
    meta.read(str(src))
  shutil.copy(os.path.join(golden_dir, "meta_llama2_2shard", "params.json"), src)
  # A shard from another model: different tensor names...
  shutil.copy(os.path.join(golden_dir, "meta_llama3_2shard", "consolidated.01.pth"), src / "consolidated.01.pth")
  with pytest.raises(ConversionError, match=r"consolidated.01.pth: tensor names differ from .*consolidated.00.pth"):
    meta.read(str(src))
  # ...or the same names with other shapes (a 1-shard file posing as shard 2 of 2).
  shutil.copy(os.path.join(golden_dir, "meta_llama2_1shard", "consolidated.00.pth"), src / "consolidated.01.pth")
  with pytest.raises(ConversionError, match=r"2 shards merged on dim 0\): tensor 'layers.0.attention.wq.weight' has 96 rows, expected 64"):
    meta.read(str(src))
