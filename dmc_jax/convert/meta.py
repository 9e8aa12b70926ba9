"""Meta `consolidated.*.pth` + `params.json` (Llama 2/3) → our tensors, without torch.

A `.pth` file is a zip archive: `<prefix>/data.pkl` (a pickle of the state dict) and `<prefix>/data/<key>`
(raw storages). A restricted unpickler rebuilds only tensors — any other global in the pickle is refused, so a
checkpoint cannot run code. Storages are memory-mapped from the (uncompressed) zip members and read lazily.

Model-parallel shards are merged tensor by tensor along each tensor's split axis: wq/wk/wv/w1/w3/output on
dim 0, wo/w2 on dim 1, norms replicated; `tok_embeddings` on dim 1 (Llama 2) or dim 0 (Llama 3), told apart
by its shape. q/k rows are interleaved pairs in Meta's layout and are permuted to rotate-half (K with the KV
head count).
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from dmc_jax.config import ConfigError, LlamaConfig, RopeScaling, check_meta_params
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.tensors import ConversionError, LazyTensor, check_view, read_json
from dmc_jax.model.rope import meta_to_hf_permutation

log = logging.getLogger(__name__)

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_KNOWN_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size"}
# Meta's Llama 3.1 `apply_scaling` constants (use_scaled_rope: true).
_META_LLAMA3_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


class _StorageRef:
  def __init__(self, dtype, key):
    self.dtype, self.key = np.dtype(dtype), key


class _TensorRef:
  """What `torch._utils._rebuild_tensor_v2` would build, as a lazy reference."""

  def __init__(self, storage: _StorageRef, offset: int, size, stride):
    self.storage, self.offset, self.shape, self.stride = storage, int(offset), tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


class _StorageType:
  def __init__(self, name):
    self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, f, path, extra_globals=None):
    super().__init__(f)
    self.path = path
    # Extension hook: (module, name) -> a stand-in another format's files need (dmc_jax/convert/megatron.py).
    self.extra_globals = dict(extra_globals or {})

  def find_class(self, module, name):
    if (module, name) in self.extra_globals:
      return self.extra_globals[(module, name)]
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ConversionError(f"{self.path}: refusing pickled global {module}.{name} (a checkpoint may only "
                          f"contain tensors)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise ConversionError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
    return _StorageRef(_STORAGE_DTYPES[pid[1].name], str(pid[2]))


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    header = f.read(30)
  if header[:4] != b"PK\x03\x04":
    raise ConversionError(f"{path}: corrupt zip entry {info.filename}")
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def read_pth(path: str, extra_globals=None, select=None) -> dict[str, LazyTensor]:
  """A torch-saved state dict as lazy tensors (no torch import, no code execution).

  Hooks for formats that pickle more than a state dict: `extra_globals` maps (module, name) to a harmless
  stand-in (every other global is still refused); `select(obj)` picks the dict of tensors out of the unpickled
  object (default: the object itself, or its "model" entry).
  """
  try:
    zf = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise ConversionError(f"{path}: file not found") from None
  except zipfile.BadZipFile:
    raise ConversionError(f"{path}: not a readable torch zip checkpoint (truncated, corrupt, or the legacy "
                          f"pre-1.6 format)") from None
  with zf:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkls:
      raise ConversionError(f"{path}: no data.pkl in the archive (not a torch checkpoint)")
    prefix = pkls[0][: -len("data.pkl")]
    try:
      state = _RestrictedUnpickler(zf.open(pkls[0]), path, extra_globals).load()
    except ConversionError:
      raise
    except Exception as e:  # malformed pickle
      raise ConversionError(f"{path}: cannot unpickle data.pkl ({type(e).__name__}: {e})") from None
    members = {n: zf.getinfo(n) for n in zf.namelist()}
  if select is not None:
    state = select(state)
  elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
    state = state["model"]
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, got {type(state).__name__}")

  file_size = os.path.getsize(path)
  out = {}
  for name, ref in state.items():
    if not isinstance(ref, _TensorRef):
      raise ConversionError(f"{path}: entry {name!r} is a {type(ref).__name__}, expected a tensor")
    member = f"{prefix}data/{ref.storage.key}"
    if member not in members:
      raise ConversionError(f"{path}: storage {member} of tensor {name!r} is missing")
    info = members[member]
    if info.compress_type != zipfile.ZIP_STORED:
      raise ConversionError(f"{path}: storage {member} is compressed; torch checkpoints store them raw")
    start = _member_data_offset(path, info)
    if start + info.file_size > file_size:
      raise ConversionError(f"{path}: truncated: storage of tensor {name!r} ends at byte "
                            f"{start + info.file_size}, file has {file_size}")
    # Bounds-check the view before anything maps it: a negative stride or offset would read outside the storage.
    check_view(path, name, ref.offset, ref.shape, ref.stride, info.file_size // ref.storage.dtype.itemsize)

    def load(start=start, ref=ref, size=info.file_size):
      itemsize = ref.storage.dtype.itemsize
      base = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size,))[:size - size % itemsize]
      base = base.view(ref.storage.dtype)
      itemsize = ref.storage.dtype.itemsize
      view = np.lib.stride_tricks.as_strided(base[ref.offset:], shape=ref.shape,
                                             strides=[s * itemsize for s in ref.stride])
      return np.array(view)  # copy out of the mapping
    out[name] = LazyTensor(name, ref.shape, ref.storage.dtype, load, source=path)
  return out


def _read_params(src: str) -> dict:
  path = os.path.join(src, "params.json")
  params = read_json(path, "not found (a Meta checkpoint directory needs params.json)")
  if not isinstance(params, dict):
    raise ConversionError(f"{path}: expected a JSON object, got a {type(params).__name__}")
  missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
  if missing:
    raise ConversionError(f"{path}: missing key(s) {missing}")
  try:
    params = check_meta_params(params, path)
  except ConfigError as e:
    raise ConversionError(str(e)) from None
  unknown = sorted(set(params) - _KNOWN_PARAMS)
  if unknown:
    log.warning("%s: ignoring unknown key(s) %s", path, unknown)
  return params


_SPLIT_AXIS = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
               "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
               "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}
_TO_HF = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
          "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
          "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
          "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight"}


def _merge(parts: list[LazyTensor], axis: int | None, name: str) -> LazyTensor:
  if axis is None or len(parts) == 1:
    return parts[0]
  shape = list(parts[0].shape)
  for p in parts[1:]:
    if len(p.shape) != len(shape) or any(a != b for i, (a, b) in enumerate(zip(p.shape, shape)) if i != axis):
      raise ConversionError(f"{p.source}: shard of {name!r} has shape {list(p.shape)}, incompatible with "
                            f"{list(parts[0].shape)} in {parts[0].source} (split on dim {axis})")
  shape[axis] = sum(p.shape[axis] for p in parts)
  where = f"{os.path.dirname(parts[0].source)} ({len(parts)} shards merged on dim {axis})"
  return LazyTensor(name, tuple(shape), parts[0].dtype,
                    lambda: np.concatenate([p.load() for p in parts], axis=axis), source=where)


def read(src: str) -> Converted:
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: not a directory (expected params.json + consolidated.*.pth)")
  params = _read_params(src)
  files = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
  if not files:
    raise ConversionError(f"{src}: no consolidated.*.pth files")
  shards = [read_pth(f) for f in files]
  n = len(shards)
  names = list(shards[0])
  for f, s in zip(files[1:], shards[1:]):
    if set(s) != set(names):
      diff = sorted(set(s) ^ set(names))
      raise ConversionError(f"{f}: tensor names differ from {files[0]} (e.g. {diff[0]!r})")

  dim, n_heads = int(params["dim"]), int(params["n_heads"])
  n_kv = int(params.get("n_kv_heads") or n_heads)
  emb_parts = [s["tok_embeddings.weight"] for s in shards] if "tok_embeddings.weight" in names else None
  if emb_parts is None:
    raise ConversionError(f"{files[0]}: missing tensor 'tok_embeddings.weight'")
  emb_shape = emb_parts[0].shape
  # Llama 2 splits the embedding on its embedding axis, Llama 3 on the vocabulary axis.
  emb_axis = 0 if emb_shape[1] == dim else 1
  if emb_axis == 1 and emb_shape[1] * n != dim:
    raise ConversionError(f"{files[0]}: tok_embeddings shard shape {list(emb_shape)} fits neither split of "
                          f"dim={dim} over {n} shard(s)")
  vocab = emb_shape[0] * (n if emb_axis == 0 else 1)
  if params.get("vocab_size", -1) not in (-1, None, vocab):
    raise ConversionError(f"{os.path.join(src, 'params.json')}: vocab_size={params['vocab_size']} but "
                          f"tok_embeddings has {vocab} rows")
  w1 = [s.get("layers.0.feed_forward.w1.weight") for s in shards]
  if any(w is None for w in w1):
    raise ConversionError(f"{files[0]}: missing tensor 'layers.0.feed_forward.w1.weight'")
  ffn_dim = sum(w.shape[0] for w in w1)
  cfg = LlamaConfig(
      vocab_size=vocab, d_model=dim, n_layers=int(params["n_layers"]), n_heads=n_heads, n_kv_heads=n_kv,
      ffn_dim=ffn_dim, rms_norm_eps=float(params.get("norm_eps", 1e-5)),
      rope_theta=float(params.get("rope_theta", 10000.0)),
      rope_scaling=_META_LLAMA3_SCALING if params.get("use_scaled_rope") else None,
      max_position_embeddings=int(params.get("max_seq_len", 8192 if vocab > 100000 else 4096)),
      tie_embeddings=False,
      bos_token_id=128000 if vocab > 100000 else 1, eos_token_ids=(128001, 128009) if vocab > 100000 else (2,))

  hd = cfg.head_dim
  q_perm = meta_to_hf_permutation(n_heads, hd)
  k_perm = meta_to_hf_permutation(n_kv, hd)
  hf: dict[str, LazyTensor] = {}
  for name in names:
    parts = [s[name] for s in shards]
    if name == "rope.freqs":  # a buffer in early Llama checkpoints
      continue
    if name == "tok_embeddings.weight":
      hf["model.embed_tokens.weight"] = _merge(parts, emb_axis, name)
    elif name == "norm.weight":
      hf["model.norm.weight"] = _merge(parts, None, name)
    elif name == "output.weight":
      hf["lm_head.weight"] = _merge(parts, 0, name)
    elif name.startswith("layers."):
      _, idx, rest = name.split(".", 2)
      if rest not in _TO_HF:
        raise ConversionError(f"{parts[0].source}: unexpected tensor {name!r}")
      t = _merge(parts, _SPLIT_AXIS[rest], name)
      if rest in ("attention.wq.weight", "attention.wk.weight"):
        perm = q_perm if rest.endswith("wq.weight") else k_perm
        if t.shape[0] != len(perm):
          raise ConversionError(f"{t.source}: tensor {name!r} has {t.shape[0]} rows, expected "
                                f"{len(perm)} (heads × head_dim)")
        t = t.map(lambda a, perm=perm: a[perm], t.shape)
      hf[f"model.layers.{idx}.{_TO_HF[rest]}"] = t
    else:
      raise ConversionError(f"{parts[0].source}: unexpected tensor {name!r}")

  tokenizer = None
  for cand in (os.path.join(src, "tokenizer.model"), os.path.join(os.path.dirname(os.path.abspath(src)),
                                                                   "tokenizer.model")):
    if os.path.exists(cand):
      tokenizer = _meta_tokenizer(cand, cfg)
      break
  tensors = layout.hf_to_ours(hf, cfg, where=os.path.join(src, "params.json"))
  return Converted(cfg, tensors, tokenizer, {"format": "meta", "path": os.path.abspath(src),
                                             "files": [os.path.basename(f) for f in files], "params": params,
                                             "inputs": [os.path.abspath(src)] + ([cand] if tokenizer else [])})


def _meta_tokenizer(path: str, cfg: LlamaConfig):
  from dmc_jax.tokenizer import TokenizerInfo
  with open(path, "rb") as f:
    data = f.read()
  if data[:1] != b"\n":  # a SentencePiece proto starts with field 1 (pieces); Llama 3's is tiktoken text
    log.warning("%s: not a SentencePiece model (Llama 3 ships a tiktoken vocabulary); no tokenizer is "
                "stored — pass --tokenizer with an HF tokenizer.json", path)
    return None
  return TokenizerInfo("sentencepiece", cfg.bos_token_id, cfg.eos_token_ids[:1], add_bos=True), data
