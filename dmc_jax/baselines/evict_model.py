"""The Llama forward with an eviction policy in every attention layer, and its token-by-token decode step.

Built from the model's own Flax modules (norms, projections, MLP) applied per layer inside a `lax.scan` over
stacked layer parameters, so one layer body is compiled and `dmc_jax.model` needs no policy code.

* `forward` — the parallel evaluation forward (exact; see `policies`): logits and the cache size kept per step.
* `init_cache` / `prefill` / `decode` — `generate` with a policy in a compact cache: per (layer, sequence, KV
  head) budget(max_len) + 1 slots instead of max_len; an evicted entry's slot takes the next token, so the memory
  saving is real (≈ 1/CR of vanilla's, plus 9 bytes of policy state a slot). Like the vanilla generator's cache it
  is one set of buffers per layer and the decode step unrolls the layers: under donation each step writes one slot
  per (layer, sequence, KV head) in place (a scan over a stacked cache would restack — copy — all of it per step).
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


def _layer(params: Any, i: int) -> Any:
  """Layer i's parameters from an unscanned tree (as it lies), or sliced from a stacked one."""
  p = params["params"]
  return p[f"layers_{i}"] if f"layers_{i}" in p else jax.tree.map(lambda a: a[i], p["layers"])


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


def capacity(policy: Policy, max_len: int) -> int:
  """Slots per (layer, sequence, KV head) of `generate`'s cache: the budget after max_len tokens plus one for the
  incoming token (a step holds kept ∪ {new} until it evicts). Never more than vanilla's max_len."""
  return min(max_len, policy.budget(max_len) + 1)


def init_cache(cfg: LlamaConfig, policy: Policy, batch: int, max_len: int, dtype=None) -> list[dict]:
  """The compact cache, one dict per layer: k, v [B, KV, C, D] with C = `capacity` slots, per slot keep (held),
  score (H2O's accumulated attention) and pos (its token's position; slots are reused, so their order is not
  positional)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  c = capacity(policy, max_len)
  shape = (batch, cfg.n_kv_heads, c)
  return [{"k": jnp.zeros(shape + (cfg.head_dim,), dtype), "v": jnp.zeros(shape + (cfg.head_dim,), dtype),
           "keep": jnp.zeros(shape, bool), "score": jnp.zeros(shape, jnp.float32), "pos": jnp.zeros(shape, jnp.int32)}
          for _ in range(cfg.n_layers)]


def prefill(cfg: LlamaConfig, policy: Policy, params: Any, tokens_BxP: Array, lengths_B: Array, cache: list[dict]):
  """Right-padded prompts through the exact parallel forward (P × P logits, transient), then each row's kept
  entries are gathered into the first slots of the compact cache (a prompt of n tokens keeps budget(n) ≤ C − 1).
  Returns (logits, cache)."""
  logits, _, c = forward(cfg, policy, params, tokens_BxP, lengths_B=lengths_B, collect_cache=True)
  cap, p = cache[0]["k"].shape[2], tokens_BxP.shape[1]
  width = max(p, cap)
  pad = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, width - p)] + [(0, 0)] * (a.ndim - 4))
  c = {n: pad(a) for n, a in c.items()}
  # Kept slots first, in position order (stable); slot j of the parallel forward holds position j.
  order = jnp.argsort(~c["keep"], axis=-1, stable=True)[..., :cap]
  take = lambda a: jnp.take_along_axis(a, order[..., None] if a.ndim == 5 else order, axis=3)
  compact = dict({n: take(a).astype(cache[0][n].dtype) for n, a in c.items()}, pos=order.astype(jnp.int32))
  return logits, [{n: a[i] for n, a in compact.items()} for i in range(cfg.n_layers)]


def decode(cfg: LlamaConfig, policy: Policy, params: Any, tokens_B: Array, index_B: Array, cache: list[dict]):
  """One token per sequence at position `index` (no packing): it takes a free slot of each (layer, KV head), the
  policy evicts, and that slot is free for the next step. Layers unrolled over the per-layer buffers (updated in
  place under donation). Returns (logits [B, V], cache)."""
  cfg = _unscanned(cfg)
  model = Llama(cfg)
  b = tokens_B.shape[0]
  x = model.apply(params, tokens_B[:, None], method=Llama._embed)
  rows_Bx1, heads_1xK = jnp.arange(b)[:, None], jnp.arange(cfg.n_kv_heads)[None, :]
  new_cache = []
  for i, c in enumerate(cache):
    p = _layer(params, i)
    q, k, v = _qkv(cfg, p, x, index_B[:, None])
    slot_BxK = jnp.argmin(c["keep"], axis=-1)  # a free slot: at most C − 1 are held between steps
    # One slot per (row, head), in order: unique sorted indices let XLA:CPU write in place (see write_cache).
    def put(buf, new, slot_BxK=slot_BxK):
      return buf.at[rows_Bx1, heads_1xK, slot_BxK].set(new.astype(buf.dtype), indices_are_sorted=True,
                                                       unique_indices=True)
    ck, cv = put(c["k"], k[:, 0]), put(c["v"], v[:, 0])
    pos = put(c["pos"], jnp.broadcast_to(index_B[:, None], slot_BxK.shape))
    kv, d = ck.shape[1], ck.shape[-1]
    qg = q[:, 0].reshape(b, kv, -1, d)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, ck, preferred_element_type=jnp.float32) * (d ** -0.5)
    probs, state = policies.step(policy, {"keep": c["keep"], "score": c["score"]}, logits, slot_BxK, index_B + 1,
                                 pos)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(cv.dtype), cv, preferred_element_type=jnp.float32)
    x = _finish(cfg, p, x, out.reshape(b, 1, -1, d).astype(q.dtype))
    new_cache.append({"k": ck, "v": cv, "pos": pos, **state})
  return model.apply(params, x, method=Llama._logits)[:, 0], new_cache
