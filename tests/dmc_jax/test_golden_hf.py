"""Our Llama computes transformers' function: logits from goldens made by tests/golden/make_golden.py."""

import json
import os
import shutil

import numpy as np
import pytest

from dmc_jax import checkpoint
from dmc_jax.convert import hf
from dmc_jax.model.llama import Llama

HF_MODELS = ["hf_llama2_mha", "hf_gqa_tied", "hf_llama31_rope", "hf_head_dim_differs", "hf_llama3_meta_twin",
             "hf_spm_twin"]


def logits_of(ckpt_dir, input_ids, **cfg_changes):
  ck = checkpoint.Checkpoint(ckpt_dir)
  cfg = ck.config.replace(**cfg_changes)
  params = ck.load_params(scan_layers=cfg.scan_layers)
  return np.asarray(Llama(cfg).apply(params, input_ids))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, golden_dir):
  root = tmp_path_factory.mktemp("golden_ckpts")
  return {name: checkpoint.write(str(root / name), hf.read(os.path.join(golden_dir, name)))
          for name in HF_MODELS}


@pytest.mark.parametrize("name", HF_MODELS)
def test_logits_equal_transformers(converted, golden_dir, name):
  for golden in ("golden.npz", "golden_long.npz"):
    path = os.path.join(golden_dir, name, golden)
    if golden == "golden.npz" or os.path.exists(path):
      z = np.load(path)
      out = logits_of(converted[name], z["input_ids"])
      err = np.abs(out - z["logits"]).max()
      assert err <= 1e-4, (name, golden, err)


def test_the_configs_cover_what_they_claim(converted):
  cfgs = {n: checkpoint.Checkpoint(p).config for n, p in converted.items()}
  assert cfgs["hf_llama2_mha"].n_kv_heads == cfgs["hf_llama2_mha"].n_heads
  assert cfgs["hf_gqa_tied"].n_groups == 4 and cfgs["hf_gqa_tied"].tie_embeddings
  assert cfgs["hf_llama31_rope"].rope_scaling.rope_type == "llama3"
  c = cfgs["hf_head_dim_differs"]
  assert c.head_dim != c.d_model // c.n_heads


def test_transformers_v4_config_keys_give_the_same_model(tmp_path, golden_dir):
  """The goldens' config.json uses v5 `rope_parameters`; the v4 twin file uses rope_theta/rope_scaling."""
  src = tmp_path / "v4"
  shutil.copytree(os.path.join(golden_dir, "hf_llama31_rope"), src)
  v5 = json.load(open(src / "config.json"))
  assert "rope_parameters" in v5
  shutil.copy(src / "config_v4_style.json", src / "config.json")
  assert "rope_scaling" in json.load(open(src / "config.json"))
  assert hf.read(str(src)).config == hf.read(os.path.join(golden_dir, "hf_llama31_rope")).config


def test_scanned_and_bf16_variants(converted, golden_dir):
  z = np.load(os.path.join(golden_dir, "hf_gqa_tied", "golden.npz"))
  scanned = logits_of(converted["hf_gqa_tied"], z["input_ids"], scan_layers=True, remat_policy="full")
  assert np.abs(scanned - z["logits"]).max() <= 1e-4
  bf16 = logits_of(converted["hf_gqa_tied"], z["input_ids"], dtype="bfloat16")
  rel = np.linalg.norm(bf16 - z["logits"]) / np.linalg.norm(z["logits"])
  assert rel < 2e-2
