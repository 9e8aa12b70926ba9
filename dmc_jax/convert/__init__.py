"""Checkpoint conversion: HF safetensors, Meta `.pth` (torch-free) and GGUF → this project's tensors, and back.

Each reader returns a `Converted`: the model config, lazy tensors already named and laid out as our parameter
tree, the tokenizer, and provenance. Writing (atomic, streamed) is the harness's job (experiments.harness).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dmc_jax.config import LlamaConfig
from dmc_jax.convert.tensors import ConversionError, LazyTensor
from dmc_jax.tokenizer import TokenizerInfo


@dataclasses.dataclass
class Converted:
  config: LlamaConfig
  tensors: list[LazyTensor]  # our flattened parameter names, e.g. layers_0/attn/q_proj/kernel
  tokenizer: tuple[TokenizerInfo, bytes] | None
  source: dict[str, Any]  # provenance: format, path, files
  # Settings a source file carries beyond the weights (Megatron DMC models): the checkpoint's `dmc` and
  # `experiment` fields.
  dmc: dict[str, Any] | None = None
  experiment: dict[str, Any] | None = None


__all__ = ["Converted", "ConversionError", "LazyTensor"]
