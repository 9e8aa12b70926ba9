"""Paged DMC decode attention: `implementation=None|"reference"|"xla"|"pallas"|"tpu"` (see pallas_kernels._backend).

* "reference" — the jnp oracle (gathers every row's whole block table);
* "xla" — the fast XLA path (`xla.py`: pages in use only, online softmax over page blocks);
* "pallas" — the split-K Pallas kernel (`gpu.py`, Triton lowering; interpreted off GPU);
* "tpu" — the Mosaic kernel (`tpu.py`; interpreted off a TPU).
"""

from __future__ import annotations

import jax

from pallas_kernels import _backend
from pallas_kernels.dmc_decode import reference, xla

OP = "paged_decode_attention"
AVAILABLE = ("reference", "xla", "pallas", "tpu")  # "triton": not written yet (a clear error, see _backend)


def paged_decode_attention(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, block_table_RxM, lengths_R, scale=None,
                           implementation: str | None = None, interpret: bool | None = None):
  """q: [R, G, D] (the G query heads of each row's KV head); pages: [P, S, D]; block_table: [R, M] page ids (−1:
  none); lengths: [R] slots in use. Returns [R, G, D]. `interpret` only matters for the kernels (None: interpret
  unless on the kernel's platform: a GPU for "pallas", a TPU for "tpu")."""
  impl = _backend.resolve(OP, implementation, AVAILABLE)
  args = (q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, block_table_RxM, lengths_R, scale)
  with jax.named_scope(f"dmc_decode_attention_{impl}"):
    if impl == "pallas":
      from pallas_kernels.dmc_decode import gpu
      return gpu.paged_decode_attention(*args, interpret=_backend.interpret(interpret))
    if impl == "tpu":
      from pallas_kernels.dmc_decode import tpu
      interpreted = _backend.interpret(interpret, target="tpu")
      # Interpreted, the tiling only changes how many operands the interpreter copies (its compile time grows
      # with them): one row and one page per step. On a TPU the kernel's defaults apply.
      tiling = dict(rows_per_block=1, pages_per_block=1) if interpreted else {}
      return tpu.paged_decode_attention(*args, interpret=interpreted, **tiling)
    if impl == "xla":
      return xla.paged_decode_attention(*args)
    return reference.paged_decode_attention(*args)
