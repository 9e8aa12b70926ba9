"""`dmc-jax bench`: DMC decode throughput at an equal KV-memory budget, the decode kernel's bandwidth, and training
step time (fused DMC vs vanilla vs dense-bias DMC). Random weights: speed does not depend on their values.

* Equal memory: each method gets the same KV budget and the largest batch that fits it, computed analytically —
  vanilla: tokens × bytes per token; DMC (decisions forced to merge at rate 1 − 1/CR): per (layer, sequence, KV
  head) row, its expected pages (rounded up, plus a 6-sigma margin over the whole pool), its float32 merge state
  (sums and the W-entry ring) and its block table (see `plan`). The caches are synthesised at the given context
  (prefill is not what is being measured), then `--steps` decode steps run through `Generator`'s compiled step;
  afterwards the DMC cache must not have overflowed and must fit the budget. Eviction policies (`--policies`, at
  the same CRs): the compact cache of `dmc_jax.baselines.evict_model` (⌈T / CR⌉ + 1 slots per layer and KV head
  + 9 bytes of policy state a slot), filled to the policy's budget at the context; afterwards every row must hold
  exactly its budget.
* `--ckpt DIR [--cache NAME] [--adapter DIR]`: a real checkpoint's own decisions after a prefill of real text
  (rows "dmc ckpt" beside its vanilla, at vanilla's equal-memory batch and at the batch its realised CR fits;
  `ckpt_decode`).
* Kernel bandwidth: the paged decode attention alone over one layer's rows at the DMC batch; bytes = the pages in
  use (K and V) + q + output, against the device's measured copy bandwidth (read + write).
* Training: value-and-grad of the LM loss, vanilla attention vs DMC with the dense-bias XLA reference vs DMC with
  the fused Pallas kernel (GPU only: on a CPU Pallas only runs interpreted).

`--profile DIR` writes a jax.profiler trace of the whole run (experiments/harness/profiling.py; host annotations
`bench/...` per section, the library's named scopes inside: docs/profiling.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time

import numpy as np

# jax is imported inside the functions: `dmc-jax` builds every subcommand's parser on each start.

PRESETS = {
    # A CPU run of a few minutes: a Llama-2-7B-width body with 2 layers (a whole 7B does not fit 24 GiB in float32
    # with its caches) and the whole SmolLM2-135M shape.
    "cpu": dict(models=["llama2-7b@2", "smollm2-135m"], budget_mb=[1024, 512], context=1024, steps=16,
                dtype="float32", policies=["h2o"], train_model="smollm2-135m@2", train_batch=1, train_len=512,
                bw_context=1024, bw_batch=8),
    # make gpu-check: the whole Llama-2-7B shape, bf16, a 30 GiB KV budget (fits on an H100 beside the weights and
    # the scan-stacked copy of them that DMC generation makes). No policy rows by default: each is one more
    # whole-model compile in gpu-check's few minutes.
    "gpu": dict(models=["llama2-7b"], budget_mb=[30 * 1024], context=1024, steps=16, dtype="bfloat16", policies=[],
                train_model="llama2-7b@2", train_batch=1, train_len=4096, bw_context=2048, bw_batch=None),
}


def model_config(spec: str, dtype: str, attention_impl):
  """'name' or 'name@layers' (a preset with fewer layers)."""
  from dmc_jax.presets import preset
  name, _, layers = spec.partition("@")
  changes = dict(param_dtype=dtype, dtype=dtype, attention_impl=attention_impl)
  if layers:
    changes["n_layers"] = int(layers)
  return preset(name, **changes)


# -- analytic sizing -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  method: str  # "vanilla" or "dmc cr X"
  cr: float
  batch: int
  bytes_per_seq: int
  table_pages: int = 0  # DMC: block-table width per row
  pool_pages: int = 0


def dmc_row_bytes(cfg, dmc, page_size: int, table_pages: int) -> tuple[int, int]:
  """(bytes of one page: its K and V and its entry on the pool's free stack; bytes of one row's merge state +
  block table + length)."""
  import jax.numpy as jnp
  d, w = cfg.head_dim, dmc.window or 0
  state = 4 * (2 * d + 1 + 1 + w * (2 * d + 1))  # sum_k, sum_v, sum_w, run, ring_k, ring_v, ring_w
  return 2 * page_size * d * jnp.dtype(cfg.dtype).itemsize + 4, state + 4 * table_pages + 4


def plan(cfg, dmc, budget: int, context: int, steps: int, cr: float, page_size: int) -> Plan:
  """The largest batch whose cache fits `budget` bytes after `context + steps` tokens.

  DMC rows (one per layer × KV head) hold 1 + Binomial(T − 1, 1/CR) slots. The pool is shared, so it needs
  Σ ceil(n_r / S) ≤ Σ n_r / S + rows pages, with Σ n_r bounded by its mean + 6 standard deviations; a row's block
  table (4 bytes a page) is sized for its own mean + 4 standard deviations.
  """
  import jax.numpy as jnp
  tokens = context + steps
  if cr == 0:
    per_seq = tokens * cfg.kv_bytes_per_token(jnp.dtype(cfg.dtype).itemsize)
    return Plan("vanilla", 1.0, budget // per_seq, per_seq)
  p = 1 - 1 / cr  # forced merge rate; the first token always appends
  mean = 1 + (tokens - 1) / cr
  sd = math.sqrt((tokens - 1) * p * (1 - p))
  table_pages = math.ceil((mean + 4 * sd) / page_size)
  page, row_fixed = dmc_row_bytes(cfg, dmc, page_size, table_pages)
  rows = cfg.n_layers * cfg.n_kv_heads
  per_seq = rows * ((mean / page_size + 1) * page + row_fixed) + 4
  batch = int(budget // per_seq)
  pages = lambda b: math.ceil(b * rows * (mean / page_size + 1) + 6 * sd * math.sqrt(b * rows) / page_size)
  while batch > 0 and pages(batch) * page + batch * (rows * row_fixed + 4) > budget:
    batch -= 1
  pool = (budget - batch * (rows * row_fixed + 4)) // page
  return Plan(f"dmc cr {cr:g}", cr, batch, int(per_seq), table_pages, int(pool))


def plan_policy(cfg, policy, budget: int, context: int, steps: int) -> Plan:
  """The largest batch whose compact eviction cache (sized for `context + steps` tokens) fits `budget` bytes."""
  import jax.numpy as jnp

  from dmc_jax.baselines import evict_model
  slots = evict_model.capacity(policy, context + steps)
  per_slot = 2 * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize + 4 + 4 + 1  # k, v; score, pos, keep
  per_seq = cfg.n_layers * cfg.n_kv_heads * slots * per_slot
  return Plan(f"{policy.name} cr {policy.cr:g}", policy.cr, budget // per_seq, per_seq)


# -- synthetic caches at a given context -------------------------------------------------------------------------


def synthetic_policy_cache(cfg, policy, batch: int, context: int, steps: int):
  """An eviction cache after `context` tokens: the policy's budget of entries held, at spread-out positions."""
  import jax.numpy as jnp

  from dmc_jax.baselines import evict_model
  held = policy.budget(context)
  out = []
  for c in evict_model.init_cache(cfg, policy, batch, context + steps, cfg.dtype):
    slot = jnp.arange(c["keep"].shape[-1])
    pos = jnp.round(slot * (context - 1) / max(held - 1, 1)).astype(jnp.int32)
    out.append(dict(c, keep=jnp.broadcast_to(slot < held, c["keep"].shape),
                    pos=jnp.broadcast_to(jnp.where(slot < held, pos, 0), c["pos"].shape)))
  return out


def synthetic_dmc_cache(cfg, dmc, pl_: Plan, context: int, page_size: int, seed: int = 0):
  """A DMC cache as `context` tokens with decisions at rate 1 − 1/CR leave it: per-row lengths 1 + Binomial."""
  import jax.numpy as jnp

  from dmc_jax import cache as dmc_cache
  rng = np.random.default_rng(seed)
  shape = (cfg.n_layers, pl_.batch, cfg.n_kv_heads)
  lengths = 1 + rng.binomial(context - 1, 1 / pl_.cr, shape)
  need = -(-lengths // page_size)
  if (need > pl_.table_pages).any() or need.sum() > pl_.pool_pages:
    raise RuntimeError("bench: the synthetic cache does not fit its analytic plan (a > 4-sigma row)")
  first = (np.cumsum(need) - need.ravel()).reshape(shape)
  page_i = np.arange(pl_.table_pages)
  table = np.where(page_i < need[..., None], first[..., None] + page_i, -1).astype(np.int32)
  c = dmc_cache.init_cache(cfg, dmc, pl_.batch, pl_.table_pages * page_size, page_size, pl_.pool_pages, cfg.dtype)
  return c.replace(lengths=jnp.asarray(lengths, jnp.int32), block_table=jnp.asarray(table),
                   next_free=jnp.asarray(need.sum(), jnp.int32), positions=jnp.full((pl_.batch,), context, jnp.int32),
                   sum_w=jnp.ones_like(c.sum_w), run=jnp.ones_like(c.run))


def plan_dmc_at_batch(cfg, dmc, batch: int, context: int, steps: int, cr: float, page_size: int) -> Plan:
  """A DMC plan for a given batch (the same-batch rows): the pool the forced-CR cache needs, as `plan` sizes it."""
  tokens = context + steps
  p = 1 - 1 / cr
  mean = 1 + (tokens - 1) / cr
  sd = math.sqrt((tokens - 1) * p * (1 - p))
  table_pages = math.ceil((mean + 4 * sd) / page_size)
  page, row_fixed = dmc_row_bytes(cfg, dmc, page_size, table_pages)
  rows = batch * cfg.n_layers * cfg.n_kv_heads
  pool = math.ceil(rows * (mean / page_size + 1) + 6 * sd * math.sqrt(rows) / page_size)
  return Plan(f"dmc cr {cr:g}", cr, batch, int(rows // batch * ((mean / page_size + 1) * page + row_fixed) + 4),
              table_pages, pool)


def matmul_params(cfg) -> int:
  """Weights that enter a matmul per token: every projection and the LM head (the embedding lookup is a gather;
  with tied embeddings the same matrix is the head)."""
  d, h, kv, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  return cfg.n_layers * (2 * d * h * dh + 2 * d * kv * dh + 3 * d * f) + cfg.vocab_size * d


def step_cost(cfg, param_bytes: int, batch: int, slots_attended: int, kv_bytes: int) -> dict:
  """A decode step's unavoidable work: bytes read (every weight once + the K/V and state in use) and FLOPs
  (2 × matmul parameters × batch + 4 × query heads × head_dim × slots attended, summed over layers and KV heads:
  `slots_attended` counts each (layer, sequence, KV head) row's slots once, its G query heads share them)."""
  flops = 2 * matmul_params(cfg) * batch + 4 * cfg.n_groups * cfg.head_dim * slots_attended
  return {"bytes_read": int(param_bytes + kv_bytes), "flops": int(flops)}


def time_decode(gen, cache, batch: int, context: int, steps: int):
  """Seconds per decode step (after one warm-up step), through the Generator's ahead-of-time compiled step."""
  import jax
  import jax.numpy as jnp
  token = jnp.zeros((batch,), jnp.int32)
  index = jnp.full((batch,), context, jnp.int32)
  key = jax.random.key(0)
  step = gen.compiled_step(cache, token, index, key)
  token, cache = step(gen.params, cache, token, index, key)
  jax.block_until_ready(token)
  t0 = time.perf_counter()
  for i in range(steps):
    token, cache = step(gen.params, cache, token, index + 1 + i, key)
  jax.block_until_ready((token, cache))
  return (time.perf_counter() - t0) / steps, cache


def _dmc_check(cfg, dmc, cache, held: str):
  """A DMC or DMS row's (kv bytes held, realised CR, slots attended, K/V + per-row state bytes read); the pool must
  not have overflowed. `held`: "pool" (the whole pool a plan sized to the budget) or "pages" (the pages in use)."""
  import jax.numpy as jnp

  from dmc_jax.model.llama import cache_lib
  lib = cache_lib(dmc)
  lib.check(cache)
  mem = lib.memory_bytes(cache)
  lengths = np.asarray(cache.lengths)
  slots = int(lengths.sum())  # at the end; the timed steps saw ≈ this (CR > 1 grows slowly)
  if dmc.method == "dms":
    realised = lib.realised_cr(cache)["overall"]
    state, row_state = mem["ring"], 4 * 3  # a step reads two ring entries and the eviction count per row
  else:
    realised = float(np.asarray(cache.positions).sum() * cfg.n_layers * cfg.n_kv_heads / slots)
    state, row_state = mem["merge_state"], 4 * (2 * cfg.head_dim + 2 + (dmc.window or 0) * (2 * cfg.head_dim + 1))
  itemsize = jnp.dtype(cache.k_pages.dtype).itemsize
  return (mem[held] + state + mem["tables"], realised, slots,
          slots * 2 * cfg.head_dim * itemsize + lengths.size * row_state)


@dataclasses.dataclass
class _Case:
  """One bench row: how to build its cache (afresh for every repetition) and the generator that decodes it."""
  group: str  # "decode" (equal memory) or "same_batch"
  plan: Plan
  gen: object
  make_cache: object
  check: object  # cache -> (kv bytes held, realised CR, slots attended, K/V + state bytes read)
  times: list = dataclasses.field(default_factory=list)


def decode_equal_memory(spec: str, *, budget: int, context: int, steps: int, crs, dtype: str, page_size: int,
                        attention_impl, policies=(), same_batch: bool = False, repeats: int = 1,
                        copy_bw: float | None = None, matmul_flops: float | None = None) -> list[dict]:
  """Decode rows at an equal KV budget (`group` "decode"), and with `same_batch` at vanilla's equal-memory batch
  (DMC forced to CR 1 — merge rate 0 — and the CRs, each policy at the CRs: `group` "same_batch"). `repeats`
  interleaved repetitions (every case once per round, its cache rebuilt), the median reported with the spread.
  With `copy_bw` and `matmul_flops` every row gets its roofline (bytes_read / copy_bw + flops / matmul_flops)."""
  import jax
  import jax.numpy as jnp

  from dmc_jax.baselines.policies import Policy
  from dmc_jax.baselines.policy_generate import PolicyGenerator
  from dmc_jax.config import DMCConfig
  from dmc_jax.generate import DMCOptions, Generator
  from dmc_jax.model.llama import cache_bytes, init_cache
  from experiments.bench.decode import random_params
  cfg = model_config(spec, dtype, attention_impl)
  dmc = DMCConfig()
  params = random_params(cfg)  # shared by every generator (all decode the unscanned layers as they lie)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # a tied embedding is one leaf: counted once
  itemsize = jnp.dtype(cfg.dtype).itemsize
  tokens_end = context + steps + 1

  def vanilla_case(group, pl_):
    def check(cache):
      n = pl_.batch * cfg.n_layers * cfg.n_kv_heads * (context + steps // 2)  # mean slots in use while timed
      return pl_.batch * pl_.bytes_per_seq, 1.0, n, n * 2 * cfg.head_dim * itemsize
    return _Case(group, pl_, Generator(cfg, params), lambda: init_cache(cfg, pl_.batch, tokens_end, cfg.dtype), check)

  def dmc_case(group, pl_, cr):
    gen = Generator(cfg, params, dmc=DMCOptions(dmc, page_size, pl_.pool_pages, forced_merge_rate=1 - 1 / cr))
    check = functools.partial(_dmc_check, cfg, dmc, held="pool")
    return _Case(group, pl_, gen, lambda: synthetic_dmc_cache(cfg, dmc, pl_, context, page_size), check)

  def policy_case(group, pl_, policy):
    gen = PolicyGenerator(cfg, params, policy)
    def check(cache):
      held, budget_end = np.stack([np.asarray(c["keep"]).sum(-1) for c in cache]), policy.budget(tokens_end)
      if (held != budget_end).any():
        raise RuntimeError(f"bench: {pl_.method} holds {np.unique(held)} entries, expected its budget {budget_end}")
      slots = int(held.sum())
      cap = cache[0]["keep"].shape[-1]
      return (cache_bytes(cache), tokens_end / budget_end, slots,
              slots * 2 * cfg.head_dim * itemsize + held.size * cap * 9)
    return _Case(group, pl_, gen, lambda: synthetic_policy_cache(cfg, policy, pl_.batch, context, steps + 1), check)

  cases = []
  vanilla_plan = plan(cfg, dmc, budget, context, steps + 1, 0, page_size)
  for cr, policy_name in [(cr, None) for cr in [0, *crs]] + [(cr, name) for name in policies for cr in crs]:
    policy = Policy(policy_name, cr) if policy_name else None
    pl_ = plan_policy(cfg, policy, budget, context, steps + 1) if policy else plan(cfg, dmc, budget, context,
                                                                                   steps + 1, cr, page_size)
    if pl_.batch < 1:
      raise ValueError(f"bench: a KV budget of {budget / 2**20:.0f} MiB holds no {pl_.method} sequence of "
                       f"{context} tokens for {spec}; raise --budget-mb")
    cases.append(policy_case("decode", pl_, policy) if policy else
                 vanilla_case("decode", pl_) if cr == 0 else dmc_case("decode", pl_, cr))
  if same_batch:
    b = vanilla_plan.batch
    cases.append(vanilla_case("same_batch", vanilla_plan))
    for cr in [1.0, *crs]:
      cases.append(dmc_case("same_batch", plan_dmc_at_batch(cfg, dmc, b, context, steps + 1, cr, page_size), cr))
    for name in policies:
      for cr in crs:
        policy = Policy(name, cr)
        cases.append(policy_case("same_batch", dataclasses.replace(plan_policy(cfg, policy, budget, context,
                                                                               steps + 1), batch=b), policy))
  results = _time_interleaved(cases, repeats, spec, budget, context, steps)
  return _rows(cases, results, spec, cfg, param_bytes, context, copy_bw, matmul_flops)


def _time_interleaved(cases, repeats: int, spec: str, budget: int, context: int, steps: int) -> dict:
  """`repeats` rounds, every case once per round (drifting load hits all of them alike); each case's last check."""
  import jax
  results = {}
  for _ in range(repeats):
    for i, case in enumerate(cases):
      with jax.profiler.TraceAnnotation(f"bench/{case.group}/{spec}/{case.plan.method}"):
        step_s, cache = time_decode(case.gen, case.make_cache(), case.plan.batch, context, steps)
      case.times.append(step_s)
      results[i] = case.check(cache)
      used = results[i][0]
      if case.group == "decode" and used > budget:
        raise RuntimeError(f"bench: {case.plan.method} used {used} bytes > budget {budget}")
      del cache
  return results


def _rows(cases, results: dict, spec: str, cfg, param_bytes: int, context: int, copy_bw, matmul_flops) -> list[dict]:
  """One row per case (median ms, spread, bytes_read, flops, roofline), ratios against each group's first row."""
  rows = []
  for i, case in enumerate(cases):
    used, realised, slots, kv_read = results[i]
    ms = 1e3 * float(np.median(case.times))
    r = {"group": case.group, "model": spec, "method": case.plan.method, "realised_cr": realised,
         "batch": case.plan.batch, "kv_bytes": int(used), "ms_per_step": ms, "tokens_per_s": case.plan.batch / ms * 1e3,
         "ms_spread": 1e3 * (max(case.times) - min(case.times)), "repeats": len(case.times),
         **step_cost(cfg, param_bytes, case.plan.batch, slots, kv_read)}
    if case.group == "same_batch":
      r["context"] = context
    if copy_bw and matmul_flops:
      r["roofline_ms"] = 1e3 * (r["bytes_read"] / copy_bw + r["flops"] / matmul_flops)
      r["roofline_fraction"] = r["roofline_ms"] / ms
    rows.append(r)
  for group in ("decode", "same_batch"):
    group_rows = [r for r in rows if r["group"] == group]
    if not group_rows:
      continue
    base = group_rows[0]
    for r in group_rows:
      r["ratio_vs_vanilla"] = r["tokens_per_s"] / base["tokens_per_s"]
      r["ms_ratio_vs_vanilla"] = r["ms_per_step"] / base["ms_per_step"]
      if "roofline_ms" in r:
        # The ratio a perfect implementation would reach: vanilla's roofline time per token over this row's.
        r["roofline_ratio"] = (base["roofline_ms"] / base["batch"]) / (r["roofline_ms"] / r["batch"])
  return rows


# -- a real checkpoint's own decisions ------------------------------------------------------------------------------


def corpus_windows(model, batch: int, context: int) -> np.ndarray:
  """[batch, context] token ids of real text: the standard-library corpus (dmc_jax.text_data), its documents
  encoded in order (each with the tokenizer's special tokens) and cut into consecutive windows."""
  from dmc_jax.errors import DataError
  from dmc_jax.text_data import stdlib_documents
  need, ids = batch * context, []
  for _, text in stdlib_documents():
    ids += model.encode(text)
    if len(ids) >= need:
      return np.asarray(ids[:need], np.int32).reshape(batch, context)
  raise DataError(f"bench --ckpt: the standard-library corpus has {len(ids)} tokens, fewer than {batch} × "
                  f"{context}; lower --context or --ckpt-budget-mb")


def ckpt_decode(path: str, *, adapter: str | None, cache: str | None, budget: int, context: int, steps: int,
                dtype: str, page_size: int, attention_impl, repeats: int = 1, copy_bw: float | None = None,
                matmul_flops: float | None = None, verify: bool = True) -> list[dict]:
  """A checkpoint's own DMC (or DMS) decisions on real text: rows "vanilla" (its weights, the vanilla cache) and
  "dmc ckpt" ("dms ckpt"),
  at vanilla's equal-memory batch (`group` "same_batch") and at the batch its realised CR fits in `budget`
  (`group` "decode"), the same keys as `decode_equal_memory`'s rows.

  Each DMC cache is a real prefill of `context` corpus tokens a sequence (one parallel prefill, once per batch;
  every repetition decodes a fresh copy of it). The fitted batch: the budget over the bytes a sequence held after
  the same-batch run's steps (pages in use, merge state, block table), lowered while a run needs more than the
  budget. The pool is sized for the worst case, so the learned decisions can never overflow it; `kv_bytes` counts
  the pages in use."""
  import os

  import jax
  import jax.numpy as jnp

  import dmc_jax
  from dmc_jax.api import LEARNED
  from dmc_jax.config import DMCConfig
  from dmc_jax.errors import ArgumentError
  from dmc_jax.generate import prefill_dmc
  from dmc_jax.model.llama import cache_lib, init_cache
  model = dmc_jax.load(path, adapter=adapter, dtype=dtype, verify=verify, attention_impl=attention_impl)
  choice = model.resolve_cache(cache)
  if choice.kind not in LEARNED:
    raise ArgumentError(f"--ckpt: {path} decodes with the {choice.kind!r} cache, which has no learned DMC/DMS "
                        "decisions; give a retrofitted checkpoint, an --adapter, or --cache dmc|dms")
  cfg, tokens_end = model.config, context + steps + 1
  if tokens_end > cfg.max_position_embeddings:
    raise ArgumentError(f"--context: {context} + {steps + 1} decode tokens exceed the checkpoint's "
                        f"{cfg.max_position_embeddings} positions")
  gen = model.generator(choice, page_size=page_size)  # the model's own decisions, a worst-case pool
  dmc = gen.dmc.dmc
  lib, label = cache_lib(dmc), f"{dmc.method} ckpt"
  name = os.path.basename(os.path.normpath(path))
  if adapter:
    name += "+" + os.path.basename(os.path.normpath(adapter))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  prefill = jax.jit(lambda p, t, n, c: prefill_dmc(gen.model, p, t, n, c)[1], donate_argnums=(3,))

  def prefilled(batch):
    c = lib.init_cache(cfg, dmc, batch, tokens_end, page_size, None, gen.cache_dtype)
    tokens = jnp.asarray(corpus_windows(model, batch, context))
    with jax.profiler.TraceAnnotation(f"bench/ckpt/{name}/prefill"):
      c = prefill(model.params, tokens, jnp.full((batch,), context, jnp.int32), c)
    lib.check(c)
    return c

  def dmc_case(group, batch, filled):
    # The step donates its cache: every repetition decodes a copy of the one prefill.
    return _Case(group, Plan(label, 0.0, batch, 0), gen, lambda: jax.tree.map(jnp.copy, filled),
                 functools.partial(_dmc_check, cfg, dmc, held="pages"))

  vanilla_plan = plan(cfg, DMCConfig(), budget, context, steps + 1, 0, page_size)
  b0 = vanilla_plan.batch
  if b0 < 1:
    raise ArgumentError(f"--ckpt-budget-mb: {budget / 2**20:g} MiB holds no vanilla sequence of {tokens_end} "
                        f"tokens for {name}")

  def vanilla_check(cache):
    n = b0 * cfg.n_layers * cfg.n_kv_heads * (context + steps // 2)  # mean slots in use while timed
    return b0 * vanilla_plan.bytes_per_seq, 1.0, n, n * 2 * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize

  vanilla = _Case("same_batch", vanilla_plan, model.generator(model.resolve_cache("vanilla")),
                  lambda: init_cache(cfg, b0, tokens_end, cfg.dtype), vanilla_check)
  same = dmc_case("same_batch", b0, prefilled(b0))
  # What a sequence holds after the steps, measured at b0, sets the batch the budget fits.
  _, held = time_decode(gen, same.make_cache(), b0, context, steps)
  b1 = max(1, int(budget * b0 // same.check(held)[0]))
  del held
  for _ in range(4):
    fitted = dmc_case("decode", b1, prefilled(b1))
    _, held = time_decode(gen, fitted.make_cache(), b1, context, steps)
    used = fitted.check(held)[0]
    del held
    if used <= budget or b1 == 1:
      break
    b1 = max(1, min(b1 - 1, int(b1 * budget // used)))  # another text mix held more than the estimate
  if used > budget:
    raise RuntimeError(f"bench --ckpt: one sequence of {name} holds {used} bytes > the budget {budget}")
  cases = [vanilla, same, fitted]
  results = _time_interleaved(cases, repeats, name, budget, context, steps)
  # Vanilla's timing is the base of both groups (its batch is the equal-memory one).
  cases.insert(2, dataclasses.replace(vanilla, group="decode"))
  results = {0: results[0], 1: results[1], 2: results[0], 3: results[2]}
  return _rows(cases, results, name, cfg, param_bytes, context, copy_bw, matmul_flops)


# -- kernel bandwidth ----------------------------------------------------------------------------------------------


def kernel_bandwidth(spec: str, dtype: str, context: int, crs, batch: int, page_size: int, impls) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from pallas_kernels.dmc_decode import api
  cfg = model_config(spec, dtype, None)
  dt = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  r, g, d = batch * cfg.n_kv_heads, cfg.n_groups, cfg.head_dim
  out = []
  for cr in crs:
    lengths = 1 + rng.binomial(context - 1, 1 / cr, r)
    need = -(-lengths // page_size)
    m = int(need.max())
    pool = int(need.sum())
    order = rng.permutation(pool)  # pages scattered through the pool, as many sequences leave it
    first = np.cumsum(need) - need
    table = np.where(np.arange(m) < need[:, None], order[np.minimum(first[:, None] + np.arange(m), pool - 1)], -1)
    k = jax.random.normal(jax.random.key(1), (pool, page_size, d), dt)
    v = jax.random.normal(jax.random.key(2), (pool, page_size, d), dt)
    q = jax.random.normal(jax.random.key(3), (r, g, d), dt)
    args = (q, k, v, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32))
    moved = int(need.sum()) * page_size * d * 2 * dt.itemsize + 2 * q.nbytes
    variants = [(impl, lambda *a, impl=impl: api.paged_decode_attention(*a, implementation=impl)) for impl in impls]
    if "xla" in impls:  # the other fast-path design: one gather over a static bucket (the rows' maximum here)
      from pallas_kernels.dmc_decode import xla
      variants.append(("xla bucketed", lambda *a, m=m: xla.bucketed(*a, max_pages=m)))
    for impl, f in variants:
      fn = jax.jit(f)
      jax.block_until_ready(fn(*args))
      best = float("inf")
      with jax.profiler.TraceAnnotation(f"bench/kernel/{impl}/cr{cr:g}"):
        for _ in range(5):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*args))
          best = min(best, time.perf_counter() - t0)
      out.append({"impl": impl, "cr": cr, "rows": r, "group": g, "mean_len": float(lengths.mean()),
                  "bytes": moved, "us": best * 1e6, "GBps": moved / best / 1e9})
  return out


# -- training step -------------------------------------------------------------------------------------------------


def train_step_times(spec: str, dtype: str, batch: int, length: int, variants, repeats: int = 3) -> list[dict]:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from dmc_jax.config import DMCConfig
  from dmc_jax.model.llama import Llama
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 3, 1000)
  out = []
  for name, mode, impl in variants:
    cfg = model_config(spec, dtype, impl).replace(scan_layers=True, remat_policy="dots")
    dmc = DMCConfig() if mode != "off" else None
    model = Llama(cfg, dmc, mode)
    rngs = {"params": jax.random.key(0), "dmc": jax.random.key(1)}
    params = jax.jit(lambda model=model, rngs=rngs: nn.unbox(model.init(rngs, tokens[:, :8])))()

    def loss(p, model=model):
      logits = model.apply(p, tokens, rngs={"dmc": jax.random.key(2)})
      logits = logits[0] if isinstance(logits, tuple) else logits
      logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    with jax.profiler.TraceAnnotation(f"bench/train/{name}"):
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params))
        best = min(best, time.perf_counter() - t0)
    out.append({"variant": name, "model": spec, "batch": batch, "length": length, "ms": best * 1e3,
                "tokens_per_s": batch * length / best, "compile_s": compile_s})
    del params, step
  return out


# -- report ----------------------------------------------------------------------------------------------------------


def _roofline_cells(r: dict) -> str:
  if "roofline_ms" not in r:
    return "| | | |"
  return f"| {r['roofline_ms']:.1f} | {100 * r['roofline_fraction']:.0f}% | {r['roofline_ratio']:.2f}× |"


def tables(result: dict) -> str:
  lines = [f"device: {result['device']} ({result['platform']}), jax {result['jax']}, measured copy bandwidth "
           f"{result['copy_bandwidth_GBps']:.1f} GB/s, matmul {result.get('matmul_GFLOPs', float('nan')):.0f} "
           f"GFLOP/s; context {result['context']} tokens, {result['steps']} decode steps × "
           f"{result.get('repeats', 1)} interleaved repetitions (median, spread = max − min), {result['dtype']}, "
           f"DMC attention: {result['decode_impl']}"]
  if result["decode"]:
    lines += ["", "Equal KV memory:", "",
              "| model | KV budget | cache | realised CR | batch (analytic) | KV bytes used | ms/step (spread) | "
              "tokens/s | × vanilla | roofline ms | of roofline | roofline × vanilla |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["decode"]:
      lines.append(f"| {r['model']} | {r['budget_mb']:.0f} MiB | {r['method']} | {r['realised_cr']:.2f} | "
                   f"{r['batch']} | {r['kv_bytes'] / 2**20:.0f} MiB | {r['ms_per_step']:.1f} "
                   f"({r.get('ms_spread', 0):.1f}) | {r['tokens_per_s']:.1f} | **{r['ratio_vs_vanilla']:.2f}×** "
                   + _roofline_cells(r))
  if result.get("same_batch"):
    lines += ["", "Same batch (vanilla's equal-memory batch):", "",
              "| model | cache | batch | context | ms/step (spread) | ms × vanilla | roofline ms | of roofline | "
              "roofline × vanilla |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["same_batch"]:
      lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.1f} "
                   f"({r['ms_spread']:.1f}) | **{r['ms_ratio_vs_vanilla']:.2f}** " + _roofline_cells(r))
  if result["kernel"]:
    lines += ["", "| decode attention | CR | rows × group | mean slots | bytes (pages in use) | µs | GB/s | "
              "of copy BW |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["kernel"]:
      lines.append(f"| {r['impl']} | {r['cr']:g} | {r['rows']} × {r['group']} | {r['mean_len']:.0f} | "
                   f"{r['bytes'] / 2**20:.1f} MiB | {r['us']:.0f} | {r['GBps']:.1f} | "
                   f"{100 * r['GBps'] / result['copy_bandwidth_GBps']:.0f}% |")
  if result["train"]:
    lines += ["", "| training step (loss + grad) | model | batch × length | ms | tokens/s |",
              "|---|---|---|---:|---:|"]
    for r in result["train"]:
      lines.append(f"| {r['variant']} | {r['model']} | {r['batch']} × {r['length']} | {r['ms']:.0f} | "
                   f"{r['tokens_per_s']:.0f} |")
  return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                 help="cpu (default off a GPU) or gpu (Llama-2-7B shape); the flags below override it")
  p.add_argument("--models", help="comma-separated preset names, 'name@layers' for fewer layers")
  p.add_argument("--budget-mb", help="KV-memory budget per model (comma-separated, one per model)")
  p.add_argument("--context", type=int, help="tokens already in each sequence's cache")
  p.add_argument("--steps", type=int, help="timed decode steps")
  p.add_argument("--crs", default="2,4,8", help="DMC compression ratios to force")
  p.add_argument("--dtype", choices=("float32", "bfloat16"))
  p.add_argument("--policies", help="eviction policies to run at the same CRs and budget (streaming, h2o, tova; "
                 "comma-separated, '' for none; default: the preset's)")
  p.add_argument("--page-size", type=int, default=32)
  from pallas_kernels._backend import IMPLEMENTATIONS
  p.add_argument("--impl", choices=("auto", *[n for n in IMPLEMENTATIONS if n]), default="auto",
                 help="DMC decode/attention implementation (auto: the best available — Pallas on GPU, the TPU "
                      "decode kernel on TPU, the fast XLA path elsewhere; reference: the jnp oracle)")
  p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every decode row (median)")
  p.add_argument("--no-same-batch", action="store_true", help="skip the same-batch rows")
  p.add_argument("--skip", default="", help="comma-separated parts to skip: decode, kernel, train")
  p.add_argument("--ckpt", help="also decode this dmc-jax checkpoint with its own DMC decisions after a prefill of "
                 "real text (the standard-library corpus) to --context: rows 'dmc ckpt' at vanilla's equal-memory "
                 "batch and at the batch its realised CR fits")
  p.add_argument("--cache", default=None, help="with --ckpt: the learned cache to decode with (default: the "
                 "checkpoint's or adapter's own method; 'dmc' on a checkpoint without DMC uses its untrained channel)")
  p.add_argument("--adapter", default=None, help="with --ckpt: a retrofit adapter directory applied to the checkpoint")
  p.add_argument("--ckpt-budget-mb", type=float, default=512.0, help="with --ckpt: its KV-memory budget (MiB)")
  p.add_argument("--json", help="also write the result here")
  from experiments.harness import profiling
  # No --profile-steps: each timed section already runs after its own compile and warm-up, so the whole run is
  # traced; its TraceAnnotations (bench/decode/..., bench/kernel/..., bench/train/...) name the sections.
  profiling.add_profile_arguments(p, steps=False)
  from experiments.bench import serve
  serve.configure(p)


def run(args: argparse.Namespace) -> int:
  if getattr(args, "serve", False):
    from experiments.bench import serve
    return serve.run(args)
  import jax

  from experiments.bench.common import copy_bandwidth, matmul_rate
  on_gpu = jax.default_backend() == "gpu"
  cfg = dict(PRESETS[args.preset or ("gpu" if on_gpu else "cpu")])
  models = args.models.split(",") if args.models else cfg["models"]
  budgets = [float(b) for b in args.budget_mb.split(",")] if args.budget_mb else cfg["budget_mb"]
  if len(budgets) == 1:
    budgets = budgets * len(models)
  if len(budgets) != len(models):
    raise ValueError(f"--budget-mb: expected 1 or {len(models)} values (one per model), got {len(budgets)}")
  context, steps = args.context or cfg["context"], args.steps or cfg["steps"]
  dtype = args.dtype or cfg["dtype"]
  crs = [float(c) for c in args.crs.split(",") if c]
  policies = cfg["policies"] if args.policies is None else [n for n in args.policies.split(",") if n]
  impl = None if args.impl == "auto" else args.impl
  skip = set(filter(None, args.skip.split(",")))
  if steps < 1 or args.repeats < 1:
    raise ValueError(f"--steps and --repeats must be >= 1, got {steps} and {args.repeats}")
  from dmc_jax.errors import ArgumentError
  if args.ckpt is None and (args.cache or args.adapter):
    raise ArgumentError("--cache and --adapter choose how --ckpt decodes; give --ckpt DIR")
  if not (math.isfinite(args.ckpt_budget_mb) and args.ckpt_budget_mb > 0):
    raise ArgumentError(f"--ckpt-budget-mb: expected a positive number of MiB, got {args.ckpt_budget_mb}")
  from pallas_kernels.dmc_decode import api as decode_api
  bw, mm = copy_bandwidth(), matmul_rate()
  result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform, "jax": jax.__version__,
            "copy_bandwidth_GBps": bw / 1e9, "matmul_GFLOPs": mm / 1e9, "context": context, "steps": steps,
            "repeats": args.repeats, "dtype": dtype,
            "decode_impl": decode_api._backend.resolve(decode_api.OP, impl, decode_api.AVAILABLE),
            "decode": [], "same_batch": [], "kernel": [], "train": []}
  from experiments.harness import profiling
  with profiling.from_args(args, "bench", whole=True):
    if "decode" not in skip:
      for spec, budget in zip(models, budgets):
        for r in decode_equal_memory(spec, budget=int(budget * 2**20), context=context, steps=steps, crs=crs,
                                     dtype=dtype, page_size=args.page_size, attention_impl=impl, policies=policies,
                                     same_batch=not args.no_same_batch, repeats=args.repeats, copy_bw=bw,
                                     matmul_flops=mm):
          result[r.pop("group")].append(dict(r, budget_mb=budget))
    if args.ckpt:
      for r in ckpt_decode(args.ckpt, adapter=args.adapter, cache=args.cache, budget=int(args.ckpt_budget_mb * 2**20),
                           context=context, steps=steps, dtype=dtype, page_size=args.page_size, attention_impl=impl,
                           repeats=args.repeats, copy_bw=bw, matmul_flops=mm):
        result[r.pop("group")].append(dict(r, budget_mb=args.ckpt_budget_mb))
    if "kernel" not in skip:
      # GPU: one layer's rows at the largest DMC batch; CPU: a small batch (the XLA path copies what it gathers).
      batch = cfg["bw_batch"] or max([r["batch"] for r in result["decode"]] or [64])
      # Interpreted kernels say nothing about speed: each is timed on its own platform only; the reference is
      # the oracle the fast path replaces.
      impls = ["reference", "xla"] + {"gpu": ["pallas"], "tpu": ["tpu"]}.get(jax.default_backend(), [])
      result["kernel"] = kernel_bandwidth(models[0].partition("@")[0], dtype, cfg["bw_context"], crs, batch,
                                          args.page_size, impls)
    if "train" not in skip:
      variants = [("vanilla", "off", None), ("DMC dense-bias (XLA reference)", "train", "xla")]
      if on_gpu:
        variants.append(("DMC fused (Pallas)", "train", "pallas"))
      result["train"] = train_step_times(cfg["train_model"], dtype, cfg["train_batch"], cfg["train_len"], variants)
  print(tables(result))
  if not on_gpu:
    print("\n(CPU: the fused Pallas kernels only run interpreted here, so they are timed on GPUs only.)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  configure(p)
  return run(p.parse_args(argv))


if __name__ == "__main__":
  import sys
  sys.exit(main())
