"""Tokenizers: HF `tokenizer.json`, SentencePiece `tokenizer.model`, and vocabularies embedded in GGUF files.

A checkpoint stores either file plus `TokenizerInfo` (kind, BOS/EOS ids, whether BOS is added). GGUF
vocabularies are turned into one of the two file forms once, at conversion:
* `gpt2` (byte-level BPE): a `tokenizers` BPE with the pre-tokenizer named by `tokenizer.ggml.pre`;
* `llama` (SentencePiece): a SentencePiece ModelProto rebuilt from pieces, scores and token types.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from dmc_jax.config import check_keys
from dmc_jax.errors import TokenizerError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  kind: str  # "hf" | "sentencepiece"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  # SentencePiece only; None for "hf" (a tokenizer.json's post-processor decides for itself).
  add_bos: bool | None = None
  add_eos: bool | None = None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eos_token_ids"] = list(self.eos_token_ids)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str) -> "TokenizerInfo":
    check_keys(cls, d, where, TokenizerError)
    d = dict(d)
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return cls(**d)

  @property
  def filename(self) -> str:
    return TOKENIZER_JSON if self.kind == "hf" else SENTENCEPIECE_MODEL


class Tokenizer:
  """encode/decode over either backend."""

  def __init__(self, directory: str, info: TokenizerInfo):
    self.info = info
    path = os.path.join(directory, info.filename)
    if not os.path.exists(path):
      raise TokenizerError(f"{path}: tokenizer file missing")
    if info.kind == "hf":
      import tokenizers
      self._hf = tokenizers.Tokenizer.from_file(path)
      self._sp = None
    elif info.kind == "sentencepiece":
      import sentencepiece
      self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
      self._hf = None
    else:
      raise TokenizerError(f"{directory}: unknown tokenizer kind {info.kind!r} (expected 'hf' or 'sentencepiece')")

  @property
  def vocab_size(self) -> int:
    return self._hf.get_vocab_size() if self._hf else self._sp.get_piece_size()

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    return self.info.eos_token_ids

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if self._hf is not None:
      return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
    ids = self._sp.encode(text)
    if add_special_tokens:
      if self.info.add_bos and self.info.bos_token_id is not None:
        ids = [self.info.bos_token_id] + ids
      if self.info.add_eos and self.info.eos_token_ids:
        ids = ids + [self.info.eos_token_ids[0]]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self._hf is not None:
      return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
      ids = [i for i in ids if not self._sp.is_control(i)]
    return self._sp.decode(ids)


def check(tokenizer: tuple[TokenizerInfo, bytes], model_vocab: int, where: str) -> int:
  """Loads a tokenizer's file contents and checks it against the model it is stored with: it must parse, its ids
  (vocabulary size) must fit the model's embedding, and its BOS/EOS ids must exist in both. Returns its size.
  Run at conversion, so that a checkpoint never stores a tokenizer that fails (or emits garbage ids) later."""
  info, data = tokenizer
  if info.kind == "hf":
    import tokenizers
    try:
      size = tokenizers.Tokenizer.from_str(data.decode("utf-8")).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises bare Exceptions on malformed JSON
      msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
      raise TokenizerError(f"{where}: not a readable tokenizer.json ({msg})") from None
  elif info.kind == "sentencepiece":
    import sentencepiece
    try:
      size = sentencepiece.SentencePieceProcessor(model_proto=data).get_piece_size()
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
      msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
      raise TokenizerError(f"{where}: not a readable SentencePiece model ({msg})") from None
  else:
    raise TokenizerError(f"{where}: unknown tokenizer kind {info.kind!r} (expected 'hf' or 'sentencepiece')")
  if size > model_vocab:
    raise TokenizerError(f"{where}: the tokenizer has {size} tokens, the model's vocabulary only {model_vocab} "
                         f"(its ids would index past the embedding)")
  specials = ([("BOS", info.bos_token_id)] if info.bos_token_id is not None else []) + \
      [("EOS", i) for i in info.eos_token_ids]
  for name, i in specials:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
      raise TokenizerError(f"{where}: {name} id {i!r} is outside the tokenizer's {size} tokens (model vocabulary "
                           f"{model_vocab})")
  return size


# -- from an HF model directory ----------------------------------------------------------------------------


def from_hf_directory(src: str, bos: int | None, eos: Sequence[int]) -> tuple[TokenizerInfo, str] | None:
  """(info, path of the file to copy) for an HF directory, or None if it has no tokenizer."""
  cfg_path = os.path.join(src, "tokenizer_config.json")
  tok_cfg = {}
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      tok_cfg = json.load(f)
  if os.path.exists(os.path.join(src, TOKENIZER_JSON)):
    return TokenizerInfo("hf", bos, tuple(eos)), os.path.join(src, TOKENIZER_JSON)
  if os.path.exists(os.path.join(src, SENTENCEPIECE_MODEL)):
    info = TokenizerInfo("sentencepiece", bos, tuple(eos), add_bos=bool(tok_cfg.get("add_bos_token", True)),
                         add_eos=bool(tok_cfg.get("add_eos_token", False)))
    return info, os.path.join(src, SENTENCEPIECE_MODEL)
  return None


# -- from GGUF metadata ------------------------------------------------------------------------------------

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's pre-tokenizer regex (llama.cpp "llama-bpe"); GPT-2's is built into ByteLevel(use_regex=True).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) → how to split before byte-level BPE.
_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_GPT2 = ("default", "gpt-2", "gpt2", "olmo", "jais", "poro-chat", "viking")
_PRE_LLAMA3 = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")


def _byte_level_pre_tokenizer(pre: str, where: str):
  from tokenizers import Regex, pre_tokenizers
  if pre in _PRE_DIGITS_THEN_GPT2:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in _PRE_GPT2:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _PRE_LLAMA3:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  known = sorted(_PRE_DIGITS_THEN_GPT2 + _PRE_GPT2 + _PRE_LLAMA3)
  raise TokenizerError(f"{where}: unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(known)})")


def gguf_bpe_tokenizer_json(meta: Mapping[str, Any], where: str) -> str:
  """A `tokenizer.json` for a GGUF `gpt2` (byte-level BPE) vocabulary."""
  from tokenizers import AddedToken, decoders, models, processors
  from tokenizers import Tokenizer as HFTok
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  bpe = models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                   fuse_unk=False, byte_fallback=False)
  tok = HFTok(bpe)
  tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), where)
  tok.decoder = decoders.ByteLevel()
  specials = [AddedToken(tokens[i], special=True, normalized=False)
              for i, t in enumerate(types) if t == _CONTROL]
  user = [AddedToken(tokens[i], special=False, normalized=False)
          for i, t in enumerate(types) if t == _USER_DEFINED]
  tok.add_special_tokens(specials)
  tok.add_tokens(user)
  bos = meta.get("tokenizer.ggml.bos_token_id")
  # llama.cpp defaults add_bos_token to true when absent for SPM, false for BPE vocabularies.
  if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
        special_tokens=[(tokens[bos], bos)])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok.to_str()


def gguf_sentencepiece_model(meta: Mapping[str, Any], where: str) -> bytes:
  """A serialized SentencePiece ModelProto for a GGUF `llama` vocabulary (Llama 1/2 style BPE)."""
  try:
    from sentencepiece import sentencepiece_model_pb2 as spm
  except ImportError as e:  # needs protobuf
    raise TokenizerError(f"{where}: cannot rebuild a SentencePiece model ({e})") from None
  tokens = list(meta["tokenizer.ggml.tokens"])
  scores = list(meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
  types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
  piece_types = {_NORMAL: 1, _UNKNOWN: 2, _CONTROL: 3, _USER_DEFINED: 4, _UNUSED: 5, _BYTE: 6}
  proto = spm.ModelProto()
  for piece, score, t in zip(tokens, scores, types):
    p = proto.pieces.add()
    p.piece, p.score = piece, float(score)
    p.type = piece_types.get(int(t), 1)
  ts = proto.trainer_spec
  ts.model_type = spm.TrainerSpec.BPE
  ts.vocab_size = len(tokens)
  ts.byte_fallback = any(int(t) == _BYTE for t in types)
  ts.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
  ts.bos_id = int(meta.get("tokenizer.ggml.bos_token_id", 1))
  ts.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", 2))
  ts.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", -1))
  ns = proto.normalizer_spec
  ns.name = "identity"
  ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return proto.SerializeToString()


def from_gguf_metadata(meta: Mapping[str, Any], where: str) -> tuple[TokenizerInfo, bytes]:
  """(info, file contents) for the tokenizer embedded in a GGUF file."""
  if "tokenizer.ggml.tokens" not in meta:
    raise TokenizerError(f"{where}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens missing)")
  model = meta.get("tokenizer.ggml.model")
  bos = meta.get("tokenizer.ggml.bos_token_id")
  eos = meta.get("tokenizer.ggml.eos_token_id")
  eos_ids = (int(eos),) if eos is not None else ()
  if model == "gpt2":
    info = TokenizerInfo("hf", bos, eos_ids)
    return info, gguf_bpe_tokenizer_json(meta, where).encode()
  if model == "llama":
    info = TokenizerInfo("sentencepiece", bos, eos_ids,
                         add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                         add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    return info, gguf_sentencepiece_model(meta, where)
  raise TokenizerError(f"{where}: unsupported tokenizer.ggml.model {model!r} (expected 'gpt2' or 'llama')")
