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
* Kernel bandwidth: the paged decode attention alone over one layer's rows at the DMC batch; bytes = the pages in
  use (K and V) + q + output, against the device's measured copy bandwidth (read + write).
* Training: value-and-grad of the LM loss, vanilla attention vs DMC with the dense-bias XLA reference vs DMC with
  the fused Pallas kernel (GPU only: on a CPU Pallas only runs interpreted).

`--profile DIR` writes a jax.profiler trace (named scopes: `bench/...` phases, `dmc_decode_attention_*`,
`dmc_attention_*`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time

import numpy as np

# jax is imported inside the functions: `dmc-jax` builds every subcommand's parser on each start.

PRESETS = {
    # A CPU run of a few minutes: a Llama-2-7B-width body with 2 layers (a whole 7B does not fit 24 GiB in float32
    # with its caches) and the whole SmolLM2-135M shape.
    "cpu": dict(models=["llama2-7b@2", "smollm2-135m"], budget_mb=[1024, 512], context=1024, steps=4,
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
  """(bytes of one page, bytes of one row's merge state + block table + length)."""
  import jax.numpy as jnp
  d, w = cfg.head_dim, dmc.window or 0
  state = 4 * (2 * d + 1 + 1 + w * (2 * d + 1))  # sum_k, sum_v, sum_w, run, ring_k, ring_v, ring_w
  return 2 * page_size * d * jnp.dtype(cfg.dtype).itemsize, state + 4 * table_pages + 4


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
  c = evict_model.init_cache(cfg, policy, batch, context + steps, cfg.dtype)
  held = policy.budget(context)
  slot = jnp.arange(c["keep"].shape[-1])
  pos = jnp.round(slot * (context - 1) / max(held - 1, 1)).astype(jnp.int32)
  return dict(c, keep=jnp.broadcast_to(slot < held, c["keep"].shape),
              pos=jnp.broadcast_to(jnp.where(slot < held, pos, 0), c["pos"].shape))


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


def decode_equal_memory(spec: str, *, budget: int, context: int, steps: int, crs, dtype: str, page_size: int,
                        attention_impl, policies=()) -> list[dict]:
  import jax
  from dmc_jax import cache as dmc_cache
  from dmc_jax.baselines.policies import Policy
  from dmc_jax.baselines.policy_generate import PolicyGenerator
  from dmc_jax.config import DMCConfig
  from dmc_jax.generate import DMCOptions, Generator
  from dmc_jax.model.llama import cache_bytes, init_cache
  from experiments.bench.decode import random_params
  cfg = model_config(spec, dtype, attention_impl)
  dmc = DMCConfig()
  params = random_params(cfg)
  rows = []
  runs = [(cr, None) for cr in [0, *crs]] + [(cr, name) for name in policies for cr in crs]
  for cr, policy_name in runs:
    policy = Policy(policy_name, cr) if policy_name else None
    if policy:
      pl_ = plan_policy(cfg, policy, budget, context, steps + 1)
    else:
      pl_ = plan(cfg, dmc, budget, context, steps + 1, cr, page_size)
    if pl_.batch < 1:
      raise ValueError(f"bench: a KV budget of {budget / 2**20:.0f} MiB holds no {pl_.method} sequence of "
                       f"{context} tokens for {spec}; raise --budget-mb")
    with jax.profiler.TraceAnnotation(f"bench/decode/{spec}/{pl_.method}"):
      if policy:
        gen = PolicyGenerator(cfg, params, policy)
        cache = synthetic_policy_cache(cfg, policy, pl_.batch, context, steps + 1)
        step_s, cache = time_decode(gen, cache, pl_.batch, context, steps)
        held, budget_end = np.asarray(cache["keep"]).sum(-1), policy.budget(context + steps + 1)
        if (held != budget_end).any():
          raise RuntimeError(f"bench: {pl_.method} holds {np.unique(held)} entries, expected its budget {budget_end}")
        used, realised = cache_bytes(cache), (context + steps + 1) / budget_end
      elif cr == 0:
        gen = Generator(cfg, params)
        cache = init_cache(cfg, pl_.batch, context + steps + 1, cfg.dtype)
        step_s, cache = time_decode(gen, cache, pl_.batch, context, steps)
        used, realised = pl_.batch * pl_.bytes_per_seq, 1.0
      else:
        gen = Generator(cfg, params, dmc=DMCOptions(dmc, page_size, pl_.pool_pages, forced_merge_rate=1 - 1 / cr))
        cache = synthetic_dmc_cache(gen.cfg, dmc, pl_, context, page_size)
        step_s, cache = time_decode(gen, cache, pl_.batch, context, steps)
        dmc_cache.check(cache)
        mem = dmc_cache.memory_bytes(cache)
        used = mem["pool"] + mem["merge_state"] + mem["tables"]
        realised = float(np.asarray(cache.positions).sum() * cfg.n_layers * cfg.n_kv_heads
                         / np.asarray(cache.lengths).sum())
    if used > budget:
      raise RuntimeError(f"bench: {pl_.method} used {used} bytes > budget {budget}")
    rows.append({"model": spec, "method": pl_.method, "realised_cr": realised, "batch": pl_.batch,
                 "kv_bytes": int(used), "ms_per_step": step_s * 1e3, "tokens_per_s": pl_.batch / step_s})
    del gen, cache
  base = rows[0]["tokens_per_s"]
  for r in rows:
    r["ratio_vs_vanilla"] = r["tokens_per_s"] / base
  return rows


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
    for impl in impls:
      fn = jax.jit(lambda *a, impl=impl: api.paged_decode_attention(*a, implementation=impl))
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
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from dmc_jax.config import DMCConfig
  from dmc_jax.model.llama import Llama
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 3, 1000)
  out = []
  for name, mode, impl in variants:
    cfg = model_config(spec, dtype, impl).replace(scan_layers=True, remat_policy="dots")
    dmc = DMCConfig() if mode != "off" else None
    model = Llama(cfg, dmc, mode)
    rngs = {"params": jax.random.key(0), "dmc": jax.random.key(1)}
    params = jax.jit(lambda: nn.unbox(model.init(rngs, tokens[:, :8])))()

    def loss(p):
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


def tables(result: dict) -> str:
  lines = [f"device: {result['device']} ({result['platform']}), jax {result['jax']}, measured copy bandwidth "
           f"{result['copy_bandwidth_GBps']:.1f} GB/s; context {result['context']} tokens, {result['steps']} "
           f"decode steps, {result['dtype']}, DMC attention: {result['decode_impl']}"]
  if result["decode"]:
    lines += ["", "| model | KV budget | cache | realised CR | batch (analytic) | KV bytes used | ms/step | tokens/s "
              "| × vanilla |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["decode"]:
      lines.append(f"| {r['model']} | {r['budget_mb']:.0f} MiB | {r['method']} | {r['realised_cr']:.2f} | "
                   f"{r['batch']} | {r['kv_bytes'] / 2**20:.0f} MiB | {r['ms_per_step']:.1f} | "
                   f"{r['tokens_per_s']:.1f} | **{r['ratio_vs_vanilla']:.2f}×** |")
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
  p.add_argument("--impl", choices=("auto", "xla", "pallas", "tpu"), default="auto",
                 help="DMC decode/attention implementation (auto: Pallas on GPU, the TPU decode kernel on TPU, "
                 "XLA elsewhere)")
  p.add_argument("--skip", default="", help="comma-separated parts to skip: decode, kernel, train")
  p.add_argument("--json", help="also write the result here")
  p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace here")


def run(args: argparse.Namespace) -> int:
  import jax
  from experiments.bench.decode import copy_bandwidth
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
  from pallas_kernels import _backend
  result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform, "jax": jax.__version__,
            "copy_bandwidth_GBps": copy_bandwidth() / 1e9, "context": context, "steps": steps, "dtype": dtype,
            "decode_impl": _backend.resolve("paged_decode_attention", impl), "decode": [], "kernel": [], "train": []}
  trace = jax.profiler.trace(args.profile) if args.profile else contextlib.nullcontext()
  with trace:
    if "decode" not in skip:
      for spec, budget in zip(models, budgets):
        for r in decode_equal_memory(spec, budget=int(budget * 2**20), context=context, steps=steps, crs=crs,
                                     dtype=dtype, page_size=args.page_size, attention_impl=impl, policies=policies):
          result["decode"].append(dict(r, budget_mb=budget))
    if "kernel" not in skip:
      # GPU: one layer's rows at the largest DMC batch; CPU: a small batch (the XLA path copies what it gathers).
      batch = cfg["bw_batch"] or max([r["batch"] for r in result["decode"]] or [64])
      # Interpreted kernels say nothing about speed: each is timed on its own platform only.
      impls = ["xla"] + {"gpu": ["pallas"], "tpu": ["tpu"]}.get(jax.default_backend(), [])
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
