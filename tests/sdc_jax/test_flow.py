"""Flow conventions on a real frame with a known sub-pixel translation."""

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.displaced_conv import api
from sdc_jax import data, flow
from sdc_jax.errors import SDCError


def shifted(img, dx, dy):
  """img translated by (+dx, +dy): content at (x, y) moves to (x + dx, y + dy) (bilinear, sub-pixel)."""
  m = np.float32([[1, 0, dx], [0, 1, dy]])
  return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def real_frame():
  frames = data.read_video(data.bundled_clip("bigbuckbunny"), max_frames=60, scale=0.25)
  return frames[59]  # 180x320, textured


@pytest.mark.parametrize("dx, dy", [(1.5, -0.75), (-2.25, 0.5)])
def test_dis_backward_flow_sign_and_magnitude(real_frame, dx, dy):
  nxt = shifted(real_frame, dx, dy)
  f = flow.DISFlow("medium")(real_frame, nxt)
  assert f.shape == real_frame.shape[:2] + (2,) and f.dtype == np.float32
  inner = f[16:-16, 16:-16]
  # Backward: nxt(x) = prev(x - d) = prev(x + F)  =>  F = -d.
  med_u, med_v = np.median(inner[..., 0]), np.median(inner[..., 1])
  assert abs(med_u - (-dx)) <= 0.25 and abs(med_v - (-dy)) <= 0.25, (med_u, med_v)
  # Warping the earlier frame by it predicts the later frame better than copying it.
  warped = np.asarray(api.warp(jnp.asarray(real_frame[None], jnp.float32), jnp.asarray(f[None])))[0]
  err_warp = np.abs(warped - nxt.astype(np.float32))[16:-16, 16:-16].mean()
  err_copy = np.abs(real_frame.astype(np.float32) - nxt.astype(np.float32))[16:-16, 16:-16].mean()
  assert err_warp < 0.5 * err_copy, (err_warp, err_copy)


def test_forward_flow_is_reversed_direction(real_frame):
  frames = np.stack([real_frame, shifted(real_frame, 1.0, 0.0)])
  est = flow.make_estimator("dis-medium")
  assert abs(np.median(flow.backward_flows(frames, est)[0, 16:-16, 16:-16, 0]) + 1.0) < 0.25
  assert abs(np.median(flow.forward_flows(frames, est)[0, 16:-16, 16:-16, 0]) - 1.0) < 0.25


def test_bad_inputs():
  a = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(SDCError, match="sizes differ"):
    flow.DISFlow()(a, np.zeros((8, 9, 3), np.uint8))
  with pytest.raises(SDCError, match="HxWx3 uint8"):
    flow.DISFlow()(a, np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(SDCError, match="unknown 'raft'"):
    flow.make_estimator("raft")
  with pytest.raises(SDCError, match="preset"):
    flow.DISFlow("slow")
