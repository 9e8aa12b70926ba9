"""`generate` with an eviction policy: the vanilla `Generator` loop, prefill and decode from `evict_model`.

The cache is compact (`evict_model.init_cache`): budget(max_len) + 1 slots per (layer, sequence, KV head), evicted
slots reused, so it holds ≈ 1/CR of the vanilla cache's bytes and `GenerationResult.cache_bytes` says so. The
parameters stay unscanned (as the vanilla generator's): the decode step unrolls the layers over per-layer buffers;
the prefill's parallel forward stacks them for its scan (once per generation, inside the compiled prefill).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dmc_jax.baselines import evict_model
from dmc_jax.baselines.policies import Policy
from dmc_jax.config import LlamaConfig
from dmc_jax.generate import Generator, Sampling, sample


class PolicyGenerator(Generator):
  def __init__(self, cfg: LlamaConfig, params: Any, policy: Policy, cache_dtype: str | None = None):
    cfg = cfg.replace(scan_layers=False, remat_policy="none")
    self.policy = policy
    super().__init__(cfg, params, cache_dtype)

  def _new_cache(self, batch: int, max_len: int):
    return evict_model.init_cache(self.cfg, self.policy, batch, max_len, self.cache_dtype)

  @jax.named_scope("prefill")  # as Generator's (docs/profiling.md)
  def _prefill_fn(self, params, tokens_BxP, cache, lengths_B, key, sampling: Sampling):
    logits, cache = evict_model.prefill(self.cfg, self.policy, params, tokens_BxP, lengths_B, cache)
    last_BxV = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return sample(last_BxV, key, sampling), cache

  @jax.named_scope("decode_step")
  def _step_fn(self, params, cache, token_B, index_B, key, sampling: Sampling):
    logits, cache = evict_model.decode(self.cfg, self.policy, params, token_B, index_B, cache)
    return sample(logits, key, sampling), cache


def kept_entries(policy: Policy, prompt_lengths, steps: int) -> list[int]:
  """Cache entries per (layer, KV head) a sequence holds at the end of `generate` (the policy's budget)."""
  return [policy.budget(int(n) + steps) for n in prompt_lengths]

