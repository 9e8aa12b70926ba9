"""Optical flow for SDC-Net. Every convention lives here:

* **Direction:** backward. `flow(prev, nxt)` returns F with  nxt(x, y) ≈ prev(x + F_u(x, y), y + F_v(x, y)):
  computed with the *later* frame as DIS's first image. Warping the last frame by the last backward flow
  (constant velocity) is the flow-extrapolation baseline, and it is the same `warp` the vector head uses.
* **Units:** pixels of the frames given (no normalisation; the model standardises flows itself).
* **Channel order:** (u, v) = (horizontal x, vertical y), last axis; shape HxWx2, float32.
* **Colour:** frames are RGB uint8 HxWx3; estimators see them converted to grey.

The estimator is pluggable: anything with `name` and `__call__(prev_HxWx3, next_HxWx3) -> HxWx2` (backward, as
above) can replace DIS; its `name` is part of the dataset's cache key.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import cv2
import numpy as np

from sdc_jax.errors import SDCError


class FlowEstimator(Protocol):
  name: str

  def __call__(self, prev_HxWx3: np.ndarray, next_HxWx3: np.ndarray) -> np.ndarray:
    ...


_DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


@dataclasses.dataclass
class DISFlow:
  """OpenCV's DIS optical flow (Kroeger et al. 2016), backward, in pixels."""
  preset: str = "medium"

  def __post_init__(self):
    if self.preset not in _DIS_PRESETS:
      raise SDCError(f"flow preset: expected one of {sorted(_DIS_PRESETS)}, got {self.preset!r}")
    self._dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[self.preset])

  @property
  def name(self) -> str:
    return f"dis-{self.preset}"

  def __call__(self, prev_HxWx3: np.ndarray, next_HxWx3: np.ndarray) -> np.ndarray:
    check_pair(prev_HxWx3, next_HxWx3)
    g_prev = cv2.cvtColor(np.ascontiguousarray(prev_HxWx3), cv2.COLOR_RGB2GRAY)
    g_next = cv2.cvtColor(np.ascontiguousarray(next_HxWx3), cv2.COLOR_RGB2GRAY)
    # First image = later frame: flow maps positions in `nxt` to where their content was in `prev`.
    return self._dis.calc(g_next, g_prev, None).astype(np.float32)


def check_pair(a: np.ndarray, b: np.ndarray) -> None:
  for x in (a, b):
    if x.ndim != 3 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise SDCError(f"flow: frames must be HxWx3 uint8 RGB, got shape {x.shape} dtype {x.dtype}")
  if a.shape != b.shape:
    raise SDCError(f"flow: frame sizes differ: {a.shape[:2]} vs {b.shape[:2]}")


def make_estimator(name: str) -> FlowEstimator:
  """`dis-medium` | `dis-fast` | `dis-ultrafast`."""
  if name.startswith("dis-"):
    return DISFlow(name[len("dis-"):])
  raise SDCError(f"flow estimator: unknown {name!r}; expected dis-medium, dis-fast or dis-ultrafast")


def backward_flows(frames_TxHxWx3: np.ndarray, estimator: FlowEstimator) -> np.ndarray:
  """F_t for t = 1..T-1 (flow from frame t to frame t-1): (T-1)xHxWx2."""
  return np.stack([estimator(frames_TxHxWx3[t - 1], frames_TxHxWx3[t]) for t in range(1, len(frames_TxHxWx3))])


def forward_flows(frames_TxHxWx3: np.ndarray, estimator: FlowEstimator) -> np.ndarray:
  """G_t for t = 1..T-1 (flow from frame t-1 to frame t; the backward flow of the time-reversed clip)."""
  return np.stack([estimator(frames_TxHxWx3[t], frames_TxHxWx3[t - 1]) for t in range(1, len(frames_TxHxWx3))])
