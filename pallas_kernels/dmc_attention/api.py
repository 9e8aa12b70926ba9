"""DMC training/prefill attention: `implementation=None|"reference"|"xla"|"pallas"` (None = the best available).

There is no TPU kernel for this op: under a model-wide `attention_impl="tpu"` (which picks the TPU decode kernel)
it runs its default (`_backend.for_op`)."""

from __future__ import annotations

import jax

from pallas_kernels import _backend
from pallas_kernels.dmc_attention import reference

OP = "dmc_attention"
AVAILABLE = ("reference", "xla", "pallas")


def dmc_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, segment_ids_BxL=None, scale=None,
                  implementation: str | None = None, interpret: bool | None = None, window: int = 0):
  """Causal attention with the per-key bias log(1 − α̃_{j+1}) below the diagonal (see reference.py). "xla" forms
  L×L logits; "pallas" is the fused flash kernel (custom VJP: gradients for q, k, v and the bias). `interpret`
  only matters for "pallas" (None: interpret unless on a GPU). `window`: the bias applies only where i − j > window
  (0: DMC; DMS's w, whose tokens stay visible for w steps)."""
  # No separate fast XLA path here: "reference" and "xla" are both the dense-bias jnp attention.
  impl = _backend.resolve(OP, implementation, AVAILABLE)
  with jax.named_scope(f"dmc_attention_{impl}"):
    if impl == "pallas":
      from pallas_kernels.dmc_attention import gpu
      return gpu.dmc_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, segment_ids_BxL, scale,
                               window=window, interpret=_backend.interpret(interpret))
    return reference.dmc_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, segment_ids_BxL, scale, window)
