"""Tokenizers against transformers / SentencePiece goldens (tests/golden/*/tokenize.json)."""

import json
import os
import shutil

import pytest

from dmc_jax import checkpoint
from dmc_jax.convert import gguf, hf
from dmc_jax.tokenizer import Tokenizer, TokenizerError, TokenizerInfo, from_gguf_metadata


def _cases(golden_dir, name):
  return json.load(open(os.path.join(golden_dir, name, "tokenize.json")))


def test_smollm2_gguf_vocabulary_matches_transformers(smollm2_ckpt, golden_dir):
  tok = checkpoint.Checkpoint(smollm2_ckpt).tokenizer()
  golden = _cases(golden_dir, "smollm2")
  assert len(golden["cases"]) >= 10
  for case in golden["cases"]:
    assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids_no_special"], case["text"]
    # Golden `decoded` = transformers' decode(ids) with special tokens kept.
    assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"], case["text"]


def test_hf_tokenizer_json_post_processor_decides_bos(tmp_path, golden_dir):
  """tokenizer.json files are used as they are: BOS only where their post-processor adds it."""
  import gzip
  spec = json.load(gzip.open(os.path.join(golden_dir, "smollm2", "hf_tokenizer", "tokenizer.json.gz")))
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "tokenizer.json").write_text(json.dumps(spec))
  plain = Tokenizer(str(tmp_path / "plain"), TokenizerInfo("hf", 1, (2,)))
  assert plain.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
  spec["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                "tokens": ["<|im_start|>"]}}}
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  with_bos = Tokenizer(str(tmp_path), TokenizerInfo("hf", 1, (2,)))
  assert with_bos.encode("The capital of France is") == [1, 504, 3575, 282, 4649, 314]
  assert with_bos.encode("The capital", add_special_tokens=False) == [504, 3575]


def test_sentencepiece_model_matches_sentencepiece(golden_dir):
  golden = _cases(golden_dir, "spm")
  tok = Tokenizer(os.path.join(golden_dir, "spm"), TokenizerInfo("sentencepiece", 1, (2,), add_bos=True))
  for case in golden["cases"]:
    assert tok.encode(case["text"], add_special_tokens=False) == case["sp_ids"], case["text"]
    assert tok.encode(case["text"]) == [1] + case["sp_ids"], case["text"]
    assert tok.decode(case["sp_ids"]) == case["sp_decoded"], case["text"]


def test_gguf_embedded_sentencepiece_vocabulary(tmp_path, golden_dir):
  converted = gguf.read(os.path.join(golden_dir, "spm", "tiny_spm.gguf"))
  info, _ = converted.tokenizer
  assert info.kind == "sentencepiece" and info.add_bos
  ck = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "ck"), converted))
  tok = ck.tokenizer()
  for case in _cases(golden_dir, "spm")["cases"]:
    assert tok.encode(case["text"], add_special_tokens=False) == case["sp_ids"], case["text"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["gguf_hf_ids_no_special"], case["text"]
    assert tok.decode(case["sp_ids"]) == case["sp_decoded"]


def test_hf_directory_with_sentencepiece_model(tmp_path, golden_dir):
  src = tmp_path / "hf"
  shutil.copytree(os.path.join(golden_dir, "hf_spm_twin"), src)
  shutil.copy(os.path.join(golden_dir, "spm", "tokenizer.model"), src / "tokenizer.model")
  (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
  info, _ = hf.read(str(src)).tokenizer
  assert info.kind == "sentencepiece" and not info.add_bos


def test_unsupported_gguf_vocabularies_are_named():
  with pytest.raises(TokenizerError, match="unsupported tokenizer.ggml.model 'rwkv'"):
    from_gguf_metadata({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.model": "rwkv"}, "x.gguf")
  with pytest.raises(TokenizerError, match="x.gguf: unsupported tokenizer.ggml.pre 'mystery'"):
    from_gguf_metadata({"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
                        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"}, "x.gguf")
