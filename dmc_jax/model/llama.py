"""Llama in Flax Linen: RMSNorm, rotate-half RoPE, MHA/GQA/MQA, SwiGLU, tied or untied embeddings.

Pure functional (`init`/`apply`). Every parameter carries logical axis names (mapped to mesh axes by the caller's
`nn.logical_axis_rules`), every large activation a logical constraint (a no-op without a mesh). Entry points, one
per mode (`dmc_jax.model.modes`: each has its own typed context, and all of them run the same layer loop):

* `Llama.__call__(tokens, positions, segment_ids)` — the parallel forward used by training and evaluation;
  segment ids keep packed documents apart (no attention across them, positions restart at 0). With a DMC
  mode ("train" relaxed, "eval" hard) it returns (logits, aux) where aux["alpha"] is [layers, B, L, K].
* `Llama.forward_with_cache(tokens, cache, cache_index)` — prefill or decode against a vanilla KV
  cache: sequence b writes its L new keys at slots cache_index[b] .. cache_index[b]+L-1 and attends to every
  slot ≤ its own, so prompts of different lengths share a batch.
* `Llama.prefill_dmc(tokens, lengths, cache)` — the eval-mode forward that fills the compressed DMC cache.
* `Llama.decode_dmc(tokens, cache)` — one step against the compressed DMC cache.

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

from dmc_jax import cache as dmc_cache
from dmc_jax import dmc as dmc_math
from dmc_jax import dms_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model import modes, rope
from dmc_jax.model.attention import Attention, Kernel, constrain

Array = jax.Array
# Vanilla KV cache. Unscanned model: one {'k','v'} dict per layer, each [B, KV, S, Dh] (separate buffers, so
# a donated decode step updates them in place). Scanned model: one dict of [layers, B, KV, S, Dh] arrays.
KVCache = Any

_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def cache_lib(dmc: DMCConfig):
  """The compressed cache's module for a method: `dmc_jax.cache` (DMC) or `dmc_jax.dms_cache` (DMS); both offer
  init_cache, prefill_layer, decode_layer, pool_of, layers_of, check, realised_cr and memory_bytes."""
  return dms_cache if dmc.method == "dms" else dmc_cache


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(acc)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(acc) * y).astype(self.dtype)


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
    h_BxLxF = constrain(h_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
    return h_BxLxF @ down.astype(dt)


class DecoderLayer(nn.Module):
  """One transformer block, in every mode. `__call__(carry, ctx, layer_xs) -> (carry, layer_ys)` is the one
  layer function the layer loop (scanned or unrolled) calls; the static `ctx.mode` picks what flows:

  * PARALLEL       carry {"x"};         xs {"forced_alpha"};           ys {"aux"} (DMC: alpha; None for vanilla)
  * VANILLA_CACHE  carry {"x"};         xs {"cache"};                  ys {"cache"}
  * DMC_PREFILL    carry {"x", "pool"}; xs {"state", "forced_alpha"};  ys {"state", "aux"}
  * DMC_DECODE     carry {"x", "pool", "state"}; xs {"layer", "forced_alpha"}; ys {}

  The pool (shared by every layer) rides in the carry. A prefill fills each layer's slice as xs/ys; a decode
  step carries every layer's state whole and updates layer `layer`'s entries in place (restacking it as xs/ys
  would copy the whole merge state every step; see dmc_jax.cache.decode_layer).
  """

  cfg: LlamaConfig
  dmc: DMCConfig | None = None
  dmc_mode: str = "off"

  def setup(self):
    c = self.cfg
    dt, pd = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.attn_norm = RMSNorm(c.rms_norm_eps, pd, dt)
    self.attn = Attention(c, self.dmc, self.dmc_mode)
    self.mlp_norm = RMSNorm(c.rms_norm_eps, pd, dt)
    self.mlp = MLP(c)

  @jax.named_scope("mlp")  # the profiler scopes: docs/profiling.md
  def _mlp_block(self, x_BxLxD: Array) -> Array:
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)).astype(x_BxLxD.dtype)
    return constrain(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))

  def __call__(self, carry: dict, ctx: modes.Context, layer_xs: dict):
    x = carry["x"]
    if ctx.mode in (modes.Mode.PARALLEL, modes.Mode.VANILLA_CACHE):
      x, cache, aux = self.block(x, ctx, layer_xs.get("cache"), layer_xs.get("forced_alpha"))
      return {"x": x}, ({"aux": aux} if ctx.mode is modes.Mode.PARALLEL else {"cache": cache})
    h = self.attn_norm(x)
    if ctx.mode is modes.Mode.DMC_PREFILL:
      attn_out, _, aux = self.attn(h, ctx.parallel, None, layer_xs.get("forced_alpha"))
      pool, state = cache_lib(self.dmc).prefill_layer(carry["pool"], layer_xs["state"], aux.pop("prefill"),
                                                      ctx.lengths)
      ys = {"state": state, "aux": aux}
    elif ctx.mode is modes.Mode.DMC_DECODE:
      attn_out, pool, state = self.attn.decode(h, ctx, carry["pool"], carry["state"], layer_xs["layer"],
                                               layer_xs.get("forced_alpha"))
      return {"x": self._mlp_block(x + attn_out.astype(x.dtype)), "pool": pool, "state": state}, {}
    else:
      raise ValueError(f"unknown mode {ctx.mode}")
    return {"x": self._mlp_block(x + attn_out.astype(x.dtype)), "pool": pool}, ys

  def block(self, x_BxLxD: Array, ctx, cache, forced_alpha):
    """Parallel / vanilla-cache block: the part `remat_policy` rematerialises (see `_remat`)."""
    attn_out, cache, aux = self.attn(self.attn_norm(x_BxLxD), ctx, cache, forced_alpha)
    return self._mlp_block(x_BxLxD + attn_out.astype(x_BxLxD.dtype)), cache, aux


def _remat(cfg: LlamaConfig, scanned: bool):
  """DecoderLayer, with `block` (the parallel and vanilla-cache modes) rematerialised under cfg.remat_policy.
  The DMC cache modes are inference only: nothing to rematerialise."""
  if cfg.remat_policy == "none":
    return DecoderLayer
  # Inside a scan CSE across iterations is impossible anyway, so prevent_cse's barriers only cost.
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not scanned,
                  methods=["block"])


class _ScanBody(nn.Module):
  """Adapts DecoderLayer to nn.scan (its parameters stay under layers/layer/...)."""

  cfg: LlamaConfig
  dmc: DMCConfig | None = None
  dmc_mode: str = "off"

  @nn.compact
  def __call__(self, carry, ctx, layer_xs):
    return _remat(self.cfg, scanned=True)(self.cfg, self.dmc, self.dmc_mode, name="layer")(carry, ctx, layer_xs)


def positions_from_segments(segment_ids_BxL: Array) -> Array:
  """Positions that restart at 0 at every document start of a packed row."""
  l = segment_ids_BxL.shape[1]
  idx = jnp.arange(l)[None, :]
  first_BxL = jax.lax.cummax(jnp.where(dmc_math.document_starts(segment_ids_BxL), idx, 0), axis=1)
  return idx - first_BxL


class Llama(nn.Module):
  cfg: LlamaConfig
  dmc: DMCConfig | None = None
  dmc_mode: str = "off"  # "off" (vanilla), "train" (relaxed decisions; needs rngs={"dmc": key}) or "eval" (hard)

  def setup(self):
    c = self.cfg
    pd = jnp.dtype(c.param_dtype)
    self.embed = Kernel((c.vocab_size, c.d_model), ("vocab", "embed"), pd, init=nn.initializers.normal(1.0),
                        name="embed")
    if c.scan_layers:
      self.layers = nn.scan(
          _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dmc": True},
          in_axes=(nn.broadcast, 0), length=c.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, self.dmc, self.dmc_mode, name="layers")
    else:
      layer = _remat(c, scanned=False)
      self.blocks = [layer(c, self.dmc, self.dmc_mode, name=f"layers_{i}") for i in range(c.n_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, pd, jnp.dtype(c.dtype))
    if not c.tie_embeddings:
      self.lm_head = Kernel((c.d_model, c.vocab_size), ("embed", "vocab"), pd)

  def _embed(self, tokens_BxL: Array) -> Array:
    table = self.embed()
    if table.shape[0] != self.cfg.vocab_size:
      raise ValueError(f"embedding has {table.shape[0]} rows, config says vocab_size={self.cfg.vocab_size}")
    x = jnp.take(table, tokens_BxL, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  @jax.named_scope("logits")
  def _logits(self, x_BxLxD: Array) -> Array:
    x = self.final_norm(x_BxLxD)
    dt = jnp.dtype(self.cfg.dtype)
    acc = jnp.promote_types(dt, jnp.float32)
    if self.cfg.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, self.embed().astype(dt), preferred_element_type=acc)
    else:
      logits = jnp.einsum("bld,dv->blv", x, self.lm_head().astype(dt), preferred_element_type=acc)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

  @jax.named_scope("layers")
  def _run_layers(self, carry: dict, ctx: modes.Context, layers_xs: dict):
    """The layer loop, for every mode: `DecoderLayer.__call__` over the layers, scanned or unrolled.

    layers_xs: name -> None, or per-layer values — stacked on axis 0 (arrays or trees of arrays), or a list with
    one entry per layer (the unscanned vanilla cache: separate buffers, updated in place). Returns (carry,
    per-layer outputs): stacked by nn.scan, or a list of dicts when unrolled (see `_stacked`).
    """
    if self.cfg.scan_layers:
      return self.layers(carry, ctx, layers_xs)
    def at(v, i):
      if v is None or isinstance(v, list):
        return None if v is None else v[i]
      return jax.tree.map(lambda a: a[i], v)
    ys = []
    for i, block in enumerate(self.blocks):
      carry, y = block(carry, ctx, {k: at(v, i) for k, v in layers_xs.items()})
      ys.append(y)
    return carry, ys

  def _stacked(self, ys, name: str):
    """Per-layer output `name` stacked on axis 0, whether the layers were scanned or unrolled."""
    if self.cfg.scan_layers:
      return ys[name]
    return jax.tree.map(lambda *a: jnp.stack(a), *[y[name] for y in ys])

  def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
               segment_ids_BxL: Array | None = None, *, forced_alpha: Array | None = None,
               fade: Array | None = None, collect_prefill: bool = False, hidden: bool = False):
    """Parallel forward: float32 logits [B, L, V]; with a DMC mode, (logits, aux).

    hidden: return the last layer's output [B, L, D] (before the final norm) instead of the logits; `head` maps it
    to logits (a loss can then materialise the vocabulary-sized logits a chunk of tokens at a time).
    forced_alpha [layers, B, L, K]: hard decisions to use instead of the model's (tests, benchmarks).
    fade: stage-1 multiplier of channel ch (vanilla mode). collect_prefill: aux["prefill"] holds every layer's
    per-position DMC states (what `dmc_jax.cache.prefill_layer` consumes; `prefill_dmc` never stacks them).
    """
    ctx = self._parallel_ctx(tokens_BxL, positions_BxL, segment_ids_BxL, fade=fade, collect_prefill=collect_prefill)
    carry, ys = self._run_layers({"x": self._embed(tokens_BxL)}, ctx, {"forced_alpha": forced_alpha})
    logits = carry["x"] if hidden else self._logits(carry["x"])
    if self.dmc_mode == "off":
      return logits
    return logits, self._stacked(ys, "aux")

  def head(self, x_BxLxD: Array) -> Array:
    """Final norm and output projection of `__call__(..., hidden=True)`'s output: float32 logits."""
    return self._logits(x_BxLxD)

  def _parallel_ctx(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, fade=None,
                    collect_prefill: bool = False) -> modes.Parallel:
    b, l = tokens_BxL.shape
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    if positions_BxL is None:
      positions_BxL = positions_from_segments(segment_ids_BxL)
    idx = jnp.arange(l)
    mask_BxLxL = (idx[None, :, None] >= idx[None, None, :]) & (
        segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    cos, sin = rope.cos_sin(positions_BxL, self.cfg)
    return modes.Parallel(cos=cos, sin=sin, segment_ids=segment_ids_BxL,
                          starts=dmc_math.document_starts(segment_ids_BxL), mask=mask_BxLxL, fade=fade,
                          collect_prefill=collect_prefill)

  def _dmc_cache_pass(self, x, ctx: modes.DMCPrefill | modes.DMCDecode, cache, forced_alpha):
    """The layer loop against the compressed cache, the pool threaded through: a prefill fills each layer's
    slice (xs/ys); a decode step carries the whole state (updated in place, layer by layer)."""
    lib = cache_lib(self.dmc)
    pool, states = lib.pool_of(cache), lib.layers_of(cache)
    if ctx.mode is modes.Mode.DMC_DECODE:
      layer = jnp.arange(self.cfg.n_layers, dtype=jnp.int32)
      carry, ys = self._run_layers({"x": x, "pool": pool, "state": states}, ctx,
                                   {"layer": layer, "forced_alpha": forced_alpha})
      return carry["x"], cache.replace(**carry["pool"], **carry["state"]), ys
    carry, ys = self._run_layers({"x": x, "pool": pool}, ctx, {"state": states, "forced_alpha": forced_alpha})
    return carry["x"], cache.replace(**carry["pool"], **self._stacked(ys, "state")), ys

  def prefill_dmc(self, tokens_BxP: Array, lengths_B: Array, cache, forced_alpha: Array | None = None):
    """Eval-mode forward over right-padded prompts that fills the compressed cache layer by layer.

    Returns (logits [B, P, V], cache, aux) with aux["alpha"] [layers, B, P, K]. Only one layer's per-position
    states exist at a time (a stacked collection would be ~6 × layers × B·P·K·D floats).
    """
    if self.dmc_mode != "eval":
      raise ValueError("prefill_dmc needs dmc_mode='eval' (hard, noiseless decisions)")
    ctx = modes.DMCPrefill(parallel=self._parallel_ctx(tokens_BxP, collect_prefill=True), lengths=lengths_B)
    x, cache, ys = self._dmc_cache_pass(self._embed(tokens_BxP), ctx, cache, forced_alpha)
    return self._logits(x), cache.replace(positions=lengths_B.astype(jnp.int32)), self._stacked(ys, "aux")

  def forward_with_cache(self, tokens_BxL: Array, cache: KVCache, cache_index_B: Array,
                         positions_BxL: Array | None = None, fade: Array | None = None) -> tuple[Array, KVCache]:
    """Prefill/decode with the vanilla cache: appends L tokens per sequence at its own index; (logits, cache).

    fade: as in `__call__` (channel ch scaled before and after RoPE; needs the model's DMCConfig)."""
    if self.dmc_mode != "off":
      raise ValueError("forward_with_cache is the vanilla cache path; DMC decodes with decode_dmc")
    l = tokens_BxL.shape[1]
    s = (cache["k"] if self.cfg.scan_layers else cache[0]["k"]).shape[-2]
    slots_BxL = cache_index_B[:, None] + jnp.arange(l)[None, :]
    if positions_BxL is None:
      positions_BxL = slots_BxL
    cos, sin = rope.cos_sin(positions_BxL, self.cfg)
    ctx = modes.VanillaCache(cos=cos, sin=sin, mask=jnp.arange(s)[None, None, :] <= slots_BxL[:, :, None],
                             cache_index=cache_index_B, fade=fade)
    carry, ys = self._run_layers({"x": self._embed(tokens_BxL)}, ctx, {"cache": cache})
    new_cache = ys["cache"] if self.cfg.scan_layers else [y["cache"] for y in ys]
    return self._logits(carry["x"]), new_cache

  def decode_dmc(self, tokens_Bx1: Array, cache, forced_alpha: Array | None = None):
    """One token per sequence against the compressed cache. forced_alpha: [layers, B, K].

    Scanned models compile one layer body (a scan whose carry threads the shared page pool); unscanned models
    unroll the layers.
    """
    cos, sin = rope.cos_sin(cache.positions[:, None], self.cfg)
    ctx = modes.DMCDecode(cos=cos, sin=sin, positions=cache.positions)
    x, cache, _ = self._dmc_cache_pass(self._embed(tokens_Bx1), ctx, cache, forced_alpha)
    return self._logits(x), cache.replace(positions=cache.positions + 1)


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
