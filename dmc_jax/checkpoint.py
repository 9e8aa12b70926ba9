"""Self-describing checkpoint directories, format `dmc-jax-checkpoint/2` (docs/design.md, "Formats").

    DIR/
      checkpoint.json         format tag; model config; tokenizer info; compression ({"method": "dmc", ...} or
                              null); chat template; experiment config; sha256 + size of every file below;
                              the parameter digest
      params.safetensors      our flattened parameter tree (unscanned; '/'-joined names), or sharded
                              params-0000i-of-0000n.safetensors + params.safetensors.index.json
      tokenizer.json | tokenizer.model
      provenance.json         where it came from: source format/path/files, command, versions, time

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place at the end, so an
error or an interrupt leaves `DIR` untouched and nothing half-written. Tensors stream one at a time, hashed as
they are written. Reading verifies every file's sha256 before the first tensor is used (`verify=False` skips it
for very large checkpoints). The parameter digest hashes tensor names, dtypes, shapes and bytes in name order,
so it does not depend on how the tensors are split into shards; adapters name their base by it.
Format /1 (no checksums, `dmc` instead of `compression`) still loads, with a warning naming the upgrade command.
Training state (optimizer, data iterator) lives in Orbax checkpoints, not here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import sys
from typing import Any, Callable, Mapping

import numpy as np

from dmc_jax.config import ConfigError, LlamaConfig
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.tensors import FLOAT_DTYPES, ConversionError, LazyTensor, read_json, read_sharded, write_sharded
from dmc_jax.errors import CheckpointError
from dmc_jax.tokenizer import Tokenizer, TokenizerInfo
from dmc_jax.tokenizer import check as tokenizer_check

FORMAT = "dmc-jax-checkpoint/2"
FORMAT_V1 = "dmc-jax-checkpoint/1"
CHECKPOINT_JSON = "checkpoint.json"
METHODS = ("dmc", "dms")  # learned compression methods a checkpoint can carry (`compression.method`)
log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


def atomic_directory(out: str, force: bool = False, inputs=()):
  """Yields a temporary sibling of `out`; on success it replaces `out`, on failure it is removed (checks, lock and
  commit rules: dmc_jax/io_safety.py)."""
  from dmc_jax import io_safety
  return io_safety.atomic_directory(out, force, inputs)


def _versions() -> dict[str, str]:
  import flax
  import jax
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

  `dmc`: DMC/DMS settings (a DMCConfig dict) stored as `compression = {"method": dmc["method"] or "dmc", **dmc}`.
  `on_progress(bytes_written, total_bytes)` is called after each tensor (a command line draws its bar from it).
  """
  tensors = _cast_all(converted.tensors, dtype)
  cfg = converted.config
  # Settings the source carried (a Megatron DMC model's args) are kept unless the caller gives its own.
  dmc = dmc if dmc is not None else converted.dmc
  experiment = experiment if experiment is not None else converted.experiment
  param_dtype = {np.dtype(np.float32): "float32", FLOAT_DTYPES["bfloat16"]: "bfloat16",
                 FLOAT_DTYPES["float16"]: "float16"}.get(tensors[0].dtype, "float32")
  cfg = cfg.replace(param_dtype=param_dtype, scan_layers=False, remat_policy="none", attention_impl=None)
  compression = None
  if dmc:
    compression = {"method": dict(dmc).get("method", "dmc"), **{k: v for k, v in dict(dmc).items() if k != "method"}}
  total = sum(t.nbytes for t in tensors)
  if converted.tokenizer:  # loaded and checked against the vocabulary now, not when generate first needs it
    where = converted.source.get("tokenizer_file") or converted.source.get("path") or out
    tokenizer_check(converted.tokenizer, cfg.vocab_size, f"{where}: tokenizer")
  digest = ParamDigest()
  with atomic_directory(out, force, converted.source.get("inputs", ())) as tmp:
    done = 0

    def on_tensor(t, a):
      nonlocal done
      digest.add(t.name, a)
      done += t.nbytes
      if on_progress is not None:
        on_progress(done, total)

    files = write_sharded(tmp, "params", tensors, max_shard_bytes, metadata={"format": FORMAT},
                          on_tensor=on_tensor)
    if converted.tokenizer:
      info, data = converted.tokenizer
      with open(os.path.join(tmp, info.filename), "wb") as f:
        f.write(data)
      files[info.filename] = hashlib.sha256(data).hexdigest()
    index = os.path.join(tmp, "params.safetensors.index.json")
    if os.path.exists(index):
      files["params.safetensors.index.json"] = _sha256_file(index)
    meta = {"format": FORMAT, "model": cfg.to_dict(),
            "tokenizer": converted.tokenizer[0].to_dict() if converted.tokenizer else None,
            "chat_template": converted.chat_template,
            "compression": compression, "experiment": dict(experiment) if experiment else None,
            "param_digest": digest.hexdigest(), "param_dtype": param_dtype,
            "files": {name: {"sha256": h, "bytes": os.path.getsize(os.path.join(tmp, name))}
                      for name, h in sorted(files.items())}}
    _write_json(os.path.join(tmp, CHECKPOINT_JSON), meta)
    _write_json(os.path.join(tmp, "provenance.json"),
                provenance(converted.source, output_dtype=dtype, **(extra_provenance or {})))
  return os.path.abspath(out)


class ParamDigest:
  """sha256 over (name, dtype, shape, bytes) of every tensor, in name order: the parameters' identity,
  independent of sharding and of the order tensors are written in. A dtype conversion is another digest."""

  def __init__(self):
    self._per_tensor: dict[str, str] = {}

  def add(self, name: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)) if a.ndim else a.tobytes())
    self._per_tensor[name] = h.hexdigest()

  def hexdigest(self) -> str:
    h = hashlib.sha256()
    for name in sorted(self._per_tensor):
      h.update(f"{name}\0{self._per_tensor[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def _sha256_file(path: str, chunk: int = 1 << 23) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


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
  """A checkpoint directory, opened lazily: config and tokenizer at once, tensors on demand.

  `verify`: check every file's sha256 against checkpoint.json before the first tensor is read (format /2).
  """

  def __init__(self, directory: str, verify: bool = True):
    self.directory = os.path.abspath(directory)
    path = os.path.join(self.directory, CHECKPOINT_JSON)
    if not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: not a directory")
    self.meta = read_json(path, "missing (not a dmc-jax checkpoint; convert one with `dmc-jax convert`)",
                          CheckpointError)
    if not isinstance(self.meta, dict):
      raise CheckpointError(f"{path}: expected a JSON object, got a {type(self.meta).__name__}")
    self.format = self.meta.get("format")
    if self.format == FORMAT_V1:
      log.warning("%s: checkpoint format /1 (no checksums, no parameter digest); upgrade it with "
                  "`dmc-jax convert --from dmc-jax %s --out NEW`", self.directory, self.directory)
    elif self.format != FORMAT:
      raise CheckpointError(f"{path}: format {self.format!r}, expected {FORMAT!r} (or {FORMAT_V1!r})")
    try:
      self.config = LlamaConfig.from_dict(self.meta["model"], where=f"{path}: model")
    except (ConfigError, KeyError, TypeError) as e:
      raise CheckpointError(f"{path}: model: {e}") from None
    tok = self.meta.get("tokenizer")
    self.tokenizer_info = TokenizerInfo.from_dict(tok, path) if tok else None
    self.verify = verify
    self._verified = False
    comp = self.meta.get("compression") if self.format == FORMAT else (
        {"method": "dmc", **self.meta["dmc"]} if self.meta.get("dmc") else None)
    if comp is not None and (not isinstance(comp, dict) or comp.get("method") not in METHODS):
      raise CheckpointError(f"{path}: compression: expected null or an object with method in {list(METHODS)}, "
                            f"got {comp!r}")
    self.compression: dict | None = comp

  @property
  def method(self) -> str | None:
    """The learned compression method the weights were trained for ("dmc" or "dms"), or None for a vanilla model."""
    return self.compression["method"] if self.compression else None

  @property
  def dmc(self) -> dict | None:
    """The learned method's settings (DMCConfig fields) when there is one; `method` among them only for DMS (DMC
    is DMCConfig's default, and DMC checkpoints name only their settings)."""
    if self.method not in METHODS:
      return None
    return {k: v for k, v in self.compression.items() if k != "method" or v != "dmc"}

  @property
  def chat_template(self) -> str | None:
    return self.meta.get("chat_template")

  @property
  def param_digest(self) -> str:
    """The parameters' identity (see ParamDigest); computed from the tensors for a format /1 checkpoint."""
    if self.meta.get("param_digest"):
      return self.meta["param_digest"]
    d = ParamDigest()
    for name, t in self.lazy_tensors().items():
      d.add(name, t.checked_load())
    return d.hexdigest()

  def tokenizer_bytes(self) -> tuple[TokenizerInfo, bytes] | None:
    """(info, file bytes) of the stored tokenizer, as converters produce it; None without one."""
    if self.tokenizer_info is None:
      return None
    with open(os.path.join(self.directory, self.tokenizer_info.filename), "rb") as f:
      return self.tokenizer_info, f.read()

  def tokenizer(self) -> Tokenizer:
    if self.tokenizer_info is None:
      raise CheckpointError(f"{self.directory}: this checkpoint has no tokenizer")
    self.verify_files()
    return Tokenizer(self.directory, self.tokenizer_info)

  def verify_files(self) -> None:
    """Checks every file listed in checkpoint.json against its size and sha256 (once; format /2 only)."""
    if not self.verify or self._verified or self.format != FORMAT:
      return
    files = self.meta.get("files")
    if not isinstance(files, dict) or not files:
      raise CheckpointError(f"{self.directory}/{CHECKPOINT_JSON}: files: missing (format /2 lists every file "
                            "with its sha256)")
    for name, entry in sorted(files.items()):
      path = os.path.join(self.directory, name)
      if os.path.basename(name) != name or not isinstance(entry, dict):
        raise CheckpointError(f"{self.directory}/{CHECKPOINT_JSON}: files: bad entry {name!r}")
      if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (listed in {CHECKPOINT_JSON})")
      size = os.path.getsize(path)
      if size != entry.get("bytes"):
        raise CheckpointError(f"{path}: {size} bytes, {CHECKPOINT_JSON} says {entry.get('bytes')}: the file is "
                              "truncated or was changed after writing")
      got = _sha256_file(path)
      if got != entry.get("sha256"):
        raise CheckpointError(f"{path}: sha256 mismatch (expected {str(entry.get('sha256'))[:16]}…, got "
                              f"{got[:16]}…): the file is corrupted or was changed after writing; "
                              "re-convert it (or load with verify=False / --no-verify)")
    self._verified = True

  def lazy_tensors(self) -> dict[str, LazyTensor]:
    self.verify_files()
    try:
      tensors = read_sharded(self.directory, "params")
    except ConversionError as e:
      raise CheckpointError(str(e)) from None
    expected = layout.our_shapes(self.config)
    if (self.dmc or {}).get("decisions") == "adapter":  # a merged adapter-form DMC model: its decision adapters
      c = self.config
      outs = 1 if self.method == "dms" else 2  # DMS's adapter gives one logit per KV head, DMC's two
      expected.update({f"layers_{i}/attn/decision_adapter/kernel": (c.d_model, c.n_kv_heads, outs)
                       for i in range(c.n_layers)})
    for name, shape in expected.items():
      if name not in tensors:
        raise CheckpointError(f"{self.directory}: missing parameter {name!r}")
      if tensors[name].shape != shape:
        raise CheckpointError(f"{self.directory}: parameter {name!r} has shape {list(tensors[name].shape)}, "
                              f"expected {list(shape)}")
      if tensors[name].dtype not in FLOAT_DTYPES.values():
        raise CheckpointError(f"{self.directory}: parameter {name!r} is {tensors[name].dtype}, expected a float "
                              f"dtype ({', '.join(sorted(FLOAT_DTYPES))})")
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
