"""Frame-quality metrics, per image (inputs in 0..255, HxWx3 or BxHxWx3).

* `ssim_pix`: the Wang et al. / TF definition as dm-pix computes it (11×11 Gaussian σ = 1.5, 'valid' filtering,
  population covariance, K1 = 0.01, K2 = 0.03).
* `ssim_skimage`: what NVIDIA's evaluator reports — skimage `structural_similarity(a, b, channel_axis=-1,
  gaussian_weights=True, sigma=1.5, data_range=255)`: scipy's truncated Gaussian (radius 5) with 'reflect'
  borders, *sample* covariance (×121/120), averaged after cropping 5 pixels per side, then over channels.
  Written here in jnp (jit-friendly) and tested against skimage itself.
* `psnr` (peak 255) and `l1` (mean absolute error in 0..255).
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np


def _batched(x):
  x = jnp.asarray(x, jnp.float32)
  return x[None] if x.ndim == 3 else x


def ssim_pix(a, b):
  return pix.ssim(_batched(a), _batched(b), max_val=255.0)


def _scipy_gaussian(sigma=1.5, truncate=3.5):
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return jnp.asarray(w / w.sum(), jnp.float32), radius


def _filter(x_BxHxWxC, w, r):
  """Separable Gaussian with scipy 'reflect' borders (= numpy 'symmetric')."""
  x = jnp.pad(x_BxHxWxC, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
  h, wd = x_BxHxWxC.shape[1:3]
  x = sum(w[i] * x[:, i:i + h] for i in range(2 * r + 1))
  return sum(w[i] * x[:, :, i:i + wd] for i in range(2 * r + 1))


def ssim_skimage(a, b, data_range=255.0):
  a, b = _batched(a), _batched(b)
  w, r = _scipy_gaussian()
  n = (2 * r + 1) ** 2
  cov_norm = n / (n - 1)
  ux, uy = _filter(a, w, r), _filter(b, w, r)
  uxx, uyy, uxy = _filter(a * a, w, r), _filter(b * b, w, r), _filter(a * b, w, r)
  vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s[:, r:-r, r:-r], axis=(1, 2, 3))


def psnr(a, b):
  mse = jnp.mean((_batched(a) - _batched(b)) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10))


def l1(a, b):
  return jnp.mean(jnp.abs(_batched(a) - _batched(b)), axis=(1, 2, 3))


@jax.jit
def all_metrics(pred, target):
  """Per-image dict of ssim_pix, ssim_skimage, psnr, l1 (pred clipped and rounded to uint8 levels first, as a
  written frame would be)."""
  pred = jnp.round(jnp.clip(_batched(pred), 0.0, 255.0))
  target = _batched(target)
  return {"ssim_pix": ssim_pix(pred, target), "ssim_skimage": ssim_skimage(pred, target),
          "psnr": psnr(pred, target), "l1": l1(pred, target)}
