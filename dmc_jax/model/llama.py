"""Llama in Flax Linen: RMSNorm, rotate-half RoPE, MHA/GQA/MQA, SwiGLU, tied or untied embeddings.

Pure functional (`init`/`apply`). Every parameter carries logical axis names (see `dmc_jax.sharding`), every
large activation a logical constraint (a no-op without a mesh). Two entry points:

* `Llama.__call__(tokens, positions, segment_ids)` — the parallel forward used by training and evaluation;
  segment ids keep packed documents apart (no attention across them, positions restart at 0).
* `Llama.forward_with_cache(tokens, positions, cache, cache_index)` — prefill or decode against a vanilla KV
  cache: sequence b writes its L new keys at slots cache_index[b] .. cache_index[b]+L-1 and attends to every
  slot ≤ its own, so prompts of different lengths share a batch.

Parameter tree (unscanned): embed/embedding [V,D]; layers_i/{attn_norm,mlp_norm}/scale [D];
layers_i/attn/{q_proj [D,H,Dh], k_proj [D,KV,Dh], v_proj [D,KV,Dh], o_proj [H,Dh,D]}/kernel;
layers_i/mlp/{gate [D,F], up [D,F], down [F,D]}/kernel; final_norm/scale; lm_head/kernel [D,V] (untied).
With `scan_layers` the layers are stacked under `layers` with a leading 'layers' axis.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmc_jax.config import LlamaConfig
from dmc_jax.model import rope

Array = jax.Array
# Vanilla KV cache. Unscanned model: one {'k','v'} dict per layer, each [B, KV, S, Dh] (separate buffers, so
# a donated decode step updates them in place). Scanned model: one dict of [layers, B, KV, S, Dh] arrays.
KVCache = Any

_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_INIT = nn.initializers.normal(stddev=0.02)


def _constrain(x: Array, names: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


class Kernel(nn.Module):
  """A named weight tensor with logical axes (the projection itself is an einsum at the call site)."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: Any
  init: Callable = _INIT

  @nn.compact
  def __call__(self) -> Array:
    return self.param("kernel", nn.with_logical_partitioning(self.init, self.axes), self.shape, self.param_dtype)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * y).astype(self.dtype)


def attend(q_BxLxHxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array, mask_BxLxS: Array) -> Array:
  """Softmax attention with GQA (query head h uses KV head h // G); float32 softmax. Returns [B, L, H, D]."""
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxSxKxD.shape[2]
  q = q_BxLxHxD.reshape(b, l, kv, h // kv, d)
  logits = jnp.einsum("blkgd,bskd->bkgls", q, k_BxSxKxD, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  logits = jnp.where(mask_BxLxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxD, preferred_element_type=jnp.float32)
  return out.reshape(b, l, h, d).astype(q_BxLxHxD.dtype)


class Attention(nn.Module):
  cfg: LlamaConfig

  def setup(self):
    c = self.cfg
    pd = jnp.dtype(c.param_dtype)
    self.q_proj = Kernel((c.d_model, c.n_heads, c.head_dim), ("embed", "q_heads", "kv"), pd)
    self.k_proj = Kernel((c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), pd)
    self.v_proj = Kernel((c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), pd)
    self.o_proj = Kernel((c.n_heads, c.head_dim, c.d_model), ("q_heads", "kv", "embed"), pd)

  def __call__(self, x_BxLxD: Array, cos: Array, sin: Array, mask_BxLxS: Array,
               cache: KVCache | None = None, cache_index_B: Array | None = None):
    dt = jnp.dtype(self.cfg.dtype)
    x = x_BxLxD.astype(dt)
    q_BxLxHxD = jnp.einsum("bld,dhk->blhk", x, self.q_proj().astype(dt))
    k_BxLxKxD = jnp.einsum("bld,dhk->blhk", x, self.k_proj().astype(dt))
    v_BxLxKxD = jnp.einsum("bld,dhk->blhk", x, self.v_proj().astype(dt))
    q_BxLxHxD = rope.apply_rope(q_BxLxHxD, cos, sin)
    k_BxLxKxD = rope.apply_rope(k_BxLxKxD, cos, sin)
    q_BxLxHxD = _constrain(q_BxLxHxD, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    if cache is None:
      keys, values, new_cache = k_BxLxKxD, v_BxLxKxD, None
    else:
      new_cache = write_cache(cache, k_BxLxKxD, v_BxLxKxD, cache_index_B)
      keys = new_cache["k"].transpose(0, 2, 1, 3)
      values = new_cache["v"].transpose(0, 2, 1, 3)
    out_BxLxHxD = attend(q_BxLxHxD, keys, values, mask_BxLxS)
    out_BxLxD = jnp.einsum("blhk,hkd->bld", out_BxLxHxD, self.o_proj().astype(dt))
    return _constrain(out_BxLxD, ("activation_batch", "activation_length", "activation_embed")), new_cache


def write_cache(cache: KVCache, k_BxLxKxD: Array, v_BxLxKxD: Array, cache_index_B: Array) -> KVCache:
  """Writes L new entries per sequence at slots cache_index[b] + (0..L-1). Cache layout [B, KV, S, Dh]."""
  b, l = k_BxLxKxD.shape[:2]
  slots_BxL = cache_index_B[:, None] + jnp.arange(l)[None, :]
  batch_BxL = jnp.broadcast_to(jnp.arange(b)[:, None], (b, l))
  def put(buf, new_BxLxKxD):
    # Advanced indices (batch, slot) around a slice move to the front: the update is [B, L, KV, Dh].
    return buf.at[batch_BxL, :, slots_BxL].set(new_BxLxKxD.astype(buf.dtype), mode="drop")
  return {"k": put(cache["k"], k_BxLxKxD), "v": put(cache["v"], v_BxLxKxD)}


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    c = self.cfg
    dt, pd = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    gate = Kernel((c.d_model, c.ffn_dim), ("embed", "mlp"), pd, name="gate")()
    up = Kernel((c.d_model, c.ffn_dim), ("embed", "mlp"), pd, name="up")()
    down = Kernel((c.ffn_dim, c.d_model), ("mlp", "embed"), pd, name="down")()
    x = x_BxLxD.astype(dt)
    h_BxLxF = jax.nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))
    h_BxLxF = _constrain(h_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
    return h_BxLxF @ down.astype(dt)


class DecoderLayer(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array, cos: Array, sin: Array, mask_BxLxS: Array,
               cache: KVCache | None = None, cache_index_B: Array | None = None):
    c = self.cfg
    dt, pd = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, pd, dt, name="attn_norm")(x_BxLxD)
    attn_out, new_cache = Attention(c, name="attn")(h, cos, sin, mask_BxLxS, cache, cache_index_B)
    x_BxLxD = x_BxLxD + attn_out.astype(x_BxLxD.dtype)
    h = RMSNorm(c.rms_norm_eps, pd, dt, name="mlp_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + MLP(c, name="mlp")(h).astype(x_BxLxD.dtype)
    x_BxLxD = _constrain(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BxLxD, new_cache


class _ScanBody(nn.Module):
  """Adapts DecoderLayer to nn.scan's (carry, xs) -> (carry, ys) shape."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_index_B, layer_cache):
    layer = DecoderLayer
    if self.cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=_REMAT_POLICIES[self.cfg.remat_policy], prevent_cse=False)
    return layer(self.cfg, name="layer")(x, cos, sin, mask, layer_cache, cache_index_B)


def positions_from_segments(segment_ids_BxL: Array) -> Array:
  """Positions that restart at 0 at every document start of a packed row."""
  l = segment_ids_BxL.shape[1]
  idx = jnp.arange(l)[None, :]
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], bool),
                            segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  first_BxL = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - first_BxL


class Llama(nn.Module):
  cfg: LlamaConfig

  def setup(self):
    c = self.cfg
    pd = jnp.dtype(c.param_dtype)
    self.embed = Kernel((c.vocab_size, c.d_model), ("vocab", "embed"), pd, init=nn.initializers.normal(1.0),
                        name="embed")
    if c.scan_layers:
      self.layers = nn.scan(
          _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
          length=c.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
    else:
      layer = DecoderLayer
      if c.remat_policy != "none":
        layer = nn.remat(layer, policy=_REMAT_POLICIES[c.remat_policy])
      self.blocks = [layer(c, name=f"layers_{i}") for i in range(c.n_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, pd, jnp.dtype(c.dtype))
    if not c.tie_embeddings:
      self.lm_head = Kernel((c.d_model, c.vocab_size), ("embed", "vocab"), pd)

  def _embed(self, tokens_BxL: Array) -> Array:
    table = self.embed()
    if table.shape[0] != self.cfg.vocab_size:
      raise ValueError(f"embedding has {table.shape[0]} rows, config says vocab_size={self.cfg.vocab_size}")
    x = jnp.take(table, tokens_BxL, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return _constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def _logits(self, x_BxLxD: Array) -> Array:
    x = self.final_norm(x_BxLxD)
    dt = jnp.dtype(self.cfg.dtype)
    if self.cfg.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, self.embed().astype(dt), preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("bld,dv->blv", x, self.lm_head().astype(dt), preferred_element_type=jnp.float32)
    return _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

  def _run_layers(self, x, cos, sin, mask, cache, cache_index_B):
    if self.cfg.scan_layers:
      x, new_cache = self.layers(x, cos, sin, mask, cache_index_B, cache)
      return x, new_cache
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, cos, sin, mask, None if cache is None else cache[i], cache_index_B)
      new_cache.append(layer_cache)
    return x, None if cache is None else new_cache

  def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
               segment_ids_BxL: Array | None = None) -> Array:
    """Parallel forward: float32 logits [B, L, V]. Segment ids separate packed documents."""
    b, l = tokens_BxL.shape
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    if positions_BxL is None:
      positions_BxL = positions_from_segments(segment_ids_BxL)
    idx = jnp.arange(l)
    mask_BxLxL = (idx[None, :, None] >= idx[None, None, :]) & (
        segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    cos, sin = rope.cos_sin(positions_BxL, self.cfg)
    x, _ = self._run_layers(self._embed(tokens_BxL), cos, sin, mask_BxLxL, None, None)
    return self._logits(x)

  def forward_with_cache(self, tokens_BxL: Array, cache: KVCache, cache_index_B: Array,
                         positions_BxL: Array | None = None) -> tuple[Array, KVCache]:
    """Prefill/decode: appends L tokens per sequence at its own cache index; returns (logits, cache)."""
    l = tokens_BxL.shape[1]
    s = (cache["k"] if self.cfg.scan_layers else cache[0]["k"]).shape[-2]
    slots_BxL = cache_index_B[:, None] + jnp.arange(l)[None, :]
    if positions_BxL is None:
      positions_BxL = slots_BxL
    mask_BxLxS = jnp.arange(s)[None, None, :] <= slots_BxL[:, :, None]
    cos, sin = rope.cos_sin(positions_BxL, self.cfg)
    x, new_cache = self._run_layers(self._embed(tokens_BxL), cos, sin, mask_BxLxS, cache, cache_index_B)
    return self._logits(x), new_cache


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty vanilla cache for `max_len` slots per sequence (layout: see KVCache)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.n_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def cache_bytes(cache: KVCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
