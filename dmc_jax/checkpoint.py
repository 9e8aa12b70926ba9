"""Self-describing checkpoint directories (the one checkpoint wrapper for converted and exported models).

    DIR/
      checkpoint.json         format tag, model config, tokenizer info, DMC settings, experiment config
      params.safetensors      our flattened parameter tree (unscanned; '/'-joined names), or sharded
                              params-0000i-of-0000n.safetensors + params.safetensors.index.json
      tokenizer.json | tokenizer.model
      provenance.json         where it came from: source format/path/files, command, versions, time

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place at the end, so an
error or an interrupt leaves `DIR` untouched and nothing half-written. Tensors stream one at a time.
Training state (optimizer, data iterator) lives in Orbax checkpoints, not here.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from dmc_jax.config import ConfigError, LlamaConfig
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.tensors import (FLOAT_DTYPES, ConversionError, LazyTensor, read_json, read_sharded,
                                     write_sharded)
from dmc_jax.errors import CheckpointError
from dmc_jax.tokenizer import Tokenizer, TokenizerInfo
from dmc_jax.tokenizer import check as tokenizer_check

FORMAT = "dmc-jax-checkpoint/1"
CHECKPOINT_JSON = "checkpoint.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


def atomic_directory(out: str, force: bool = False, inputs=()):
  """Yields a temporary sibling of `out`; on success it replaces `out`, on failure it is removed (checks, lock and
  commit rules: dmc_jax/io_safety.py)."""
  from dmc_jax import io_safety
  return io_safety.atomic_directory(out, force, inputs)


def _versions() -> dict[str, str]:
  import jax
  import flax
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "numpy": np.__version__}


def provenance(source: Mapping[str, Any], **extra) -> dict[str, Any]:
  src = {k: v for k, v in source.items() if k not in ("hf_config", "params")}
  return {"source": src, "command": " ".join(sys.argv), "time": datetime.datetime.now().isoformat(),
          "host": platform.node(), "versions": _versions(), **extra}


def write(out: str, converted: Converted, *, dtype: str = "auto", force: bool = False,
          dmc: Mapping[str, Any] | None = None, experiment: Mapping[str, Any] | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_provenance: Mapping[str, Any] | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> str:
  """Writes a converted model as a checkpoint directory; returns its absolute path.

  `on_progress(bytes_written, total_bytes)` is called after each tensor (a command line draws its bar from it).
  """
  tensors = _cast_all(converted.tensors, dtype)
  cfg = converted.config
  param_dtype = {np.dtype(np.float32): "float32", FLOAT_DTYPES["bfloat16"]: "bfloat16",
                 FLOAT_DTYPES["float16"]: "float16"}.get(tensors[0].dtype, "float32")
  cfg = cfg.replace(param_dtype=param_dtype, scan_layers=False, remat_policy="none", attention_impl=None)
  meta = {"format": FORMAT, "model": cfg.to_dict(),
          "tokenizer": converted.tokenizer[0].to_dict() if converted.tokenizer else None,
          "dmc": dict(dmc) if dmc else None, "experiment": dict(experiment) if experiment else None}
  total = sum(t.nbytes for t in tensors)
  if converted.tokenizer:  # loaded and checked against the vocabulary now, not when generate first needs it
    where = converted.source.get("tokenizer_file") or converted.source.get("path") or out
    tokenizer_check(converted.tokenizer, cfg.vocab_size, f"{where}: tokenizer")
  with atomic_directory(out, force, converted.source.get("inputs", ())) as tmp:
    done = 0

    def on_tensor(t):
      nonlocal done
      done += t.nbytes
      if on_progress is not None:
        on_progress(done, total)

    write_sharded(tmp, "params", tensors, max_shard_bytes, metadata={"format": FORMAT}, on_tensor=on_tensor)
    if converted.tokenizer:
      info, data = converted.tokenizer
      with open(os.path.join(tmp, info.filename), "wb") as f:
        f.write(data)
    _write_json(os.path.join(tmp, CHECKPOINT_JSON), meta)
    _write_json(os.path.join(tmp, "provenance.json"),
                provenance(converted.source, output_dtype=dtype, **(extra_provenance or {})))
  return os.path.abspath(out)


def _cast_all(tensors: list[LazyTensor], dtype: str) -> list[LazyTensor]:
  if dtype == "auto":
    floats = {t.dtype for t in tensors}
    if len(floats) == 1 and next(iter(floats)) in FLOAT_DTYPES.values():
      return tensors
    return [t.cast(np.float32) for t in tensors]  # mixed or non-float sources: one float32 dtype
  if dtype not in FLOAT_DTYPES:
    raise CheckpointError(f"--dtype: expected auto or one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
  return [t.cast(FLOAT_DTYPES[dtype]) for t in tensors]


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=str)
    f.write("\n")


# -- reading ------------------------------------------------------------------------------------------------


class Checkpoint:
  """A checkpoint directory, opened lazily: config and tokenizer at once, tensors on demand."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    path = os.path.join(self.directory, CHECKPOINT_JSON)
    if not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: not a directory")
    self.meta = read_json(path, "missing (not a dmc-jax checkpoint; convert one with `dmc-jax convert`)",
                          CheckpointError)
    if not isinstance(self.meta, dict):
      raise CheckpointError(f"{path}: expected a JSON object, got a {type(self.meta).__name__}")
    if self.meta.get("format") != FORMAT:
      raise CheckpointError(f"{path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
    try:
      self.config = LlamaConfig.from_dict(self.meta["model"], where=f"{path}: model")
    except (ConfigError, KeyError) as e:
      raise CheckpointError(str(e)) from None
    tok = self.meta.get("tokenizer")
    self.tokenizer_info = TokenizerInfo.from_dict(tok, path) if tok else None

  @property
  def dmc(self) -> dict | None:
    return self.meta.get("dmc")

  def tokenizer(self) -> Tokenizer:
    if self.tokenizer_info is None:
      raise CheckpointError(f"{self.directory}: this checkpoint has no tokenizer")
    return Tokenizer(self.directory, self.tokenizer_info)

  def lazy_tensors(self) -> dict[str, LazyTensor]:
    try:
      tensors = read_sharded(self.directory, "params")
    except ConversionError as e:
      raise CheckpointError(str(e)) from None
    expected = layout.our_shapes(self.config)
    for name, shape in expected.items():
      if name not in tensors:
        raise CheckpointError(f"{self.directory}: missing parameter {name!r}")
      if tensors[name].shape != shape:
        raise CheckpointError(f"{self.directory}: parameter {name!r} has shape {list(tensors[name].shape)}, "
                              f"expected {list(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
      raise CheckpointError(f"{self.directory}: unexpected parameter {extra[0]!r}")
    return tensors

  def load_params(self, scan_layers: bool = False) -> dict:
    """The parameter tree as numpy arrays (`{'params': ...}`), stacked per layer if `scan_layers`."""
    flat = {name: t.checked_load() for name, t in self.lazy_tensors().items()}
    tree = layout.unflatten(flat)
    if scan_layers:
      tree = layout.stack_layers(tree, self.config.n_layers)
    return {"params": tree}
