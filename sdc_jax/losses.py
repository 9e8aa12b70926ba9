"""SDC-Net training losses (the released weights): 0.7 L1 colour + 0.2 L1 of gradient magnitudes + 0.1 smoothness.

Colour terms use images / 255; the smoothness term is the mean absolute spatial difference of the predicted
motion (u, v) in pixels.
"""

from __future__ import annotations

import jax.numpy as jnp

_EPS = 1e-6


def l1(pred_BxHxWxC, target_BxHxWxC):
  return jnp.mean(jnp.abs(pred_BxHxWxC - target_BxHxWxC))


def gradient_magnitude(img_BxHxWxC):
  """|∇I| from forward differences (last row/column replicated so shapes are kept)."""
  gx = jnp.diff(img_BxHxWxC, axis=2, append=img_BxHxWxC[:, :, -1:])
  gy = jnp.diff(img_BxHxWxC, axis=1, append=img_BxHxWxC[:, -1:])
  return jnp.sqrt(gx * gx + gy * gy + _EPS)


def gradient_l1(pred_BxHxWxC, target_BxHxWxC):
  return l1(gradient_magnitude(pred_BxHxWxC), gradient_magnitude(target_BxHxWxC))


def smoothness(uv_BxHxWx2):
  return (jnp.mean(jnp.abs(jnp.diff(uv_BxHxWx2, axis=1))) + jnp.mean(jnp.abs(jnp.diff(uv_BxHxWx2, axis=2))))


def sdc_loss(pred_BxHxWx3, target_BxHxWx3, uv_BxHxWx2, w_color=0.7, w_grad=0.2, w_smooth=0.1):
  """Total loss and its terms (pred/target in 0..255)."""
  p, t = pred_BxHxWx3 / 255.0, target_BxHxWx3 / 255.0
  terms = {"color_l1": l1(p, t), "grad_l1": gradient_l1(p, t), "smooth": smoothness(uv_BxHxWx2)}
  total = w_color * terms["color_l1"] + w_grad * terms["grad_l1"] + w_smooth * terms["smooth"]
  return total, terms
