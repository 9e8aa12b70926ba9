"""Batched autoregressive generation with a vanilla KV cache (jit-compiled prefill and decode step).

Prompts of different lengths share a batch: they are right-padded, each sequence writes its cache slots from
its own length on and uses its own positions, and the first new token of sequence b comes from the logits at
its last real prompt token. Greedy by default; temperature, top-k and top-p sampling with an explicit seed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax import cache as dmc_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model.llama import Llama, cache_bytes, cache_lib, init_cache

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@jax.named_scope("sample")  # the profiler scopes: docs/profiling.md
def sample(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] from float32 logits."""
  if s.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / s.temperature
  neg = jnp.finfo(logits.dtype).min
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if s.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    cutoff_idx = jnp.sum(cum < s.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DMCOptions:
  """Generate with the compressed DMC cache instead of the vanilla one."""

  dmc: DMCConfig
  page_size: int = 32
  pool_pages: int | None = None  # None: the worst case (no compression), so the pool cannot run out
  forced_merge_rate: float | None = None  # benchmarks: decisions forced to merge with this probability


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # new tokens per sequence (up to and including EOS)
  prompt_lengths: list[int]
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  cache_bytes: int  # vanilla: the allocated cache; DMC: bytes in use at the end (pages, merge state, tables)
  compile_seconds: float  # compilation triggered by this call (0 when shapes were seen before)
  dmc: dict | None = None  # DMC: realised CR (overall, per layer, per head), memory breakdown, vanilla bytes

  @property
  def decode_tokens_per_second(self) -> float:
    """Generated tokens per second over the decode steps (batch × steps / time), prefill excluded."""
    n = len(self.tokens) * self.decode_steps
    return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _bucket(n: int, multiple: int = 32) -> int:
  return -(-n // multiple) * multiple


_FORCED_KEY = 20240306  # fixed: forced decisions depend on positions only, not on the sampling seed


class Generator:
  """Holds the compiled prefill/decode functions for one model; reuse it across calls."""

  def __init__(self, cfg: LlamaConfig, params: Any, cache_dtype: str | None = None,
               dmc: DMCOptions | None = None):
    if dmc is None and cfg.scan_layers:
      # Per-layer vanilla cache buffers update in place; a scanned cache would be copied every step.
      raise ValueError("vanilla generation needs an unscanned model (scan_layers=False)")
    if dmc is not None:
      # DMC decodes as the model's layers lie. Unscanned (the usual checkpoint), the step unrolls the layers over
      # separate weight buffers; a scan over stacked weights would slice — copy — every weight every step (XLA:CPU
      # materialises each dynamic slice: for SmolLM2 all 540 MB of float32 weights read and written per step).
      # A scanned model still decodes as a scan (one layer body to compile, at that price).
      cfg = cfg.replace(remat_policy="none")
    self.cfg = cfg
    self.params = params
    self.dmc = dmc
    self.model = Llama(cfg) if dmc is None else Llama(cfg, dmc.dmc, "eval")
    self.cache_dtype = cache_dtype or cfg.dtype
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,), static_argnames=("sampling",))
    self._step = jax.jit(self._step_fn, donate_argnums=(1,), static_argnames=("sampling",))
    self._executables: dict = {}
    self._compile_seconds = 0.0  # compile time since the last generate() began

  def compiled_step(self, cache, token_B, index_B, key, sampling: Sampling = Sampling()):
    """The decode step compiled ahead of time for these shapes: (params, cache, token_B, index_B, key) → (next
    token_B, cache), the cache donated. For callers that drive decoding themselves (benchmarks)."""
    return self._compiled(self._step, (self.params, cache, token_B, index_B, key), sampling)

  def _compiled(self, fn, args, sampling: Sampling):
    """Ahead-of-time compiled `fn` for these argument shapes, so timings exclude compilation."""
    key = (fn is self._step, sampling, tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args)))
    if key not in self._executables:
      t0 = time.perf_counter()
      self._executables[key] = fn.lower(*args, sampling=sampling).compile()
      self._compile_seconds += time.perf_counter() - t0
    return self._executables[key]

  def _forced(self, positions_BxL):
    if self.dmc is None or self.dmc.forced_merge_rate is None:
      return None
    return forced_merge_decisions(jax.random.key(_FORCED_KEY), positions_BxL, self.cfg.n_layers,
                                  self.cfg.n_kv_heads, self.dmc.forced_merge_rate)

  def _new_cache(self, batch: int, max_len: int):
    if self.dmc is None:
      return init_cache(self.cfg, batch, max_len, self.cache_dtype)
    return cache_lib(self.dmc.dmc).init_cache(self.cfg, self.dmc.dmc, batch, max_len, self.dmc.page_size,
                                              self.dmc.pool_pages, self.cache_dtype)

  @jax.named_scope("prefill")
  def _prefill_fn(self, params, tokens_BxP, cache, lengths_B, key, sampling: Sampling):
    if self.dmc is None:
      logits, cache = self.model.apply(params, tokens_BxP, cache, jnp.zeros_like(lengths_B),
                                       method=Llama.forward_with_cache)
    else:
      positions = jnp.broadcast_to(jnp.arange(tokens_BxP.shape[1]), tokens_BxP.shape)
      logits, cache = prefill_dmc(self.model, params, tokens_BxP, lengths_B, cache, self._forced(positions))
    last_BxV = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return sample(last_BxV, key, sampling), cache

  @jax.named_scope("decode_step")
  def _step_fn(self, params, cache, token_B, index_B, key, sampling: Sampling):
    if self.dmc is None:
      logits, cache = self.model.apply(params, token_B[:, None], cache, index_B, method=Llama.forward_with_cache)
      logits = logits[:, 0]
    else:
      forced = self._forced(index_B[:, None])
      logits, cache = decode_dmc(self.model, params, token_B, cache, None if forced is None else forced[:, :, 0])
    return sample(logits, key, sampling), cache

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, eos_ids: Sequence[int] = (), stop_at_eos: bool = True,
               on_step: Callable[[int], None] | None = None) -> GenerationResult:
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    p_len = _bucket(int(lengths.max()))
    total = _bucket(p_len + max_new_tokens)
    if total > self.cfg.max_position_embeddings:
      # Not fatal (RoPE extrapolates), but worth knowing.
      log.warning("sequence length %d exceeds max_position_embeddings %d", total,
                  self.cfg.max_position_embeddings)
    tokens = np.zeros((b, p_len), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    cache = self._new_cache(b, total)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    self._compile_seconds = 0.0
    prefill_args = (self.params, jnp.asarray(tokens), cache, jnp.asarray(lengths), sub)
    prefill = self._compiled(self._prefill, prefill_args, sampling)
    step = self._compiled(self._step, (self.params, cache, jnp.zeros(b, jnp.int32), jnp.asarray(lengths), sub),
                          sampling)

    t0 = time.perf_counter()
    token, cache = prefill(*prefill_args)
    token = np.asarray(token)  # blocks: prefill time includes the first sampled token
    prefill_s = time.perf_counter() - t0

    eos = np.array(sorted(set(int(e) for e in eos_ids)), np.int32)
    out = [[int(t)] for t in token]
    done = np.isin(token, eos) if stop_at_eos and eos.size else np.zeros(b, bool)
    index = lengths.copy()
    steps = 0
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
      if done.all():
        break
      key, sub = jax.random.split(key)
      token_dev, cache = step(self.params, cache, jnp.asarray(token), jnp.asarray(index), sub)
      token = np.asarray(token_dev)
      index += 1
      steps += 1
      for i in np.flatnonzero(~done):
        out[i].append(int(token[i]))
      if stop_at_eos and eos.size:
        done |= np.isin(token, eos)
      if on_step:
        on_step(steps)
    decode_s = time.perf_counter() - t0
    if self.dmc is None:
      return GenerationResult(out, lengths.tolist(), prefill_s, decode_s, steps, cache_bytes(cache),
                              self._compile_seconds)
    lib = cache_lib(self.dmc.dmc)
    lib.check(cache)
    memory = lib.memory_bytes(cache)
    itemsize = jnp.dtype(self.cache_dtype).itemsize
    stats = {"method": self.dmc.dmc.method, "cr": lib.realised_cr(cache), "memory": memory,
             "vanilla_bytes": int(np.asarray(cache.positions).sum()) * self.cfg.kv_bytes_per_token(itemsize)}
    if self.dmc.dmc.method == "dmc":
      # Sequence length above which DMC holds less than vanilla (at CR 2 and 4, this page size and window).
      stats["crossover_tokens"] = {cr: dmc_cache.crossover_tokens(self.cfg, self.dmc.dmc, self.dmc.page_size,
                                                                  self.cache_dtype, cr) for cr in (2, 4)}
    return GenerationResult(out, lengths.tolist(), prefill_s, decode_s, steps, memory["total"],
                            self._compile_seconds, stats)


# -- DMC: the compressed cache ---------------------------------------------------------------------------------


def prefill_dmc(model: Llama, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array, cache,
                forced_alpha: jax.Array | None = None):
  """Parallel prefill of right-padded prompts: the eval-mode forward, then every slot written at once.

  `model` must be in dmc_mode="eval". Returns (logits [B, P, V], cache).
  """
  logits, cache, _ = model.apply(params, tokens_BxP, lengths_B, cache, forced_alpha, method=Llama.prefill_dmc)
  return logits, cache


def decode_dmc(model: Llama, params: Any, tokens_B: jax.Array, cache, forced_alpha: jax.Array | None = None):
  """One decode step for every sequence; forced_alpha: [layers, B, K]. Returns (logits [B, V], cache)."""
  logits, cache = model.apply(params, tokens_B[:, None], cache, forced_alpha, method=Llama.decode_dmc)
  return logits[:, 0], cache


def forced_merge_decisions(key: jax.Array, positions_BxL: jax.Array, n_layers: int, n_kv_heads: int,
                           merge_rate: float) -> jax.Array:
  """Pseudo-random hard decisions [layers, B, L, K] with P(merge) = merge_rate, a pure function of the position
  (so prefill and decode force the same pattern); position 0 always appends. Benchmarks use it to set a CR."""
  def at(pos_B):
    u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p), (n_layers, n_kv_heads)))(pos_B)
    return jnp.moveaxis(u, 0, 1)  # [layers, B, K]
  u = jax.vmap(at, in_axes=1, out_axes=2)(positions_BxL)  # [layers, B, L, K]
  return ((u < merge_rate) & (positions_BxL[None, :, :, None] > 0)).astype(jnp.float32)
