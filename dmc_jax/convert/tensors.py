"""Lazy tensors and a streaming safetensors reader/writer.

Conversion never holds a whole model: every source tensor is a `LazyTensor` (name, shape, dtype, a loader),
transforms compose lazily, and the writer plans the file header from shapes alone, then loads, writes and drops
one tensor at a time. Peak host memory is about one tensor (plus the page cache of the file being read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from dmc_jax.errors import ConversionError


SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray]
  source: str = ""  # file it comes from, for error messages

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def map(self, fn: Callable[[np.ndarray], np.ndarray], shape: Sequence[int], name: str | None = None,
          dtype: np.dtype | None = None) -> "LazyTensor":
    return dataclasses.replace(self, name=name or self.name, shape=tuple(shape),
                               dtype=np.dtype(dtype or self.dtype), load=lambda: fn(self.load()))

  def cast(self, dtype: np.dtype) -> "LazyTensor":
    dtype = np.dtype(dtype)
    if dtype == self.dtype:
      return self
    return self.map(lambda a: a.astype(dtype), self.shape, dtype=dtype)

  def checked_load(self) -> np.ndarray:
    a = self.load()
    if tuple(a.shape) != self.shape or a.dtype != self.dtype:
      raise ConversionError(f"{self.source}: tensor {self.name!r} loaded as {a.dtype}{list(a.shape)}, "
                            f"expected {self.dtype}{list(self.shape)}")
    return a


# -- reading -----------------------------------------------------------------------------------------------


def read_safetensors_header(path: str) -> tuple[dict, int]:
  """(header dict, byte offset of the data section). Validates sizes so truncated files fail clearly."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8 or n > 100 * 2**20:
        raise ConversionError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file is {size})")
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise ConversionError(f"{path}: file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  data_start = 8 + n
  end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
  if data_start + end > size:
    raise ConversionError(f"{path}: truncated safetensors file: tensors need {data_start + end} bytes, "
                          f"file has {size}")
  return header, data_start


def read_safetensors(path: str) -> dict[str, LazyTensor]:
  header, data_start = read_safetensors_header(path)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ConversionError(f"{path}: tensor {name!r} spans {end - begin} bytes, expected "
                            f"{count * dtype.itemsize} for {info['dtype']}{list(shape)}")

    def load(begin=begin, count=count, dtype=dtype, shape=shape):
      with open(path, "rb") as f:
        f.seek(data_start + begin)
        return np.fromfile(f, dtype=dtype, count=count).reshape(shape)
    out[name] = LazyTensor(name, shape, dtype, load, source=path)
  return out


# -- writing -----------------------------------------------------------------------------------------------


def plan_shards(tensors: Sequence[LazyTensor], max_shard_bytes: int) -> list[list[LazyTensor]]:
  shards: list[list[LazyTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def write_safetensors(path: str, tensors: Sequence[LazyTensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[LazyTensor, np.ndarray], None] | None = None) -> str:
  """Writes tensors one at a time (header planned from shapes; each loaded, written and dropped).

  Returns the file's sha256 (hex), computed from the bytes as they are written; `on_tensor(t, array)` is called
  after each tensor.
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = metadata
  offset = 0
  names = set()
  for t in tensors:
    if t.name in names:
      raise ConversionError(f"{path}: duplicate tensor name {t.name!r}")
    names.add(t.name)
    if t.dtype not in _DTYPE_NAMES:
      raise ConversionError(f"{path}: cannot store dtype {t.dtype} of tensor {t.name!r}")
    header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as the reference writer does
  h = hashlib.sha256()
  with open(path, "wb") as f:
    for chunk in (struct.pack("<Q", len(blob)), blob):
      f.write(chunk)
      h.update(chunk)
    for t in tensors:
      a = np.ascontiguousarray(t.checked_load())
      data = a.tobytes(order="C") if a.ndim == 0 else memoryview(a.reshape(-1).view(np.uint8))
      f.write(data)
      h.update(data)
      if on_tensor:
        on_tensor(t, a)
      del a, data
  return h.hexdigest()


def write_sharded(directory: str, stem: str, tensors: Sequence[LazyTensor], max_shard_bytes: int,
                  metadata: dict[str, str] | None = None,
                  on_tensor: Callable[[LazyTensor, np.ndarray], None] | None = None) -> dict[str, str]:
  """`stem.safetensors`, or HF-style `stem-0000i-of-0000n.safetensors` + `stem.safetensors.index.json`.

  Returns {file name: sha256} of the tensor files written (the index excluded).
  """
  shards = plan_shards(list(tensors), max_shard_bytes)
  if len(shards) == 1:
    name = f"{stem}.safetensors"
    return {name: write_safetensors(os.path.join(directory, name), shards[0], metadata, on_tensor)}
  names, weight_map = {}, {}
  for i, shard in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    names[name] = write_safetensors(os.path.join(directory, name), shard, metadata, on_tensor)
    weight_map.update({t.name: name for t in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
  with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return names


def read_sharded(directory: str, stem: str) -> dict[str, LazyTensor]:
  """Reads `stem.safetensors` or a sharded set described by `stem.safetensors.index.json`."""
  single = os.path.join(directory, f"{stem}.safetensors")
  index_path = single + ".index.json"
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ConversionError(f"{index_path}: not a safetensors index ({e})") from None
    out: dict[str, LazyTensor] = {}
    for shard in sorted(set(weight_map.values())):
      tensors = read_safetensors(os.path.join(directory, shard))
      for name, file in weight_map.items():
        if file == shard:
          if name not in tensors:
            raise ConversionError(f"{os.path.join(directory, shard)}: tensor {name!r} listed in the index is "
                                  f"missing from the shard")
          out[name] = tensors[name]
    return out
  if os.path.exists(single):
    return read_safetensors(single)
  raise ConversionError(f"{directory}: no {stem}.safetensors or {stem}.safetensors.index.json")


def read_json(path: str, missing: str, error: type[Exception] = ConversionError) -> Any:
  """A JSON file, or one line naming the file: `{path}: {missing}` when absent, `invalid JSON` when broken."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise error(f"{path}: {missing}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: invalid JSON ({e})") from None
