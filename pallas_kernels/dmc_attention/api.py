"""DMC training/prefill attention: `implementation=None|"xla"|"pallas"` (None = the best available)."""

from __future__ import annotations

from pallas_kernels.dmc_attention import reference


def dmc_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, segment_ids_BxL=None, scale=None,
                  implementation: str | None = None):
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(f"implementation: expected None, 'xla' or 'pallas', got {implementation!r}")
  if implementation == "pallas":
    raise NotImplementedError("the fused Pallas DMC attention arrives with the kernels issue; use 'xla'")
  return reference.dmc_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, segment_ids_BxL, scale)
