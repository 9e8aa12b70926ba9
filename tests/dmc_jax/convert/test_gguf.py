"""GGUF files written with gguf-py's GGUFWriter (every type it can write) round-trip through `convert`."""

import os

import gguf
import jax
import numpy as np
import pytest
from helpers import random_hf_model, write_hf_dir

from dmc_jax import checkpoint
from dmc_jax.config import LlamaConfig
from dmc_jax.convert import gguf as gguf_convert
from dmc_jax.convert import hf
from dmc_jax.convert.tensors import ConversionError
from dmc_jax.model.llama import Llama
from dmc_jax.model.rope import meta_to_hf_permutation

# Rows of 64/96 values: multiples of every block size gguf-py can write (32).
CFG = LlamaConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=None, eos_token_ids=())
Q = gguf.GGMLQuantizationType
WRITABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
_HF_TO_GGUF = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
               "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
               "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
               "mlp.down_proj.weight": "ffn_down", "input_layernorm.weight": "attn_norm",
               "post_attention_layernorm.weight": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if hf_name in top:
    return top[hf_name]
  parts = hf_name.split(".")
  return f"blk.{parts[2]}.{_HF_TO_GGUF['.'.join(parts[3:])]}.weight"


def hf_to_meta_rows(w, n_heads, head_dim):
  """Inverse of our Meta→HF permutation: the layout llama.cpp writes."""
  return w[np.argsort(meta_to_hf_permutation(n_heads, head_dim))]


def write_gguf(path, cfg, tensors, qtype, raw_type_override=None, metadata=True):
  w = gguf.GGUFWriter(str(path), "llama")
  if metadata:
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
  expected = {}
  for name, a in tensors.items():
    if "q_proj" in name:
      a = hf_to_meta_rows(a, cfg.n_heads, cfg.head_dim)
    elif "k_proj" in name:
      a = hf_to_meta_rows(a, cfg.n_kv_heads, cfg.head_dim)
    t = Q.F32 if a.ndim == 1 else qtype
    data = gguf.quants.quantize(a, t)
    if raw_type_override and name == "model.layers.0.mlp.up_proj.weight":
      w.add_tensor(gguf_name(name), data, raw_dtype=raw_type_override)
    elif t in (Q.F32, Q.F16):
      w.add_tensor(gguf_name(name), data)
    else:
      w.add_tensor(gguf_name(name), data, raw_dtype=t)
    expected[name] = gguf.quants.dequantize(data, t).reshape(a.shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  tensors = random_hf_model(CFG, seed=3)
  return tensors, write_hf_dir(tmp_path_factory.mktemp("hf"), CFG, tensors)


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda q: q.name)
def test_gguf_round_trip(tmp_path, hf_source, qtype):
  tensors, hf_dir = hf_source
  expected = write_gguf(tmp_path / "m.gguf", CFG, tensors, qtype)
  converted = gguf_convert.read(str(tmp_path / "m.gguf"))
  assert converted.config == CFG.replace(rms_norm_eps=float(np.float32(CFG.rms_norm_eps)))  # GGUF stores f32
  ours = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "ck"), converted))
  # Same tensors as the HF layout of the dequantized weights (q/k permuted back exactly).
  back = hf.layout.ours_to_hf(ours.lazy_tensors(), CFG, "ck")
  for t in back:
    ref = expected[t.name]
    if "q_proj" in t.name:
      ref = ref[meta_to_hf_permutation(CFG.n_heads, CFG.head_dim)]
    elif "k_proj" in t.name:
      ref = ref[meta_to_hf_permutation(CFG.n_kv_heads, CFG.head_dim)]
    np.testing.assert_array_equal(t.load(), ref.astype(np.float32), err_msg=t.name)
  # And the model computes what the HF-directory twin computes, up to the quantization error.
  twin = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "twin"), hf.read(hf_dir)))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
  a = Llama(CFG).apply(ours.load_params(), tokens)
  b = Llama(CFG).apply(twin.load_params(), tokens)
  rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
  # The logits may differ by about as much as the weights do (a few layers amplify it a little), no more.
  weight_err = max(np.linalg.norm(expected[n] - tensors[n]) / np.linalg.norm(tensors[n]) for n in tensors)
  assert rel <= 4 * weight_err + 1e-6, (qtype.name, rel, weight_err)
  if qtype == Q.F32:
    assert rel < 1e-6


def test_unsupported_quant_type_is_named(tmp_path, hf_source):
  tensors, _ = hf_source
  write_gguf(tmp_path / "m.gguf", CFG, tensors, Q.F32, raw_type_override=Q.Q8_1)
  with pytest.raises(ConversionError, match=r"m.gguf: tensor 'blk.0.ffn_up.weight' has GGUF type Q8_1, which the "
                                            r"gguf package cannot dequantize \(supported: F32, F16, BF16"):
    gguf_convert.read(str(tmp_path / "m.gguf"))


def test_unknown_type_id_and_truncated_file(tmp_path, hf_source):
  tensors, _ = hf_source
  write_gguf(tmp_path / "m.gguf", CFG, tensors, Q.F32)
  data = bytearray(open(tmp_path / "m.gguf", "rb").read())
  # Corrupt the type id of the first tensor-info record (after its name, n_dims and dims).
  name = b"token_embd.weight"
  at = data.index(name) + len(name)
  n_dims = int.from_bytes(data[at:at + 4], "little")
  type_at = at + 4 + 8 * n_dims
  data[type_at:type_at + 4] = (250).to_bytes(4, "little")
  open(tmp_path / "bad.gguf", "wb").write(bytes(data))
  with pytest.raises(ConversionError, match=r"bad.gguf: tensor 'token_embd.weight' has unknown GGUF type 250"):
    gguf_convert.read(str(tmp_path / "bad.gguf"))
  good = open(tmp_path / "m.gguf", "rb").read()
  open(tmp_path / "short.gguf", "wb").write(good[: len(good) // 2])
  with pytest.raises(ConversionError, match=r"short.gguf: truncated: tensor '.*' needs \d+ bytes at offset \d+, "
                                            r"file has \d+"):
    gguf_convert.read(str(tmp_path / "short.gguf"))


def test_missing_metadata_and_tensor(tmp_path, hf_source):
  tensors, _ = hf_source
  write_gguf(tmp_path / "m.gguf", CFG, tensors, Q.F32, metadata=False)
  with pytest.raises(ConversionError, match="GGUF metadata key 'llama.attention.head_count' missing"):
    gguf_convert.read(str(tmp_path / "m.gguf"))
  partial = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.v_proj.weight"}
  write_gguf(tmp_path / "p.gguf", CFG, partial, Q.F32)
  with pytest.raises(ConversionError, match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
    gguf_convert.read(str(tmp_path / "p.gguf"))
  out = tmp_path / "out"
  from experiments.cli import dmc as cli_dmc
  assert cli_dmc.main(["convert", "--from", "gguf", str(tmp_path / "p.gguf"), "--out", str(out)]) == 2
  assert not out.exists()


def test_real_smollm2_gguf_metadata(smollm2_gguf):
  c = gguf_convert.read(smollm2_gguf)
  cfg = c.config
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == \
      (30, 576, 9, 3, 64, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
  assert c.source["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
  assert c.tokenizer[0].kind == "hf" and c.tokenizer[0].eos_token_ids == (2,)


def test_gguf_with_sentencepiece_vocab_matches_its_hf_twin(tmp_path, golden_dir):
  """tiny_spm.gguf (llama.cpp layout, written by the golden script) computes hf_spm_twin's logits."""
  ck = checkpoint.Checkpoint(checkpoint.write(str(tmp_path / "ck"),
                                              gguf_convert.read(os.path.join(golden_dir, "spm", "tiny_spm.gguf"))))
  z = np.load(os.path.join(golden_dir, "hf_spm_twin", "golden.npz"))
  out = np.asarray(Llama(ck.config).apply(ck.load_params(), z["input_ids"]))
  assert np.abs(out - z["logits"]).max() <= 1e-4
