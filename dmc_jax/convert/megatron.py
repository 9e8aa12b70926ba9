"""Megatron-LM checkpoints (Megatron-core GPTModel, legacy `torch.save` format) → our tensors, without torch.

Written for NVIDIA's released DMC models (nvidia/Llama-2-{7B,13B}-DMC-{4x,8x}): `model_optim_rng.pt`, one per
tensor-parallel rank (`mp_rank_TT/`, possibly under `iter_NNNNNNN/` or `release/` with
`latest_checkpointed_iteration.txt`), each a pickled dict {args (argparse.Namespace), checkpoint_version,
iteration, model (the state dict), ...}. The file is read by meta.py's zip reader and restricted unpickler,
extended by stand-ins for exactly the other globals these files pickle (`argparse.Namespace`,
`megatron.core.enums.ModelType`, `_io.BytesIO` kept opaque, `_codecs.encode` for latin-1 only — protocol 2's
encoding of bytes —, torch dtypes); any other global is refused by name and nothing in the file is executed.

Everything about the model comes from `args` and the tensors themselves (never from a list of known models):
* Transformer-Engine layer spec names: `decoder.layers.N.self_attention.linear_qkv.{weight,layer_norm_weight}`
  (the input RMSNorm is fused into the QKV linear), `…linear_proj.weight`, `…mlp.linear_fc1.{weight,
  layer_norm_weight}`, `…mlp.linear_fc2.weight`, `embedding.word_embeddings.weight`,
  `decoder.final_layernorm.weight`, `output_layer.weight` (untied). The local spec's separate
  `input_layernorm` / `pre_mlp_layernorm` are read too. `*._extra_state` (TE metadata) is skipped.
* The fused QKV weight holds, for each query group, [q rows of the group's heads | k rows | v rows]; a rank
  holds whole groups. fc1 is [gate; up] within each rank. Megatron's RoPE is rotate-half, like HF's: no q/k
  permutation. Column-parallel weights (QKV, fc1, embedding, output layer) concatenate on dim 0 in rank order,
  row-parallel ones (linear_proj, fc2) on dim 1; norms are replicated (rank 0's is used).
* The vocabulary is padded (`args.padded_vocab_size`); rows past the tokenizer's vocabulary are dropped. The
  files carry no tokenizer, so one is required.
* DMC settings (`dmc_init_val` = offset c, `dmc_window_size` = W, `dmc_temp` = τ, `dmc_cr` = target CR) become
  the checkpoint's `dmc` field; NVIDIA's inference fixes the decision channel (the last one) and ε (bf16's
  machine epsilon, 2^-7), which are this project's defaults.
Tensors stream: each output tensor loads only its slices of the rank files when it is written.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np

from dmc_jax.config import ConfigError, DMCConfig, LlamaConfig
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.meta import read_pth
from dmc_jax.convert.tensors import ConversionError, LazyTensor

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_ITER_DIR = re.compile(r"^(iter_\d{7}|release)$")
# Megatron-LM's `dmc` branch argparse defaults (megatron/contrib/dmc), used when a file lacks one of them.
_DMC_ARG_DEFAULTS = {"dmc_init_val": 5.0, "dmc_window_size": 12, "dmc_temp": 0.1, "dmc_cr": 4.0}


# -- the pickled globals these files need, as inert stand-ins ------------------------------------------------


class _Namespace:
  """argparse.Namespace: the unpickler only sets attributes on it."""


class _ModelType:
  """megatron.core.enums.ModelType (an Enum, pickled as ModelType(value))."""

  def __init__(self, value=None):
    self.value = value


class _OpaqueBytesIO:
  """_io.BytesIO (Transformer Engine's serialized `_extra_state`): its bytes are never parsed; only the size kept."""

  def __init__(self, *args):
    self.nbytes = 0

  def __setstate__(self, state):
    data = state[0] if isinstance(state, tuple) and state else b""
    self.nbytes = len(data) if isinstance(data, (bytes, bytearray)) else 0


class _TorchDtype:
  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


_TORCH_DTYPES = ("float32", "float", "float16", "half", "bfloat16", "float64", "double", "int64", "int32", "int16",
                 "int8", "uint8", "bool")


def _globals(path: str) -> dict[tuple[str, str], Any]:
  def latin1(obj, encoding="utf-8", errors="strict"):
    # Pickle protocol 2 writes bytes as _codecs.encode(str, "latin1"); nothing else is accepted.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
      raise ConversionError(f"{path}: refusing pickled call _codecs.encode(<{type(obj).__name__}>, "
                            f"{encoding!r}) (only latin-1 bytes are expected)")
    return obj.encode("latin1")

  def empty_bytes(*args):
    # ... and an empty bytes object as bytes().
    if args:
      raise ConversionError(f"{path}: refusing pickled call bytes(...) with arguments")
    return b""

  out: dict[tuple[str, str], Any] = {("argparse", "Namespace"): _Namespace,
                                     ("megatron.core.enums", "ModelType"): _ModelType,
                                     ("_io", "BytesIO"): _OpaqueBytesIO, ("io", "BytesIO"): _OpaqueBytesIO,
                                     ("_codecs", "encode"): latin1,
                                     ("__builtin__", "bytes"): empty_bytes, ("builtins", "bytes"): empty_bytes}
  out.update({("torch", n): _TorchDtype(n) for n in _TORCH_DTYPES})
  return out


# -- reading one rank file -----------------------------------------------------------------------------------


class _RankFile:
  def __init__(self, path: str):
    self.path = path
    self.meta: dict[str, Any] = {}
    self.tensors = read_pth(path, extra_globals=_globals(path), select=self._select)
    self.args: dict[str, Any] = self.meta["args"]

  def _select(self, state):
    if not isinstance(state, dict):
      raise ConversionError(f"{self.path}: expected a pickled dict (args, iteration, model), got "
                            f"{type(state).__name__}")
    if "model" not in state:
      chunks = sorted(k for k in state if isinstance(k, str) and re.fullmatch(r"model\d+", k))
      if chunks:
        raise ConversionError(f"{self.path}: model chunks {chunks} (virtual pipeline parallelism) are not "
                              f"supported; merge them with Megatron's tools/checkpoint/convert.py first")
      raise ConversionError(f"{self.path}: no 'model' entry (keys: {sorted(map(str, state))[:8]})")
    args = state.get("args")
    if not isinstance(args, _Namespace):
      raise ConversionError(f"{self.path}: no 'args' (argparse.Namespace) entry: the model's shape is unknown")
    model = state["model"]
    if not isinstance(model, dict):
      raise ConversionError(f"{self.path}: 'model' is a {type(model).__name__}, expected a state dict")
    self.meta = {"args": dict(vars(args)), "iteration": state.get("iteration"),
                 "checkpoint_version": state.get("checkpoint_version")}
    # Transformer Engine's metadata (FP8 scales; BytesIO or, in newer TE, a byte tensor): not weights.
    return {k: v for k, v in model.items() if not str(k).endswith("_extra_state")}


# -- locating the rank files ----------------------------------------------------------------------------------


def _rank_dirs(directory: str) -> list[str]:
  return sorted(n for n in os.listdir(directory)
                if _RANK_DIR.match(n) and os.path.isdir(os.path.join(directory, n)))


def _refuse_pipeline(directory: str, names: list[str]) -> None:
  pp = [n for n in names if _RANK_DIR.match(n).group(2) is not None]
  if pp:
    shown = ", ".join(pp[:3]) + (" …" if len(pp) > 3 else "")
    raise ConversionError(f"{directory}: pipeline-parallel shard set ({shown}) is not supported; re-save with "
                          f"--target-pipeline-parallel-size 1 (Megatron's tools/checkpoint/convert.py)")


def _model_file(rank_dir: str) -> str:
  path = os.path.join(rank_dir, MODEL_FILE)
  if os.path.isfile(path):
    return path
  pts = sorted(n for n in os.listdir(rank_dir) if n.endswith(".pt"))
  if len(pts) == 1:
    return os.path.join(rank_dir, pts[0])
  raise ConversionError(f"{rank_dir}: no {MODEL_FILE}" + (f" (found {pts})" if pts else ""))


def _set_directory(src: str) -> str:
  """The directory holding the mp_rank_* directories, from a checkpoint root or an iter_*/release directory."""
  if _rank_dirs(src):
    return src
  tracker = os.path.join(src, TRACKER)
  if os.path.isfile(tracker):
    with open(tracker) as f:
      text = f.read().strip()
    if text == "release":
      sub = "release"
    elif text.isdigit():
      sub = f"iter_{int(text):07d}"
    else:
      raise ConversionError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    path = os.path.join(src, sub)
    if not os.path.isdir(path):
      raise ConversionError(f"{tracker} names {sub!r}, but {path} is missing")
    if not _rank_dirs(path):
      raise ConversionError(f"{path}: no mp_rank_* directories")
    return path
  iters = sorted(n for n in os.listdir(src) if _ITER_DIR.match(n) and os.path.isdir(os.path.join(src, n)))
  if len(iters) == 1 and _rank_dirs(os.path.join(src, iters[0])):
    return os.path.join(src, iters[0])
  if len(iters) > 1:
    raise ConversionError(f"{src}: several checkpoints ({', '.join(iters[:4])}) and no {TRACKER}; pass one of them")
  if any(n.endswith(".distcp") or n == ".metadata" for n in os.listdir(src)):
    raise ConversionError(f"{src}: a distributed (torch_dist) checkpoint; only the legacy torch format "
                          f"(mp_rank_*/{MODEL_FILE}) is read — re-save with --ckpt-format torch")
  raise ConversionError(f"{src}: no Megatron checkpoint here (expected mp_rank_*/{MODEL_FILE}, an iter_* or "
                        f"release directory, or {TRACKER})")


def _first_rank_file(src: str) -> tuple[str, str | None, str]:
  """(rank-0 file, directory of the mp_rank_* set or None for a lone file, file name) for any accepted PATH."""
  if not os.path.exists(src):
    raise ConversionError(f"{src}: not found")
  if os.path.isfile(src):
    rank_dir = os.path.dirname(os.path.abspath(src))
    m = _RANK_DIR.match(os.path.basename(rank_dir))
    if not m:
      return src, None, os.path.basename(src)
    set_dir = os.path.dirname(rank_dir)
    _refuse_pipeline(set_dir, _rank_dirs(set_dir))
    return os.path.join(set_dir, "mp_rank_00", os.path.basename(src)), set_dir, os.path.basename(src)
  if _RANK_DIR.match(os.path.basename(os.path.abspath(src))):
    return _first_rank_file(_model_file(src))
  set_dir = _set_directory(src)
  names = _rank_dirs(set_dir)
  _refuse_pipeline(set_dir, names)
  if "mp_rank_00" not in names:
    raise ConversionError(f"{set_dir}: tensor-parallel shard mp_rank_00 is missing (found {names})")
  first = _model_file(os.path.join(set_dir, "mp_rank_00"))
  return first, set_dir, os.path.basename(first)


def _rank_files(src: str) -> list[_RankFile]:
  first, set_dir, name = _first_rank_file(src)
  if set_dir is not None and not os.path.exists(first):
    raise ConversionError(f"{set_dir}: tensor-parallel shard mp_rank_00 is missing (expected {first})")
  rank0 = _RankFile(first)
  tp = int(rank0.args.get("tensor_model_parallel_size") or 1)
  pp = int(rank0.args.get("pipeline_model_parallel_size") or 1)
  if pp > 1:
    raise ConversionError(f"{first}: args.pipeline_model_parallel_size={pp}: pipeline-parallel checkpoints are "
                          f"not supported; re-save with --target-pipeline-parallel-size 1")
  if tp == 1:
    return [rank0]
  if set_dir is None:
    raise ConversionError(f"{first}: one rank of a tensor-parallel set of {tp} (args.tensor_model_parallel_size) "
                          f"outside an mp_rank_NN directory; pass the directory holding mp_rank_00..{tp - 1:02d}")
  extra = [n for n in _rank_dirs(set_dir) if int(_RANK_DIR.match(n).group(1)) >= tp]
  if extra:
    raise ConversionError(f"{set_dir}: {extra[0]} present, but args.tensor_model_parallel_size={tp}")
  files = [rank0]
  for r in range(1, tp):
    path = os.path.join(set_dir, f"mp_rank_{r:02d}", name)
    if not os.path.isfile(path):
      raise ConversionError(f"{set_dir}: tensor-parallel shard mp_rank_{r:02d} of {tp} is missing "
                            f"(expected {path})")
    files.append(_RankFile(path))
  return files


# -- args → config ------------------------------------------------------------------------------------------


def _refusals(a: dict[str, Any], where: str) -> None:
  """Everything this importer does not represent, refused by the name of the argument."""
  def refuse(key, why):
    raise ConversionError(f"{where}: args.{key}={a.get(key)!r}: {why} is not supported")

  if a.get("position_embedding_type", "rope") != "rope":
    refuse("position_embedding_type", "a position embedding other than RoPE")
  if a.get("rotary_interleaved"):
    refuse("rotary_interleaved", "interleaved (GPT-J style) RoPE")
  if float(a.get("rotary_percent", 1.0) or 1.0) != 1.0:
    refuse("rotary_percent", "partial RoPE (only a fraction of each head's channels rotated)")
  if a.get("rotary_seq_len_interpolation_factor") not in (None, 1, 1.0):
    refuse("rotary_seq_len_interpolation_factor", "RoPE position interpolation")
  if a.get("use_rope_scaling"):
    refuse("use_rope_scaling", "Llama 3.1 RoPE scaling in a Megatron file")
  if a.get("normalization", "RMSNorm") != "RMSNorm":
    refuse("normalization", "a normalization other than RMSNorm")
  if a.get("apply_layernorm_1p"):
    refuse("apply_layernorm_1p", "zero-centred (1 + w) norm weights")
  if a.get("qk_layernorm"):
    refuse("qk_layernorm", "q/k layer norms")
  if "swiglu" in a and not a["swiglu"]:
    refuse("swiglu", "an MLP other than SwiGLU")
  for key in ("add_bias_linear", "add_qkv_bias"):
    if a.get(key):
      refuse(key, "linear-layer biases")
  if a.get("num_experts"):
    refuse("num_experts", "mixture of experts")
  if a.get("multi_latent_attention"):
    refuse("multi_latent_attention", "multi-latent attention")
  if a.get("window_size") is not None:
    refuse("window_size", "sliding-window attention")
  if a.get("virtual_pipeline_model_parallel_size") not in (None, 1):
    refuse("virtual_pipeline_model_parallel_size", "virtual pipeline parallelism")
  if a.get("softmax_scale") is not None:
    refuse("softmax_scale", "a non-default attention scale")


def _int(a, key, where, default=None) -> int:
  v = a.get(key, default)
  if v is None:
    raise ConversionError(f"{where}: args.{key} missing")
  if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
    raise ConversionError(f"{where}: args.{key}={v!r}, expected a positive integer")
  return int(v)


def _dtype_name(a: dict[str, Any]) -> str:
  d = a.get("params_dtype")
  if isinstance(d, _TorchDtype):
    return {"float": "float32", "half": "float16", "double": "float64"}.get(d.name, d.name)
  return "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"


def dmc_settings(a: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, float | None]:
  """(the checkpoint's `dmc` dict, the target CR) from Megatron-LM `dmc` branch arguments; (None, None) without."""
  present = [k for k in _DMC_ARG_DEFAULTS if a.get(k) is not None]
  if not present:
    return None, None
  missing = [k for k in _DMC_ARG_DEFAULTS if k not in present]
  if missing:
    log.warning("%s: DMC arguments %s missing; using Megatron-LM's defaults %s", where, missing,
                {k: _DMC_ARG_DEFAULTS[k] for k in missing})
  v = {k: a[k] if k in present else _DMC_ARG_DEFAULTS[k] for k in _DMC_ARG_DEFAULTS}
  window = v["dmc_window_size"]
  if isinstance(window, bool) or not isinstance(window, (int, float)) or int(window) != window or window < 1:
    raise ConversionError(f"{where}: args.dmc_window_size={window!r}, expected a positive integer")
  try:
    cfg = DMCConfig(decision_channel="last", offset=float(v["dmc_init_val"]), temperature=float(v["dmc_temp"]),
                    window=int(window), epsilon=2.0 ** -7)
  except (ConfigError, TypeError, ValueError) as e:
    raise ConversionError(f"{where}: DMC arguments {v}: {e}") from None
  if a.get("dmc_is_stage_one"):
    log.warning("%s: args.dmc_is_stage_one is set: a stage-one checkpoint, whose decisions are not trained yet",
                where)
  return cfg.to_dict(), float(v["dmc_cr"])


def config_from_args(a: dict[str, Any], where: str, vocab: int, bos: int | None,
                     eos: tuple[int, ...]) -> LlamaConfig:
  _refusals(a, where)
  hidden = _int(a, "hidden_size", where)
  heads = _int(a, "num_attention_heads", where)
  groups = _int(a, "num_query_groups", where) if a.get("group_query_attention") else heads
  kv = _int(a, "kv_channels", where, hidden // heads if hidden % heads == 0 else None)
  max_pos = _int(a, "max_position_embeddings", where, a.get("seq_length") or 4096)
  try:
    return LlamaConfig(
        vocab_size=vocab, d_model=hidden, n_layers=_int(a, "num_layers", where), n_heads=heads, n_kv_heads=groups,
        ffn_dim=_int(a, "ffn_hidden_size", where), head_dim=kv,
        rms_norm_eps=float(a.get("norm_epsilon", 1e-5)), rope_theta=float(a.get("rotary_base", 10000)),
        max_position_embeddings=max_pos, tie_embeddings=not a.get("untie_embeddings_and_output_weights", False),
        bos_token_id=bos, eos_token_ids=eos)
  except ConfigError as e:
    raise ConversionError(f"{where}: args give an invalid model: {e}") from None


# -- the tokenizer -------------------------------------------------------------------------------------------


def read_tokenizer(path: str | None):
  """((TokenizerInfo, file bytes), vocabulary size, bos, eos) for a tokenizer.json or a SentencePiece model."""
  from dmc_jax.tokenizer import TokenizerInfo
  if not path:
    raise ConversionError("a Megatron checkpoint carries no tokenizer: pass --tokenizer with the model's "
                          "tokenizer.model (Llama 2's SentencePiece file) or tokenizer.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: tokenizer file not found")
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(".json"):
    import tokenizers
    try:
      t = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises its own Exception type
      raise ConversionError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    vocab = t.get_vocab_size(with_added_tokens=True)
    bos, eos = t.token_to_id("<s>"), t.token_to_id("</s>")
    info = TokenizerInfo("hf", bos, (eos,) if eos is not None else ())
  else:
    import sentencepiece
    try:
      sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
      raise ConversionError(f"{path}: not a SentencePiece model or tokenizer.json ({str(e).splitlines()[0][:120]})"
                            ) from None
    vocab = sp.get_piece_size()
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    info = TokenizerInfo("sentencepiece", bos, (eos,) if eos is not None else (), add_bos=True, add_eos=False)
  return (info, data), vocab, info.bos_token_id, info.eos_token_ids


# -- tensors -------------------------------------------------------------------------------------------------


class _OneSlot:
  """Keeps the last fused tensor loaded, so q/k/v (and gate/up) split from one load instead of three (two)."""

  def __init__(self):
    self.key, self.value = None, None

  def get(self, key, load):
    if self.key != key:
      self.key, self.value = None, None  # drop the previous one before loading the next
      self.value, self.key = load(), key
    return self.value


def _check_shape(t: LazyTensor, name: str, shape: tuple[int, ...]) -> None:
  if tuple(t.shape) != tuple(shape):
    raise ConversionError(f"{t.source}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")


def _parts(ranks: list[_RankFile], name: str) -> list[LazyTensor]:
  missing = [r.path for r in ranks if name not in r.tensors]
  if missing:
    raise ConversionError(f"{missing[0]}: missing tensor {name!r}")
  return [r.tensors[name] for r in ranks]


def _concat(parts: list[LazyTensor], axis: int, name: str, rows: int | None = None) -> LazyTensor:
  """Ranks concatenated on `axis` (then the first `rows` rows kept: the unpadded vocabulary)."""
  shape = list(parts[0].shape)
  shape[axis] = sum(p.shape[axis] for p in parts)
  if rows is not None:
    shape[0] = rows

  def load():
    a = parts[0].load() if len(parts) == 1 else np.concatenate([p.load() for p in parts], axis=axis)
    return np.ascontiguousarray(a[:rows]) if rows is not None else a
  where = parts[0].source if len(parts) == 1 else f"{parts[0].source} (+{len(parts) - 1} tensor-parallel ranks)"
  return LazyTensor(name, tuple(shape), parts[0].dtype, load, source=where)


def _layer_tensors(ranks, i: int, cfg: LlamaConfig, slot: _OneSlot) -> dict[str, LazyTensor]:
  tp = len(ranks)
  d, f, kv, G = cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.n_groups
  ng_r, f_r = cfg.n_kv_heads // tp, f // tp
  p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
  out: dict[str, LazyTensor] = {}

  qkv_name = p + "self_attention.linear_qkv.weight"
  qkv = _parts(ranks, qkv_name)
  for t in qkv:
    _check_shape(t, qkv_name, (ng_r * (G + 2) * kv, d))

  def fused_qkv():  # [groups, (G + 2) * kv, d], rank r holding groups r*ng_r ... (r+1)*ng_r - 1
    return np.concatenate([t.load().reshape(ng_r, (G + 2) * kv, d) for t in qkv], axis=0)
  for _, (hf_name, lo, hi) in enumerate((("q_proj", 0, G * kv), ("k_proj", G * kv, (G + 1) * kv),
                                         ("v_proj", (G + 1) * kv, (G + 2) * kv))):
    rows = cfg.n_kv_heads * (hi - lo)
    out[h + f"self_attn.{hf_name}.weight"] = LazyTensor(
        h + f"self_attn.{hf_name}.weight", (rows, d), qkv[0].dtype,
        lambda lo=lo, hi=hi, rows=rows: np.ascontiguousarray(slot.get(qkv_name, fused_qkv)[:, lo:hi].reshape(rows, d)),
        source=qkv[0].source)

  fc1_name = p + "mlp.linear_fc1.weight"
  fc1 = _parts(ranks, fc1_name)
  for t in fc1:
    _check_shape(t, fc1_name, (2 * f_r, d))

  def fused_fc1():  # [tp, 2, f_r, d]: [gate_r; up_r] per rank
    return np.stack([t.load().reshape(2, f_r, d) for t in fc1])
  for half, hf_name in enumerate(("gate_proj", "up_proj")):
    out[h + f"mlp.{hf_name}.weight"] = LazyTensor(
        h + f"mlp.{hf_name}.weight", (f, d), fc1[0].dtype,
        lambda half=half: np.ascontiguousarray(slot.get(fc1_name, fused_fc1)[:, half].reshape(f, d)),
        source=fc1[0].source)

  for name, hf_name, shape in ((p + "self_attention.linear_proj.weight", "self_attn.o_proj.weight",
                                (d, cfg.n_heads * kv // tp)),
                               (p + "mlp.linear_fc2.weight", "mlp.down_proj.weight", (d, f_r))):
    parts = _parts(ranks, name)
    for t in parts:
      _check_shape(t, name, shape)
    out[h + hf_name] = _concat(parts, 1, h + hf_name)

  for te, local, hf_name in (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight",
                              "input_layernorm.weight"),
                             ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight",
                              "post_attention_layernorm.weight")):
    name = p + (te if p + te in ranks[0].tensors else local)
    t = _parts(ranks, name)[0]  # replicated across ranks
    _check_shape(t, name, (d,))
    out[h + hf_name] = t
  return out


def _read_tensors(ranks: list[_RankFile], cfg: LlamaConfig, padded: int) -> dict[str, LazyTensor]:
  tp, d = len(ranks), cfg.d_model
  r0 = ranks[0]
  names = list(r0.tensors)
  for r in ranks[1:]:
    diff = sorted(set(r.tensors) ^ set(names))
    if diff:
      raise ConversionError(f"{r.path}: tensor names differ from {r0.path} (e.g. {diff[0]!r})")
  known = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
  layer_keys = {"self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
                "self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc1.layer_norm_weight",
                "mlp.linear_fc2.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight"}
  for n in names:
    if n in known or n.endswith("rotary_pos_emb.inv_freq"):  # inv_freq: a buffer, recomputed
      continue
    if n.endswith(".bias") or n.endswith("layer_norm_bias"):
      raise ConversionError(f"{r0.path}: tensor {n!r}: biases are not supported (Llama has none)")
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", n)
    if not m or m.group(2) not in layer_keys:
      raise ConversionError(f"{r0.path}: unexpected tensor {n!r}")
    if int(m.group(1)) >= cfg.n_layers:
      raise ConversionError(f"{r0.path}: tensor {n!r} is past args.num_layers={cfg.n_layers}")
  if "output_layer.weight" in names and cfg.tie_embeddings:
    raise ConversionError(f"{r0.path}: tensor 'output_layer.weight' present, but "
                          f"args.untie_embeddings_and_output_weights is false")

  slot = _OneSlot()
  hf: dict[str, LazyTensor] = {}
  for src, dst in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                   ("output_layer.weight", "lm_head.weight")):
    if src == "output_layer.weight" and cfg.tie_embeddings:
      continue
    parts = _parts(ranks, src)
    for t in parts:
      _check_shape(t, src, (padded // tp, d))
    hf[dst] = _concat(parts, 0, dst, rows=cfg.vocab_size)
  norm = _parts(ranks, "decoder.final_layernorm.weight")[0]
  _check_shape(norm, "decoder.final_layernorm.weight", (d,))
  hf["model.norm.weight"] = norm
  for i in range(cfg.n_layers):
    hf.update(_layer_tensors(ranks, i, cfg, slot))
  return hf


def _vocab_size_with_padding(n: int, divisible_by: int, tp: int) -> int:
  """megatron/training/tokenizer/tokenizer.py `_vocab_size_with_padding`."""
  multiple = divisible_by * tp
  return ((n + multiple - 1) // multiple) * multiple


def read(src: str, tokenizer: str | None = None) -> Converted:
  tok, vocab, bos, eos = read_tokenizer(tokenizer)
  ranks = _rank_files(src)
  r0 = ranks[0]
  a, where = r0.args, r0.path
  tp = len(ranks)
  emb = r0.tensors.get("embedding.word_embeddings.weight")
  if emb is None:
    raise ConversionError(f"{where}: missing tensor 'embedding.word_embeddings.weight'")
  padded = int(a.get("padded_vocab_size") or emb.shape[0] * tp)
  if emb.shape[0] * tp != padded:
    raise ConversionError(f"{where}: tensor 'embedding.word_embeddings.weight' has {emb.shape[0]} rows per rank "
                          f"× {tp} ranks, but args.padded_vocab_size={padded}")
  if vocab > padded:
    raise ConversionError(f"{tokenizer}: {vocab} tokens, more than the checkpoint's {padded} embedding rows "
                          f"(args.padded_vocab_size): not this model's tokenizer")
  divisible = int(a.get("make_vocab_size_divisible_by") or 128)
  if _vocab_size_with_padding(vocab, divisible, tp) != padded:
    raise ConversionError(f"{tokenizer}: {vocab} tokens pad to {_vocab_size_with_padding(vocab, divisible, tp)} "
                          f"(args.make_vocab_size_divisible_by={divisible} × {tp} ranks), but "
                          f"args.padded_vocab_size={padded}: not this model's tokenizer")
  cfg = config_from_args(a, where, vocab, bos, eos)
  if cfg.n_heads % tp or cfg.n_kv_heads % tp or cfg.ffn_dim % tp:
    raise ConversionError(f"{where}: {cfg.n_heads} heads / {cfg.n_kv_heads} query groups / ffn {cfg.ffn_dim} do "
                          f"not split over args.tensor_model_parallel_size={tp}")
  dmc, target_cr = dmc_settings(a, where)
  hf = _read_tensors(ranks, cfg, padded)
  tensors = layout.hf_to_ours(hf, cfg, where=where)

  iteration = r0.meta.get("iteration")
  dtype = _dtype_name(a)
  dmc_text = (f"DMC: offset c={dmc['offset']:g}, window W={dmc['window']}, temperature τ={dmc['temperature']:g}, "
              f"target CR {target_cr:g} (decision channel last, ε 2^-7)" if dmc else "no DMC settings in args")
  log.info("megatron %s: iteration %s, TP %d, %s; %d layers, d_model %d, %d heads / %d query groups, head_dim %d, "
           "ffn %d, vocab %d (padded %d), %s, rope θ %g; %s", os.path.abspath(src), iteration, tp, dtype,
           cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
           padded, "tied" if cfg.tie_embeddings else "untied", cfg.rope_theta, dmc_text)
  read_keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
               "num_query_groups", "kv_channels", "rotary_base", "rotary_percent", "norm_epsilon",
               "untie_embeddings_and_output_weights", "max_position_embeddings", "padded_vocab_size",
               "make_vocab_size_divisible_by", "tensor_model_parallel_size", "bf16", "fp16",
               *_DMC_ARG_DEFAULTS, "dmc_finetune", "dmc_is_stage_one")
  source = {"format": "megatron", "path": os.path.abspath(src),
            "files": [os.path.abspath(r.path) for r in ranks], "iteration": iteration,
            "checkpoint_version": r0.meta.get("checkpoint_version"), "params_dtype": dtype,
            "args": {k: a[k] for k in read_keys if k in a and isinstance(a[k], (int, float, str, bool))},
            "tokenizer": os.path.abspath(tokenizer)}
  experiment = ({"source": "megatron", "train": {"target_cr": target_cr}, "iteration": iteration}
                if dmc else None)
  return Converted(cfg, tensors, tok, source, dmc=dmc, experiment=experiment)
