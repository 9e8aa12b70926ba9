"""SDC op API: picks the implementation.

* "xla": the jnp reference (reference.py) — gathers a row of the window at a time; autodiff keeps every row, so
  its backward pass holds O(frame·(N+1)²). The test oracle.
* "xla_taps": an XLA loop over the (N+1)² taps with a custom VJP (taps.py) — O(frame) temporaries, and on the CPU
  faster than the reference at every measured size (`make bench`).
* "pallas": the fused Pallas (Triton) kernels (gpu.py); interpreted off a GPU (a correctness tool, slow).
* None: "pallas" on a GPU, "xla_taps" elsewhere.
"""

from __future__ import annotations

import jax

from pallas_kernels import _backend
from pallas_kernels.displaced_conv import gpu, reference, taps

IMPLEMENTATIONS = (None, "xla", "xla_taps", "pallas")
OP = "displaced_conv"


def resolve(implementation: str | None) -> str:
  """The implementation that runs for `implementation` on this platform."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{OP}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation is None:
    return "pallas" if _backend.resolve(OP, None) == "pallas" else "xla_taps"
  return implementation


def displaced_conv(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, kh_BxHxWxN: jax.Array,
                   kv_BxHxWxN: jax.Array, implementation: str | None = None) -> jax.Array:
  """Spatially-displaced separable convolution; see reference.py for the definition and border rule."""
  impl = resolve(implementation)
  fn = {"xla": reference.displaced_conv, "xla_taps": taps.displaced_conv, "pallas": gpu.displaced_conv}[impl]
  return fn(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN)


def warp(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, implementation: str | None = None) -> jax.Array:
  """Bilinear backward warp (the N = 1 SDC)."""
  ones = jax.numpy.ones(uv_BxHxWx2.shape[:-1] + (1,), uv_BxHxWx2.dtype)
  return displaced_conv(frame_BxHxWxC, uv_BxHxWx2, ones, ones, implementation)
