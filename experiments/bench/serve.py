"""`dmc-jax bench --serve`: a fixed request stream through the continuous-batching engine, vanilla (paged) beside
DMC (and, with --serve-dms-crs, DMS) at forced CRs and the eviction policies at their CRs (H2O at 2, 4, 8 by
default), every method on the same KV budget, page size and requests.

The workload (issue 18): `--serve-requests` (32) requests, all submitted at once, prompts of `--serve-prompt` (512)
tokens cut from distinct documents of the stdlib corpus (`dmc_jax.text_data.stdlib_documents`), output lengths
drawn uniformly from `--serve-output` (512-1536) with a fixed seed, EOS ignored so every method generates the same
tokens; no slot cap (as many decode slots as requests): the pool alone decides how many run. Random weights of a
preset shape (speed does not depend on their values), so there is no tokenizer: a prompt's ids are its document's
UTF-8 bytes (real text, byte-level ids).

Per method: output tokens/s over the stream, time to first token and time per output token (p50, p95), peak and
mean pages in use (of the pool), preemptions, host time per step outside the compiled calls, the allocator's cost
(the free calls), and the roofline time of the method's own trace: each decode step replayed through the two-term
model of `experiments.bench.dmc.step_cost` (bytes read: weights + KV pages in use; FLOPs: 2 × matmul parameters ×
decode slots + attention over the slots in use) plus each prefill (2 × matmul parameters × prompt tokens), over
the machine's measured copy bandwidth and matmul rate. The roofline ratio is vanilla's roofline time over the
method's. A PNG plots pages in use and running requests against time per method.

A policy row (`PolicyKV`) is charged the pages its held entries would take (docs/design.md, "Serving"); its roofline
counts those entries, while its decode attends over each row's whole capacity: the gap is the implementation's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def configure(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("--serve: the request-stream benchmark")
  g.add_argument("--serve", action="store_true", help="run the request-stream benchmark instead")
  g.add_argument("--serve-model", default="smollm2-135m", help="preset ('name@layers' for fewer layers)")
  g.add_argument("--serve-budget-mb", type=float, default=512.0, help="KV page-pool budget (MiB), every method")
  g.add_argument("--serve-requests", type=int, default=32)
  g.add_argument("--serve-prompt", type=int, default=512, help="prompt tokens per request")
  g.add_argument("--serve-output", default="512-1536", help="output lengths: uniform LO-HI (fixed seed)")
  g.add_argument("--serve-crs", default="2,4,8", help="forced DMC compression ratios")
  g.add_argument("--serve-dms-crs", default="", help="forced DMS compression ratios (eviction rate 1 - 1/CR, "
                 "window dmc.dms_window), e.g. 2,4,8; none by default")
  g.add_argument("--serve-policies", default="h2o", help="eviction policies (streaming, h2o, tova), comma-separated; "
                 "'' for none")
  g.add_argument("--serve-policy-crs", default="2,4,8", help="the policies' compression ratios")
  g.add_argument("--serve-progress-s", type=float, default=60.0, help="a progress line every N s (0: none)")
  g.add_argument("--serve-png", default="serve_stream.png", help="pages and running requests over time")


def workload(n: int, prompt_len: int, out_lo: int, out_hi: int, vocab: int, seed: int = 0):
  """(prompts, output lengths): prompts of prompt_len byte-level ids from distinct stdlib documents."""
  from dmc_jax.text_data import stdlib_documents
  docs = [text.encode("utf-8") for _, text in stdlib_documents() if len(text.encode("utf-8")) >= prompt_len]
  if len(docs) < n:
    raise ValueError(f"--serve-prompt {prompt_len}: only {len(docs)} stdlib documents are that long")
  rng = np.random.default_rng(seed)
  picked = rng.choice(len(docs), n, replace=False)
  prompts = [[1 + b % (vocab - 1) for b in docs[i][:prompt_len]] for i in picked]
  return prompts, rng.integers(out_lo, out_hi + 1, n).tolist()


def roofline_seconds(cfg, trace, prefills, param_bytes: int, page_bytes: int, bw: float, mm: float) -> float:
  from experiments.bench.dmc import matmul_params, step_cost
  total = 0.0
  for t in trace:
    c = step_cost(cfg, param_bytes, t["slots"], t["kv_slots"], t["pages"] * page_bytes)
    total += c["bytes_read"] / bw + c["flops"] / mm
  # Prefills: weights once and 2 × matmul parameters per prompt token (attention's quadratic term is small at 512).
  for n in prefills:
    total += param_bytes / bw + 2 * matmul_params(cfg) * n / mm
  return total


def drain(engine, reqs, label: str, every_s: float, clock=time.perf_counter, out=sys.stdout) -> None:
  """`engine.run_until_idle()` with a line every `every_s` seconds (0: none): a method's stream can run for
  tens of minutes on a CPU, and without it nothing says how far it is."""
  total = sum(r.max_tokens for r in reqs)
  start = last = clock()
  while not engine.idle():
    engine.step()
    now = clock()
    if every_s and now - last >= every_s:
      last = now
      done = sum(len(r.tokens) for r in reqs)
      print(f"[bench --serve] {label}: {done}/{total} tokens ({100 * done / total:.0f}%), {engine.running} running, "
            f"{now - start:.0f} s", file=out, flush=True)


def run_method(kv, label, cr, prompts, outputs, progress_s: float = 60.0):
  from dmc_jax.serving import Engine
  kind, pages = kv.kind, kv.num_pages
  from dmc_jax.serving.kv import prompt_bucket
  # Compile outside the timed stream: the step, the free, and every prefill bucket a context can reach (a
  # preempted request recomputes its prompt plus what it generated: longer contexts, larger buckets).
  warm = Engine(kv)
  longest = len(prompts[0]) + max(outputs) - 1
  buckets = sorted({prompt_bucket(n) for n in range(len(prompts[0]), longest + 1)})
  for b in buckets:
    n = min(b, longest)
    warm.submit((prompts[0] * (n // len(prompts[0]) + 1))[:n], 1 if n == longest else 2)
    warm.run_until_idle()
  engine = Engine(kv, trace=True)
  t0 = time.perf_counter()
  reqs = [engine.submit(p, m, ignore_eos=True) for p, m in zip(prompts, outputs)]
  drain(engine, reqs, label, progress_s)
  wall = time.perf_counter() - t0
  assert all(len(r.tokens) == m for r, m in zip(reqs, outputs)), "a request did not produce its tokens"
  assert engine.pages_in_use == 0 and kv.occupancy(engine.cache)[0] == 0 and not kv.overflowed(engine.cache)
  ttft = np.array([r.first_token_at - r.submitted for r in reqs])
  tpot = np.array([(r.finished_at - r.first_token_at) / max(len(r.tokens) - 1, 1) for r in reqs])
  used = np.array([t["pages"] for t in engine.trace])
  running = np.array([t["active"] for t in engine.trace])
  steps = max(engine.decode_steps, 1)
  return {"method": label, "kind": kind, "forced_cr": cr,
          "wall_s": wall, "tokens": int(sum(outputs)), "tokens_per_s": sum(outputs) / wall,
          "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
          "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p95_s": float(np.percentile(tpot, 95)),
          "pool_pages": pages, "peak_pages": int(used.max()), "mean_pages": float(used.mean()),
          "peak_running": int(running.max()), "mean_running": float(running.mean()),
          "preemptions": engine.preemptions, "decode_steps": engine.decode_steps,
          "host_ms_per_step": 1e3 * engine.host_seconds / steps, "free_ms_per_step": 1e3 * engine.free_seconds / steps,
          "step_ms_mean": 1e3 * float(np.mean([t["step_s"] for t in engine.trace])),
          "recomputed_prefills": sum(r.preemptions for r in reqs),
          "_trace": engine.trace, "_t0": t0, "_prefills": [n for t in engine.trace for n in t["prefill_lengths"]],
          "page_bytes": kv.page_bytes}


def plot(results, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
  for r in results:
    t = np.array([s["t"] for s in r["_trace"]]) - r["_t0"]
    a.plot(t, [100 * s["pages"] / r["pool_pages"] for s in r["_trace"]], label=r["method"])
    b.plot(t, [s["active"] for s in r["_trace"]], label=r["method"])
  a.set_ylabel("KV pages in use (% of pool)")
  b.set_ylabel("running requests")
  b.set_xlabel("seconds since the stream was submitted")
  a.legend()
  a.set_title("request stream: pages in use and running requests")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def table(result: dict) -> str:
  lines = [f"request stream: {result['requests']} requests × {result['prompt']}-token prompts, outputs "
           f"{result['output']} (seed 0, EOS ignored), {result['model']}, {result['budget_mb']:g} MiB KV pool "
           f"({result['page_size']}-slot pages)",
           "| method | tokens/s | × vanilla | roofline × vanilla | TTFT p50 / p95 s | TPOT p50 / p95 ms | peak / mean "
           "pages (% pool) | peak running | preemptions | host ms/step |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["methods"]:
    lines.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['ratio_vs_vanilla']:.2f}× | "
                 f"{r['roofline_ratio']:.2f}× | {r['ttft_p50_s']:.1f} / {r['ttft_p95_s']:.1f} | "
                 f"{1e3 * r['tpot_p50_s']:.0f} / {1e3 * r['tpot_p95_s']:.0f} | "
                 f"{100 * r['peak_pages'] / r['pool_pages']:.0f}% / {100 * r['mean_pages'] / r['pool_pages']:.0f}% | "
                 f"{r['peak_running']} | {r['preemptions']} | {r['host_ms_per_step']:.2f} |")
  return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
  import flax.linen as nn
  import jax

  from dmc_jax import cache as dmc_cache
  from dmc_jax.model.llama import Llama
  from experiments.bench.common import copy_bandwidth, matmul_rate
  from experiments.bench.dmc import model_config
  lo, _, hi = args.serve_output.partition("-")
  out_lo, out_hi = int(lo), int(hi or lo)
  if not (args.serve_requests >= 1 and args.serve_prompt >= 1 and 1 <= out_lo <= out_hi):
    raise ValueError("--serve-requests, --serve-prompt and --serve-output LO-HI must be positive (LO <= HI)")
  dtype = args.dtype or "float32"
  cfg = model_config(args.serve_model, dtype, None if args.impl == "auto" else args.impl).replace(
      remat_policy="none", scan_layers=False)
  params = nn.unbox(Llama(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  prompts, outputs = workload(args.serve_requests, args.serve_prompt, out_lo, out_hi, cfg.vocab_size)
  page_size = args.page_size
  pages = dmc_cache.pages_for_budget(cfg, int(args.serve_budget_mb * 2**20), page_size, dtype)
  bw, mm = copy_bandwidth(), matmul_rate()
  from dmc_jax.config import DMCConfig
  from dmc_jax.serving import PagedKV
  shape = dict(max_batch=len(prompts), max_len=args.serve_prompt + out_hi, page_size=page_size, num_pages=pages)
  crs = [float(x) for x in args.serve_crs.split(",") if x]
  methods = [("vanilla (paged)", PagedKV(cfg, params, kind="vanilla", **shape), None)]
  if crs:  # one DMC cache: the forced rate is an argument of its compiled functions, so the CRs compile once
    dmc_kv = PagedKV(cfg, params, kind="dmc", dmc=DMCConfig(), forced_merge_rate=1 - 1 / crs[0], **shape)
    methods += [(f"dmc CR {c:g} (forced)", dmc_kv.with_forced_rate(1 - 1 / c), c) for c in crs]
  dms_crs = [float(x) for x in args.serve_dms_crs.split(",") if x]
  if dms_crs:
    dms_kv = PagedKV(cfg, params, kind="dms", dmc=DMCConfig(method="dms"), forced_merge_rate=1 - 1 / dms_crs[0],
                     **shape)
    methods += [(f"dms CR {c:g} (forced)", dms_kv.with_forced_rate(1 - 1 / c), c) for c in dms_crs]
  from dmc_jax.baselines.policies import Policy
  from dmc_jax.serving import PolicyKV
  from dmc_jax.serving.kv import policy_page_bytes
  budget = int(args.serve_budget_mb * 2**20)
  for name in [x for x in args.serve_policies.split(",") if x]:
    for c in [float(x) for x in args.serve_policy_crs.split(",") if x]:
      policy_pages = max(1, budget // policy_page_bytes(cfg, page_size, dtype))
      methods.append((f"{name} CR {c:g}", PolicyKV(cfg, params, policy=Policy(name, c), **dict(
          shape, num_pages=policy_pages)), c))
  results = []
  for label, kv, cr in methods:
    r = run_method(kv, label, cr, prompts, outputs, args.serve_progress_s)
    r["roofline_s"] = roofline_seconds(cfg, r["_trace"], r["_prefills"], param_bytes, r["page_bytes"], bw, mm)
    results.append(r)
    print(f"[bench --serve] {label}: {r['tokens_per_s']:.1f} tokens/s, peak {r['peak_running']} running, "
          f"{r['preemptions']} preemptions, {r['wall_s']:.0f} s, roofline {r['roofline_s']:.1f} s", flush=True)
    print("[bench --serve] " + json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
  base = results[0]
  for r in results:
    r["ratio_vs_vanilla"] = r["tokens_per_s"] / base["tokens_per_s"]
    r["roofline_ratio"] = base["roofline_s"] / r["roofline_s"]
    r["of_roofline_ratio"] = r["ratio_vs_vanilla"] / r["roofline_ratio"]
  plot(results, args.serve_png)
  result = {"model": args.serve_model, "dtype": dtype, "budget_mb": args.serve_budget_mb, "page_size": page_size,
            "requests": args.serve_requests, "prompt": args.serve_prompt, "output": f"{out_lo}-{out_hi}",
            "device": str(jax.devices()[0].device_kind), "copy_bandwidth_GBps": bw / 1e9,
            "matmul_GFLOPs": mm / 1e9, "png": args.serve_png,
            "methods": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]}
  print(table(result))
  print(f"(plot: {args.serve_png})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0
