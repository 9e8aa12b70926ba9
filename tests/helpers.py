"""Helpers shared by the tests (plain functions; the fixtures are in conftest.py). Importable as `helpers`
because pyproject.toml puts tests/ on the test path."""

from __future__ import annotations

import os

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # the repository


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
  from dmc_jax import checkpoint
  from dmc_jax.convert import Converted, LazyTensor, layout
  flat = {k: np.asarray(v) for k, v in layout.flatten(params["params"]).items()}
  tensors = [LazyTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()]
  if tokenizer is None and tokenizer_from:
    tokenizer = checkpoint.Checkpoint(tokenizer_from).tokenizer_bytes()
  return checkpoint.write(str(path), Converted(cfg, tensors, tokenizer, {"format": "test"}), dmc=dmc)
