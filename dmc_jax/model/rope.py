"""Rotary position embeddings (rotate-half layout, as in HF checkpoints) — the one home of RoPE.

Frequencies follow transformers bit for bit where it matters (float32 inverse frequencies and angles), so
golden logits match; Llama 3.1 `llama3` scaling, linear scaling and llama.cpp's per-frequency factors.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dmc_jax.config import LlamaConfig


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """[head_dim/2] float32 inverse frequencies after scaling."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
  if cfg.rope_freq_factors is not None:
    return (inv_freq / np.asarray(cfg.rope_freq_factors, np.float32)).astype(np.float32)
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  if s.rope_type == "linear":
    return (inv_freq / np.float32(s.factor)).astype(np.float32)
  # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
  old_len = s.original_max_position_embeddings
  low_freq_wavelen = old_len / s.low_freq_factor
  high_freq_wavelen = old_len / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions_BxL: jnp.ndarray, cfg: LlamaConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin of shape [B, L, head_dim] (float32) for integer positions."""
  inv_freq = jnp.asarray(inverse_frequencies(cfg))
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  angles_BxLxD = jnp.concatenate([angles_BxLxF, angles_BxLxF], axis=-1)
  return jnp.cos(angles_BxLxD), jnp.sin(angles_BxLxD)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BxLxHxD: jnp.ndarray, cos_BxLxD: jnp.ndarray, sin_BxLxD: jnp.ndarray) -> jnp.ndarray:
  """Rotates q or k; computed in (at least) float32, returned in the input dtype."""
  x = x_BxLxHxD.astype(jnp.promote_types(x_BxLxHxD.dtype, jnp.float32))
  cos, sin = cos_BxLxD[:, :, None, :], sin_BxLxD[:, :, None, :]
  return (x * cos + rotate_half(x) * sin).astype(x_BxLxHxD.dtype)


def meta_to_hf_permutation(n_heads: int, head_dim: int) -> np.ndarray:
  """Row order taking interleaved-pair (Meta/GGUF) q/k rows to rotate-half (HF) rows: hf = meta[perm].

  Within a head, Meta stores pairs (2i, 2i+1); HF stores the first elements of all pairs, then the seconds.
  Channels 0 and head_dim-1 are fixed points (DMC's decision channel means the same in both layouts).
  """
  per_head = np.arange(head_dim).reshape(head_dim // 2, 2).T.reshape(-1)
  return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)
