"""GGUF (llama.cpp) → our tensors, with the tokenizer from the GGUF metadata.

Every tensor type the `gguf` package can dequantize is accepted (float32 out); the few it cannot are refused
with the type's name. GGUF lists shapes fastest dimension first (reversed here) and stores q/k in Meta's
interleaved layout, permuted to rotate-half as for Meta checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dmc_jax import tokenizer as tok
from dmc_jax.config import LlamaConfig
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.tensors import ConversionError, LazyTensor
from dmc_jax.model.rope import meta_to_hf_permutation

_LAYER_TO_HF = {"attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
                "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
                "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
                "ffn_down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
                "ffn_norm": "post_attention_layernorm.weight"}
_TOP_TO_HF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _open(path: str):
  import gguf
  if not os.path.exists(path):
    raise ConversionError(f"{path}: file not found")
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
  if key in meta:
    return int(meta[key])
  if default is None:
    raise ConversionError(f"{path}: GGUF metadata key {key!r} missing")
  return default


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
  eos = meta.get("tokenizer.ggml.eos_token_id")
  cfg = LlamaConfig(
      vocab_size=tensors["token_embd.weight"].shape[0],
      d_model=d_model,
      n_layers=_meta_int(meta, "llama.block_count", path),
      n_heads=n_heads,
      n_kv_heads=n_kv,
      ffn_dim=_meta_int(meta, "llama.feed_forward_length", path),
      head_dim=head_dim,
      rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
      rope_freq_factors=freq_factors,
      max_position_embeddings=_meta_int(meta, "llama.context_length", path, 4096),
      tie_embeddings="output.weight" not in tensors,
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_token_ids=(int(eos),) if eos is not None else (),
  )
  vocab_meta = meta.get("llama.vocab_size")
  if vocab_meta is not None and int(vocab_meta) != cfg.vocab_size:
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
                                          "tensor_types": sorted({t.tensor_type.name for t in raw.values()})},
                   chat_template=meta.get("tokenizer.chat_template") if isinstance(
                       meta.get("tokenizer.chat_template"), str) else None)
