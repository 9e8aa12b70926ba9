"""The model's modes, each with its own small typed context (what every layer of one forward shares).

A context's class *is* the mode: it is part of the pytree structure, so it is static under `jit`, `nn.scan` and
`nn.remat`, and the layer body dispatches on `ctx.mode` instead of probing dict keys or the carry's type.

* `Parallel` — the parallel forward over whole sequences (training, evaluation; vanilla, or DMC "train"/"eval").
  `collect_prefill` (static) asks DMC attention for every position's merge state (`dmc_jax.cache.prefill_layer`).
* `VanillaCache` — prefill or decode against the vanilla KV cache (L new tokens per sequence at its own index).
* `DMCPrefill` — DMC eval-mode parallel forward over right-padded prompts that fills the compressed cache.
* `DMCDecode` — one token per sequence against the compressed cache.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import flax.struct
import jax

Array = jax.Array


class Mode(enum.Enum):
  PARALLEL = "parallel"
  VANILLA_CACHE = "vanilla_cache"
  DMC_PREFILL = "dmc_prefill"
  DMC_DECODE = "dmc_decode"


@flax.struct.dataclass
class Parallel:
  cos: Array  # [B, L, Dh] RoPE tables at each position
  sin: Array
  segment_ids: Array  # [B, L] packed documents (DMC attention)
  starts: Array  # [B, L] bool, document starts (DMC decisions forced to append there)
  mask: Array | None = None  # [B, L, L] causal ∧ same-document (vanilla attention)
  fade: Array | None = None  # stage-1 multiplier of channel ch (vanilla attention)
  collect_prefill: bool = flax.struct.field(pytree_node=False, default=False)
  mode: ClassVar[Mode] = Mode.PARALLEL


@flax.struct.dataclass
class VanillaCache:
  cos: Array  # [B, L, Dh]
  sin: Array
  mask: Array  # [B, L, S] slot ≤ own slot
  cache_index: Array  # [B] first slot written by each sequence
  fade: Array | None = None
  mode: ClassVar[Mode] = Mode.VANILLA_CACHE


@flax.struct.dataclass
class DMCPrefill:
  parallel: Parallel  # the eval-mode parallel forward (collect_prefill set)
  lengths: Array  # [B] prompt lengths (right padding past them never enters the cache)
  mode: ClassVar[Mode] = Mode.DMC_PREFILL


@flax.struct.dataclass
class DMCDecode:
  cos: Array  # [B, 1, Dh] at each sequence's position
  sin: Array
  positions: Array  # [B] position of the new token (= tokens already seen)
  mode: ClassVar[Mode] = Mode.DMC_DECODE


Context = Parallel | VanillaCache | DMCPrefill | DMCDecode
