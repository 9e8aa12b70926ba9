"""SDC op benchmark: every implementation's compiled memory and time, forward and forward + backward.

    python -m experiments.bench.sdc [--sizes 256,720p,1080p] [--ns 1,5,11] [--json OUT.json]

Memory is XLA's `memory_analysis` of the compiled program (temporaries; arguments and outputs are the same for
every implementation and listed once), so it needs no run. On a CPU the Pallas kernel only runs interpreted, so
only the XLA formulations are timed, and only where arguments + outputs + temporaries fit `--run-budget-gb`;
the Pallas row there is the interpreted program's memory. On a GPU every implementation is timed (the fused kernel
against both XLA formulations, ratios from the same run), plus SDC-Net predicted frames/s at 720p and 1080p and
the fused forward's achieved bandwidth against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import copy_bandwidth
from pallas_kernels.displaced_conv import api

SIZES = {"256": (256, 256), "720p": (720, 1280), "1080p": (1080, 1920)}


def frame_size(name: str) -> tuple[int, int]:
  """A named size or HxW (small ones check the script itself)."""
  if name in SIZES:
    return SIZES[name]
  try:
    h, w = (int(v) for v in name.split("x"))
  except ValueError:
    raise ValueError(f"frame size: expected one of {list(SIZES)} or HxW, got {name!r}") from None
  return h, w
IMPLS = ("xla", "xla_taps", "pallas")
CHANNELS = 3


def shapes(h, w, n):
  s = jax.ShapeDtypeStruct
  f32 = jnp.float32
  return s((1, h, w, CHANNELS), f32), s((1, h, w, 2), f32), s((1, h, w, n), f32), s((1, h, w, n), f32)


def programs(impl):
  """(forward, forward + backward w.r.t. all four inputs) for one implementation."""
  def fwd(*a):
    return api.displaced_conv(*a, implementation=impl)

  def fwd_bwd(*a):
    out, vjp = jax.vjp(fwd, *a)
    return out, vjp(out)
  return {"fwd": jax.jit(fwd), "fwd_bwd": jax.jit(fwd_bwd)}


def random_inputs(h, w, n, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  frame = jax.random.uniform(k[0], (1, h, w, CHANNELS), jnp.float32, 0, 255)
  uv = 4.0 * jax.random.normal(k[1], (1, h, w, 2), jnp.float32)
  kh = jax.nn.softmax(jax.random.normal(k[2], (1, h, w, n), jnp.float32), -1)
  kv = jax.nn.softmax(jax.random.normal(k[3], (1, h, w, n), jnp.float32), -1)
  return frame, uv, kh, kv


def timed(fn, args, min_seconds, min_runs=3) -> float:
  """Median seconds per call after one warm-up call (runs until min_runs and min_seconds are both reached)."""
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < min_runs or sum(times) < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if times[0] > 5 * min_seconds:  # one long run is enough
      break
  return float(np.median(times))


def measure(size, n, impl, time_all, run_budget, min_seconds):
  h, w = frame_size(size)
  row = {"size": size, "h": h, "w": w, "n": n, "impl": impl}
  progs = programs(impl)
  args = None
  for kind, fn in progs.items():
    m = fn.lower(*shapes(h, w, n)).compile().memory_analysis()
    row[f"{kind}_temp_MB"] = m.temp_size_in_bytes / 1e6
    row[f"{kind}_peak_MB"] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                              - m.alias_size_in_bytes) / 1e6
    row["args_MB"] = m.argument_size_in_bytes / 1e6
    runnable = (time_all or impl != "pallas") and row[f"{kind}_peak_MB"] * 1e6 <= run_budget
    if runnable:
      args = args if args is not None else random_inputs(h, w, n)
      row[f"{kind}_ms"] = 1e3 * timed(fn, args, min_seconds)
  if "fwd_ms" in row:
    # Bytes the forward must move at least: every input once, the output once (float32).
    row["fwd_min_bytes"] = 4 * h * w * (CHANNELS + 2 + 2 * n + CHANNELS)
    row["fwd_GBps"] = row["fwd_min_bytes"] / row["fwd_ms"] / 1e6
  return row


def model_fps(size, impl, min_seconds, n=11):
  """SDC-Net (released widths, SDC head, N = 11), batch 1: predicted frames per second of the forward pass."""
  from sdc_jax.model import SDCNet, SDCNetConfig
  h, w = frame_size(size)
  model = SDCNet(SDCNetConfig(kernel_size=n, implementation=impl))
  k = jax.random.split(jax.random.key(1), 2)
  frames = jax.random.uniform(k[0], (1, 2, h, w, 3), jnp.float32, 0, 255)
  flows = 2.0 * jax.random.normal(k[1], (1, 1, h, w, 2), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), frames, flows)
  predict = jax.jit(lambda p, f, fl: model.apply(p, f, fl)["pred"])
  return 1.0 / timed(predict, (params, frames, flows), min_seconds)


def run(sizes, ns, time_all, run_budget, model_sizes, min_seconds):
  rows = []
  for size in sizes:
    for n in ns:
      for impl in IMPLS:
        rows.append(measure(size, n, impl, time_all, run_budget, min_seconds))
        print(f"bench_sdc: {rows[-1]}", file=sys.stderr, flush=True)  # progress; the table comes at the end
  result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "time_all": time_all, "rows": rows}
  if time_all:
    result["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    result["model_fps"] = {size: {impl: model_fps(size, impl, min_seconds) for impl in ("pallas", "xla_taps")}
                           for size in model_sizes}
  return result


def _cell(row, key, fmt="{:.0f}"):
  return fmt.format(row[key]) if key in row else "—"


def table(result: dict) -> str:
  gpu = result["time_all"]
  lines = [f"device: {result['device']} ({result['platform']}), jax {result['jax']}"
           + (f", measured copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s" if gpu else ""), "",
           "| frame | N | impl | fwd temp MB | fwd+bwd temp MB | fwd peak MB | fwd+bwd peak MB | fwd ms "
           "| fwd+bwd ms |" + (" fwd ms / fused | fwd+bwd ms / fused | fwd GB/s (% copy) |" if gpu else ""),
           "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if gpu else "")]
  fused = {(r["size"], r["n"]): r for r in result["rows"] if r["impl"] == "pallas"}
  for r in result["rows"]:
    line = (f"| {r['size']} | {r['n']} | {r['impl']} | {r['fwd_temp_MB']:.1f} | {r['fwd_bwd_temp_MB']:.1f} "
            f"| {r['fwd_peak_MB']:.1f} | {r['fwd_bwd_peak_MB']:.1f} | {_cell(r, 'fwd_ms', '{:.1f}')} "
            f"| {_cell(r, 'fwd_bwd_ms', '{:.1f}')} |")
    if gpu:
      f = fused[(r["size"], r["n"])]
      ratio = " | ".join(f"{r[k] / f[k]:.2f}×" if k in r and k in f else "—" for k in ("fwd_ms", "fwd_bwd_ms"))
      bw = (f"{r['fwd_GBps']:.0f} ({100 * r['fwd_GBps'] / result['copy_bandwidth_GBps']:.0f}%)"
            if "fwd_GBps" in r else "—")
      line += f" {ratio} | {bw} |"
    lines.append(line)
  lines.append("")
  lines.append("peak = arguments + outputs + temporaries of the compiled program; arguments per frame: "
               + ", ".join(sorted({f"{r['size']} N={r['n']} {r['args_MB']:.0f} MB" for r in result["rows"]
                                   if r["impl"] == "xla"})))
  for size, fps in result.get("model_fps", {}).items():
    lines.append(f"SDC-Net (N = 11, batch 1) at {size}: " + ", ".join(f"{k} {v:.1f} frames/s" for k, v in fps.items())
                 + f" (fused / xla_taps {fps['pallas'] / fps['xla_taps']:.2f}×)")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="256,720p,1080p", help=f"comma-separated frame sizes: {list(SIZES)} or HxW")
  p.add_argument("--ns", default="1,5,11", help="comma-separated kernel sizes N")
  p.add_argument("--run-budget-gb", type=float, default=3.0,
                 help="time a program only if its compiled peak memory fits this (GB)")
  p.add_argument("--time-all", action="store_true",
                 help="time Pallas too and add the model and bandwidth rows (default on a GPU; on a CPU the "
                      "kernel runs interpreted: only to check this script at small sizes)")
  p.add_argument("--model-sizes", default="720p,1080p", help="frame sizes for SDC-Net frames/s (with --time-all)")
  p.add_argument("--min-seconds", type=float, default=1.0, help="time each program for at least this")
  p.add_argument("--json", help="also write the results here")
  a = p.parse_args(argv)
  sizes = [s for s in a.sizes.split(",") if s]
  model_sizes = [s for s in a.model_sizes.split(",") if s]
  try:
    for s in sizes + model_sizes:
      frame_size(s)
  except ValueError as e:
    p.error(str(e))
  time_all = a.time_all or jax.devices()[0].platform == "gpu"
  result = run(sizes, [int(n) for n in a.ns.split(",")], time_all, a.run_budget_gb * 1e9, model_sizes,
               a.min_seconds)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)
  print(table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
