"""Causal attention with DMC's additive mask — the jnp reference (XLA fallback and the fused kernel's oracle).

logits_ij = ⟨q_i, k_j⟩·scale + bias_j for i − j > window (bias_j = log(1 − α̃_{j+1}), one value per key and KV
head), + 0 nearer the diagonal, −∞ for j > i and across segments. DMC: window 0 (a query always sees its own,
current state); DMS: window w (a token stays visible for w steps, whatever its decision; docs/dmc.md §10).
The bias is a vector per key: no dense L×L bias tensor is an input (this reference still forms L×L logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def dmc_attention(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array, key_bias_BxLxK: jax.Array,
                  segment_ids_BxL: jax.Array | None = None, scale: float | None = None, window: int = 0) -> jax.Array:
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxLxKxD.shape[2]
  scale = d ** -0.5 if scale is None else scale
  acc = jnp.promote_types(q_BxLxHxD.dtype, jnp.float32)
  q = q_BxLxHxD.reshape(b, l, kv, h // kv, d)
  logits = jnp.einsum("blkgd,bskd->bkgls", q, k_BxLxKxD, preferred_element_type=acc) * scale
  idx = jnp.arange(l)
  below = idx[:, None] > idx[None, :]
  beyond = idx[:, None] - idx[None, :] > window
  diagonal = idx[:, None] == idx[None, :]
  bias_BxKxS = jnp.moveaxis(key_bias_BxLxK.astype(acc), 1, 2)
  logits = logits + jnp.where(beyond, bias_BxKxS[:, :, None, None, :], 0.0)
  allowed = below | diagonal
  if segment_ids_BxL is not None:
    same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    allowed = allowed[None] & same
    allowed = allowed[:, None, None]
  logits = jnp.where(allowed, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxLxKxD.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxLxKxD, preferred_element_type=acc)
  return out.reshape(b, l, h, d).astype(q_BxLxHxD.dtype)
