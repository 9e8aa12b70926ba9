"""Training metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL history, PNG curves.

    WORKDIR/tb/                 TensorBoard events (`tensorboard --logdir WORKDIR/tb`)
    WORKDIR/metrics.jsonl       one {"step": ..., name: value, ...} per logging event
    WORKDIR/curves.png          one panel per metric (matplotlib Agg)
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Mapping


class MetricsWriter:
  """enabled=False (every process but the first of a multi-host run) keeps the history in memory, writes nothing."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, "metrics.jsonl")
    self.enabled = enabled
    # A killed run may have logged past its last checkpoint: keep only what the resumed run will not redo.
    self.history = [r for r in read_history(self.path) if r["step"] <= resume_step]
    self.tb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(self.workdir, exist_ok=True)
    with open(self.path, "w") as f:
      for r in self.history:
        f.write(json.dumps(r) + "\n")
    self.tb = SummaryWriter(os.path.join(self.workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, values: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    self.history.append(row)
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in values.items():
      self.tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()

  def plot(self, path: str | None = None) -> str | None:
    if not self.enabled:
      return None
    return plot_history(self.history, path or os.path.join(self.workdir, "curves.png"))


def read_history(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_history(history: list[dict], path: str) -> str | None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  series = defaultdict(list)
  for row in history:
    for k, v in row.items():
      if k != "step" and v is not None and math.isfinite(v):
        series[k].append((row["step"], v))
  if not series:
    return None
  names = sorted(series)
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    xs, ys = zip(*series[name])
    ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
