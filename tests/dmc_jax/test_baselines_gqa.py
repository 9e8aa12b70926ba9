"""GQA pooling: identity at the same head count, exact when heads of a group agree, the CLI and its CR."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_checkpoint

from dmc_jax import checkpoint
from dmc_jax.baselines import gqa
from dmc_jax.config import LlamaConfig
from dmc_jax.model.llama import Llama, cache_bytes, init_cache
from experiments.cli import dmc as cli_dmc

CFG = LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=48)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(jax.jit(Llama(CFG).init)(jax.random.key(0), TOKENS))


def test_pool_to_the_same_count_is_the_identity():
  k = np.random.default_rng(1).normal(size=(32, 4, 8)).astype(np.float32)
  assert np.array_equal(gqa.pool_kv(k, 4), k)
  np.testing.assert_allclose(gqa.pool_kv(k, 2)[:, 1], (k[:, 2] + k[:, 3]) / 2, rtol=1e-6)
  with pytest.raises(gqa.ConfigError, match="--kv-heads: 3 must divide the checkpoint's 4 KV heads"):
    gqa.pooled_config(CFG, 3)


def test_pooling_heads_that_agree_keeps_the_model_and_divides_the_cache(tmp_path, params):
  # Make the KV heads of each pooled pair equal: mean-pooling is then exact and the pooled model computes the
  # same function with half the cache.
  p = jax.tree.map(np.array, params)
  for i in range(CFG.n_layers):
    for name in gqa.POOLED:
      w = p["params"][f"layers_{i}"]["attn"][name]["kernel"]
      w[:, 1::2] = w[:, 0::2]
  src = write_checkpoint(tmp_path / "src", CFG, p)
  assert cli_dmc.main(["gqa-pool", src, "--kv-heads", "2", "--out", str(tmp_path / "gqa2")]) == 0
  pooled = checkpoint.Checkpoint(tmp_path / "gqa2")
  assert pooled.config.n_kv_heads == 2 and pooled.config.n_heads == 8
  ref = Llama(CFG).apply(p, TOKENS)
  out = Llama(pooled.config).apply(pooled.load_params(), TOKENS)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert cache_bytes(init_cache(CFG, 1, 64)) / cache_bytes(init_cache(pooled.config, 1, 64)) == 2


def test_pooled_model_runs_and_differs_from_unpooled(tmp_path, params):
  src = write_checkpoint(tmp_path / "src", CFG, params)
  path, cr = gqa.pool_checkpoint(src, 1, str(tmp_path / "mqa"))
  assert cr == 4
  pooled = checkpoint.Checkpoint(path)
  out = np.asarray(Llama(pooled.config).apply(pooled.load_params(), TOKENS))
  assert np.isfinite(out).all()
  assert np.abs(out - np.asarray(Llama(CFG).apply(params, TOKENS))).max() > 1e-4
  assert cli_dmc.main(["gqa-pool", src, "--kv-heads", "3", "--out", str(tmp_path / "bad")]) == 2
