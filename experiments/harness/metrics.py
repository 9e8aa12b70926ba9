"""Training metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL history, PNG curves.

    WORKDIR/tb/                 TensorBoard events (`tensorboard --logdir WORKDIR/tb`)
    WORKDIR/metrics.jsonl       one {"step": ..., name: value, ...} per logging event (scalars)
    WORKDIR/arrays.jsonl        one {"step", "name", "values"} per array metric and event (e.g. CR per layer × head)
    WORKDIR/curves.png          one panel per top-level scalar (matplotlib Agg); per-index scalars
                                (`a/b/07`) stay in TensorBoard and metrics.jsonl

Array metrics also go to TensorBoard: a 1-D array as one scalar per index (`name/07`); a 2-D array (a tag per
entry would be hundreds) as a heatmap image, rows = first axis, plus a histogram.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Mapping

import numpy as np


class MetricsWriter:
  """enabled=False (every process but the first of a multi-host run) keeps the history in memory, writes nothing."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, "metrics.jsonl")
    self.arrays_path = os.path.join(self.workdir, "arrays.jsonl")
    self.enabled = enabled
    self.tb = None
    if not enabled:
      self.history = [r for r in read_history(self.path) if r["step"] <= resume_step]
      return
    from tensorboardX import SummaryWriter
    os.makedirs(self.workdir, exist_ok=True)
    self.history = _truncate(self.path, resume_step)
    _truncate(self.arrays_path, resume_step)
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

  def write_array(self, step: int, name: str, values) -> None:
    if not self.enabled:
      return
    values = np.asarray(values, np.float64)
    with open(self.arrays_path, "a") as f:
      f.write(json.dumps({"step": int(step), "name": name, "values": values.tolist()}) + "\n")
    if values.ndim == 1:
      for i, v in enumerate(values):
        self.tb.add_scalar(f"{name}/{i:02d}", float(v), step)
    elif values.ndim == 2:
      self.tb.add_image(name, heatmap_rgb(values), step, dataformats="HWC")
      self.tb.add_histogram(name, values.ravel(), step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()

  def plot(self, path: str | None = None) -> str | None:
    if not self.enabled:
      return None
    return plot_history(self.history, path or os.path.join(self.workdir, "curves.png"))


def _truncate(path: str, resume_step: int) -> list[dict]:
  """A killed run may have logged past its last checkpoint: keep only what the resumed run will not redo."""
  rows = [r for r in read_history(path) if r["step"] <= resume_step]
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows


def heatmap_rgb(values, cell: int = 8):
  """A 2-D array as a uint8 RGB image (viridis, min..max), each entry a cell×cell block."""
  import matplotlib
  lo, hi = float(np.min(values)), float(np.max(values))
  rgb = matplotlib.colormaps["viridis"]((values - lo) / (hi - lo if hi > lo else 1.0))[..., :3]
  return (np.kron(rgb, np.ones((cell, cell, 1))) * 255).astype(np.uint8)


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
      if k != "step" and k.count("/") < 2 and v is not None and math.isfinite(v):
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
