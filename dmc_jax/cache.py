"""The compressed DMC KV cache: paged, ragged per (layer, sequence, KV head), updated on device.

Every row — one (layer, sequence, KV head) — is its own single-head sequence with its own number of slots (cache
length = number of runs of merged tokens). Slots live in fixed-size pages of one pool shared by all layers (so
memory flows to the layers and heads that compress less); `block_table[row, i]` is the pool page holding slots
i·S .. i·S+S−1. Pages are taken from the pool on the device (no host round trip per step) off a free stack:
`free_list[next_free:]` are the free page ids, so taking n pages reads the next n entries and advances
`next_free`, and `free_rows` gives a finished sequence's pages back by writing their ids just below `next_free`
and lowering it (a fixed-batch generation never frees, and then the stack is the identity: a bump allocator).
`active` masks sequences out of a decode step (a serving slot with no request: it neither writes nor allocates).
A full pool sets the sticky `overflow` flag and drops the write; `check` turns the flag into an error (the
generator calls it after every generation), so exhaustion is never silent.

Per row the merge state of the current run (docs/dmc.md §4) is kept in float32: running sums S^k, S^v, Z, the run
length r and a ring buffer of the last W weighted entries (ω k, ω v, ω), so that a slot averages at most the
last W tokens of its run, exactly as the training-time windowed accumulation does.

Prefill is parallel: the model's eval-mode forward gives every position's accumulated state; with hard decisions
the run ids are the cumulative sum of 1 − α, and the state at each run's last token is its slot (a scatter, no
loop over positions), written layer by layer inside the model's layer loop. Padding past each prompt's length
never enters a slot or the merge state.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import CachePoolExhausted
from dmc_jax.model import rope

Array = jax.Array


@flax.struct.dataclass
class DMCCache:
  k_pages: Array  # [P, S, D] pool, cache dtype
  v_pages: Array
  block_table: Array  # [Ly, B, K, M] int32 page ids (−1: none)
  lengths: Array  # [Ly, B, K] int32 slots in use
  next_free: Array  # [] int32 pages in use: free_list[next_free:] are free
  free_list: Array  # [P] int32 free stack of page ids (the identity until rows are freed)
  overflow: Array  # [] bool, sticky: a page was needed and the pool was empty
  sum_k: Array  # [Ly, B, K, D] float32 merge state of the current run
  sum_v: Array
  sum_w: Array  # [Ly, B, K]
  run: Array  # [Ly, B, K] int32 tokens in the current run
  ring_k: Array  # [Ly, B, K, W, D] float32 last W weighted entries (W = 0 when unbounded)
  ring_v: Array
  ring_w: Array  # [Ly, B, K, W]
  positions: Array  # [B] int32 tokens seen per sequence (= position of the next token)
  active: Array  # [B] bool, sequences a decode step updates
  page_size: int = flax.struct.field(pytree_node=False)
  window: int | None = flax.struct.field(pytree_node=False)

  @property
  def num_pages(self) -> int:
    return self.k_pages.shape[0]


def page_bytes(cfg: LlamaConfig, page_size: int, dtype) -> int:
  return 2 * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def pages_for_budget(cfg: LlamaConfig, budget_bytes: int, page_size: int, dtype) -> int:
  """Pool size (pages) that a KV-memory budget buys."""
  return max(1, budget_bytes // page_bytes(cfg, page_size, dtype))


FITTED_PAGE_SIZES = (8, 16, 32)


def fitted_page_size(max_len: int) -> int:
  """A page size for rows of at most `max_len` slots: the smallest of FITTED_PAGE_SIZES of at least max_len / 16
  (8 up to 128 tokens, 16 up to 256, else 32; a row's part-filled last page is the waste). Short generations get
  small pages (the SmolLM2 crossover at CR 2 falls from 78 tokens at 32-slot pages to 38 at 8); long ones keep 32,
  where the decode attention was measured (more, smaller pages mean more gathers per slot). Outputs do not depend
  on it."""
  return next((s for s in FITTED_PAGE_SIZES if 16 * s >= max_len), FITTED_PAGE_SIZES[-1])


def init_cache(cfg: LlamaConfig, dmc: DMCConfig, batch: int, max_len: int, page_size: int = 32,
               num_pages: int | None = None, dtype=None) -> DMCCache:
  """An empty cache for up to `max_len` tokens per sequence. Without `num_pages` the pool holds the worst case
  (no compression at all), so it cannot run out."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  ly, kv, d = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
  max_pages = math.ceil(max_len / page_size)
  if num_pages is None:
    num_pages = ly * batch * kv * max_pages
  w = dmc.window or 0
  rows = (ly, batch, kv)
  return DMCCache(
      k_pages=jnp.zeros((num_pages, page_size, d), dtype), v_pages=jnp.zeros((num_pages, page_size, d), dtype),
      block_table=jnp.full(rows + (max_pages,), -1, jnp.int32), lengths=jnp.zeros(rows, jnp.int32),
      next_free=jnp.zeros((), jnp.int32), free_list=jnp.arange(num_pages, dtype=jnp.int32),
      overflow=jnp.zeros((), bool),
      sum_k=jnp.zeros(rows + (d,), jnp.float32), sum_v=jnp.zeros(rows + (d,), jnp.float32),
      sum_w=jnp.zeros(rows, jnp.float32), run=jnp.zeros(rows, jnp.int32),
      ring_k=jnp.zeros(rows + (w, d), jnp.float32), ring_v=jnp.zeros(rows + (w, d), jnp.float32),
      ring_w=jnp.zeros(rows + (w,), jnp.float32), positions=jnp.zeros((batch,), jnp.int32),
      active=jnp.ones((batch,), bool), page_size=page_size, window=dmc.window)


def _allocate(next_free: Array, num_pages: int, need: Array) -> tuple[Array, Array, Array]:
  """Takes `need[i]` pages per row (flattened) off the free stack; returns (each row's first index into the free
  list — its pages are free_list[first .. first + need − 1] —, next_free, overflow)."""
  flat = need.reshape(-1)
  start = next_free + jnp.cumsum(flat) - flat
  new_next = next_free + jnp.sum(flat)
  return start.reshape(need.shape), new_next, new_next > num_pages


def _page_ids(free_list: Array, index: Array) -> Array:
  """The page ids at free-stack positions `index` (clipped: callers mask entries past the pool)."""
  return free_list[jnp.clip(index, 0, free_list.shape[0] - 1)]


def _write_slots(pages: Array, block_table: Array, rows_slots: Array, values: Array, write: Array) -> Array:
  """pages[page of slot, slot % S] = value, for every entry where `write`; others (and full pools) dropped.

  block_table: [..., M]; rows_slots, write: [...]; values: [..., D] (leading axes shared).
  """
  s = pages.shape[1]
  m = block_table.shape[-1]
  page_idx = rows_slots // s
  page = jnp.take_along_axis(block_table, jnp.clip(page_idx, 0, m - 1)[..., None], axis=-1)[..., 0]
  # A slot past the row's block table (or in no page) is dropped, never folded onto another page.
  ok = write & (page >= 0) & (page_idx >= 0) & (page_idx < m)
  # Dropped writes go out of range (mode="drop"), each to its own index past the pool, so that every index is
  # distinct: a row writes its own page (pages belong to one row), so the kept ones are too. Declaring
  # unique_indices lets XLA update the donated pool in place; without it XLA:CPU may rewrite the whole pool.
  dropped = pages.shape[0] + jnp.arange(page.size, dtype=page.dtype).reshape(page.shape)
  page = jnp.where(ok, page, dropped)
  return pages.at[page, rows_slots % s].set(values.astype(pages.dtype), mode="drop", unique_indices=True)


def write_rows(pool: dict, table: Array, length: Array, slot: Array, appends: Array, live: Array, k: Array,
               v: Array) -> tuple[dict, Array]:
  """One decode step's pool update for one layer (DMC and DMS alike): every `live` row writes k, v ([B, K, D]) at
  its `slot`; a row that `appends` at a page edge first takes a page off the free stack into its block table. A
  row whose table is full, or that finds the pool empty, drops its write and raises the sticky overflow flag.
  Returns (pool, block table)."""
  page_size = pool["k_pages"].shape[1]
  m = table.shape[-1]
  beyond = appends & (length >= m * page_size)  # the row's block table is full: nowhere to append
  need = (appends & (jnp.mod(length, page_size) == 0) & ~beyond).astype(jnp.int32)
  first, next_free, overflow = _allocate(pool["next_free"], pool["k_pages"].shape[0], need)
  overflow = overflow | jnp.any(beyond)
  at_page_i = jnp.arange(m) == (length // page_size)[..., None]
  table = jnp.where(at_page_i & ((need > 0) & ~overflow)[..., None], _page_ids(pool["free_list"], first)[..., None],
                    table)
  write = ~(overflow & (need > 0)) & ~beyond & live
  return dict(pool, k_pages=_write_slots(pool["k_pages"], table, slot, k, write),
              v_pages=_write_slots(pool["v_pages"], table, slot, v, write),
              next_free=next_free, overflow=pool["overflow"] | overflow), table


# -- prefill --------------------------------------------------------------------------------------------------


def prefill_rows(pool: dict, table_pages: int, n_slots_BxK: Array, slot_BxLxK: Array, write_BxLxK: Array,
                 k_BxLxKxD: Array, v_BxLxKxD: Array) -> tuple[dict, Array]:
  """One layer's pool fill from a prompt (DMC and DMS alike): every row takes ceil(n_slots / S) pages off the free
  stack into a fresh block table of `table_pages` entries, and each position where `write` puts its k, v at its
  row's `slot`. A prompt that needs more pages than the table holds, or than the pool has left, gets no pages
  (its writes drop) and raises the sticky overflow flag. Returns (pool, block table [B, K, table_pages])."""
  b, l, kv = slot_BxLxK.shape
  need = -(-n_slots_BxK // pool["k_pages"].shape[1])
  first, next_free, overflow = _allocate(pool["next_free"], pool["k_pages"].shape[0], need)
  overflow = overflow | jnp.any(need > table_pages)  # a prompt longer than the cache was sized for
  page_i = jnp.arange(table_pages)
  table = jnp.where(page_i < need[..., None], _page_ids(pool["free_list"], first[..., None] + page_i),
                    -1).astype(jnp.int32)
  table = jnp.where(overflow, -1, table)  # never point past the pool
  bt = jnp.broadcast_to(table[:, None], (b, l, kv, table_pages))
  return dict(pool, k_pages=_write_slots(pool["k_pages"], bt, slot_BxLxK, k_BxLxKxD, write_BxLxK),
              v_pages=_write_slots(pool["v_pages"], bt, slot_BxLxK, v_BxLxKxD, write_BxLxK),
              next_free=next_free, overflow=pool["overflow"] | overflow), table


def prefill_layer(pool: dict, state: dict, states: dict[str, Array], lengths_B: Array) -> tuple[dict, dict]:
  """Fills one layer's rows of an empty cache from its eval-mode forward over right-padded prompts.

  `states` ([B, L, K, ...]): alpha (hard), omega, wk = ω·k, wv = ω·v, num_k, num_v, den (the windowed sums at
  every position), k_slot = RoPE_t(k̃_t) with ch zeroed, v_slot = ṽ_t. Layers are filled one after the other
  (the model calls this inside its layer loop), so only one layer's states ever exist at once.
  Returns the updated (pool, layer state).
  """
  w = state["ring_w"].shape[-1]
  alpha = states["alpha"]
  b, l, kv = alpha.shape
  t = jnp.arange(l)
  valid = jnp.broadcast_to((t[None, :] < lengths_B[:, None])[..., None], alpha.shape)
  appends = jnp.where(valid, 1 - (alpha > 0.5).astype(jnp.int32), 0)
  run_id = jnp.cumsum(appends, axis=1) - 1  # slot of every valid token
  n_slots = jnp.sum(appends, axis=1)  # [B, K]
  next_alpha = jnp.concatenate([alpha[:, 1:], jnp.zeros_like(alpha[:, :1])], axis=1)
  is_last = t[None, :, None] == (lengths_B[:, None, None] - 1)
  is_end = valid & (is_last | (next_alpha < 0.5))

  # Slots: the state at the last token of each run (one scatter per pool; other tokens are dropped).
  new_pool, block_table = prefill_rows(pool, state["block_table"].shape[-1], n_slots, run_id, is_end,
                                       states["k_slot"], states["v_slot"])

  # Merge state at each prompt's last token, and the run length there.
  last = jnp.maximum(lengths_B - 1, 0)
  def at_last(x):  # [B, L, K, ...] -> [B, K, ...]
    return jnp.take_along_axis(x, last.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
  last_append = jax.lax.cummax(jnp.where(appends > 0, t[None, :, None], 0), axis=1)
  new = dict(state, block_table=block_table, lengths=n_slots.astype(jnp.int32), sum_k=at_last(states["num_k"]),
             sum_v=at_last(states["num_v"]), sum_w=at_last(states["den"]),
             run=at_last(t[None, :, None] - last_append + 1).astype(jnp.int32))
  if w:
    # Ring slot j holds the entry of the position p ≡ j (mod W) among the last W tokens (zero before the start).
    j = jnp.arange(w)
    p_BxW = last[:, None] - jnp.mod(last[:, None] - j[None, :], w)
    ok = (p_BxW >= 0)[:, None, :]  # [B, 1, W]
    def ring(x):  # [B, L, K, ...] -> [B, K, W, ...]
      idx = jnp.clip(p_BxW, 0, l - 1).reshape((b, w) + (1,) * (x.ndim - 2))
      g = jnp.moveaxis(jnp.take_along_axis(x, idx, axis=1), 1, 2)
      return jnp.where(ok.reshape(ok.shape + (1,) * (g.ndim - 3)), g, 0.0)
    new.update(ring_k=ring(states["wk"]), ring_v=ring(states["wv"]), ring_w=ring(states["omega"]))
  return new_pool, new


# -- decode ---------------------------------------------------------------------------------------------------


# The cache splits into the pool every layer shares and one slice per layer; a decode step threads the pool
# through the layers (unrolled, or as the carry of a scan over layers) and updates each layer's slice.
POOL_FIELDS = ("k_pages", "v_pages", "next_free", "free_list", "overflow", "active")
LAYER_FIELDS = ("block_table", "lengths", "sum_k", "sum_v", "sum_w", "run", "ring_k", "ring_v", "ring_w")


def pool_of(cache: DMCCache) -> dict[str, Array]:
  return {f: getattr(cache, f) for f in POOL_FIELDS}


def layers_of(cache: DMCCache) -> dict[str, Array]:
  """Per-layer fields, stacked on axis 0 (index [layer] for one layer's slice)."""
  return {f: getattr(cache, f) for f in LAYER_FIELDS}


def decode_layer(pool: dict, state: dict, *, layer, positions_B: Array, k_BxKxD: Array, v_BxKxD: Array,
                 alpha_BxK: Array, omega_BxK: Array, cos_BxD: Array, sin_BxD: Array,
                 ch: int | None) -> tuple[dict, dict]:
  """One token per sequence through layer `layer`: merge into or append to each row's last slot (docs/dmc.md §4).

  state: every layer's fields stacked on axis 0 (`layers_of`); `layer` may be traced (the scan over layers).
  Only that layer's entries are read, and only what changes is written — its sums, lengths and table (one layer's
  slice), one ring entry and one pool slot per row — so under donation the pool and merge state are updated in
  place, never copied whole. k is pre-RoPE with channel ch zeroed; the candidate slot is RoPE_t(S^k / Z) at the
  new token's position t. Page size and window are read off the shapes (static under jit). Returns the updated
  (pool, state).
  """
  w = state["ring_w"].shape[-1]
  b, kv = alpha_BxK.shape
  t = positions_B
  cur = {f: jax.lax.dynamic_index_in_dim(state[f], layer, 0, keepdims=False)
         for f in ("block_table", "lengths", "sum_k", "sum_v", "sum_w", "run")}
  # Ring slot t mod W holds the entry of t − W: read it now (subtracted below once the run is longer than W).
  ring_at = (layer, jnp.arange(b)[:, None], jnp.arange(kv)[None, :], jnp.mod(t, max(w, 1))[:, None])
  if w:
    cur.update({f: state[f][ring_at] for f in ("ring_k", "ring_v", "ring_w")})
  # Every read of the state happens before any write to it. Without the barrier XLA may fuse a read into the
  # fusion that updates the same buffer, or leave read and write unordered, and then copies the whole buffer
  # (every state field, once per layer per step) to keep the old value alive.
  cur, state = jax.lax.optimization_barrier((cur, state))
  # A sequence's first token always appends (decode normally starts after a prefill, but need not).
  alpha_i = (alpha_BxK > 0.5).astype(jnp.int32) * (t[:, None] > 0)
  live = jnp.broadcast_to(pool["active"][:, None], (b, kv))  # rows of sequences this step updates
  alpha = alpha_i.astype(jnp.float32)
  run = alpha_i * cur["run"] + 1
  wk = omega_BxK[..., None] * k_BxKxD.astype(jnp.float32)
  wv = omega_BxK[..., None] * v_BxKxD.astype(jnp.float32)
  sum_k = alpha[..., None] * cur["sum_k"] + wk
  sum_v = alpha[..., None] * cur["sum_v"] + wv
  sum_w = alpha * cur["sum_w"] + omega_BxK
  new = dict(state)
  if w:
    # Subtract the entry leaving the window and put the new one in its place (one entry per row; the indices
    # are distinct and sorted).
    drop = (run > w).astype(jnp.float32)
    sum_k = sum_k - drop[..., None] * cur["ring_k"]
    sum_v = sum_v - drop[..., None] * cur["ring_v"]
    sum_w = sum_w - drop * cur["ring_w"]
    def put(f, value):  # an inactive row keeps its entry
      keep = jnp.where(live.reshape(live.shape + (1,) * (value.ndim - 2)), value, cur[f])
      return state[f].at[ring_at].set(keep, indices_are_sorted=True, unique_indices=True)
    new.update(ring_k=put("ring_k", wk), ring_v=put("ring_v", wv), ring_w=put("ring_w", omega_BxK))

  k_cand = sum_k / sum_w[..., None]
  k_cand = rope.apply_rope(k_cand[:, None], cos_BxD[:, None], sin_BxD[:, None])[:, 0]
  if ch is not None:  # None: the adapter form, no repurposed channel
    k_cand = k_cand.at[..., ch].set(0.0)
  v_cand = sum_v / sum_w[..., None]

  length = cur["lengths"]
  slot = length - alpha_i  # merge: overwrite the last slot; append: the next one
  new_pool, table = write_rows(pool, cur["block_table"], length, slot, live & (alpha_i == 0), live, k_cand, v_cand)
  for f, value in dict(block_table=table, lengths=length + 1 - alpha_i, sum_k=sum_k, sum_v=sum_v, sum_w=sum_w,
                       run=run).items():
    value = jnp.where(live.reshape(live.shape + (1,) * (value.ndim - 2)), value, cur[f])
    new[f] = jax.lax.dynamic_update_index_in_dim(state[f], value.astype(state[f].dtype), layer, 0)
  return new_pool, new


# -- bookkeeping ----------------------------------------------------------------------------------------------


def free_rows(cache: DMCCache, free_B: Array) -> DMCCache:
  """Gives the pages of sequences `free_B` ([B] bool) back to the free stack and empties their rows (no pages,
  no slots, inactive). Their page ids are written just below `next_free`, which drops by their count: the stack
  below `next_free` holds no meaning (pages in use are found through the block tables), so nothing is lost."""
  table = cache.block_table  # [Ly, B, K, M]
  freed = (table >= 0) & free_B[None, :, None, None]
  flat, ok = table.reshape(-1), freed.reshape(-1)
  n = jnp.sum(ok, dtype=jnp.int32)
  # The freed ids packed to the front (a stable order: the k-th freed page in row-major order goes to k).
  rank = jnp.cumsum(ok) - 1
  base = cache.next_free - n
  # Entries not freed go past the stack, each to its own index (dropped), so every index is distinct.
  dest = jnp.where(ok, base + rank, cache.free_list.shape[0] + jnp.arange(flat.size, dtype=jnp.int32))
  free_list = cache.free_list.at[dest].set(flat, mode="drop", unique_indices=True)
  rows = free_B[None, :, None]
  return cache.replace(
      free_list=free_list, next_free=base,
      block_table=jnp.where(free_B[None, :, None, None], -1, table),
      lengths=jnp.where(rows, 0, cache.lengths), active=cache.active & ~free_B)


def check(cache: DMCCache) -> None:
  """Raises if the pool ran out at any point (host-side; call after a batch of steps)."""
  if bool(cache.overflow):
    raise CachePoolExhausted(
        f"DMC cache pool exhausted: {cache.num_pages} pages of {cache.page_size} slots were not enough, or a "
        f"row outgrew the {cache.block_table.shape[-1] * cache.page_size} slots it was sized for (outputs after "
        f"that point are invalid); raise the memory budget or max length, or lower the batch")


def realised_cr(cache: DMCCache) -> dict[str, Any]:
  """Tokens per slot: overall, per layer [Ly] and per (layer, KV head) [Ly, K], pooled over the batch."""
  tokens = np.asarray(cache.positions, np.float64)  # [B]
  lengths = np.asarray(cache.lengths, np.float64)  # [Ly, B, K]
  ly, b, kv = lengths.shape
  total_tokens = tokens.sum()
  per_head = total_tokens / np.maximum(lengths.sum(axis=1), 1)
  per_layer = total_tokens * kv / np.maximum(lengths.sum(axis=(1, 2)), 1)
  overall = total_tokens * ly * kv / max(lengths.sum(), 1)
  return {"overall": float(overall), "per_layer": per_layer, "per_head": per_head}


def memory_bytes(cache: DMCCache) -> dict[str, int]:
  """Bytes in use: allocated pages, per-row merge state (+ ring buffer), block tables and lengths."""
  pages_used = int(min(int(cache.next_free), cache.num_pages))
  per_page = cache.k_pages[0].nbytes + cache.v_pages[0].nbytes
  state = sum(x.nbytes for x in (cache.sum_k, cache.sum_v, cache.sum_w, cache.run, cache.ring_k, cache.ring_v,
                                 cache.ring_w))
  tables = cache.block_table.nbytes + cache.lengths.nbytes + cache.positions.nbytes + cache.free_list.nbytes
  return {"pages": pages_used * per_page, "merge_state": state, "tables": tables,
          "total": pages_used * per_page + state + tables, "pool": cache.num_pages * per_page}


def row_fixed_bytes(head_dim: int, window: int | None, table_pages: int) -> int:
  """Bytes a row holds whatever its length: float32 merge state (sums, run, W-entry ring), block table, length."""
  w = window or 0
  return 4 * (2 * head_dim + 2 + w * (2 * head_dim + 1)) + 4 * table_pages + 4


def crossover_tokens(cfg: LlamaConfig, dmc: DMCConfig, page_size: int, dtype, cr: float, horizon: int = 1 << 16) -> int:
  """The sequence length from which a DMC row at compression `cr` holds fewer bytes than a vanilla row (K and V of
  every token) at every longer length (checked up to `horizon`): below it the fixed merge state and whole pages
  cost more than compression saves. Pages counted whole, the block table sized for the length itself."""
  item = jnp.dtype(dtype).itemsize
  t = np.arange(1, horizon + 1)
  pages = -(-(-(-t // cr)).astype(np.int64) // page_size)
  dmc_bytes = pages * 2 * page_size * cfg.head_dim * item + row_fixed_bytes(cfg.head_dim, dmc.window, 0) + 4 * pages
  worse = np.flatnonzero(dmc_bytes >= 2 * cfg.head_dim * item * t)
  return int(t[worse[-1]] + 1) if worse.size else 1
