"""Vanilla decode ms/step of this tree against an older commit's code, measured in one interleaved run.

    python tools/bench_vanilla_base.py --base 4f027d9 --json out.json

The two trees' modules share names, so they cannot run in one process: each tree gets a worker process (that
tree's code on its PYTHONPATH) that builds `dmc-jax bench`'s vanilla case once (random weights, the equal-memory
batch of the budget, the cache at `--context` tokens), compiles its decode step and then times one repetition of
`--steps` steps whenever the driver asks. The driver alternates the workers (A B B A ... so neither always goes
first), so load that drifts during the run hits both alike. The older commit is exported with `git archive` into
a temporary directory (no worktree left behind). Only functions both trees have are used (bench.dmc's
model_config, plan, time_decode; bench.decode's random_params; Generator; init_cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import sys
spec, budget, context, steps, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from dmc_jax.config import DMCConfig
from dmc_jax.generate import Generator
from dmc_jax.model.llama import init_cache
from experiments.bench.decode import random_params
from experiments.bench.dmc import model_config, plan, time_decode
cfg = model_config(spec, dtype, None)
batch = plan(cfg, DMCConfig(), budget, context, steps + 1, 0, 32).batch
gen = Generator(cfg, random_params(cfg))
fresh = lambda: init_cache(cfg, batch, context + steps + 1, cfg.dtype)
time_decode(gen, fresh(), batch, context, steps)  # compiles
print("ready", batch, flush=True)
for line in sys.stdin:
  if line.strip() != "go":
    break
  s, cache = time_decode(gen, fresh(), batch, context, steps)
  del cache
  print(s * 1e3, flush=True)
"""


def _worker(tree: str, args, spec: str, budget_mb: float) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=tree)
  return subprocess.Popen([sys.executable, "-c", WORKER, spec, str(int(budget_mb * 2**20)), str(args.context),
                           str(args.steps), args.dtype], cwd=tree, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)


def _ask(w: subprocess.Popen) -> float:
  w.stdin.write("go\n")
  w.stdin.flush()
  line = w.stdout.readline()
  if not line:
    raise RuntimeError(f"worker {w.args[0]} exited with {w.wait()}")
  return float(line)


def compare(base_tree: str, tree: str, args) -> list[dict]:
  rows = []
  for spec, budget_mb in zip(args.models.split(","), [float(b) for b in args.budget_mb.split(",")]):
    workers = {"base": _worker(base_tree, args, spec, budget_mb), "current": _worker(tree, args, spec, budget_mb)}
    batches = {}
    for name, w in workers.items():
      ready = w.stdout.readline().split()
      if not ready or ready[0] != "ready":
        raise RuntimeError(f"{name} worker for {spec} did not start (exit {w.wait()})")
      batches[name] = int(ready[1])
    times = {"base": [], "current": []}
    for r in range(args.rounds):
      for name in (("base", "current") if r % 2 == 0 else ("current", "base")):
        times[name].append(_ask(workers[name]))
    for w in workers.values():
      w.stdin.close()
      w.wait()
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows.append({"model": spec, "budget_mb": budget_mb, "batch": batches, "ms_per_step": med,
                 "ms_spread": {k: max(v) - min(v) for k, v in times.items()}, "times_ms": times,
                 "current_over_base": med["current"] / med["base"],
                 # Round by round (the two measured back to back): less exposed to load drifting over the run.
                 "paired_ratio_median": float(np.median(np.array(times["current"]) / np.array(times["base"])))})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="the commit to compare against (e.g. main before a change)")
  p.add_argument("--models", default="llama2-7b@2,smollm2-135m", help="as dmc-jax bench --models")
  p.add_argument("--budget-mb", default="1024,512", help="one KV budget per model (sets the equal-memory batch)")
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--rounds", type=int, default=6, help="interleaved repetitions per tree (median)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--json", help="also write the result here")
  args = p.parse_args(argv)
  commit = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as base_tree:
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
    rows = compare(base_tree, ROOT, args)
  result = {"base": commit, "context": args.context, "steps": args.steps, "rounds": args.rounds,
            "dtype": args.dtype, "rows": rows}
  print("| model | batch | base ms/step (spread) | current ms/step (spread) | current / base | paired median |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} | {r['batch']['current']} | {r['ms_per_step']['base']:.1f} ({r['ms_spread']['base']:.1f}) "
          f"| {r['ms_per_step']['current']:.1f} ({r['ms_spread']['current']:.1f}) | {r['current_over_base']:.3f} "
          f"| {r['paired_ratio_median']:.3f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
