"""The Llama forward with an eviction policy in every attention layer, and its token-by-token decode step.

Built from the model's own Flax modules (norms, projections, MLP) applied per layer inside a `lax.scan` over
stacked layer parameters, so one layer body is compiled and `dmc_jax.model` needs no policy code.

* `forward` — the parallel evaluation forward (exact; see `policies`): logits and the cache size kept per step.
* `prefill` / `decode` — `generate` with a policy: a vanilla-sized cache plus the policy's keep mask. Evicted
  entries are masked, not freed: this reproduces the policy's effect on quality, not its memory saving.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dmc_jax.baselines import policies
from dmc_jax.baselines.policies import Policy
from dmc_jax.config import LlamaConfig
from dmc_jax.model import rope
from dmc_jax.model.attention import Attention
from dmc_jax.model.llama import DecoderLayer, Llama, RMSNorm, positions_from_segments

Array = jax.Array


def stack_params(cfg: LlamaConfig, params: Any) -> Any:
  """An unscanned checkpoint's tree with its layers also stacked under "layers" (do it once, outside jit:
  stacking inside a decode step would copy every weight per step). Idempotent."""
  p = params["params"]
  if "layers" in p:
    return params
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[f"layers_{i}"] for i in range(cfg.n_layers)])
  return {"params": {**{k: v for k, v in p.items() if not k.startswith("layers_")}, "layers": stacked}}


def _layers(cfg: LlamaConfig, params: Any) -> Any:
  return stack_params(cfg, params)["params"]["layers"]


def _qkv(cfg: LlamaConfig, p_layer: Any, x_BxLxD: Array, positions_BxL: Array):
  norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype))
  h = norm.apply({"params": p_layer["attn_norm"]}, x_BxLxD)
  q, k, v = Attention(cfg).apply({"params": p_layer["attn"]}, h, method=Attention._project)
  cos, sin = rope.cos_sin(positions_BxL, cfg)
  return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v


def _finish(cfg: LlamaConfig, p_layer: Any, x_BxLxD: Array, attn_BxLxHxD: Array) -> Array:
  x = x_BxLxD + Attention(cfg).apply({"params": p_layer["attn"]}, attn_BxLxHxD,
                                     method=Attention._output).astype(x_BxLxD.dtype)
  return DecoderLayer(cfg).apply({"params": p_layer}, x, method=DecoderLayer._mlp_block)


def _unscanned(cfg: LlamaConfig) -> LlamaConfig:
  return cfg.replace(scan_layers=False, remat_policy="none")


def forward(cfg: LlamaConfig, policy: Policy, params: Any, tokens_BxL: Array, segment_ids_BxL: Array | None = None,
            lengths_B: Array | None = None, collect_cache: bool = False):
  """Parallel forward of an unscanned checkpoint under `policy`.

  Returns (logits [B, L, V], kept [layers, B, L, KV]); with collect_cache also {"k", "v": [layers, B, KV, L, D],
  "keep", "score": [layers, B, KV, L]} (the state after each row's last active step; see `prefill`).
  """
  cfg = _unscanned(cfg)
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.ones_like(tokens_BxL)
  positions = positions_from_segments(segment_ids_BxL)
  model = Llama(cfg)
  x = model.apply(params, tokens_BxL, method=Llama._embed)

  def layer(x, p):
    q, k, v = _qkv(cfg, p, x, positions)
    out, kept, state = policies.attend(policy, q, k, v, segment_ids_BxL, lengths_B)
    ys = {"kept": kept}
    if collect_cache:
      ys.update(k=jnp.swapaxes(k, 1, 2), v=jnp.swapaxes(v, 1, 2), **state)
    return _finish(cfg, p, x, out), ys

  x, ys = jax.lax.scan(layer, x, _layers(cfg, params))
  logits = model.apply(params, x, method=Llama._logits)
  kept = ys.pop("kept")
  return (logits, kept, ys) if collect_cache else (logits, kept)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
  """A vanilla-sized cache [layers, B, KV, S, D] and the policy state [layers, B, KV, S]."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
  state = policies.init_state(batch, cfg.n_kv_heads, max_len)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          **{n: jnp.broadcast_to(a, (cfg.n_layers,) + a.shape) for n, a in state.items()}}


def prefill(cfg: LlamaConfig, policy: Policy, params: Any, tokens_BxP: Array, lengths_B: Array, cache: dict):
  """Right-padded prompts through the parallel forward; fills the cache's first P slots. Returns (logits, cache)."""
  logits, _, c = forward(cfg, policy, params, tokens_BxP, lengths_B=lengths_B, collect_cache=True)
  p = tokens_BxP.shape[1]
  cache = {n: cache[n].at[:, :, :, :p].set(c[n].astype(cache[n].dtype)) for n in cache}
  return logits, cache


def decode(cfg: LlamaConfig, policy: Policy, params: Any, tokens_B: Array, index_B: Array, cache: dict):
  """One token per sequence at slot = position `index` (no packing). Returns (logits [B, V], cache)."""
  cfg = _unscanned(cfg)
  model = Llama(cfg)
  b = tokens_B.shape[0]
  s = cache["k"].shape[3]
  x = model.apply(params, tokens_B[:, None], method=Llama._embed)
  slot_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  batch = jnp.arange(b)

  def layer(x, xs):
    p, c = xs
    q, k, v = _qkv(cfg, p, x, index_B[:, None])
    ck = c["k"].at[batch, :, index_B].set(k[:, 0].astype(c["k"].dtype))
    cv = c["v"].at[batch, :, index_B].set(v[:, 0].astype(c["v"].dtype))
    kv, d = ck.shape[1], ck.shape[-1]
    qg = q[:, 0].reshape(b, kv, -1, d)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, ck, preferred_element_type=jnp.float32) * (d ** -0.5)
    probs, state = policies.step(policy, {"keep": c["keep"], "score": c["score"]}, logits, index_B, index_B + 1,
                                 slot_pos)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(cv.dtype), cv, preferred_element_type=jnp.float32)
    out = out.reshape(b, 1, -1, d).astype(q.dtype)
    return _finish(cfg, p, x, out), {"k": ck, "v": cv, **state}

  x, cache = jax.lax.scan(layer, x, (_layers(cfg, params), cache))
  return model.apply(params, x, method=Llama._logits)[:, 0], cache
