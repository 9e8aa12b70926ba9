"""Next-frame and recursive k-step prediction on whole frames (host loop; the network step is jitted).

Recursive prediction: each predicted frame (rounded to uint8, as a written frame would be) becomes the newest
input, and the flows that involve it are computed by the same flow estimator as the real ones.
"""

from __future__ import annotations

import numpy as np

from sdc_jax import flow as flow_lib
from sdc_jax.errors import SDCError
from sdc_jax.model import SDCNetConfig
from sdc_jax.train import make_predict_fn


def to_uint8(x) -> np.ndarray:
  return np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8)


class Predictor:
  def __init__(self, cfg: SDCNetConfig, params, estimator: flow_lib.FlowEstimator):
    self.cfg, self.params, self.estimator = cfg, params, estimator
    self._fn = make_predict_fn(cfg)

  def next_frame(self, frames_SxHxWx3: np.ndarray, flows_FxHxWx2: np.ndarray | None = None) -> np.ndarray:
    """The predicted next frame (HxWx3 uint8) after the last s frames."""
    s = self.cfg.frames
    if frames_SxHxWx3.shape[0] < s:
      raise SDCError(f"predict: need {s} frames of history, got {frames_SxHxWx3.shape[0]}")
    frames = frames_SxHxWx3[-s:]
    if flows_FxHxWx2 is None:
      flows_FxHxWx2 = flow_lib.backward_flows(frames, self.estimator)
    return to_uint8(self._fn(self.params, frames[None], flows_FxHxWx2[-(s - 1):][None])[0])

  def rollout(self, frames_SxHxWx3: np.ndarray, steps: int, on_step=None) -> np.ndarray:
    """K recursively predicted frames: KxHxWx3 uint8. on_step(i): called after frame i (from 1) is predicted."""
    history = list(frames_SxHxWx3[-self.cfg.frames:])
    out = []
    for i in range(steps):
      nxt = self.next_frame(np.stack(history))
      out.append(nxt)
      if on_step is not None:
        on_step(i + 1)
      history = history[1:] + [nxt]
    return np.stack(out)

  def extrapolate_flow(self, frames_SxHxWx3: np.ndarray, steps: int) -> np.ndarray:
    """The flow-extrapolation baseline run recursively with the same estimator (constant velocity)."""
    import jax.numpy as jnp

    from pallas_kernels.displaced_conv import api
    history = list(frames_SxHxWx3[-2:])
    out = []
    for _ in range(steps):
      f = self.estimator(history[-2], history[-1])
      nxt = to_uint8(api.warp(jnp.asarray(history[-1][None], jnp.float32), jnp.asarray(f[None]))[0])
      out.append(nxt)
      history = [history[-1], nxt]
    return np.stack(out)
