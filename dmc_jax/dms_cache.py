"""The DMS KV cache (docs/dmc.md §10): DMC's paged pool, filled by delayed eviction instead of merging.

Every row — one (layer, sequence, KV head) — holds the keys (RoPE applied) and values of the tokens it still
sees, in slots of fixed-size pages of the pool every layer shares (`dmc_jax.cache`'s free stack of pages, block
tables and sticky `overflow` flag, so exhaustion raises `CachePoolExhausted` exactly as DMC's does, and
`dmc_jax.cache.free_rows` frees a sequence's pages alike). Per row a ring of
w + 1 pending entries (slot, evict), indexed by position mod (w + 1), remembers the last w + 1 tokens: when token t
arrives, the decision at t marks entry t − 1, and entry t mod (w + 1) — token t − w − 1, the oldest, now leaving
the window — decides where t goes: if it was marked its slot is overwritten in place by t, otherwise t is
appended. A row never has a hole (no compaction, no fragmentation), and its length only grows on an append.

Prefill is parallel from the hard forward: token t evicts token t − w − 1 iff α_{t−w} = 1, so along each residue
class mod (w + 1) a token takes its predecessor's slot or a fresh one (a cumulative max over the chain), and a
prompt token survives unless the token w + 1 after it, still in the prompt, overwrote it.

The cache exposes what DMC's does — `init_cache`, `prefill_layer`, `decode_layer`, `pool_of`, `layers_of`,
`check`, `realised_cr`, `memory_bytes` — so the generator (and a serving engine) drive either one alike.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache import prefill_rows, write_rows
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import CachePoolExhausted

Array = jax.Array


@flax.struct.dataclass
class DMSCache:
  k_pages: Array  # [P, S, D] pool, cache dtype (keys with RoPE applied)
  v_pages: Array
  block_table: Array  # [Ly, B, K, M] int32 page ids (−1: none)
  lengths: Array  # [Ly, B, K] int32 slots in use (= tokens seen − evictions)
  next_free: Array  # [] int32 pages in use: free_list[next_free:] are free (dmc_jax.cache's free stack)
  free_list: Array  # [P] int32 free stack of page ids (the identity until rows are freed)
  overflow: Array  # [] bool, sticky: a page was needed and the pool was empty
  active: Array  # [B] bool sequences a decode step updates (a serving engine's free slots are inactive)
  ring_slot: Array  # [Ly, B, K, w+1] int32 slot of pending token p at index p mod (w+1)
  ring_evict: Array  # [Ly, B, K, w+1] int32 1 when pending token p was marked (by the decision at p+1)
  evictions: Array  # [Ly, B, K] int32 tokens evicted so far
  positions: Array  # [B] int32 tokens seen per sequence (= position of the next token)
  page_size: int = flax.struct.field(pytree_node=False)
  window: int = flax.struct.field(pytree_node=False)

  @property
  def num_pages(self) -> int:
    return self.k_pages.shape[0]


def init_cache(cfg: LlamaConfig, dmc: DMCConfig, batch: int, max_len: int, page_size: int = 32,
               num_pages: int | None = None, dtype=None) -> DMSCache:
  """An empty cache for up to `max_len` tokens per sequence. Without `num_pages` the pool holds the worst case
  (nothing evicted), so it cannot run out."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  ly, kv, d = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
  max_pages = math.ceil(max_len / page_size)
  if num_pages is None:
    num_pages = ly * batch * kv * max_pages
  rows = (ly, batch, kv)
  w1 = dmc.dms_window + 1
  return DMSCache(
      k_pages=jnp.zeros((num_pages, page_size, d), dtype), v_pages=jnp.zeros((num_pages, page_size, d), dtype),
      block_table=jnp.full(rows + (max_pages,), -1, jnp.int32), lengths=jnp.zeros(rows, jnp.int32),
      next_free=jnp.zeros((), jnp.int32), free_list=jnp.arange(num_pages, dtype=jnp.int32),
      overflow=jnp.zeros((), bool), active=jnp.ones((batch,), bool),
      ring_slot=jnp.zeros(rows + (w1,), jnp.int32), ring_evict=jnp.zeros(rows + (w1,), jnp.int32),
      evictions=jnp.zeros(rows, jnp.int32), positions=jnp.zeros((batch,), jnp.int32),
      page_size=page_size, window=dmc.dms_window)


# -- prefill --------------------------------------------------------------------------------------------------


def prefill_layer(pool: dict, state: dict, states: dict[str, Array], lengths_B: Array) -> tuple[dict, dict]:
  """Fills one layer's rows of an empty cache from its hard forward over right-padded prompts.

  `states` ([B, L, K, ...]): alpha (hard, 0 at position 0), k_slot = RoPE_t(k_t) and v_slot = v_t. Padding past
  each prompt's length never enters a slot or the ring. Returns the updated (pool, layer state).
  """
  w1 = state["ring_slot"].shape[-1]
  alpha = states["alpha"] > 0.5
  b, l, kv = alpha.shape
  n = lengths_B[:, None, None]
  t = jnp.arange(l)[None, :, None]
  valid = jnp.broadcast_to(t < n, alpha.shape)
  prev_mark = jnp.concatenate([jnp.zeros_like(alpha[:, :w1 - 1]), alpha[:, :max(l - w1 + 1, 0)]], axis=1)[:, :l]
  evicts = valid & (t >= w1) & prev_mark  # token t takes the slot of token t − w − 1 (α_{t−w} marked it)
  appends = valid & ~evicts
  append_idx = jnp.cumsum(appends, axis=1) - 1
  # Along each chain t, t + (w+1), ... the slot is that of the latest append: append indices grow with t, so a
  # cumulative max over the chain finds it.
  lp = -(-l // w1) * w1
  chain = jnp.pad(jnp.where(appends, append_idx, -1), ((0, 0), (0, lp - l), (0, 0)), constant_values=-1)
  slot = jax.lax.cummax(chain.reshape(b, lp // w1, w1, kv), axis=1).reshape(b, lp, kv)[:, :l]
  next_mark = jnp.concatenate([alpha[:, 1:], jnp.zeros_like(alpha[:, :1])], axis=1)
  survives = valid & ~((t + w1 < n) & next_mark)  # else token t + w + 1 overwrote it
  n_slots = jnp.sum(appends, axis=1).astype(jnp.int32)

  new_pool, block_table = prefill_rows(pool, state["block_table"].shape[-1], n_slots, slot, survives,
                                       states["k_slot"], states["v_slot"])

  # Ring entry j: the pending token p ≡ j (mod w+1) among the last w + 1 (none before the start: evict 0).
  last = lengths_B - 1
  j = jnp.arange(w1)
  p_BxW = last[:, None] - jnp.mod(last[:, None] - j[None, :], w1)
  ok = (p_BxW >= 0)[:, None, :]
  def gather(x, p):  # [B, L, K] at positions p [B, W] -> [B, K, W]
    return jnp.moveaxis(jnp.take_along_axis(x, jnp.clip(p, 0, l - 1)[:, :, None], axis=1), 1, 2)
  marked = gather(next_mark, p_BxW) & (p_BxW + 1 <= last[:, None])[:, None, :]
  new = dict(state, block_table=block_table, lengths=n_slots,
             evictions=jnp.sum(evicts, axis=1).astype(jnp.int32),
             ring_slot=jnp.where(ok, gather(slot, p_BxW), 0).astype(jnp.int32),
             ring_evict=(ok & marked).astype(jnp.int32))
  return new_pool, new


# -- decode ---------------------------------------------------------------------------------------------------


POOL_FIELDS = ("k_pages", "v_pages", "next_free", "free_list", "overflow", "active")
LAYER_FIELDS = ("block_table", "lengths", "ring_slot", "ring_evict", "evictions")


def pool_of(cache: DMSCache) -> dict[str, Array]:
  return {f: getattr(cache, f) for f in POOL_FIELDS}


def layers_of(cache: DMSCache) -> dict[str, Array]:
  """Per-layer fields, stacked on axis 0 (index [layer] for one layer's slice)."""
  return {f: getattr(cache, f) for f in LAYER_FIELDS}


def decode_layer(pool: dict, state: dict, *, layer, positions_B: Array, k_BxKxD: Array, v_BxKxD: Array,
                 alpha_BxK: Array) -> tuple[dict, dict]:
  """One token per sequence through layer `layer` (traced or not): mark the previous token with α, then overwrite
  the oldest pending token's slot if it was marked, else append. k has RoPE applied. Returns (pool, state)."""
  w1 = state["ring_slot"].shape[-1]
  b, kv = alpha_BxK.shape
  t = positions_B
  rows = (layer, jnp.arange(b)[:, None], jnp.arange(kv)[None, :])
  old = rows + (jnp.mod(t, w1)[:, None],)  # token t − w − 1, leaving the window now
  prev = rows + (jnp.mod(t - 1, w1)[:, None],)  # token t − 1, marked by this step's decision
  cur = {f: jax.lax.dynamic_index_in_dim(state[f], layer, 0, keepdims=False)
         for f in ("block_table", "lengths", "evictions")}
  cur.update(old_slot=state["ring_slot"][old], old_evict=state["ring_evict"][old],
             prev_evict=state["ring_evict"][prev])
  cur, state = jax.lax.optimization_barrier((cur, state))  # every read before any write (see dmc_jax.cache)
  live = jnp.broadcast_to(pool["active"][:, None], (b, kv))  # rows of sequences this step updates
  evict = (cur["old_evict"] > 0) & (t[:, None] > w1 - 1) & live
  append = ~evict & live
  length = cur["lengths"]
  slot = jnp.where(evict, cur["old_slot"], length)
  new_pool, table = write_rows(pool, cur["block_table"], length, slot, append, live, k_BxKxD, v_BxKxD)
  mark = ((alpha_BxK > 0.5) & (t[:, None] > 0)).astype(jnp.int32)
  # prev ≠ old (w ≥ 1): the two entries are distinct, and the new token's entry starts unmarked. An inactive
  # row keeps its entries.
  ring_evict = state["ring_evict"].at[prev].set(jnp.where(live, mark, cur["prev_evict"])).at[old].set(
      jnp.where(live, 0, cur["old_evict"]))
  ring_slot = state["ring_slot"].at[old].set(jnp.where(live, slot, cur["old_slot"]).astype(jnp.int32))
  new = dict(state, ring_evict=ring_evict, ring_slot=ring_slot)
  for f, value in dict(block_table=table, lengths=length + append.astype(jnp.int32),
                       evictions=cur["evictions"] + evict.astype(jnp.int32)).items():
    new[f] = jax.lax.dynamic_update_index_in_dim(state[f], value.astype(state[f].dtype), layer, 0)
  return new_pool, new


# -- bookkeeping ----------------------------------------------------------------------------------------------


def check(cache: DMSCache) -> None:
  """Raises if the pool ran out at any point (host-side; call after a batch of steps)."""
  if bool(cache.overflow):
    raise CachePoolExhausted(
        f"DMS cache pool exhausted: {cache.num_pages} pages of {cache.page_size} slots were not enough, or a "
        f"row outgrew the {cache.block_table.shape[-1] * cache.page_size} slots it was sized for (outputs after "
        f"that point are invalid); raise the memory budget or max length, or lower the batch")


def realised_cr(cache: DMSCache) -> dict[str, Any]:
  """tokens ÷ (tokens − evictions): overall, per layer [Ly] and per (layer, KV head) [Ly, K], pooled over the
  batch (the same keys as DMC's)."""
  tokens = np.asarray(cache.positions, np.float64)  # [B]
  kept = tokens[None, :, None] - np.asarray(cache.evictions, np.float64)  # [Ly, B, K]
  ly, b, kv = kept.shape
  total = tokens.sum()
  return {"overall": float(total * ly * kv / max(kept.sum(), 1)),
          "per_layer": total * kv / np.maximum(kept.sum(axis=(1, 2)), 1),
          "per_head": total / np.maximum(kept.sum(axis=1), 1)}


def memory_bytes(cache: DMSCache) -> dict[str, int]:
  """Bytes in use: allocated pages, the pending rings, block tables and lengths."""
  pages_used = int(min(int(cache.next_free), cache.num_pages))
  per_page = cache.k_pages[0].nbytes + cache.v_pages[0].nbytes
  ring = cache.ring_slot.nbytes + cache.ring_evict.nbytes + cache.evictions.nbytes
  tables = cache.block_table.nbytes + cache.lengths.nbytes + cache.positions.nbytes + cache.free_list.nbytes
  return {"pages": pages_used * per_page, "ring": ring, "tables": tables,
          "total": pages_used * per_page + ring + tables, "pool": cache.num_pages * per_page}
