"""SDC op API: picks the implementation.

* "xla": the jnp reference (reference.py) — gathers a row of the window at a time; autodiff keeps every row, so
  forward + backward hold ≈2.6× the (N+1)² window (9.3 GB of temporaries for a 1080p RGB frame at N = 11).
  The test oracle.
* "xla_taps": an XLA loop over the (N+1)² taps with a custom VJP (taps.py) — O(frame) temporaries (124 MB there);
  on the CPU from 2.6× faster (N = 1) to 1.7× slower (N ≥ 5 on large frames) than the reference (`make bench`).
* "pallas": the fused Pallas (Triton) kernels (gpu.py); interpreted off a GPU (a correctness tool, slow).
* None: "pallas" on a GPU; elsewhere "xla" while the window B·H·W·(N+1)²·C float32 is at most
  WINDOW_BUDGET_BYTES (small training crops: the reference's speed, and today's behaviour), "xla_taps" above.
"""

from __future__ import annotations

import jax

from pallas_kernels import _backend
from pallas_kernels.displaced_conv import gpu, reference, taps

IMPLEMENTATIONS = (None, "xla", "xla_taps", "pallas")
OP = "displaced_conv"
WINDOW_BUDGET_BYTES = 256 * 2**20  # 128² crops, batch 8, N = 11 stay on the reference (226 MB)


def window_bytes(frame_shape, n: int) -> int:
  """Size of the (N+1)² float32 window per pixel that a gather formulation materialises."""
  b, h, w, c = frame_shape
  return 4 * b * h * w * c * (n + 1) ** 2


def resolve(implementation: str | None, frame_shape, n: int) -> str:
  """The implementation that runs for `implementation` on this platform and frame shape (B, H, W, C)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{OP}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation is not None:
    return implementation
  if _backend.resolve(OP, None) == "pallas":
    return "pallas"
  return "xla" if window_bytes(frame_shape, n) <= WINDOW_BUDGET_BYTES else "xla_taps"


def displaced_conv(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, kh_BxHxWxN: jax.Array,
                   kv_BxHxWxN: jax.Array, implementation: str | None = None) -> jax.Array:
  """Spatially-displaced separable convolution; see reference.py for the definition and border rule."""
  impl = resolve(implementation, frame_BxHxWxC.shape, kh_BxHxWxN.shape[-1])
  fn = {"xla": reference.displaced_conv, "xla_taps": taps.displaced_conv, "pallas": gpu.displaced_conv}[impl]
  return fn(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN)


def warp(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, implementation: str | None = None) -> jax.Array:
  """Bilinear backward warp (the N = 1 SDC)."""
  ones = jax.numpy.ones(uv_BxHxWx2.shape[:-1] + (1,), uv_BxHxWx2.dtype)
  return displaced_conv(frame_BxHxWxC, uv_BxHxWx2, ones, ones, implementation)
