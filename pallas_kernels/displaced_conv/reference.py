"""Spatially-displaced convolution (SDC), the pure-jnp reference: the XLA fallback and the test oracle.

    out(x, y) = sum_{i,j=-r..r} kv_j(x,y) kh_i(x,y) B[frame](x + u + i, y + v + j),   N = 2r + 1

B is bilinear sampling and, by this project's border rule (docs/sdc.md §1), every integer position a bilinear
sample reads is clamped into the image (edge replication), for every tap. N = 1 with kh = kv = 1 is flow warping;
uv = 0 is per-pixel separable adaptive convolution.

Implementation identity (why this is cheap to write): the fractional parts (alpha, beta) of (x+u, y+v) are
shared by every tap, so the N-tap SDC equals an (N+1)-tap per-pixel separable filter at the integer base
(floor(x+u) - r, floor(y+v) - r) with weights
    wh_a = (1 - alpha) kh_a + alpha kh_{a-1},   wv_b = (1 - beta) kv_b + beta kv_{b-1},   (k_{-1} = k_N = 0).
We gather one row of N+1 samples per window row at a time (N+1 gathers of (N+1) values per pixel) rather than
the whole (N+1)^2 window, so the live intermediate is N+1 times smaller. Autodiff gives the gradients: w.r.t.
(u, v) through alpha and beta only (floor is flat), w.r.t. the frame a scatter-add (the gather's transpose).

NVIDIA's CUDA layer differs at the border (it clamps the anchor and reads a padded window); we do not copy it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_shapes(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN) -> int:
  """Validates shapes; returns N. Raises ValueError with a one-line message."""
  if frame_BxHxWxC.ndim != 4:
    raise ValueError(f"displaced_conv: frame must be BxHxWxC, got shape {tuple(frame_BxHxWxC.shape)}")
  b, h, w, _ = frame_BxHxWxC.shape
  if tuple(uv_BxHxWx2.shape) != (b, h, w, 2):
    raise ValueError(f"displaced_conv: uv must be {(b, h, w, 2)}, got {tuple(uv_BxHxWx2.shape)}")
  n = kh_BxHxWxN.shape[-1]
  for name, k in (("kh", kh_BxHxWxN), ("kv", kv_BxHxWxN)):
    if tuple(k.shape) != (b, h, w, n):
      raise ValueError(f"displaced_conv: {name} must be {(b, h, w, n)}, got {tuple(k.shape)}")
  if n % 2 != 1:
    raise ValueError(f"displaced_conv: kernel size N must be odd (taps -r..r), got {n}")
  return n


def _interp_weights(k_BxHxWxN: jax.Array, frac_BxHxW: jax.Array) -> jax.Array:
  """(N+1)-tap weights w_a = (1 - f) k_a + f k_{a-1}."""
  pad_right = jnp.pad(k_BxHxWxN, ((0, 0), (0, 0), (0, 0), (0, 1)))
  pad_left = jnp.pad(k_BxHxWxN, ((0, 0), (0, 0), (0, 0), (1, 0)))
  f = frac_BxHxW[..., None]
  return (1 - f) * pad_right + f * pad_left


def displaced_conv(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, kh_BxHxWxN: jax.Array,
                   kv_BxHxWxN: jax.Array) -> jax.Array:
  """SDC with separable per-pixel kernels; uv[..., 0] is horizontal (x), uv[..., 1] vertical (y), in pixels."""
  n = check_shapes(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN)
  b, h, w, c = frame_BxHxWxC.shape
  r = (n - 1) // 2
  dtype = jnp.result_type(frame_BxHxWxC.dtype, uv_BxHxWx2.dtype, kh_BxHxWxN.dtype, jnp.float32)
  xs_W = jnp.arange(w, dtype=dtype)
  ys_H = jnp.arange(h, dtype=dtype)
  # Positions more than N+1 pixels outside only ever read the clamped edge, whatever their fraction, so
  # clipping them there changes no value and keeps the int32 cast safe for huge (or inf) displacements.
  px_BxHxW = jnp.clip(xs_W[None, None, :] + uv_BxHxWx2[..., 0].astype(dtype), -(n + 1), w + n)
  py_BxHxW = jnp.clip(ys_H[None, :, None] + uv_BxHxWx2[..., 1].astype(dtype), -(n + 1), h + n)
  fx_BxHxW = jnp.floor(px_BxHxW)
  fy_BxHxW = jnp.floor(py_BxHxW)
  wh_BxHxWxM = _interp_weights(kh_BxHxWxN.astype(dtype), px_BxHxW - fx_BxHxW)
  wv_BxHxWxM = _interp_weights(kv_BxHxWxN.astype(dtype), py_BxHxW - fy_BxHxW)
  taps_M = jnp.arange(n + 1)
  cols_BxHxWxM = jnp.clip(fx_BxHxW.astype(jnp.int32)[..., None] - r + taps_M, 0, w - 1)
  base_row_BxHxW = fy_BxHxW.astype(jnp.int32) - r
  flat_BxPxC = frame_BxHxWxC.astype(dtype).reshape(b, h * w, c)
  out_BxHxWxC = jnp.zeros((b, h, w, c), dtype)
  for row in range(n + 1):
    rows_BxHxW = jnp.clip(base_row_BxHxW + row, 0, h - 1)
    idx_BxQ = (rows_BxHxW[..., None] * w + cols_BxHxWxM).reshape(b, -1)
    vals_BxHxWxMxC = jnp.take_along_axis(flat_BxPxC, idx_BxQ[..., None], axis=1).reshape(b, h, w, n + 1, c)
    row_BxHxWxC = jnp.einsum("bhwm,bhwmc->bhwc", wh_BxHxWxM, vals_BxHxWxMxC)
    out_BxHxWxC = out_BxHxWxC + wv_BxHxWxM[..., row, None] * row_BxHxWxC
  return out_BxHxWxC


def warp(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array) -> jax.Array:
  """Bilinear backward warping out(x, y) = B[frame](x + u, y + v): the N = 1 SDC with unit kernels."""
  ones = jnp.ones(uv_BxHxWx2.shape[:-1] + (1,), uv_BxHxWx2.dtype)
  return displaced_conv(frame_BxHxWxC, uv_BxHxWx2, ones, ones)
