"""Decode attention over the paged, per-head ragged DMC cache — the jnp reference (XLA fallback and oracle).

Every row (one sequence × layer × KV head) is its own single-head sequence: `lengths[r]` slots stored in the
pages `block_table[r, :]`; the G query heads of the row's KV head attend to them together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def paged_decode_attention(q_RxGxD: jax.Array, k_pages_PxSxD: jax.Array, v_pages_PxSxD: jax.Array,
                           block_table_RxM: jax.Array, lengths_R: jax.Array, scale: float | None = None) -> jax.Array:
  r, g, d = q_RxGxD.shape
  scale = d ** -0.5 if scale is None else scale
  pages = jnp.clip(block_table_RxM, 0, k_pages_PxSxD.shape[0] - 1)
  k = k_pages_PxSxD[pages].reshape(r, -1, d)  # [R, M·S, D]
  v = v_pages_PxSxD[pages].reshape(r, -1, d)
  logits = jnp.einsum("rgd,rsd->rgs", q_RxGxD, k, preferred_element_type=jnp.float32) * scale
  valid = jnp.arange(k.shape[1])[None, :] < lengths_R[:, None]
  # where, not multiply: slots past a row's length may hold anything (even NaN) and must not be read into the sum.
  logits = jnp.where(valid[:, None, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(valid[:, None, :], probs, 0.0).astype(v.dtype)
  v = jnp.where(valid[:, :, None], v, 0)
  out = jnp.einsum("rgs,rsd->rgd", probs, v, preferred_element_type=jnp.float32)
  return out.astype(q_RxGxD.dtype)
