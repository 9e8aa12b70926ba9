"""GQA up-training's starting point: mean-pool a checkpoint's KV heads into fewer groups (Ainslie et al. 2023).

KV heads are pooled in contiguous groups: new head j is the mean of old heads j·r .. j·r + r − 1 (r = old / new),
so query head h, which used old head h // G, now uses new head h // (G · r) — the pooled head of its own old
head. K rows are already in rotate-half order per head (every converter writes that layout), so averaging heads
averages matching RoPE channels. The KV cache shrinks by r: that is the CR GQA is compared at. Continued training
afterwards uses the same harness, learning rate and tokens as DMC (`dmc-jax train --config.model.init_from=OUT`).
"""

from __future__ import annotations

import numpy as np

from dmc_jax.config import ConfigError, LlamaConfig

POOLED = ("k_proj", "v_proj")


def pool_kv(kernel_DxKxH: np.ndarray, kv_heads: int) -> np.ndarray:
  """[D, KV, Dh] → [D, kv_heads, Dh]: the mean of each contiguous group of KV heads (accumulated in float32)."""
  d, kv, dh = kernel_DxKxH.shape
  pooled = kernel_DxKxH.astype(np.float32).reshape(d, kv_heads, kv // kv_heads, dh).mean(axis=2)
  return pooled.astype(kernel_DxKxH.dtype)


def pooled_config(cfg: LlamaConfig, kv_heads: int) -> LlamaConfig:
  if kv_heads < 1 or cfg.n_kv_heads % kv_heads:
    raise ConfigError(f"--kv-heads: {kv_heads} must divide the checkpoint's {cfg.n_kv_heads} KV heads")
  return cfg.replace(n_kv_heads=kv_heads)


def pool_checkpoint(src: str, kv_heads: int, out: str, force: bool = False) -> tuple[str, float]:
  """Writes the pooled checkpoint (self-describing, same tokenizer and DMC settings). Returns (path, cache CR)."""
  from dmc_jax import checkpoint
  from dmc_jax.convert import Converted
  ckpt = checkpoint.Checkpoint(src)
  cfg = pooled_config(ckpt.config, kv_heads)
  tensors = []
  for t in ckpt.lazy_tensors().values():
    if t.name.split("/")[-2] in POOLED:
      t = t.map(lambda a: pool_kv(a, kv_heads), (t.shape[0], kv_heads, t.shape[2]))
    tensors.append(t)
  tokenizer = ckpt.tokenizer_bytes()
  cr = ckpt.config.n_kv_heads / kv_heads
  converted = Converted(cfg, tensors, tokenizer, {"format": "dmc-jax gqa-pool", "path": ckpt.directory,
                                                 "from_kv_heads": ckpt.config.n_kv_heads, "kv_heads": kv_heads,
                                                 "inputs": [ckpt.directory]},
                        chat_template=ckpt.chat_template)
  path = checkpoint.write(out, converted, force=force, dmc=ckpt.dmc, experiment=ckpt.meta.get("experiment"),
                          extra_provenance={"gqa_pool": {"from_kv_heads": ckpt.config.n_kv_heads,
                                                                             "kv_heads": kv_heads, "cache_cr": cr}})
  return path, cr
