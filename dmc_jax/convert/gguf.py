"""GGUF (llama.cpp) → our tensors, with the tokenizer from the GGUF metadata.

Every tensor type the `gguf` package can dequantize is accepted (float32 out); the few it cannot are refused
with the type's name. GGUF lists shapes fastest dimension first (reversed here) and stores q/k in Meta's
interleaved layout, permuted to rotate-half as for Meta checkpoints.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from dmc_jax import tokenizer as tok
from dmc_jax.config import ConfigError, LlamaConfig, typed
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.tensors import ConversionError, LazyTensor, check_extents
from dmc_jax.model.rope import meta_to_hf_permutation

_LAYER_TO_HF = {"attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
                "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
                "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
                "ffn_down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
                "ffn_norm": "post_attention_layernorm.weight"}
_TOP_TO_HF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


# GGUF value types: fixed sizes in bytes; 8 = string (u64 length + bytes), 9 = array (u32 type, u64 count, items).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_table(path: str) -> None:
  """Walks the GGUF header with bounds checks (counts and lengths against the file size, so a forged count is
  refused before anything is allocated) and validates the tensor table with `check_extents`: offsets inside the
  data section, sizes from shape × type, no overlaps, and "truncated: tensor X needs N bytes at offset O, file
  has M" for a cut file. The gguf package's reader runs only on a file that passed."""
  import gguf
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(min(size, 64 * 2**20))  # the header; vocabularies of 200k tokens fit in a few MB

  def fail(what):
    raise ConversionError(f"{path}: not a readable GGUF file ({what})")

  pos = 0

  def take(n: int, what: str) -> bytes:
    nonlocal pos
    if n < 0 or pos + n > len(head):
      if pos + n > size or len(head) == size:
        raise ConversionError(f"{path}: truncated or corrupt GGUF header: {what[:60]!r} needs {pos + n} bytes, "
                              f"file has {size}")
      fail(f"header larger than {len(head)} bytes")
    out = head[pos:pos + n]
    pos += n
    return out

  u32 = lambda what: struct.unpack("<I", take(4, what))[0]
  u64 = lambda what: struct.unpack("<Q", take(8, what))[0]
  if take(4, "the magic") != b"GGUF":
    fail("bad magic")
  version = u32("the version")
  if version not in (2, 3):
    fail(f"version {version}, expected 2 or 3")
  n_tensors, n_kv = u64("the tensor count"), u64("the metadata count")
  if n_tensors > size // 24 or n_kv > size // 12:  # every entry needs at least that many bytes
    fail(f"{n_tensors} tensors / {n_kv} metadata entries cannot fit in {size} bytes")
  alignment = gguf.GGUF_DEFAULT_ALIGNMENT

  def skip_value(vtype: int, key: str):
    if vtype in _GGUF_SIZES:
      return take(_GGUF_SIZES[vtype], key)
    if vtype == 8:
      return take(u64(key), key)
    if vtype == 9:
      etype, count = u32(key), u64(key)
      if etype in _GGUF_SIZES:
        take(count * _GGUF_SIZES[etype], key)
      elif etype in (8, 9):
        if count * 8 > len(head) - pos:
          take(count * 8, key)  # raises: cannot fit
        for _ in range(count):
          skip_value(etype, key)
      else:
        fail(f"metadata {key!r}: unknown array item type {etype}")
      return None
    fail(f"metadata {key!r}: unknown value type {vtype}")

  for _ in range(n_kv):
    key = take(u64("a metadata key"), "a metadata key").decode("utf-8", "replace")
    vtype = u32(key)
    raw = skip_value(vtype, key)
    if key == "general.alignment":
      if vtype != 4 or not (a := struct.unpack("<I", raw)[0]) or a & (a - 1):
        fail("general.alignment must be a uint32 power of two")
      alignment = a
  infos = []
  for _ in range(n_tensors):
    name = take(u64("a tensor name"), "a tensor name").decode("utf-8", "replace")
    n_dims = u32(name)
    if n_dims > 8:
      fail(f"tensor {name!r:.60} has {n_dims} dimensions")
    dims = [u64(name) for _ in range(n_dims)]
    ttype, offset = u32(name), u64(name)
    infos.append((name, dims, ttype, offset))
  data_start = pos + (-pos % alignment)
  extents = []
  for name, dims, ttype, offset in infos:
    try:
      block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
      raise ConversionError(f"{path}: tensor {name!r} has unknown GGUF type {ttype}") from None
    count = 1
    for d in dims:
      count *= d
    if dims and dims[0] % block:
      raise ConversionError(f"{path}: tensor {name!r}: first dimension {dims[0]} is not a multiple of the "
                            f"{gguf.GGMLQuantizationType(ttype).name} block size {block}")
    nbytes = count // block * type_size
    if offset % alignment:
      raise ConversionError(f"{path}: tensor {name!r}: data offset {offset} is not aligned to {alignment}")
    extents.append((name, offset, nbytes, nbytes))
  check_extents(path, extents, data_start, size)


def _open(path: str):
  import gguf
  if not os.path.exists(path):
    raise ConversionError(f"{path}: file not found")
  if os.path.isdir(path):
    raise ConversionError(f"{path}: is a directory, expected a .gguf file")
  check_table(path)
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConversionError(f"{path}: not a readable GGUF file ({msg})") from None


def metadata(reader) -> dict[str, Any]:
  out = {}
  for name, field in reader.fields.items():
    try:
      out[name] = field.contents()
    except Exception:  # an unreadable value is never one we need
      continue
  return out


def dequantizable_types() -> list[str]:
  import gguf
  from gguf import quants
  plain = ["F32", "F16", "BF16", "F64"]
  return plain + sorted(t.name for t in gguf.GGMLQuantizationType if t in quants._type_traits and t.name not in plain)


def _lazy(reader_tensor, path: str) -> LazyTensor:
  import gguf
  qt = gguf.GGMLQuantizationType
  t = reader_tensor
  shape = tuple(int(d) for d in reversed(list(t.shape)))
  ttype = t.tensor_type
  if ttype in (qt.F32, qt.F16, qt.F64) or ttype.name == "BF16" or ttype in gguf.quants._type_traits:
    pass
  else:
    raise ConversionError(f"{path}: tensor {t.name!r} has GGUF type {ttype.name}, which the gguf package cannot "
                          f"dequantize (supported: {', '.join(dequantizable_types())})")

  def load():
    data = np.asarray(t.data)
    if ttype == qt.F64:
      return data.astype(np.float32).reshape(shape)
    return np.asarray(gguf.quants.dequantize(data, ttype), dtype=np.float32).reshape(shape)
  return LazyTensor(t.name, shape, np.dtype(np.float32), load, source=path)


def _meta_int(meta: dict, key: str, path: str, default=None) -> int:
  """A positive integer metadata value (counts and sizes), type-checked: one line naming the key otherwise."""
  where = f"{path}: GGUF metadata"
  if default is None:
    if meta.get(key) is None:
      raise ConversionError(f"{path}: GGUF metadata key {key!r} missing")
    return typed(meta, key, "int", where, positive=True, error=ConversionError)
  return typed(meta, key, "int", where, default, positive=True, error=ConversionError)


def read(path: str) -> Converted:
  reader = _open(path)
  meta = metadata(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ConversionError(f"{path}: general.architecture is {arch!r}, expected 'llama'")
  raw = {t.name: t for t in reader.tensors}
  tensors = {name: _lazy(t, path) for name, t in raw.items()}
  if "token_embd.weight" not in tensors:
    raise ConversionError(f"{path}: missing tensor 'token_embd.weight'")
  n_heads = _meta_int(meta, "llama.attention.head_count", path)
  d_model = _meta_int(meta, "llama.embedding_length", path)
  n_kv = _meta_int(meta, "llama.attention.head_count_kv", path, n_heads)
  head_dim = _meta_int(meta, "llama.attention.key_length", path,
                       _meta_int(meta, "llama.rope.dimension_count", path, d_model // n_heads))
  freq_factors = None
  if "rope_freqs.weight" in tensors:  # llama.cpp's precomputed Llama 3.1 frequency divisors
    freq_factors = tuple(float(x) for x in tensors.pop("rope_freqs.weight").load().reshape(-1))
  where = f"{path}: GGUF metadata"
  try:
    cfg = LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        d_model=d_model,
        n_layers=_meta_int(meta, "llama.block_count", path),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_dim=_meta_int(meta, "llama.feed_forward_length", path),
        head_dim=head_dim,
        rms_norm_eps=typed(meta, "llama.attention.layer_norm_rms_epsilon", "float", where, 1e-5, positive=True,
                           error=ConversionError),
        rope_theta=typed(meta, "llama.rope.freq_base", "float", where, 10000.0, positive=True,
                         error=ConversionError),
        rope_freq_factors=freq_factors,
        max_position_embeddings=_meta_int(meta, "llama.context_length", path, 4096),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=typed(meta, "tokenizer.ggml.bos_token_id", "int", where, None, minimum=0,
                           error=ConversionError),
        eos_token_ids=typed(meta, "tokenizer.ggml.eos_token_id", "ids", where, (), error=ConversionError),
    )
  except ConfigError as e:
    raise ConversionError(f"{path}: {e}") from None
  vocab_meta = typed(meta, "llama.vocab_size", "int", where, None, positive=True, error=ConversionError)
  if vocab_meta is not None and vocab_meta != cfg.vocab_size:
    raise ConversionError(f"{path}: llama.vocab_size={vocab_meta} but token_embd.weight has "
                          f"{cfg.vocab_size} rows")

  q_perm = meta_to_hf_permutation(n_heads, head_dim)
  k_perm = meta_to_hf_permutation(n_kv, head_dim)
  hf: dict[str, LazyTensor] = {}
  for name, t in tensors.items():
    if name in _TOP_TO_HF:
      hf[_TOP_TO_HF[name]] = t
      continue
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_TO_HF or parts[3] != "weight":
      raise ConversionError(f"{path}: unexpected tensor {name!r}")
    kind = parts[2]
    if kind in ("attn_q", "attn_k"):
      perm = q_perm if kind == "attn_q" else k_perm
      if t.shape[0] != len(perm):
        raise ConversionError(f"{path}: tensor {name!r} has {t.shape[0]} rows, expected {len(perm)}")
      t = t.map(lambda a, perm=perm: a[perm], t.shape)
    hf[f"model.layers.{parts[1]}.{_LAYER_TO_HF[kind]}"] = t
  ours = layout.hf_to_ours(hf, cfg, where=path)
  tokenizer = None
  if "tokenizer.ggml.tokens" in meta:
    try:
      tokenizer = tok.from_gguf_metadata(meta, path)
    except tok.TokenizerError as e:
      raise ConversionError(str(e)) from None
  keep = {k: v for k, v in meta.items() if k.startswith("general.") and isinstance(v, (str, int, float))}
  return Converted(cfg, ours, tokenizer, {"format": "gguf", "path": os.path.abspath(path),
                                          "files": [os.path.basename(path)], "gguf_general": keep,
                                          "inputs": [os.path.abspath(path)],
                                          "tensor_types": sorted({t.tensor_type.name for t in raw.values()})},
                   chat_template=meta.get("tokenizer.chat_template") if isinstance(
                       meta.get("tokenizer.chat_template"), str) else None)
