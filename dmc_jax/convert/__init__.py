"""Checkpoint conversion: HF safetensors, Meta `.pth` (torch-free) and GGUF → this project's tensors, and back.

Each reader returns a `Converted`: the model config, lazy tensors already named and laid out as our parameter
tree, the tokenizer, its chat template, and provenance. Writing (atomic, streamed, checksummed) is
`dmc_jax.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import sys
import types
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
  chat_template: str | None = None  # Jinja, as the source ships it (GGUF metadata, tokenizer_config.json)
  # Settings a source file carries beyond the weights (Megatron DMC models): the checkpoint's `dmc` and
  # `experiment` fields.
  dmc: dict[str, Any] | None = None
  experiment: dict[str, Any] | None = None


SOURCES = ("hf", "meta", "gguf", "megatron", "dmc-jax")


def detect_source(src: str) -> str:
  """The source format of a path: a .gguf file, an HF directory (config.json), a Meta directory (params.json),
  a Megatron-LM checkpoint (a .pt file, mp_rank_* / iter_* directories) or a dmc-jax checkpoint."""
  import os
  if os.path.isfile(src) and src.endswith(".gguf"):
    return "gguf"
  if (os.path.isfile(src) and src.endswith(".pt")) or os.path.basename(os.path.normpath(src)).startswith(
      ("mp_rank_", "iter_")) or os.path.isfile(os.path.join(src, "latest_checkpointed_iteration.txt")):
    return "megatron"
  for marker, kind in (("checkpoint.json", "dmc-jax"), ("config.json", "hf"), ("params.json", "meta")):
    if os.path.isfile(os.path.join(src, marker)):
      return kind
  raise ConversionError(f"{src}: cannot tell its format (no .gguf or .pt file, checkpoint.json, config.json, "
                        f"params.json or Megatron layout); pass source= one of {list(SOURCES)}")


def read(src: str, source: str, tokenizer: str | None = None) -> Converted:
  """A source as our tensors + config (+ the DMC settings and experiment config a dmc-jax or Megatron checkpoint
  carries). `tokenizer`: a tokenizer file to store instead of the source's (required for Megatron files)."""
  if source not in SOURCES:
    raise ConversionError(f"source: unknown {source!r}; expected one of {list(SOURCES)}")
  if source == "megatron":
    from dmc_jax.convert import megatron
    conv = megatron.read(src, tokenizer)
  elif source == "dmc-jax":
    from dmc_jax.checkpoint import Checkpoint
    ck = Checkpoint(src)
    conv = Converted(ck.config, list(ck.lazy_tensors().values()), ck.tokenizer_bytes(),
                     {"format": "dmc-jax", "from_format": ck.format, "path": ck.directory},
                     chat_template=ck.chat_template, dmc=ck.dmc, experiment=ck.meta.get("experiment"))
  else:
    import importlib
    conv = importlib.import_module(f"dmc_jax.convert.{source}").read(src)
  import os
  if tokenizer and source != "megatron":
    conv.tokenizer = tokenizer_from_file(tokenizer, conv.config)
  # What --force must never replace or delete: the source and a tokenizer file read beside it.
  inputs = list(conv.source.get("inputs") or [os.path.abspath(src)])
  if tokenizer:
    inputs.append(os.path.abspath(tokenizer))
    conv.source["tokenizer_file"] = os.path.abspath(tokenizer)
  conv.source["inputs"] = inputs
  return conv


def tokenizer_from_file(path: str, cfg: LlamaConfig) -> tuple[TokenizerInfo, bytes]:
  """A tokenizer.json (HF) or tokenizer.model (SentencePiece) file to store instead of the source's."""
  import os
  if not os.path.isfile(path):
    raise ConversionError(f"tokenizer {path}: not a file (expected tokenizer.json or tokenizer.model)")
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(".json"):
    return TokenizerInfo("hf", cfg.bos_token_id, cfg.eos_token_ids), data
  return TokenizerInfo("sentencepiece", cfg.bos_token_id, cfg.eos_token_ids, add_bos=True, add_eos=False), data


def convert(src: str, out: str, *, source: str | None = None, dtype: str = "auto", tokenizer: str | None = None,
            force: bool = False, max_shard_bytes: int = 2 * 2**30, on_progress=None) -> str:
  """Converts an HF directory, Meta checkpoint, GGUF file, Megatron-LM checkpoint or older dmc-jax checkpoint into
  a dmc-jax checkpoint
  directory at `out` (written atomically, checksummed); returns its path. `source=None` detects the format."""
  from dmc_jax import checkpoint
  converted = read(src, source or detect_source(src), tokenizer)
  return checkpoint.write(out, converted, dtype=dtype, force=force, max_shard_bytes=max_shard_bytes,
                          on_progress=on_progress)


class _CallableModule(types.ModuleType):
  """`dmc_jax.convert(...)` is the conversion function, yet `dmc_jax.convert` is also this package: importing a
  submodule (dmc_jax.convert.hf) rebinds the parent's attribute to the package, so the package itself is callable."""

  def __call__(self, *args, **kwargs):
    return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Converted", "ConversionError", "LazyTensor", "SOURCES", "convert", "detect_source", "read",
           "tokenizer_from_file"]
