"""Dynamic Memory Compression: the one home of the math (docs/dmc.md §3–6), shared by training, prefill and decode.

Per layer, KV head and token t the model decides to append (α = 0) its key/value to the cache or merge (α = 1) it
into the last slot. Nothing is added to the model: one channel `ch` of q and k is repurposed —
a_t = k_t[ch] − c is the decision logit, ω_t = σ(mean over the query group of q_t[ch] + c) + ε the importance —
and then zeroed in q and k before and after RoPE.

Shapes: B batch, L sequence, H query heads, K KV heads, G = H / K, D head dim. Decisions are [B, L, K].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dmc_jax.config import DMCConfig

Array = jax.Array
NEG_INF = -1e30  # finite: a fully masked row must not produce NaN


# -- decisions ------------------------------------------------------------------------------------------------


def decision_and_importance(q_BxLxHxD: Array, k_BxLxKxD: Array, dmc: DMCConfig) -> tuple[Array, Array]:
  """(a, ω) in float32, both [B, L, K]; ω averages q[ch] over the query heads of each KV head."""
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxLxKxD.shape[2]
  ch = dmc.channel(d)
  acc = jnp.promote_types(k_BxLxKxD.dtype, jnp.float32)
  a_BxLxK = k_BxLxKxD[..., ch].astype(acc) - dmc.offset - dmc.decision_bias
  q_ch_BxLxKxG = q_BxLxHxD[..., ch].astype(acc).reshape(b, l, kv, h // kv)
  omega_BxLxK = jax.nn.sigmoid(jnp.mean(q_ch_BxLxKxG, axis=-1) + dmc.offset) + dmc.epsilon
  return a_BxLxK, omega_BxLxK


def unit_rms(x: Array) -> Array:
  """x scaled to unit root-mean-square over its last axis (an RMSNorm at its initialisation, no parameters)."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def adapter_decision_and_importance(x_BxLxD: Array, w_DxKx2: Array, dmc: DMCConfig) -> tuple[Array, Array]:
  """The adapter form: (a, ω), float32 [B, L, K], from the attention input through a per-layer linear map.

  a = x̂·W[:, :, 0] − c and ω = σ(x̂·W[:, :, 1] + c) + ε, x̂ = x at unit RMS: with W = 0 (its initialisation)
  every decision is "append" (a = −c) and every weight equal, so the model computes exactly the original
  attention. x̂ rather than x for the reason the DMS adapter gives (dms.adapter_logits): SmolLM2's small
  attention-norm scales left the first five layers at CR ≈ 1 after 100 steps of the raw-input adapter."""
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  logits_BxLxKx2 = jnp.einsum("bld,dkt->blkt", unit_rms(x_BxLxD.astype(acc)), w_DxKx2.astype(acc))
  return (logits_BxLxKx2[..., 0] - dmc.offset - dmc.decision_bias,
          jax.nn.sigmoid(logits_BxLxKx2[..., 1] + dmc.offset) + dmc.epsilon)


def scale_channel(x: Array, ch: int | None, scale) -> Array:
  """x with channel `ch` of its last axis multiplied by `scale` (0 zeroes it); x itself when ch is None (the
  adapter form repurposes no channel)."""
  if ch is None:
    return x
  return x.at[..., ch].multiply(jnp.asarray(scale, x.dtype))


def document_starts(segment_ids_BxL: Array) -> Array:
  """True where a sequence or a packed document begins (α ≡ 0 there)."""
  first = jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool)
  return jnp.concatenate([first, segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)


def logistic_noise(key: Array, shape) -> Array:
  """u ~ Logistic(0, 1) (the difference of two Gumbel(0, 1) variables)."""
  uniform = jax.random.uniform(key, shape, jnp.float32, minval=1e-6, maxval=1.0 - 1e-6)
  return jnp.log(uniform) - jnp.log1p(-uniform)


def relaxed_logits(a_BxLxK: Array, noise_BxLxK: Array, temperature: float) -> Array:
  """z = (a + u) / τ; the relaxed decision is α̃ = σ(z)."""
  return (a_BxLxK + noise_BxLxK) / temperature


def straight_through(alpha_soft: Array) -> Array:
  """1[α̃ > 0.5] in the forward pass, the gradient of α̃ in the backward pass."""
  hard = (alpha_soft > 0.5).astype(alpha_soft.dtype)
  return alpha_soft + jax.lax.stop_gradient(hard - alpha_soft)


def _next(x_BxLxK: Array, fill) -> Array:
  """x[:, j+1] at position j; `fill` at the last position (no token follows it yet)."""
  return jnp.concatenate([x_BxLxK[:, 1:], jnp.full_like(x_BxLxK[:, :1], fill)], axis=1)


def key_bias_relaxed(z_BxLxK: Array, starts_BxL: Array) -> Array:
  """Per-key bias log(1 − α̃_{j+1}) = logsigmoid(−z_{j+1}); 0 where j+1 starts a document or does not exist."""
  bias = jax.nn.log_sigmoid(-_next(z_BxLxK, 0.0))
  blocked = _next(jnp.broadcast_to(starts_BxL[..., None], z_BxLxK.shape), True)
  return jnp.where(blocked, 0.0, bias)


def key_bias_hard(alpha_BxLxK: Array) -> Array:
  """Per-key bias for hard decisions: −∞ where token j+1 merged into the state of key j, else 0."""
  return jnp.where(_next(alpha_BxLxK, 0.0) > 0.5, NEG_INF, 0.0)


# -- partial accumulation -------------------------------------------------------------------------------------


def _shift(x: Array, m: int) -> Array:
  """x[:, t − m] at position t (zeros before the start); axis 1 is the sequence."""
  if m == 0:
    return x
  pad = jnp.zeros_like(x[:, :m])
  return jnp.concatenate([pad, x[:, :-m]], axis=1)


def accumulate(k_BxLxKxD: Array, v_BxLxKxD: Array, alpha_BxLxK: Array, omega_BxLxK: Array,
               window: int | None) -> tuple[Array, Array, Array]:
  """Running weighted sums of every position's slot, float32: (Σ P ω k, Σ P ω v, Σ P ω).

  With P_{t,m} = Π_{r=t−m+1..t} α_r, sums run over m < W (windowed) or all m (W = None, the linear recurrence
  S_t = α_t S_{t−1} + ω_t x_t as an associative scan). k̃ = first / third. α must be 0 at every start.
  """
  acc = jnp.promote_types(k_BxLxKxD.dtype, jnp.float32)
  alpha = alpha_BxLxK.astype(acc)
  omega = omega_BxLxK.astype(acc)
  wk = omega[..., None] * k_BxLxKxD.astype(acc)
  wv = omega[..., None] * v_BxLxKxD.astype(acc)
  if window is None:
    def combine(left, right):
      (a1, k1, v1, w1), (a2, k2, v2, w2) = left, right
      return a1 * a2, a2[..., None] * k1 + k2, a2[..., None] * v1 + v2, a2 * w1 + w2
    _, num_k, num_v, den = jax.lax.associative_scan(combine, (alpha, wk, wv, omega), axis=1)
    return num_k, num_v, den
  num_k, num_v, den = wk, wv, omega
  prod = jnp.ones_like(alpha)
  for m in range(1, window):  # W shifted multiply-adds: no loop over sequence positions
    prod = prod * _shift(alpha, m - 1)
    num_k = num_k + prod[..., None] * _shift(wk, m)
    num_v = num_v + prod[..., None] * _shift(wv, m)
    den = den + prod * _shift(omega, m)
  return num_k, num_v, den


# -- compression-ratio loss, schedule, stage 1 ----------------------------------------------------------------


def merge_fraction(alpha_LyxBxLxK: Array, valid_BxL: Array) -> Array:
  """Per sequence: mean decision over valid positions, heads and all layers ([B])."""
  weights = valid_BxL.astype(jnp.float32)[None, :, :, None]
  total = jnp.sum(alpha_LyxBxLxK * weights, axis=(0, 2, 3))
  count = jnp.sum(jnp.broadcast_to(weights, alpha_LyxBxLxK.shape), axis=(0, 2, 3))
  return total / jnp.maximum(count, 1.0)


CR_LOSSES = ("one_sided", "two_sided")


def cr_loss(alpha_hard_LyxBxLxK: Array, valid_BxL: Array, target_cr, kind: str = "one_sided") -> Array:
  """Global loss over sequences s, p = 1 − 1/CR: one-sided mean_s max(0, p − f_s) (the paper's; compressing more is
  not penalised) or two-sided mean_s |p − f_s|. f_s counts the hard decisions of the *noisy* logits, so a trained
  model's noise-free inference CR can still exceed the target (DMS at target 4: 4.02 in training, 5.03 held out,
  with either kind; docs/results.md)."""
  if kind not in CR_LOSSES:
    raise ValueError(f"train.cr_loss: expected one of {CR_LOSSES}, got {kind!r}")
  gap = 1.0 - 1.0 / jnp.asarray(target_cr, jnp.float32) - merge_fraction(alpha_hard_LyxBxLxK, valid_BxL)
  return jnp.mean(jnp.maximum(0.0, gap) if kind == "one_sided" else jnp.abs(gap))


def realised_cr(alpha_hard: Array, valid_BxL: Array) -> Array:
  """1 / (1 − mean hard α) over all valid positions, heads and layers."""
  weights = jnp.broadcast_to(valid_BxL.astype(jnp.float32)[None, :, :, None], alpha_hard.shape)
  mean = jnp.sum(alpha_hard * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return 1.0 / (1.0 - mean)


def cr_schedule(step, ramp_start: int, ramp_steps: int, target: float) -> Array:
  """Target CR: 1 until `ramp_start`, linear to `target` over `ramp_steps`, then held."""
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - ramp_start) / max(ramp_steps, 1), 0.0, 1.0)
  return 1.0 + frac * (target - 1.0)


def stage1_fade(step, stage1_steps: int) -> Array:
  """Multiplier of channel ch during stage 1: max(0, 1 − step / (0.8 · stage1_steps))."""
  return jnp.maximum(0.0, 1.0 - jnp.asarray(step, jnp.float32) / (0.8 * stage1_steps))


def is_decision_kernel(path) -> bool:
  """Whether a parameter-tree path names a q_proj/k_proj kernel (scanned or not; head dim is its last axis)."""
  names = [getattr(p, "key", None) for p in path]
  return "attn" in names and ("q_proj" in names or "k_proj" in names) and names[-1] == "kernel"


def zero_decision_rows(params: Any, dmc: DMCConfig) -> Any:
  """Stage-1 surgery: zero the q/k weight rows that produce channel ch (a = −c, ω ≈ 1 afterwards).

  Works on unscanned (layers_i) and scanned (layers/layer, leading layer axis) trees alike: the head-dim axis is
  the last axis of q_proj/k_proj kernels. Any tree that mirrors the parameters works too (optimizer moments).
  """
  def fix(path, x):
    if dmc.decisions == "adapter":  # no repurposed channel, no rows to zero
      return x
    if getattr(path[-1], "key", None) == "rows":  # split-out decision rows (dmc_jax.adapter): all of them
      return jnp.zeros_like(x)
    return x.at[..., dmc.channel(x.shape[-1])].set(0) if is_decision_kernel(path) else x
  return jax.tree_util.tree_map_with_path(fix, params)
