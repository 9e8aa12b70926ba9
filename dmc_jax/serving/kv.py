"""The one cache interface the serving engine drives: init, prefill into a slot, step, free slots, bytes in use.

Both implementations are the paged cache of `dmc_jax.cache` (one page pool, a block table per (layer, sequence,
KV head) row, pages taken off a free stack on the device and given back by `free_rows`), run by the model's
DMC prefill and decode (`Llama.prefill_dmc` / `Llama.decode_dmc`, the `dmc_decode` kernels): no second copy of
the decode math.

* **vanilla** (paged): every token appends (decisions forced to 0) through the adapter form of DMC with a zero
  adapter, which repurposes no channel: a slot is then the token's own RoPE'd key and value, so this is exactly
  Llama attention over a paged cache — compared with DMC page for page at the same page size and budget.
* **dmc**: the checkpoint's own decisions (a retrofit or a DMC adapter), or decisions forced to merge with
  probability 1 − 1/CR (benchmarks; the same pseudo-random pattern as `Generator`'s, a function of the position).
* **dms**: the same paged cache with DMS's delayed eviction (`dmc_jax.dms_cache`).

`PolicyKV` puts the eviction policies (StreamingLLM, H2O, TOVA) behind the same interface: their compact caches
(`dmc_jax.baselines.evict_model`, the decode of `generate --cache h2o`) with the pool's pages as the accounting
unit — see its docstring for what that means and what it does not.

Slots are sequences of one fixed batch (`max_batch`); a slot without a request is inactive (the step neither writes
nor allocates for it). Sampling is per slot (temperature, top-p, seed), keyed by the request's seed and the number
of tokens it has sampled, so a request samples the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax import cache as dmc_cache
from dmc_jax.baselines import evict_model
from dmc_jax.baselines.policies import Policy
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import ArgumentError
from dmc_jax.generate import _FORCED_KEY, forced_merge_decisions
from dmc_jax.model.llama import Llama, cache_lib

_MIN_BUCKET = 16  # prompt lengths are padded to a power of two at least this long (few prefill shapes compile)


def prompt_bucket(n: int) -> int:
  return max(_MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def sample_rows(logits_BxV: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array, seed_B: jax.Array,
                count_B: jax.Array) -> jax.Array:
  """Next token per row: greedy where temperature is 0, else top-p sampling at the row's own temperature with the
  key fold_in(key(seed), count). The vocabulary sort only runs when some row samples."""
  greedy = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sampled(_):
    logits = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token), as generate.sample does.
    cutoff = jnp.take_along_axis(sorted_desc, jnp.sum(cum < top_p_B[:, None], axis=-1, keepdims=True), axis=-1)
    logits = jnp.where(logits < cutoff, jnp.finfo(logits.dtype).min, logits)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_B, count_B)
    drawn = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, logits).astype(jnp.int32)
    return jnp.where(temperature_B > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda _: greedy, None)


def _with_zero_adapter(cfg: LlamaConfig, dmc: DMCConfig, params: Any) -> Any:
  """`params` plus a zero decision adapter in every layer (the adapter form then computes the original model)."""
  model = Llama(cfg, dmc, "eval")
  shapes = jax.eval_shape(lambda: flax.linen.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path, s in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items():
    if path not in flat:
      if "decision_adapter" not in path:
        raise ValueError(f"parameter {'/'.join(path)} missing from the checkpoint")
      flat[path] = jnp.zeros(s.shape, s.dtype)
  return flax.traverse_util.unflatten_dict(flat)


class _SlotCache:
  """The host side both caches share: one small transfer per compiled call, unpacked. A subclass sets `_prefill`,
  `_step`, `_free` (jitted), `max_batch`, `page_bytes`, and `_extra()`: trailing arguments of its compiled calls."""

  def _extra(self) -> tuple:
    return ()

  def prefill(self, cache, tokens: list[int], slot: int, sampling: tuple[float, float, int, int]):
    """Prefills one sequence into slot `slot` (inactive, no pages); returns (first token, boundary rows, pages in
    use, slots in use, cache). sampling: (temperature, top_p, seed, tokens sampled so far)."""
    n = len(tokens)
    padded = np.zeros((1, prompt_bucket(n)), np.int32)
    padded[0, :n] = tokens
    t, p, s, c = sampling
    out, cache = self._prefill(self.params, cache, padded, np.int32(n), np.int32(slot), np.float32(t),
                               np.float32(p), np.uint32(s), np.int32(c), *self._extra())
    out = np.asarray(out)
    return int(out[0]), int(out[1]), int(out[2]), int(out[3]), cache

  def step(self, cache, tokens_B: np.ndarray, temperature_B, top_p_B, seed_B, count_B):
    """One decode step of every active slot; returns (next tokens [B], boundary rows per slot [B], pages in use,
    slots in use (summed over rows), cache). A slot's boundary rows are those whose next append needs a new page:
    the most the next step takes."""
    out, cache = self._step(self.params, cache, tokens_B, temperature_B, top_p_B, seed_B, count_B, *self._extra())
    out = np.asarray(out)  # one transfer: tokens, boundary counts, pages and slots in use
    b = self.max_batch
    return out[:b], out[b:2 * b], int(out[2 * b]), int(out[2 * b + 1]), cache

  def free(self, cache, slots):
    mask = np.zeros(self.max_batch, bool)
    mask[list(slots)] = True
    return self._free(cache, mask)

  def bytes_in_use(self, pages_in_use: int) -> int:
    return pages_in_use * self.page_bytes


class PagedKV(_SlotCache):
  """A paged cache of `max_batch` slots over a pool of `num_pages` pages of `page_size` slots, with compiled
  prefill-into-a-slot, step and free. `kind` is "vanilla", "dmc" or "dms" (DMS: the forced rate is the eviction
  rate, 1 − 1/CR, as DMC's merge rate is)."""

  def __init__(self, cfg: LlamaConfig, params: Any, *, kind: str, dmc: DMCConfig | None = None,
               forced_merge_rate: float | None = None, max_batch: int, max_len: int, page_size: int,
               num_pages: int, cache_dtype: str | None = None):
    if kind not in ("vanilla", "dmc", "dms"):
      raise ArgumentError(f"cache: the serving engine runs 'vanilla', 'dmc' or 'dms', got {kind!r}")
    for name, v in (("max_batch", max_batch), ("max_len", max_len), ("page_size", page_size),
                    ("num_pages", num_pages)):
      if not (isinstance(v, int) and v >= 1):
        raise ArgumentError(f"{name}: expected an integer >= 1, got {v!r}")
    cfg = cfg.replace(remat_policy="none", scan_layers=False)
    if kind == "vanilla":
      # The adapter form repurposes no channel; window None: a run never exceeds one token, no ring to keep.
      dmc = DMCConfig(decisions="adapter", window=None)
      params = _with_zero_adapter(cfg, dmc, params)
      forced_merge_rate = 0.0
    elif dmc is None or (dmc.method == "dms") != (kind == "dms"):
      raise ArgumentError(f"cache={kind!r} needs {kind.upper()} settings (a retrofitted checkpoint, an adapter, or "
                          f"forced CR)")
    self.kind, self.cfg, self.dmc, self.params = kind, cfg, dmc, params
    self.forced_merge_rate = forced_merge_rate
    self.max_batch, self.page_size, self.num_pages = max_batch, page_size, num_pages
    self.max_len = math.ceil(max_len / page_size) * page_size  # whole pages per row
    self.cache_dtype = cache_dtype or cfg.dtype
    self.rows_per_sequence = cfg.n_layers * cfg.n_kv_heads
    self.page_bytes = dmc_cache.page_bytes(cfg, page_size, self.cache_dtype)
    self.model = Llama(cfg, dmc, "eval")
    self.lib = cache_lib(dmc)
    # Names of their own: a profile maps XLA modules to scopes by name (jit__step_fn is the Generator's).
    self._prefill = jax.jit(self._serve_prefill, donate_argnums=(1,))
    self._step = jax.jit(self._serve_step, donate_argnums=(1,))
    self._free = jax.jit(dmc_cache.free_rows, donate_argnums=(0,))

  # -- the interface -------------------------------------------------------------------------------------------

  def init(self):
    c = self.lib.init_cache(self.cfg, self.dmc, self.max_batch, self.max_len, self.page_size, self.num_pages,
                             self.cache_dtype)
    return c.replace(active=jnp.zeros_like(c.active))

  def prefill_pages(self, n_tokens: int) -> int:
    """Pages a prompt of n tokens can take at most (every token its own slot: vanilla's exact count)."""
    return self.rows_per_sequence * -(-n_tokens // self.page_size)

  def occupancy(self, cache) -> tuple[int, int]:
    """(pages in use, slots in use summed over rows), read from the device."""
    return int(cache.next_free), int(cache.lengths.sum())

  def with_forced_rate(self, rate: float) -> "PagedKV":
    """This DMC cache at another forced merge rate, sharing the compiled functions (the rate is their argument,
    so a benchmark over several CRs compiles once)."""
    if self.kind == "vanilla" or self.forced_merge_rate is None:
      raise ValueError("with_forced_rate: only a DMC or DMS cache with forced decisions has a rate to change")
    other = copy.copy(self)
    other.forced_merge_rate = float(rate)
    return other

  # -- compiled functions --------------------------------------------------------------------------------------

  def _extra(self) -> tuple:
    return (np.float32(self.forced_merge_rate or 0.0),)  # the forced rate: an argument, so CRs share a compile

  def _forced(self, positions_BxL, rate):
    if self.forced_merge_rate is None:
      return None
    if self.kind == "vanilla":
      return jnp.zeros((self.cfg.n_layers,) + positions_BxL.shape + (self.cfg.n_kv_heads,), jnp.float32)
    return forced_merge_decisions(jax.random.key(_FORCED_KEY), positions_BxL, self.cfg.n_layers,
                                  self.cfg.n_kv_heads, rate)

  def _boundary(self, lengths_LyxBxK, active_B):
    """Rows per slot whose next append opens a page."""
    at_edge = (jnp.mod(lengths_LyxBxK, self.page_size) == 0) & active_B[None, :, None]
    return jnp.sum(at_edge, axis=(0, 2), dtype=jnp.int32)

  def _serve_prefill(self, params, cache, tokens_1xP, length, slot, temperature, top_p, seed, count, rate):
    # A one-sequence cache sharing the big cache's pool: prefill takes its pages off the shared free stack.
    layer = {f: jnp.zeros(getattr(cache, f).shape[:1] + (1,) + getattr(cache, f).shape[2:], getattr(cache, f).dtype)
             for f in self.lib.LAYER_FIELDS}
    layer["block_table"] = jnp.full_like(layer["block_table"], -1)
    one = cache.replace(**layer, positions=jnp.zeros((1,), jnp.int32), active=jnp.ones((1,), bool))
    positions = jnp.arange(tokens_1xP.shape[1])[None, :]
    lengths = length[None]
    logits, one, _ = self.model.apply(params, tokens_1xP, lengths, one, self._forced(positions, rate),
                                      method=Llama.prefill_dmc)
    # The new sequence's rows go into the slot; the pool (pages written, stack advanced) is the one-sequence one.
    new = {f: getattr(cache, f).at[:, slot].set(getattr(one, f)[:, 0]) for f in self.lib.LAYER_FIELDS}
    pool = {f: getattr(one, f) for f in ("k_pages", "v_pages", "next_free", "free_list", "overflow")}
    cache = cache.replace(**new, **pool, positions=cache.positions.at[slot].set(length),
                          active=cache.active.at[slot].set(True))
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, 0, keepdims=True)
    token = sample_rows(last, temperature[None], top_p[None], seed[None], count[None])
    boundary = self._boundary(cache.lengths, cache.active)[slot]
    return jnp.stack([token[0], boundary, cache.next_free, jnp.sum(cache.lengths)]), cache

  def _serve_step(self, params, cache, tokens_B, temperature_B, top_p_B, seed_B, count_B, rate):
    forced = self._forced(cache.positions[:, None], rate)
    logits, cache = self.model.apply(params, tokens_B[:, None], cache, None if forced is None else forced[:, :, 0],
                                     method=Llama.decode_dmc)
    # An inactive slot's position does not advance (decode_dmc advances every sequence's).
    cache = cache.replace(positions=jnp.where(cache.active, cache.positions, cache.positions - 1))
    token = sample_rows(logits[:, 0], temperature_B, top_p_B, seed_B, count_B)
    out = jnp.concatenate([token, self._boundary(cache.lengths, cache.active), cache.next_free[None],
                           jnp.sum(cache.lengths)[None]])
    return out, cache

  def overflowed(self, cache) -> bool:
    """Whether a write was ever dropped (the engine's reserve makes this a bug, checked by the tests)."""
    return bool(cache.overflow)


@flax.struct.dataclass
class PolicyCache:
  layers: list  # per layer evict_model's compact cache: k, v [B, KV, C, D]; keep, score, pos [B, KV, C]
  positions: jax.Array  # [B] int32 tokens seen per slot (= position of its next token)
  active: jax.Array  # [B] bool, slots holding a request


def policy_page_bytes(cfg: LlamaConfig, page_size: int, dtype) -> int:
  """A policy page's bytes: K and V, and per slot keep (1), H2O's score (4) and the token's position (4)."""
  return dmc_cache.page_bytes(cfg, page_size, dtype) + 9 * page_size


class PolicyKV(_SlotCache):
  """An eviction policy's compact cache behind the engine's interface (init, prefill into a slot, step, free,
  bytes in use), with the paged caches' page as its accounting unit.

  Storage is the fixed-batch compact cache of `generate --cache h2o|tova|streaming` (evict_model): per (layer,
  slot, KV head) row `capacity(max_len)` slots, an evicted entry's slot taking the next token, prefill by the exact
  parallel forward, decode unrolled over per-layer buffers updated in place. A row holds exactly budget(t) entries
  after t tokens, so a request's need is known without reading the device: `pages(t)` = ceil((budget(t) + 1) /
  page_size) pages a row (its entries plus the incoming token's), each page charged its K/V and the policy's 9
  bytes of state per slot. The engine admits, reserves and preempts by these pages exactly as for the paged
  caches, so a policy is compared with them on the same budget.

  What this is not: a paged policy cache. The buffers are allocated for `max_batch` slots at full capacity (more
  memory than the pool accounts for when `max_batch` sequences could not all reach max_len), and a decode step
  attends over all `capacity` slots of every row (masked), active or not; the roofline of a stream counts the
  entries held. An inactive slot's row is stepped like the others and ignored; `free` empties it.
  """

  def __init__(self, cfg: LlamaConfig, params: Any, *, policy: Policy, max_batch: int, max_len: int,
               page_size: int, num_pages: int, cache_dtype: str | None = None):
    for name, v in (("max_batch", max_batch), ("max_len", max_len), ("page_size", page_size),
                    ("num_pages", num_pages)):
      if not (isinstance(v, int) and v >= 1):
        raise ArgumentError(f"{name}: expected an integer >= 1, got {v!r}")
    self.kind, self.policy = policy.name, policy
    self.cfg = cfg.replace(remat_policy="none", scan_layers=False)
    self.params = params
    self.max_batch, self.page_size, self.num_pages, self.max_len = max_batch, page_size, num_pages, max_len
    self.cache_dtype = cache_dtype or cfg.dtype
    self.capacity = evict_model.capacity(policy, max_len)
    self.rows_per_sequence = cfg.n_layers * cfg.n_kv_heads
    self.page_bytes = policy_page_bytes(cfg, page_size, self.cache_dtype)
    self._prefill = jax.jit(self._policy_prefill, donate_argnums=(1,))
    self._step = jax.jit(self._policy_step, donate_argnums=(1,))
    self._free = jax.jit(self._policy_free, donate_argnums=(0,))

  def init(self) -> PolicyCache:
    b = self.max_batch
    return PolicyCache(evict_model.init_cache(self.cfg, self.policy, b, self.max_len, self.cache_dtype),
                       jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))

  def _row_pages(self, t):
    """Pages a row is charged after t tokens: its budget(t) entries plus the next token's slot."""
    return -(-(self.policy.budget(t) + 1) // self.page_size)

  def prefill_pages(self, n_tokens: int) -> int:
    return self.rows_per_sequence * self._row_pages(int(n_tokens))

  def _accounting(self, positions_B, active_B):
    """(rows per slot whose next step opens a page, pages in use, entries held summed over rows)."""
    rows = self.rows_per_sequence
    grows = (self._row_pages(positions_B + 1) > self._row_pages(positions_B)) & active_B
    pages = jnp.sum(jnp.where(active_B, self._row_pages(positions_B), 0)) * rows
    held = jnp.sum(jnp.where(active_B, self.policy.budget(positions_B), 0)) * rows
    return grows.astype(jnp.int32) * rows, pages.astype(jnp.int32), held.astype(jnp.int32)

  def occupancy(self, cache) -> tuple[int, int]:
    _, pages, held = self._accounting(np.asarray(cache.positions), np.asarray(cache.active))
    return int(pages), int(held)

  def overflowed(self, cache) -> bool:
    return False  # rows are sized for max_len, which `Engine.check` never lets a request exceed

  def _policy_prefill(self, params, cache, tokens_1xP, length, slot, temperature, top_p, seed, count):
    one = evict_model.init_cache(self.cfg, self.policy, 1, self.max_len, self.cache_dtype)  # shapes only
    logits, one = evict_model.prefill(self.cfg, self.policy, params, tokens_1xP, length[None], one)
    layers = [{n: big[n].at[slot].set(o[n][0]) for n in big} for big, o in zip(cache.layers, one)]
    cache = cache.replace(layers=layers, positions=cache.positions.at[slot].set(length),
                          active=cache.active.at[slot].set(True))
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, 0, keepdims=True)
    token = sample_rows(last, temperature[None], top_p[None], seed[None], count[None])
    grows, pages, held = self._accounting(cache.positions, cache.active)
    return jnp.stack([token[0], grows[slot], pages, held]), cache

  def _policy_step(self, params, cache, tokens_B, temperature_B, top_p_B, seed_B, count_B):
    logits, layers = evict_model.decode(self.cfg, self.policy, params, tokens_B, cache.positions, cache.layers)
    cache = cache.replace(layers=layers, positions=jnp.where(cache.active, cache.positions + 1, cache.positions))
    token = sample_rows(logits, temperature_B, top_p_B, seed_B, count_B)
    grows, pages, held = self._accounting(cache.positions, cache.active)
    return jnp.concatenate([token, grows, pages[None], held[None]]), cache

  def _policy_free(self, cache, free_B):
    layers = [dict(c, keep=jnp.where(free_B[:, None, None], False, c["keep"])) for c in cache.layers]
    return cache.replace(layers=layers, positions=jnp.where(free_B, 0, cache.positions),
                         active=cache.active & ~free_B)


def _budget_bytes(kv_budget_mb) -> int:
  if not (isinstance(kv_budget_mb, (int, float)) and math.isfinite(kv_budget_mb) and kv_budget_mb > 0):
    raise ArgumentError(f"kv_budget_mb: expected a positive number of MiB, got {kv_budget_mb!r}")
  return int(kv_budget_mb * 2**20)


def paged_kv(model, cache: str | None = None, *, cr: float | None = None, dmc_force_cr: float | None = None,
             max_batch: int = 8, kv_budget_mb: float | None = None, page_size: int = 32,
             max_len: int | None = None) -> PagedKV | PolicyKV:
  """The serving cache for a loaded `dmc_jax.api.Model`: `cache` as the API's contract ("vanilla", "dmc", "dms", or
  an eviction policy with its `cr`; None: the checkpoint's own method), a pool of `kv_budget_mb` MiB (default: every
  slot at max_len uncompressed, so it cannot run out), rows of up to `max_len` tokens (default the model's
  positions)."""
  from dmc_jax.api import LEARNED, POLICIES
  choice = model.resolve_cache(cache, cr, dmc_force_cr)
  cfg = model.config
  max_len = max_len or cfg.max_position_embeddings
  if choice.kind in POLICIES:
    policy = Policy(choice.kind, choice.cr)
    if kv_budget_mb is None:
      num_pages = max_batch * cfg.n_layers * cfg.n_kv_heads * -(-(policy.budget(max_len) + 1) // page_size)
    else:
      num_pages = max(1, _budget_bytes(kv_budget_mb) // policy_page_bytes(cfg, page_size, cfg.dtype))
    return PolicyKV(cfg, model.params, policy=policy, max_batch=max_batch, max_len=max_len, page_size=page_size,
                    num_pages=num_pages)
  dmc = None
  if choice.kind in LEARNED:
    dmc = model.learned_config(choice.kind) or DMCConfig(method=choice.kind)
  rows = cfg.n_layers * cfg.n_kv_heads
  if kv_budget_mb is None:
    num_pages = max_batch * rows * -(-max_len // page_size)
  else:
    num_pages = dmc_cache.pages_for_budget(cfg, _budget_bytes(kv_budget_mb), page_size, cfg.dtype)
  rate = None if choice.force_cr is None else 1.0 - 1.0 / choice.force_cr
  return PagedKV(cfg, model.params, kind=choice.kind, dmc=dmc, forced_merge_rate=rate, max_batch=max_batch,
                 max_len=max_len, page_size=page_size, num_pages=num_pages)
