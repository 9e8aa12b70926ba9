"""The Python API: load a checkpoint, generate with any cache, score text.

    import dmc_jax
    dmc_jax.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt/smollm2", source="gguf")
    model = dmc_jax.load("ckpt/smollm2")                          # a dmc-jax checkpoint directory
    prompts = ["The capital of France is", "Gravity is the force that"]
    model.generate(prompts, max_new_tokens=8)                     # -> [" Paris. ...", ...]
    model.generate(prompts, max_new_tokens=8, cache="h2o", cr=2)  # an eviction policy at a target ratio
    model.generate(prompts, max_new_tokens=8, dmc_force_cr=4)     # DMC with forced decisions (benchmarks)
    model.perplexity(["The quick brown fox jumps over the lazy dog."], cache="tova", cr=3)

The cache-selection contract (the CLI's `--cache NAME [--cr CR] [--dmc-force-cr CR]` mirrors it):
* `cache=None` uses the checkpoint's own learned method (`compression.method`: "dmc" or "dms"), else "vanilla".
* `cr` is the target ratio of an eviction policy ("streaming", "h2o", "tova") and required for one. A learned
  cache ("dmc", "dms") compresses at the model's own ratio: passing `cr` with it is an error.
* Forced decisions (benchmarks) only through `dmc_force_cr=`: DMC merges (DMS evicts) with probability 1 - 1/CR
  whatever the model decides; with `cache=None` it implies the checkpoint's learned method, else "dmc".
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import numpy as np

from dmc_jax.checkpoint import Checkpoint
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import ArgumentError

log = logging.getLogger(__name__)

POLICIES = ("streaming", "h2o", "tova")
LEARNED = ("dmc", "dms")
CACHES = ("vanilla",) + LEARNED + POLICIES
_SCORE_BUCKET = 64  # scored rows are right-padded to a multiple of this (few compiled shapes)


@dataclasses.dataclass(frozen=True)
class CacheChoice:
  """A resolved cache: `kind` in CACHES; `cr` an eviction policy's target ratio; `force_cr` forced DMC decisions."""

  kind: str
  cr: float | None = None
  force_cr: float | None = None

  def label(self) -> str:
    if self.kind in POLICIES:
      return f"{self.kind} CR {self.cr:g}"
    if self.force_cr is not None:
      return f"dmc (forced CR {self.force_cr:g})"
    return self.kind


def resolve_cache(method: str | None, cache: str | None = None, cr: float | None = None,
                  dmc_force_cr: float | None = None) -> CacheChoice:
  """Applies the cache-selection contract (module docstring) for a checkpoint whose learned method is `method`."""
  if cache is None:
    cache = (method if method in LEARNED else "dmc") if dmc_force_cr is not None else (method or "vanilla")
  if cache not in CACHES:
    raise ArgumentError(f"cache: unknown {cache!r}; expected one of {list(CACHES)}")
  if dmc_force_cr is not None:
    if cache not in LEARNED:
      raise ArgumentError(f"dmc_force_cr: forces DMC or DMS decisions; it cannot be used with cache={cache!r}")
    if not (isinstance(dmc_force_cr, (int, float)) and math.isfinite(dmc_force_cr) and dmc_force_cr >= 1):
      raise ArgumentError(f"dmc_force_cr: expected a finite ratio >= 1, got {dmc_force_cr!r}")
  if cache in POLICIES:
    if cr is None:
      raise ArgumentError(f"cache={cache!r}: an eviction policy needs its target ratio cr= (e.g. cr=2)")
    if not (isinstance(cr, (int, float)) and math.isfinite(cr) and cr >= 1):
      raise ArgumentError(f"cr: expected a finite ratio >= 1, got {cr!r}")
    return CacheChoice(cache, cr=float(cr))
  if cr is not None:
    if cache in LEARNED:
      raise ArgumentError(f"cr: cache={cache!r} compresses at the model's own learned ratio; cr= sets an eviction "
                          f"policy's ratio ({', '.join(POLICIES)}); to force DMC decisions use dmc_force_cr=")
    raise ArgumentError("cr: the vanilla cache does not compress; cr= sets an eviction policy's ratio")
  return CacheChoice(cache, force_cr=None if dmc_force_cr is None else float(dmc_force_cr))


@dataclasses.dataclass
class Completion:
  """What `Model.complete` returns: texts, token ids and the generation's statistics."""

  texts: list[str]
  tokens: list[list[int]]  # new token ids per prompt (EOS excluded)
  prompt_tokens: list[list[int]]
  cache: CacheChoice
  result: Any  # dmc_jax.generate.GenerationResult: times, steps, cache bytes, DMC statistics
  generator: Any  # the Generator that ran it (its DMC options, policy)


class Model:
  """A loaded checkpoint: parameters on the device, the tokenizer, and compiled generators per cache."""

  def __init__(self, ckpt: Checkpoint, dtype: str | None = None, attention_impl: str | None = None,
               adapter=None):
    import jax

    from dmc_jax.config import DTYPES
    if dtype is not None and dtype not in DTYPES:
      raise ArgumentError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    self.checkpoint = ckpt
    self.config: LlamaConfig = ckpt.config.replace(dtype=dtype or "float32", scan_layers=False, remat_policy="none",
                                                   attention_impl=attention_impl)
    self.tokenizer = ckpt.tokenizer()
    self.adapter = adapter  # dmc_jax.adapter.Adapter applied to the checkpoint's parameters, or None
    params = ckpt.load_params()
    self.params = jax.device_put(params if adapter is None else adapter.apply(params))
    self._generators: dict = {}
    self._scorers: dict = {}
    self._stacked = None

  # -- what the checkpoint is ---------------------------------------------------------------------------------

  @property
  def method(self) -> str | None:
    """The learned compression method of the weights ("dmc", "dms") or None; an adapter's method when applied."""
    return self.adapter.method if self.adapter is not None else self.checkpoint.method

  @property
  def chat_template(self) -> str | None:
    return self.checkpoint.chat_template

  def dmc_config(self) -> DMCConfig | None:
    if self.adapter is not None:
      return self.adapter.dmc
    d = self.checkpoint.dmc
    return None if d is None else DMCConfig.from_dict(d, where=f"{self.checkpoint.directory}/checkpoint.json: "
                                                              "compression")

  def learned_config(self, kind: str) -> DMCConfig | None:
    """The settings for cache `kind` ("dmc" or "dms"): the weights' own, or None when they carry none. Weights
    trained for the other method are refused: their decisions mean something else."""
    dmc = self.dmc_config()
    if dmc is not None and dmc.method != kind:
      raise ArgumentError(f"cache={kind!r}: {self.checkpoint.directory} was retrofitted with {dmc.method!r}; use "
                          f"cache={dmc.method!r}")
    return dmc

  @property
  def eos_ids(self) -> list[int]:
    return sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids))

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

  def resolve_cache(self, cache: str | None = None, cr: float | None = None,
                    dmc_force_cr: float | None = None) -> CacheChoice:
    return resolve_cache(self.method, cache, cr, dmc_force_cr)

  # -- generation ---------------------------------------------------------------------------------------------

  def generator(self, choice: CacheChoice, *, page_size: int = 32, kv_budget_mb: float | None = None):
    """The (cached) Generator for a cache choice; its compiled functions are reused across calls."""
    key = (choice, page_size, kv_budget_mb)
    if key in self._generators:
      return self._generators[key]
    from dmc_jax.generate import DMCOptions, Generator
    if kv_budget_mb is not None and choice.kind not in LEARNED:
      raise ArgumentError(f"kv_budget_mb: sizes the DMC/DMS cache's page pool; cache={choice.kind!r} has none")
    if not (isinstance(page_size, int) and page_size >= 1):
      raise ArgumentError(f"page_size: expected an integer >= 1, got {page_size!r}")
    if choice.kind in POLICIES:
      from dmc_jax.baselines.policies import Policy
      from dmc_jax.baselines.policy_generate import PolicyGenerator
      gen = PolicyGenerator(self.config, self.params, Policy(choice.kind, choice.cr))
    elif choice.kind in LEARNED:
      from dmc_jax import cache as dmc_cache
      dmc = self.learned_config(choice.kind)
      if dmc is None:
        dmc = DMCConfig(method=choice.kind)
        if choice.force_cr is None:
          log.warning("%s was not retrofitted with %s: its decisions come from an untrained channel",
                      self.checkpoint.directory, choice.kind.upper())
      pages = None
      if kv_budget_mb is not None:
        if not (isinstance(kv_budget_mb, (int, float)) and math.isfinite(kv_budget_mb) and kv_budget_mb > 0):
          raise ArgumentError(f"kv_budget_mb: expected a positive number of MiB, got {kv_budget_mb!r}")
        pages = dmc_cache.pages_for_budget(self.config, int(kv_budget_mb * 2**20), page_size, self.config.dtype)
      rate = None if choice.force_cr is None else 1.0 - 1.0 / choice.force_cr
      gen = Generator(self.config, self.params,
                      dmc=DMCOptions(dmc, page_size=page_size, pool_pages=pages, forced_merge_rate=rate))
    else:
      gen = Generator(self.config, self.params)
    self._generators[key] = gen
    return gen

  def complete(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, cache: str | None = None,
               cr: float | None = None, dmc_force_cr: float | None = None, kv_budget_mb: float | None = None,
               page_size: int | None = None, stop_at_eos: bool = True, add_special_tokens: bool = True,
               on_step=None, max_batch: int | None = None) -> Completion:
    """Generates a continuation of every prompt (one batch) and returns texts, ids and statistics.

    on_step(s): called after decode step s (`Generator.generate`'s hook; the CLI's --profile uses it).
    page_size: slots per page of a DMC/DMS cache; None fits it to the longest prompt + max_new_tokens
    (`cache.fitted_page_size`: 8 up to 128 tokens, 16 up to 256, else 32). Outputs do not depend on it.
    max_batch: stream the prompts through the continuous-batching engine (`dmc_jax.serving`) with this many
    decode slots over a pool of `kv_budget_mb` (any cache; prompt i samples with seed + i): a finished
    sequence's slot and pages go to the next prompt at once. Without it, one fixed batch as before."""
    from dmc_jax.generate import Sampling
    prompts = _prompt_list(prompts)
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
      raise ArgumentError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    choice = self.resolve_cache(cache, cr, dmc_force_cr)
    try:
      sampling = Sampling(float(temperature), int(top_k), float(top_p))
    except ValueError as e:
      raise ArgumentError(str(e)) from None
    if not math.isfinite(sampling.temperature):
      raise ArgumentError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if sampling.top_k > self.config.vocab_size:
      raise ArgumentError(f"top_k: {sampling.top_k} exceeds the vocabulary of {self.config.vocab_size} tokens")
    ids = [self.encode(p, add_special_tokens) for p in prompts]
    if any(not i for i in ids):
      raise ArgumentError("prompts: a prompt encodes to no tokens (give text, or keep the special tokens)")
    # Checked before any cache is allocated: 10^8 new tokens is one line, not a 25 GB allocation.
    longest = max(len(i) for i in ids)
    if longest + max_new_tokens > self.config.max_position_embeddings:
      raise ArgumentError(f"max_new_tokens: {longest} prompt + {max_new_tokens} new tokens exceed the model's "
                          f"{self.config.max_position_embeddings} positions")
    if page_size is None:
      from dmc_jax import cache as dmc_cache
      page_size = dmc_cache.fitted_page_size(longest + max_new_tokens) if choice.kind in LEARNED else 32
    if max_batch is not None:
      return self._complete_streamed(ids, max_new_tokens, sampling, seed, choice, kv_budget_mb, page_size,
                                     max_batch, stop_at_eos)
    gen = self.generator(choice, page_size=page_size, kv_budget_mb=kv_budget_mb)
    eos = self.eos_ids
    result = gen.generate(ids, max_new_tokens, sampling, seed=seed, eos_ids=eos, stop_at_eos=stop_at_eos,
                          on_step=on_step)
    new = [[t for t in toks if t not in eos] for toks in result.tokens]
    return Completion([self.tokenizer.decode(t) for t in new], new, ids, choice, result, gen)

  def _complete_streamed(self, ids, max_new_tokens, sampling, seed, choice, kv_budget_mb, page_size, max_batch,
                         stop_at_eos) -> Completion:
    """`complete` through the serving engine (offline continuous batching)."""
    from dmc_jax.serving import Engine, paged_kv
    if not (isinstance(max_batch, int) and max_batch >= 1):
      raise ArgumentError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
    if sampling.top_k:
      raise ArgumentError("top_k: the serving engine samples with temperature and top_p only")
    # Rows sized for the longest request (rounded up to a power of two, so calls share compiled functions).
    max_len = 1 << (max(len(i) for i in ids) + max_new_tokens - 1).bit_length()
    key = ("engine", choice, page_size, kv_budget_mb, max_batch, max_len)
    if key not in self._generators:
      self._generators[key] = paged_kv(self, choice.kind, cr=choice.cr, dmc_force_cr=choice.force_cr,
                                       max_batch=max_batch,
                                       kv_budget_mb=kv_budget_mb, page_size=page_size, max_len=max_len)
    kv = self._generators[key]
    eos = self.eos_ids
    engine = Engine(kv, eos_ids=eos if stop_at_eos else ())
    reqs = [engine.submit(p, max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                          seed=(seed + i) % 2**32) for i, p in enumerate(ids)]
    engine.run_until_idle()
    new = [[t for t in r.tokens if t not in eos] for r in reqs]
    stats = {"decode_steps": engine.decode_steps, "preemptions": engine.preemptions,
             "tokens_generated": engine.tokens_generated, "pool_pages": kv.num_pages,
             "finish_reasons": [r.finish_reason for r in reqs]}
    return Completion([self.tokenizer.decode(t) for t in new], new, ids, choice, stats, kv)

  def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, **kwargs) -> list[str]:
    """The continuations (text after each prompt) as a list; keyword arguments as `complete`."""
    return self.complete(prompts, max_new_tokens, **kwargs).texts

  # -- scoring ------------------------------------------------------------------------------------------------

  def _scorer(self, choice: CacheChoice):
    """jit(params, tokens [B, L], targets [B, L]) -> (log p(target) [B, L], greedy == target [B, L]), from the
    parallel forward of the chosen cache (DMC: eval-mode hard decisions; a policy: its exact eviction)."""
    if choice in self._scorers:
      return self._scorers[choice]
    import jax
    import jax.numpy as jnp

    from dmc_jax.convert import layout
    from dmc_jax.model.llama import Llama
    if choice.force_cr is not None:
      raise ArgumentError("dmc_force_cr: forced decisions are for decoding benchmarks; scoring uses the model's own")
    if choice.kind in POLICIES:
      from dmc_jax.baselines import evict_model
      from dmc_jax.baselines.policies import Policy
      policy = Policy(choice.kind, choice.cr)
      params = evict_model.stack_params(self.config, self.params)
      forward = lambda p, t: evict_model.forward(self.config, policy, p, t)[0]
    else:
      if self._stacked is None:
        self._stacked = {"params": layout.stack_layers(self.params["params"], self.config.n_layers,
                                                       stack=jnp.stack)}
      params = self._stacked
      scanned = self.config.replace(scan_layers=True)
      if choice.kind in LEARNED:
        dmc = self.learned_config(choice.kind)
        if dmc is None:
          raise ArgumentError(f"cache={choice.kind!r}: {self.checkpoint.directory} has no {choice.kind.upper()} "
                              "settings (not retrofitted)")
        model = Llama(scanned, dmc, "eval")
        forward = lambda p, t: model.apply(p, t)[0]
      else:
        model = Llama(scanned)
        forward = lambda p, t: model.apply(p, t)

    def score(p, tokens_BxL, targets_BxL):
      logp = jax.nn.log_softmax(forward(p, tokens_BxL).astype(jnp.float32), axis=-1)
      target_logp = jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
      return target_logp, jnp.argmax(logp, axis=-1) == targets_BxL
    fn = jax.jit(score)
    self._scorers[choice] = (fn, params)
    return self._scorers[choice]

  def score(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, cache: str | None = None,
            cr: float | None = None, batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per (input ids, target ids) row of equal lengths: (log p of each target, whether it is the argmax).

    Rows are sorted by length, right-padded to a multiple of 64 and batched; padding after a row cannot change
    its causal log-probabilities. The lm-eval adapter and `loglikelihood` are built on this.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
      raise ArgumentError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    choice = self.resolve_cache(cache, cr)
    fn, params = self._scorer(choice)
    out: list = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      width = -(-max(len(rows[i][0]) for i in idx) // _SCORE_BUCKET) * _SCORE_BUCKET
      tokens = np.zeros((batch_size, width), np.int32)
      targets = np.zeros_like(tokens)
      for r, i in enumerate(idx):
        inp, tgt = rows[i]
        if len(inp) != len(tgt) or not len(inp):
          raise ArgumentError(f"score: row {i} has {len(inp)} inputs and {len(tgt)} targets")
        tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      logp, greedy = (np.asarray(a) for a in fn(params, tokens, targets))
      for r, i in enumerate(idx):
        n = len(rows[i][0])
        out[i] = (logp[r, :n], greedy[r, :n])
    return out

  def _text_rows(self, texts) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per text: its ids cut to the last max_position_embeddings + 1, shifted by one."""
    rows = []
    for i, text in enumerate(_prompt_list(texts, "texts")):
      ids = self.encode(text)[-(self.config.max_position_embeddings + 1):]
      if len(ids) < 2:
        raise ArgumentError(f"texts[{i}]: needs at least 2 tokens to score, got {len(ids)}")
      rows.append((ids[:-1], ids[1:]))
    return rows

  def loglikelihood(self, texts: str | Sequence[str], *, cache: str | None = None, cr: float | None = None,
                    batch_size: int = 8) -> list[float]:
    """Sum of log p(token | preceding tokens) over each text's tokens after the first (BOS, if the tokenizer adds
    one, is the first), under the chosen cache's parallel forward. Texts longer than the model's context are cut
    to its last max_position_embeddings + 1 tokens."""
    scored = self.score(self._text_rows(texts), cache=cache, cr=cr, batch_size=batch_size)
    return [float(lp.sum(dtype=np.float64)) for lp, _ in scored]

  def perplexity(self, texts: str | Sequence[str], *, cache: str | None = None, cr: float | None = None,
                 batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per scored token) over all texts (see `loglikelihood`)."""
    rows = self._text_rows(texts)
    scored = self.score(rows, cache=cache, cr=cr, batch_size=batch_size)
    return math.exp(-sum(float(lp.sum(dtype=np.float64)) for lp, _ in scored) / sum(len(t) for _, t in rows))


def _prompt_list(prompts, name: str = "prompts") -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ArgumentError(f"{name}: expected a string or a non-empty list of strings")
  return prompts


def load(path: str, *, adapter: str | None = None, dtype: str | None = None, verify: bool = True,
         attention_impl: str | None = None) -> Model:
  """Opens a dmc-jax checkpoint directory (checksums verified unless `verify=False`) and loads its parameters.

  `dtype`: compute dtype (default float32; bfloat16 is faster on accelerators, slower on CPUs).
  `attention_impl`: the DMC attention and decode kernels (LlamaConfig.attention_impl; None: the best available).
  `adapter`: an adapter directory (`dmc-jax train` with train.trainable != all writes WORKDIR/adapter) applied to
  the checkpoint's parameters; its method becomes the default cache (cache="vanilla" turns it off). A checkpoint
  whose parameter digest is not the adapter's base is refused.
  """
  ckpt = Checkpoint(path, verify=verify)
  applied = None
  if adapter is not None:
    from dmc_jax import adapter as adapter_lib
    applied = adapter_lib.load(adapter, verify=verify)
    applied.check_base(ckpt)
  return Model(ckpt, dtype=dtype, attention_impl=attention_impl, adapter=applied)
