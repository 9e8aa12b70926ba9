"""Where one decode step's time goes: vanilla beside DMC at equal memory (random weights, synthetic caches).

    python -m experiments.bench.decode_profile --model smollm2-135m --budget-mb 512 --context 1024 --crs 4 \\
        --out /tmp/decode_profile

For each method: the compiled step's memory analysis (temporaries vs the cache), the optimized HLO's heaviest
instructions by bytes written (a whole-pool scatter or copy shows up here), the median step time, and a
jax.profiler trace (perfetto JSON, summarised by event name) written under --out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time

import numpy as np

_SHAPE = re.compile(r"\b(pred|s8|u8|s32|u32|f32|bf16|f16|s64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "f64": 8}


def hlo_heavy_ops(text: str, top: int = 12) -> list[tuple[int, str]]:
  """(bytes of the result, instruction head) for the largest-result instructions of an optimized HLO module."""
  out = []
  for line in text.splitlines():
    line = line.strip()
    m = re.match(r"(ROOT )?%?([\w.\-]+) = (.+?) (\w[\w\-]*)\(", line)
    if not m:
      continue
    shape, opcode = m.group(3), m.group(4)
    if opcode in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
      continue
    size = 0
    for dt, dims in _SHAPE.findall(shape):
      n = 1
      for x in filter(None, dims.split(",")):
        n *= int(x)
      size += n * _BYTES[dt]
    out.append((size, f"{opcode} {m.group(2)} {shape[:80]}"))
  out.sort(reverse=True)
  return out[:top]


def trace_summary(directory: str, top: int = 25) -> list[tuple[str, float, int]]:
  """(name, total ms, count) of the perfetto trace's complete events, largest first."""
  files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return []
  with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  tot, cnt = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      name = re.sub(r"\.\d+$", "", e["name"])
      tot[name] += e["dur"] / 1e3
      cnt[name] += 1
  return [(n, ms, cnt[n]) for n, ms in tot.most_common(top)]


def profile(spec: str, budget_mb: float, context: int, crs, steps: int, out: str, dtype: str = "float32",
            impl=None, page_size: int = 32) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from dmc_jax.config import DMCConfig
  from dmc_jax.generate import DMCOptions, Generator
  from dmc_jax.model.llama import init_cache
  from experiments.bench import dmc as bench_dmc
  from experiments.bench.decode import random_params
  cfg = bench_dmc.model_config(spec, dtype, impl)
  dmc = DMCConfig()
  params = random_params(cfg)
  budget = int(budget_mb * 2**20)
  rows = []
  for cr in [0, *crs]:
    pl_ = bench_dmc.plan(cfg, dmc, budget, context, steps + 1, cr, page_size)
    if cr == 0:
      gen = Generator(cfg, params)
      cache = init_cache(cfg, pl_.batch, context + steps + 1, cfg.dtype)
      cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    else:
      gen = Generator(cfg, params, dmc=DMCOptions(dmc, page_size, pl_.pool_pages, forced_merge_rate=1 - 1 / cr))
      cache = bench_dmc.synthetic_dmc_cache(gen.cfg, dmc, pl_, context, page_size)
      cache_bytes = cache.k_pages.nbytes * 2
    token = jnp.zeros((pl_.batch,), jnp.int32)
    index = jnp.full((pl_.batch,), context, jnp.int32)
    key = jax.random.key(0)
    step = gen.compiled_step(cache, token, index, key)
    mem = step.memory_analysis()
    hlo = step.as_text()
    token, cache = step(gen.params, cache, token, index, key)
    jax.block_until_ready(token)
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      token, cache = step(gen.params, cache, token, index + 1 + i, key)
      jax.block_until_ready(token)
      times.append(time.perf_counter() - t0)
    tdir = os.path.join(out, f"{spec}_{pl_.method.replace(' ', '_')}")
    with jax.profiler.trace(tdir, create_perfetto_trace=True):
      for i in range(3):
        token, cache = step(gen.params, cache, token, index + 1 + steps + i, key)
        jax.block_until_ready(token)
    with open(tdir + ".hlo.txt", "w") as f:
      f.write(hlo)
    rows.append({"method": pl_.method, "batch": pl_.batch, "ms_median": 1e3 * float(np.median(times)),
                 "cache_MiB": cache_bytes / 2**20, "temp_MiB": mem.temp_size_in_bytes / 2**20,
                 "alias_MiB": mem.alias_size_in_bytes / 2**20,
                 "ops": collections.Counter(re.findall(r"= \S+ (gather|scatter|copy|while|dynamic-update-slice|"
                                                       r"dynamic-slice|fusion|dot|sort)\(", hlo)),
                 "heavy": hlo_heavy_ops(hlo), "trace": trace_summary(tdir)})
    del gen, cache, step
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--budget-mb", type=float, default=512)
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--crs", default="4")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--impl", default=None)
  p.add_argument("--out", default="/tmp/decode_profile")
  a = p.parse_args(argv)
  rows = profile(a.model, a.budget_mb, a.context, [float(c) for c in a.crs.split(",") if c], a.steps, a.out,
                 impl=a.impl)
  for r in rows:
    print(f"\n## {r['method']} batch {r['batch']}: {r['ms_median']:.1f} ms/step; cache {r['cache_MiB']:.0f} MiB, "
          f"temporaries {r['temp_MiB']:.1f} MiB, aliased {r['alias_MiB']:.0f} MiB; ops {dict(r['ops'])}")
    print("heaviest results:")
    for size, op in r["heavy"]:
      print(f"  {size / 2**20:9.2f} MiB  {op}")
    print("trace (total ms over 3 steps, count):")
    for name, ms, n in r["trace"]:
      print(f"  {ms:9.2f}  {n:5d}  {name[:100]}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
