"""Paged DMC decode attention: `implementation=None|"xla"|"pallas"` (None = the best available)."""

from __future__ import annotations

from pallas_kernels.dmc_decode import reference


def paged_decode_attention(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, block_table_RxM, lengths_R, scale=None,
                           implementation: str | None = None):
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(f"implementation: expected None, 'xla' or 'pallas', got {implementation!r}")
  if implementation == "pallas":
    raise NotImplementedError("the Pallas paged decode kernel arrives with the kernels issue; use 'xla'")
  return reference.paged_decode_attention(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, block_table_RxM, lengths_R, scale)
