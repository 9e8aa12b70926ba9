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


# -- validating tensor tables (safetensors, GGUF, torch storages) -------------------------------------------
#
# A tensor table maps names to byte ranges of a file. Every reader checks its table here before any tensor is
# read: extents non-negative, inside the data section (else "truncated: ..."), of the size shape × dtype implies,
# and pairwise disjoint; strided views (torch) inside their storage with non-negative strides.


def _int(value, what: str, path: str, name: str, minimum: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ConversionError(f"{path}: tensor {name!r}: {what} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_shape(shape, path: str, name: str) -> tuple[int, ...]:
  if not isinstance(shape, (list, tuple)):
    raise ConversionError(f"{path}: tensor {name!r}: shape must be a list of integers, got {shape!r}")
  return tuple(_int(d, "every shape dimension", path, name) for d in shape)


def check_extents(path: str, extents, data_start: int, file_size: int) -> None:
  """`extents`: (name, begin, nbytes, expected_nbytes) with `begin` relative to the data section at `data_start`.
  Refuses negative offsets, sizes other than shape × dtype, ranges past the end of the file, and overlaps."""
  spans = []
  for name, begin, nbytes, expected in extents:
    begin = _int(begin, "its data offset", path, name)
    nbytes = _int(nbytes, "its byte size", path, name)
    if nbytes != expected:
      raise ConversionError(f"{path}: tensor {name!r} spans {nbytes} bytes, its shape and dtype need {expected}")
    if data_start + begin + nbytes > file_size:
      raise ConversionError(f"{path}: truncated: tensor {name!r} needs {nbytes} bytes at offset "
                            f"{data_start + begin}, file has {file_size}")
    if nbytes:
      spans.append((begin, begin + nbytes, name))
  spans.sort()
  for (_, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise ConversionError(f"{path}: tensors {n0!r} and {n1!r} overlap (bytes {b1}..{min(e0, e1)} of the data "
                            f"section belong to both)")


def check_view(path: str, name: str, offset, shape, stride, storage_numel: int) -> tuple[int, tuple, tuple]:
  """A strided view (torch's storage_offset, size, stride, in elements) must lie inside its storage."""
  offset = _int(offset, "its storage offset", path, name)
  shape = check_shape(shape, path, name)
  if not isinstance(stride, (list, tuple)) or len(stride) != len(shape):
    raise ConversionError(f"{path}: tensor {name!r}: stride {stride!r} does not match shape {list(shape)}")
  stride = tuple(_int(s, "every stride", path, name) for s in stride)
  if all(shape):
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if last >= storage_numel:
      raise ConversionError(f"{path}: tensor {name!r} (offset {offset}, shape {list(shape)}, stride "
                            f"{list(stride)}) reaches element {last} of a storage of {storage_numel}")
  return offset, shape, stride


def read_safetensors_header(path: str) -> tuple[dict, int]:
  """(validated header dict, byte offset of the data section). Truncated or malformed tables fail in one line."""
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
  except RecursionError:
    raise ConversionError(f"{path}: corrupt safetensors header (nested too deeply)") from None
  if not isinstance(header, dict):
    raise ConversionError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an "
                          f"object of tensors)")
  data_start = 8 + n
  extents = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise ConversionError(f"{path}: tensor {name!r}: expected an object with dtype, shape and data_offsets, "
                            f"got {info!r:.80}")
    if not isinstance(info["dtype"], str) or info["dtype"] not in SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r:.40}")
    shape = check_shape(info["shape"], path, name)
    offs = info["data_offsets"]
    if not isinstance(offs, (list, tuple)) or len(offs) != 2:
      raise ConversionError(f"{path}: tensor {name!r}: data_offsets must be [begin, end], got {offs!r:.80}")
    begin = _int(offs[0], "its data offset", path, name)
    end = _int(offs[1], "its end offset", path, name)
    expected = int(np.prod(shape, dtype=object)) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
    extents.append((name, begin, end - begin, expected))
  check_extents(path, extents, data_start, size)
  return header, data_start


def read_safetensors(path: str) -> dict[str, LazyTensor]:
  header, data_start = read_safetensors_header(path)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(int(d) for d in info["shape"])
    begin = int(info["data_offsets"][0])
    count = int(np.prod(shape, dtype=np.int64))

    def load(begin=begin, count=count, dtype=dtype, shape=shape, name=name):
      with open(path, "rb") as f:
        f.seek(data_start + begin)
        a = np.fromfile(f, dtype=dtype, count=count)
      if a.size != count:  # the file shrank since its header was checked
        raise ConversionError(f"{path}: truncated: tensor {name!r} needs {count * dtype.itemsize} bytes at "
                              f"offset {data_start + begin}, file has {os.path.getsize(path)}")
      return a.reshape(shape)
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
    index = read_json(index_path, "not found")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
      raise ConversionError(f"{index_path}: not a safetensors index (expected an object with a 'weight_map' of "
                            f"tensor name -> shard file)")
    root = os.path.realpath(directory)
    for shard in set(weight_map.values()):
      # A shard is a file of this folder: never an absolute path or one that climbs out (../x).
      real = os.path.realpath(os.path.join(root, shard))
      if os.path.isabs(shard) or os.path.dirname(real) != root:
        raise ConversionError(f"{index_path}: shard {shard!r} is outside the model folder (shards must be files "
                              f"directly in {directory})")
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
