"""Self-attention: vanilla (parallel or against a vanilla KV cache) and DMC (train, eval, decode).

* vanilla — `dmc_mode="off"`: exactly Llama attention. During DMC's stage 1 a `fade` factor scales channel ch
  of q and k before and after RoPE; at fade = 0 this is DMC's convention with every token appended, so the
  switch to stage 2 changes nothing until a head starts merging.
* train / eval — parallel over the sequence with relaxed (Gumbel-sigmoid) or hard noiseless decisions, windowed
  partial accumulation of k and v, and the additive per-key mask (docs/dmc.md §5).
* decode — one token per sequence against the paged compressed cache (`dmc_jax.cache`).

With `dmc.method = "dms"` the same modes run DMS (`dmc_jax.dms`): plain keys and values, the per-key bias only
beyond the window, and the DMS cache (`dmc_jax.dms_cache`) in decode.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmc_jax import cache as dmc_cache
from dmc_jax import dmc as dmc_math
from dmc_jax import dms as dms_math
from dmc_jax import dms_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model import rope
from dmc_jax.model.modes import DMCDecode, Mode, Parallel, VanillaCache
from pallas_kernels import _backend
from pallas_kernels.dmc_attention.api import AVAILABLE as DMC_ATTENTION_IMPLS
from pallas_kernels.dmc_attention.api import dmc_attention
from pallas_kernels.dmc_decode.api import paged_decode_attention

Array = jax.Array
DMC_MODES = ("off", "train", "eval")
_INIT = nn.initializers.normal(stddev=0.02)


def constrain(x: Array, names: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


class Kernel(nn.Module):
  """A named weight tensor with logical axes (the projection itself is an einsum at the call site)."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: Any
  init: Any = _INIT

  @nn.compact
  def __call__(self) -> Array:
    return self.param("kernel", nn.with_logical_partitioning(self.init, self.axes), self.shape, self.param_dtype)


def attend(q_BxLxHxD: Array, k: Array, v: Array, mask_BxLxS: Array, kv_layout: str = "bskd") -> Array:
  """Softmax attention with GQA (query head h uses KV head h // G); float32 softmax. Returns [B, L, H, D].

  k, v are [B, S, KV, D] ("bskd", fresh projections) or [B, KV, S, D] ("bksd", the vanilla cache's layout,
  read as it lies: a transpose of the whole cache every decode step would cost more than the attention).
  """
  if kv_layout not in ("bskd", "bksd"):
    raise ValueError(f"kv_layout: expected 'bskd' or 'bksd', got {kv_layout!r}")
  b, l, h, d = q_BxLxHxD.shape
  kv = k.shape[2] if kv_layout == "bskd" else k.shape[1]
  g = h // kv
  acc = jnp.promote_types(q_BxLxHxD.dtype, jnp.float32)
  q = q_BxLxHxD.reshape(b, l, kv, g, d)
  if kv_layout == "bksd" and b > 1 and g > 1:
    # The cache path under GQA: (length, group) folded into one row axis, so each (sequence, KV head) is one plain
    # matmul against its cache. With separate group and length-1 axes XLA:CPU picked a dot layout plus transposes
    # 4.8× slower (SmolLM2 layer, batch 11 × 1k tokens: 5.7 vs 1.2 ms; a whole decode step 242 → ~120 ms). Not at
    # batch 1: there XLA:CPU squeezes the batch axis for the folded dot and duplicates the cache update to feed it,
    # copying each layer's cache twice more (decode step 63 → 80 ms at 1k tokens). Not for MHA (G = 1: nothing to
    # fold).
    q = jnp.swapaxes(q, 1, 2).reshape(b, kv, l * g, d)
    logits = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=acc).reshape(b, kv, l, g, -1)
    logits = jnp.where(mask_BxLxS[:, None, :, None], logits * (d ** -0.5), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, l * g, -1)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v, preferred_element_type=acc)
    return jnp.swapaxes(out.reshape(b, kv, l, g, d), 1, 2).reshape(b, l, h, d).astype(q_BxLxHxD.dtype)
  logits = jnp.einsum(f"blkgd,{kv_layout}->bkgls", q, k, preferred_element_type=acc)
  logits = logits * (d ** -0.5)
  logits = jnp.where(mask_BxLxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgls,{kv_layout}->blkgd", probs, v, preferred_element_type=acc)
  return out.reshape(b, l, h, d).astype(q_BxLxHxD.dtype)


def write_cache(cache, k_BxLxKxD: Array, v_BxLxKxD: Array, cache_index_B: Array):
  """Vanilla cache: writes L new entries per sequence at slots cache_index[b] + (0..L-1); layout [B, KV, S, D]."""
  b, l = k_BxLxKxD.shape[:2]
  slots_BxL = cache_index_B[:, None] + jnp.arange(l)[None, :]
  batch_BxL = jnp.broadcast_to(jnp.arange(b)[:, None], (b, l))
  def put(buf, new_BxLxKxD):
    # Advanced indices (batch, slot) around a slice move to the front: the update is [B, L, KV, D]. The (batch,
    # slot) pairs are unique and in order; saying so lets XLA:CPU update the donated buffer in place (without it,
    # it rewrites the whole cache: 4.7 ms vs 0.02 ms a layer for SmolLM2 at batch 11 × 1k tokens).
    return buf.at[batch_BxL, :, slots_BxL].set(new_BxLxKxD.astype(buf.dtype), mode="drop",
                                               indices_are_sorted=True, unique_indices=True)
  return {"k": put(cache["k"], k_BxLxKxD), "v": put(cache["v"], v_BxLxKxD)}


class Attention(nn.Module):
  cfg: LlamaConfig
  dmc: DMCConfig | None = None
  dmc_mode: str = "off"

  def setup(self):
    c = self.cfg
    if self.dmc_mode not in DMC_MODES:
      raise ValueError(f"dmc_mode: expected one of {DMC_MODES}, got {self.dmc_mode!r}")
    if self.dmc_mode != "off" and self.dmc is None:
      raise ValueError(f"dmc_mode={self.dmc_mode!r} needs a DMCConfig")
    pd = jnp.dtype(c.param_dtype)
    self.q_proj = Kernel((c.d_model, c.n_heads, c.head_dim), ("embed", "q_heads", "kv"), pd)
    self.k_proj = Kernel((c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), pd)
    self.v_proj = Kernel((c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), pd)
    self.o_proj = Kernel((c.n_heads, c.head_dim, c.d_model), ("q_heads", "kv", "embed"), pd)
    if self.dmc is not None and self.dmc.decisions == "adapter" and self.dmc_mode != "off":
      # Zero-initialised: at init every token appends and the model is the original (dmc_jax.dmc).
      # DMC's adapter gives (a, ω) per KV head, DMS's only the eviction logit.
      outs = 1 if self.dmc.method == "dms" else 2
      self.decision_adapter = Kernel((c.d_model, c.n_kv_heads, outs), ("embed", "kv_heads", None), pd,
                                     init=nn.initializers.zeros)

  @property
  def ch(self) -> int | None:
    return self.dmc.channel(self.cfg.head_dim)

  def _decide(self, x_BxLxD: Array, q: Array, k: Array) -> tuple[Array, Array]:
    """(a, ω) [B, L, K]: from the repurposed channel, or from the decision adapter on the attention input."""
    if self.dmc.decisions == "adapter":
      return dmc_math.adapter_decision_and_importance(x_BxLxD, self.decision_adapter(), self.dmc)
    return dmc_math.decision_and_importance(q, k, self.dmc)

  def _project(self, x_BxLxD: Array):
    dt = jnp.dtype(self.cfg.dtype)
    x = x_BxLxD.astype(dt)
    q = jnp.einsum("bld,dhk->blhk", x, self.q_proj().astype(dt))
    k = jnp.einsum("bld,dhk->blhk", x, self.k_proj().astype(dt))
    v = jnp.einsum("bld,dhk->blhk", x, self.v_proj().astype(dt))
    return q, k, v

  def _output(self, out_BxLxHxD: Array) -> Array:
    dt = jnp.dtype(self.cfg.dtype)
    out = jnp.einsum("blhk,hkd->bld", out_BxLxHxD.astype(dt), self.o_proj().astype(dt))
    return constrain(out, ("activation_batch", "activation_length", "activation_embed"))

  @jax.named_scope("attention")  # the profiler scopes: docs/profiling.md
  def __call__(self, x_BxLxD: Array, ctx: Parallel | VanillaCache, cache=None,
               forced_alpha_BxLxK: Array | None = None):
    """The parallel forward (training, evaluation, prefill) or a vanilla-cache step (`ctx` says which).

    Returns (out, cache, aux): the updated vanilla cache (None in parallel mode); aux only with a DMC mode."""
    q, k, v = self._project(x_BxLxD)
    if self.dmc_mode != "off":
      if ctx.mode is not Mode.PARALLEL:
        raise ValueError(f"DMC attention runs in parallel mode here, got {ctx.mode}; decode with `decode`")
      if self.dmc.method == "dms":
        return self._dms_parallel(x_BxLxD, q, k, v, ctx, forced_alpha_BxLxK)
      return self._dmc_parallel(x_BxLxD, q, k, v, ctx, forced_alpha_BxLxK)
    cos, sin, fade = ctx.cos, ctx.sin, ctx.fade
    if fade is not None:
      q, k = dmc_math.scale_channel(q, self.ch, fade), dmc_math.scale_channel(k, self.ch, fade)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    if fade is not None:
      q, k = dmc_math.scale_channel(q, self.ch, fade), dmc_math.scale_channel(k, self.ch, fade)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    if ctx.mode is Mode.VANILLA_CACHE:
      cache = write_cache(cache, k, v, ctx.cache_index)
      return self._output(attend(q, cache["k"], cache["v"], ctx.mask, kv_layout="bksd")), cache, None
    return self._output(attend(q, k, v, ctx.mask)), None, None

  def _alphas(self, a: Array, starts: Array, forced_alpha: Array | None):
    """(α, key bias, α for the aux) from decision logits: forced, relaxed with noise (train) or hard (eval); α ≡ 0
    where a document starts. DMC and DMS share it (what α marks differs, not how it is drawn)."""
    if forced_alpha is not None:
      alpha = jnp.where(starts[..., None], 0.0, forced_alpha.astype(jnp.float32))
      return alpha, dmc_math.key_bias_hard(alpha), alpha
    if self.dmc_mode == "train":
      z = dmc_math.relaxed_logits(a, dmc_math.logistic_noise(self.make_rng("dmc"), a.shape), self.dmc.temperature)
      alpha = jnp.where(starts[..., None], 0.0, jax.nn.sigmoid(z))
      return alpha, dmc_math.key_bias_relaxed(z, starts), dmc_math.straight_through(alpha)
    alpha = jnp.where(starts[..., None], 0.0, (a > 0).astype(jnp.float32))
    return alpha, dmc_math.key_bias_hard(alpha), alpha

  def _decision_aux(self, a: Array, alpha_st: Array) -> dict:
    """aux of a parallel pass; hard (eval) passes add the decision logits, which calibration reads
    (dmc_jax/calibrate.py). Callers that drop them under jit do not compute them."""
    return {"alpha": alpha_st, "logit": a} if self.dmc_mode == "eval" else {"alpha": alpha_st}

  def _dmc_parallel(self, x, q, k, v, ctx, forced_alpha):
    dmc, ch = self.dmc, self.ch
    a, omega = self._decide(x, q, k)
    q, k = dmc_math.scale_channel(q, ch, 0), dmc_math.scale_channel(k, ch, 0)
    alpha, bias, alpha_st = self._alphas(a, ctx.starts, forced_alpha)
    num_k, num_v, den = dmc_math.accumulate(k, v, alpha, omega, dmc.window)
    dt = q.dtype
    k_acc = (num_k / den[..., None]).astype(dt)
    v_acc = (num_v / den[..., None]).astype(dt)
    q = dmc_math.scale_channel(rope.apply_rope(q, ctx.cos, ctx.sin), ch, 0)
    k_rot = dmc_math.scale_channel(rope.apply_rope(k_acc, ctx.cos, ctx.sin), ch, 0)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    impl = _backend.for_op(self.cfg.attention_impl, DMC_ATTENTION_IMPLS)
    out = dmc_attention(q, k_rot, v_acc, bias, ctx.segment_ids, implementation=impl)
    aux = self._decision_aux(a, alpha_st)
    if ctx.collect_prefill:  # a static field of the context
      aux["prefill"] = {"alpha": alpha, "omega": omega, "num_k": num_k, "num_v": num_v, "den": den,
                        "wk": omega[..., None] * k.astype(jnp.float32),
                        "wv": omega[..., None] * v.astype(jnp.float32), "k_slot": k_rot, "v_slot": v_acc}
    return self._output(out), None, aux

  def _dms_logits(self, x_BxLxD: Array, q: Array) -> Array:
    """DMS eviction logits [B, L, K]: the adapter on the attention input, or the repurposed query channel."""
    if self.dmc.decisions == "adapter":
      return dms_math.adapter_logits(x_BxLxD, self.decision_adapter(), self.dmc)
    return dms_math.channel_logits(q, self.cfg.n_kv_heads, self.dmc)

  def _dms_rope(self, q: Array, k: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
    """RoPE, with the decision channel of the deciding query heads zeroed before and after it."""
    kv, ch = self.cfg.n_kv_heads, self.ch
    q = dms_math.zero_decision_channel(q, kv, ch)
    q = dms_math.zero_decision_channel(rope.apply_rope(q, cos, sin), kv, ch)
    return q, rope.apply_rope(k, cos, sin)

  def _dms_parallel(self, x, q, k, v, ctx, forced_alpha):
    """DMS over whole sequences: α_t marks token t − 1; key j gets log(1 − α̃_{j+1}) only from queries more than
    w positions later (docs/dmc.md §10)."""
    dmc = self.dmc
    a = self._dms_logits(x, q)
    q, k = self._dms_rope(q, k, ctx.cos, ctx.sin)
    alpha, bias, alpha_st = self._alphas(a, ctx.starts, forced_alpha)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    impl = _backend.for_op(self.cfg.attention_impl, DMC_ATTENTION_IMPLS)
    out = dmc_attention(q, k, v, bias, ctx.segment_ids, implementation=impl, window=dmc.dms_window)
    aux = self._decision_aux(a, alpha_st)
    if ctx.collect_prefill:
      aux["prefill"] = {"alpha": alpha, "k_slot": k, "v_slot": v}
    return self._output(out), None, aux

  @jax.named_scope("attention")
  def decode(self, x_Bx1xD: Array, ctx: DMCDecode, pool: dict, state: dict, layer,
             forced_alpha_BxK: Array | None = None):
    """One token per sequence against the compressed cache: the shared page `pool` and every layer's `state`, of
    which layer `layer`'s is read and updated (see dmc_jax.cache.decode_layer). Returns (out, pool, state)."""
    ch = self.ch
    q, k, v = self._project(x_Bx1xD)
    cos, sin = ctx.cos, ctx.sin
    if self.dmc.method == "dms":
      a = self._dms_logits(x_Bx1xD, q)
      q, k = self._dms_rope(q, k, cos, sin)
      alpha = (a[:, 0] > 0).astype(jnp.float32) if forced_alpha_BxK is None else forced_alpha_BxK
      with jax.named_scope("dms_update"):  # mark the previous token; overwrite the oldest pending slot or append
        pool, state = dms_cache.decode_layer(pool, state, layer=layer, positions_B=ctx.positions, k_BxKxD=k[:, 0],
                                             v_BxKxD=v[:, 0], alpha_BxK=alpha)
    else:
      a, omega = self._decide(x_Bx1xD, q, k)
      q, k = dmc_math.scale_channel(q, ch, 0), dmc_math.scale_channel(k, ch, 0)
      # Decode never sees a sequence's first token (the prompt has at least one), so no start rule is needed.
      alpha = (a[:, 0] > 0).astype(jnp.float32) if forced_alpha_BxK is None else forced_alpha_BxK
      with jax.named_scope("dmc_update"):  # the merge/append of this token's key and value
        pool, state = dmc_cache.decode_layer(pool, state, layer=layer, positions_B=ctx.positions, k_BxKxD=k[:, 0],
                                             v_BxKxD=v[:, 0], alpha_BxK=alpha, omega_BxK=omega[:, 0],
                                             cos_BxD=cos[:, 0], sin_BxD=sin[:, 0], ch=ch)
      q = dmc_math.scale_channel(rope.apply_rope(q, cos, sin), ch, 0)
    b, _, h, d = q.shape
    kv = self.cfg.n_kv_heads
    table, lengths = state["block_table"][layer], state["lengths"][layer]
    with jax.named_scope("paged_attention"):  # the page gather and the attention over the pages in use
      out = paged_decode_attention(q.reshape(b * kv, h // kv, d), pool["k_pages"], pool["v_pages"],
                                   table.reshape(b * kv, -1), lengths.reshape(-1),
                                   implementation=self.cfg.attention_impl)
    return self._output(out.reshape(b, 1, h, d)), pool, state
