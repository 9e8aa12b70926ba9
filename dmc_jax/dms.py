"""Dynamic Memory Sparsification: DMS's decisions (docs/dmc.md §10), beside DMC's in `dmc_jax.dmc`.

DMS evicts instead of merging, with a delay: a token stays visible for w = `dms_window` steps after it arrives;
after that it stays only if the decision computed at the next position did not mark it (the decision at t+1 marks
token t). Training uses DMC's pieces unchanged — logistic noise, τ, straight-through hard decisions, the one-sided
CR loss on the mean hard decision, the per-key bias log(1 − α̃_{j+1}) — with the bias applied only beyond the
window (`pallas_kernels.dmc_attention`'s `window`); keys and values are the token's own (no accumulation).

Decision logits, [B, L, K] float32, from one of two sources (`DMCConfig.decisions`):
* "channel": dms_scale · q[ch] − offset of the first query head of each KV head's group; that channel of those
  heads is zeroed before and after RoPE (it no longer takes part in attention). Keys are untouched.
* "adapter": dms_scale · x̂·W − offset, W [D, K, 1] zero-initialised, x̂ the attention input scaled to unit RMS:
  at initialisation every logit is −offset (keep), so the model is the original.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmc_jax import dmc as dmc_math
from dmc_jax.config import DMCConfig

Array = jax.Array


def channel_logits(q_BxLxHxD: Array, n_kv_heads: int, dmc: DMCConfig) -> Array:
  b, l, h, d = q_BxLxHxD.shape
  acc = jnp.promote_types(q_BxLxHxD.dtype, jnp.float32)
  q_first = q_BxLxHxD.reshape(b, l, n_kv_heads, h // n_kv_heads, d)[:, :, :, 0, dmc.channel(d)]
  return q_first.astype(acc) * dmc.dms_scale - dmc.offset - dmc.decision_bias


def adapter_logits(x_BxLxD: Array, w_DxKx1: Array, dmc: DMCConfig) -> Array:
  """The adapter reads x scaled to unit RMS. The attention input carries its RMSNorm's learned scale, which in
  SmolLM2 is small (mean |scale| 0.03 in layer 0, 0.25 in layer 10): read as it is, a step of Adam (each weight
  moves by about the LR) moved the logits so little that 36 steps left every decision at "keep". NVIDIA's adapter
  has an RMSNorm of its own, initialised to scale 1; this is that norm at its initialisation, without parameters."""
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  out = jnp.einsum("bld,dk->blk", dmc_math.unit_rms(x_BxLxD.astype(acc)), w_DxKx1[..., 0].astype(acc))
  return out * dmc.dms_scale - dmc.offset - dmc.decision_bias


def zero_decision_channel(q_BxLxHxD: Array, n_kv_heads: int, ch: int | None) -> Array:
  """q with channel ch of the first query head of every group zeroed (those heads lent it to the decisions)."""
  if ch is None:
    return q_BxLxHxD
  b, l, h, d = q_BxLxHxD.shape
  q = q_BxLxHxD.reshape(b, l, n_kv_heads, h // n_kv_heads, d)
  return q.at[:, :, :, 0, ch].set(0).reshape(b, l, h, d)


def evictions(alpha_BxLxK: Array, lengths_B: Array, window: int) -> Array:
  """Tokens a cache has evicted after reading the first lengths[b] tokens of hard decisions α ([B, K] int32):
  token j is gone once token j + w + 1 has arrived (j + w + 1 < length) if α_{j+1} marked it."""
  l = alpha_BxLxK.shape[1]
  t = jnp.arange(l)[None, :, None]
  gone = (alpha_BxLxK > 0.5) & (t + window < lengths_B[:, None, None]) & (t >= 1)
  return jnp.sum(gone, axis=1).astype(jnp.int32)
