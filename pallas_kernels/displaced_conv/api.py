"""SDC op API: picks the implementation. `None` and "xla" run the jnp reference; "pallas" is the fused kernel
of issue 7 (not written yet)."""

from __future__ import annotations

import jax

from pallas_kernels.displaced_conv import reference

IMPLEMENTATIONS = (None, "xla", "pallas")


def displaced_conv(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, kh_BxHxWxN: jax.Array,
                   kv_BxHxWxN: jax.Array, implementation: str | None = None) -> jax.Array:
  """Spatially-displaced separable convolution; see reference.py for the definition and border rule."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"displaced_conv: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "pallas":
    raise NotImplementedError("displaced_conv: the fused Pallas SDC kernel is issue 7 and not written yet; "
                              "use implementation=None or 'xla'")
  return reference.displaced_conv(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN)


def warp(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, implementation: str | None = None) -> jax.Array:
  """Bilinear backward warp (the N = 1 SDC)."""
  ones = jax.numpy.ones(uv_BxHxWx2.shape[:-1] + (1,), uv_BxHxWx2.dtype)
  return displaced_conv(frame_BxHxWxC, uv_BxHxWx2, ones, ones, implementation)
