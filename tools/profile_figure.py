"""docs/figures/profile_dmc_decode.png: xprof's trace viewer screenshot of a `--profile` run, annotated, above the
named scopes of one traced step drawn from the run's .trace.json.gz (args.scope; experiments/harness/profiling.py).

    python tools/profile_figure.py RUN_DIR SCREENSHOT.png --step 4 --out docs/figures/profile_dmc_decode.png

The screenshot comes from headless Chromium on xprof served on loopback (docs/profiling.md, "A DMC decode step").
"""

from __future__ import annotations

import argparse
import collections
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.harness import profiling  # noqa: E402

LANES = [  # (label, scope path prefix under decode_step/layers or decode_step), drawn top to bottom
    ("attention/dmc_update (merge or append)", "decode_step/layers/attention/dmc_update"),
    ("attention/paged_attention (gather + attend)", "decode_step/layers/attention/paged_attention"),
    ("attention (q/k/v/o projections, RoPE, decisions)", "decode_step/layers/attention"),
    ("mlp", "decode_step/layers/mlp"),
    ("layers: slicing layer i out of the stacked weights", "decode_step/layers"),
    ("logits", "decode_step/logits"),
    ("sample", "decode_step/sample"),
    ("decode_step (other)", "decode_step"),
    ("no scope: ops XLA:CPU left without metadata (dot.N)", None),
]
UNSCOPED = len(LANES) - 1


def lane_of(scope: str) -> int | None:
  for i, (_, prefix) in enumerate(LANES):
    if prefix is not None and (scope == prefix or scope.startswith(prefix + "/")):
      return i
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dir")
  p.add_argument("screenshot")
  p.add_argument("--step", type=int, required=True, help="the traced step to break down")
  p.add_argument("--out", required=True)
  p.add_argument("--title", default="dmc-jax generate --cache dmc --dmc-force-cr 4, SmolLM2-135M, 2-core CPU")
  args = p.parse_args(argv)
  events = profiling.read_events(args.run_dir)
  step = next(e for e in events if e.get("name") == "decode" and e.get("args", {}).get("step_num") == str(args.step))
  t0, t1 = step["ts"], step["ts"] + step["dur"]
  # XLA op events name their module (args.hlo_module); those without a scope had no op_name in the HLO.
  ops = [e for e in events if e.get("ph") == "X" and "hlo_module" in e.get("args", {}) and t0 <= e["ts"] < t1]
  busy = collections.Counter()
  for e in ops:
    lane = lane_of(e["args"]["scope"]) if "scope" in e["args"] else UNSCOPED
    if lane is not None:
      busy[lane] += e["dur"]

  img = plt.imread(args.screenshot)
  fig = plt.figure(figsize=(13, 12))
  ax_img = fig.add_axes([0.01, 0.40, 0.98, 0.57])
  ax_img.imshow(img)
  ax_img.set_axis_off()
  h, w = img.shape[:2]
  ax_img.set_title(f"xprof trace viewer: {args.title}", fontsize=10)
  note = dict(fontsize=9, color="#b00020", weight="bold", bbox=dict(fc="white", ec="#b00020", alpha=0.9))
  arrow = dict(arrowstyle="->", color="#b00020", lw=1.5)
  # Positions in the 1600x1000 screenshot (the layout of xprof 2.24.2's trace viewer at that window size).
  sx, sy = w / 1600, h / 1000
  ax_img.annotate("one StepTraceAnnotation per traced decode step\n(host thread: 'decode 4', 'decode 5')",
                  xy=(1000 * sx, 528 * sy), xytext=(1050 * sx, 640 * sy), arrowprops=arrow, **note)
  ax_img.annotate("XLA:CPU op threads: the step's fused ops\n(named by HLO instruction: dot.44, gather...)",
                  xy=(1200 * sx, 262 * sy), xytext=(760 * sx, 720 * sy), arrowprops=arrow, **note)
  ax_img.annotate("step 4 waits for step 3's device work\n(async dispatch; then the ops run here)",
                  xy=(860 * sx, 360 * sy), xytext=(420 * sx, 820 * sy), arrowprops=arrow, **note)

  ax = fig.add_axes([0.30, 0.05, 0.66, 0.30])
  colors = plt.cm.tab10.colors
  for e in ops:
    lane = lane_of(e["args"]["scope"]) if "scope" in e["args"] else UNSCOPED
    if lane is None:
      continue
    ax.broken_barh([((e["ts"] - t0) / 1e3, max(e["dur"] / 1e3, 0.02))], (lane - 0.4, 0.8), color=colors[lane % 10])
  ax.set_yticks(range(len(LANES)))
  ax.set_yticklabels([f"{label}  {busy[i] / 1e3:.1f} ms" for i, (label, _) in enumerate(LANES)], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, (t1 - t0) / 1e3)
  ax.set_xlabel("ms since the start of the step annotation (op time summed over XLA:CPU threads at the right)")
  total = sum(busy.values())
  ax.set_title(f"decode step {args.step} by named scope (from the .trace.json.gz's args.scope): "
               f"{step['dur'] / 1e3:.0f} ms wall, {total / 1e3:.0f} ms of XLA op time", fontsize=9)
  ax.grid(axis="x", alpha=0.3)
  fig.savefig(args.out, dpi=110)
  for i, (label, _) in enumerate(LANES):
    print(f"{label:50s} {busy[i] / 1e3:8.2f} ms", file=sys.stderr)
  print(f"step wall {step['dur'] / 1e3:.2f} ms; wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
