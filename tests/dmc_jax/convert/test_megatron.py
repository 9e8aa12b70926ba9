"""Megatron-LM checkpoints (the layout of NVIDIA's released DMC models), read without torch.

Fixtures: tests/golden/megatron (made by tests/golden/make_megatron.py from the HF twins next to them; its
slicing is ported from Megatron-LM's tools/checkpoint). Every refusal is one line naming the key or file.
"""

import json
import os
import pickle
import pickletools
import shutil
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import cache as dmc_cache
from dmc_jax import checkpoint
from dmc_jax.config import DMCConfig
from dmc_jax.convert import hf, layout, megatron
from dmc_jax.convert.tensors import ConversionError
from dmc_jax.generate import decode_dmc
from dmc_jax.model.llama import Llama

CHECKPOINTS = ["mcore_mha_untied_tp1", "mcore_mha_untied_tp2", "mcore_gqa_tied_tp1", "mcore_gqa_tied_tp2"]


@pytest.fixture(scope="module")
def mdir(golden_dir):
  return os.path.join(golden_dir, "megatron")


@pytest.fixture(scope="module")
def manifest(mdir):
  with open(os.path.join(mdir, "manifest.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def tok(mdir):
  return os.path.join(mdir, "tokenizer.json")


def _f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _ckpt(tmp_path, converted, name):
  return checkpoint.Checkpoint(checkpoint.write(str(tmp_path / name), converted))


_JITTED = {}  # one compile per model shape, shared by the tests (the twins of a family have the same shape)


def _scanned(ck):
  """(config, params) as float32 with stacked layers: one layer body to compile."""
  cfg = ck.config.replace(param_dtype="float32", bos_token_id=None, eos_token_ids=(), scan_layers=True)
  return cfg, {"params": layout.stack_layers(_f32(ck.load_params()["params"]), cfg.n_layers)}


def _logits(ck, ids):
  cfg, params = _scanned(ck)
  if cfg not in _JITTED:
    _JITTED[cfg] = jax.jit(Llama(cfg).apply)
  return np.asarray(_JITTED[cfg](params, ids))


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value), str(excinfo.value)
  return str(excinfo.value)


# -- the function -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_megatron_checkpoint_is_its_hf_twin(tmp_path, mdir, manifest, tok, name):
  info = manifest["checkpoints"][name]
  twin = os.path.join(mdir, info["twin"])
  ck = _ckpt(tmp_path, megatron.read(os.path.join(mdir, name), tok), "m")
  ref = _ckpt(tmp_path, hf.read(twin), "h")
  # Same model apart from token ids the tokenizer decides; the padded vocabulary rows are gone.
  assert ck.config.replace(bos_token_id=None, eos_token_ids=()) == ref.config.replace(bos_token_id=None,
                                                                                     eos_token_ids=())
  assert ck.config.vocab_size == manifest["vocab"] < info["padded_vocab_size"]
  assert ck.config.param_dtype == "bfloat16"  # the files hold bf16 storages
  golden = np.load(os.path.join(twin, "golden.npz"))
  got, want = _logits(ck, golden["input_ids"]), _logits(ref, golden["input_ids"])
  assert np.abs(got - want).max() <= 1e-5
  # ... and both are transformers' function (float32, the twin's bf16-representable weights)
  assert np.abs(got - golden["logits"]).max() <= 1e-4
  # compared as settings: fields added to DMCConfig later (with defaults) do not change what the file says
  assert DMCConfig.from_dict(ck.dmc) == DMCConfig.from_dict(info["expected_dmc"])
  assert ck.meta["experiment"]["train"]["target_cr"] == info["expected_target_cr"]


@pytest.mark.parametrize("name", ["mcore_mha_untied_tp2", "mcore_gqa_tied_tp2"])
def test_dmc_decode_with_the_files_settings_matches_the_hf_import(tmp_path, mdir, manifest, tok, name):
  """Greedy DMC decoding with the settings read from args equals DMC decoding of the HF twin with the settings
  the fixture script wrote, token for token, with the same per-head compression."""
  info = manifest["checkpoints"][name]
  ck = _ckpt(tmp_path, megatron.read(os.path.join(mdir, name), tok), "m")
  ref = _ckpt(tmp_path, hf.read(os.path.join(mdir, info["twin"])), "h")
  dmc = DMCConfig.from_dict(ck.dmc)
  assert dmc == DMCConfig(**info["expected_dmc"]) and dmc != DMCConfig()
  cfg = _scanned(ck)[0]
  # Decode steps from an empty cache for the prompt too (the cache appends each sequence's first token): one
  # compile per model shape instead of a prefill and a step.
  step = jax.jit(lambda p, t, c: decode_dmc(Llama(cfg, dmc, "eval"), p, t, c))
  prompts = np.random.RandomState(7).randint(3, cfg.vocab_size, size=(2, 9)).astype(np.int32)

  def greedy(ck):
    params = _scanned(ck)[1]
    cache = dmc_cache.init_cache(cfg, dmc, 2, 32, page_size=4)
    for t in range(prompts.shape[1]):
      logits, cache = step(params, jnp.asarray(prompts[:, t]), cache)
    out = []
    for _ in range(14):
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      out.append(np.asarray(token))
      logits, cache = step(params, token, cache)
    return np.stack(out, 1), dmc_cache.realised_cr(cache)

  got, cr = greedy(ck)
  want, cr_ref = greedy(ref)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(cr["per_head"], cr_ref["per_head"])
  assert 1.1 < cr["overall"] < 23 / 2  # some tokens merged, some appended


# -- paths ----------------------------------------------------------------------------------------------------


def test_every_accepted_path_form_reads_the_same_set(mdir, tok):
  root = os.path.join(mdir, "mcore_gqa_tied_tp2")
  iter_dir = os.path.join(root, "iter_0000750")
  forms = [root, iter_dir, os.path.join(iter_dir, "mp_rank_01"),
           os.path.join(iter_dir, "mp_rank_01", "model_optim_rng.pt")]
  read = [megatron.read(p, tok) for p in forms]
  for r in read:
    assert r.config == read[0].config and r.source["files"] == read[0].source["files"]
    assert r.source["iteration"] == 750 and len(r.source["files"]) == 2
  flat = megatron.read(os.path.join(mdir, "mcore_mha_untied_tp2"), tok)  # the model repositories' layout
  assert flat.source["iteration"] == 2000 and flat.config.n_kv_heads == flat.config.n_heads == 4
  release = megatron.read(os.path.join(mdir, "mcore_gqa_tied_tp1"), tok)
  assert release.source["files"][0].endswith(os.path.join("release", "mp_rank_00", "model_optim_rng.pt"))


def test_cli_convert_prints_shape_dtype_iteration_and_dmc(tmp_path, mdir, manifest, tok, capsys):
  from experiments.cli.dmc import main
  name = "mcore_mha_untied_tp2"
  out = str(tmp_path / "ck")
  assert main(["convert", "--from", "megatron", os.path.join(mdir, name), "--tokenizer", tok, "--out", out,
               "--dtype", "float32"]) == 0
  err = capsys.readouterr().err
  for text in ("iteration 2000", "TP 2", "bfloat16", "2 layers, d_model 32, 4 heads / 4 query groups",
               "vocab 200 (padded 256)", "offset c=0.5", "window W=4", "temperature τ=0.2", "target CR 4"):
    assert text in err, (text, err)
  ck = checkpoint.Checkpoint(out)
  assert ck.config.param_dtype == "float32" and DMCConfig.from_dict(ck.dmc) == DMCConfig.from_dict(manifest["checkpoints"][name]["expected_dmc"])
  assert ck.tokenizer().encode("bade fifi") == [1, 4, 35]  # BOS, then two words of the fixture tokenizer
  assert main(["convert", "--from", "megatron", os.path.join(mdir, name), "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "carries no tokenizer" in err and "--tokenizer" in err


# -- refusals -------------------------------------------------------------------------------------------------


def _copy(mdir, name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(mdir, name), dst)
  return dst


def _rewrite_pickle(path, edit):
  """Rewrites the zip at `path` with data.pkl replaced by edit(data.pkl) (other members unchanged)."""
  with zipfile.ZipFile(path) as z:
    members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    for n, data in members:
      z.writestr(n, edit(data) if n.endswith("data.pkl") else data)


def _set_arg(data: bytes, key: str, value_opcode: bytes) -> bytes:
  """Replaces the pickled value that follows the string `key` (an args field) by `value_opcode`."""
  ops = list(pickletools.genops(data))
  for i, (op, arg, _) in enumerate(ops):
    if op.name == "BINUNICODE" and arg == key:
      j = i + 1
      while ops[j][0].name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
        j += 1
      start, end = ops[j][2], ops[j + 1][2]
      return data[:start] + value_opcode + data[end:]
  raise AssertionError(f"{key} not in the pickle")


def _rename(data: bytes, old: str, new: str) -> bytes:
  enc = lambda s: b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # noqa: E731  (BINUNICODE)
  assert enc(old) in data
  return data.replace(enc(old), enc(new))


def _all_ranks(root):
  return sorted(str(p) for p in root.rglob("model_optim_rng.pt"))


def test_rotary_interleaved_is_refused_by_name(tmp_path, mdir, tok):
  root = _copy(mdir, "mcore_mha_untied_tp1", tmp_path)
  _rewrite_pickle(_all_ranks(root)[0], lambda d: _set_arg(d, "rotary_interleaved", b"\x88"))
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert "args.rotary_interleaved=True: interleaved (GPT-J style) RoPE is not supported" in _one_line(e)


def test_partial_rotary_percent_is_refused_by_name(tmp_path, mdir, tok):
  root = _copy(mdir, "mcore_mha_untied_tp1", tmp_path)
  _rewrite_pickle(_all_ranks(root)[0], lambda d: _set_arg(d, "rotary_percent", b"G" + struct.pack(">d", 0.5)))
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert "args.rotary_percent=0.5: partial RoPE" in _one_line(e)


def test_pipeline_parallel_sets_are_refused(tmp_path, mdir, tok):
  root = _copy(mdir, "mcore_gqa_tied_tp2", tmp_path)
  it = root / "iter_0000750"
  for r in ("00", "01"):
    os.rename(it / f"mp_rank_{r}", it / f"mp_rank_{r}_000")
  for path in (root, it / "mp_rank_00_000" / "model_optim_rng.pt"):
    with pytest.raises(ConversionError) as e:
      megatron.read(str(path), tok)
    assert "pipeline-parallel shard set (mp_rank_00_000, mp_rank_01_000)" in _one_line(e)
  # ... and a file whose args say so, whatever its directory is called
  root = _copy(mdir, "mcore_mha_untied_tp1", tmp_path)
  _rewrite_pickle(_all_ranks(root)[0], lambda d: _set_arg(d, "pipeline_model_parallel_size", b"K\x02"))
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert "args.pipeline_model_parallel_size=2: pipeline-parallel checkpoints are not supported" in _one_line(e)


def test_unknown_global_is_refused_by_name(tmp_path, mdir, tok):
  root = _copy(mdir, "mcore_mha_untied_tp1", tmp_path)
  _rewrite_pickle(_all_ranks(root)[0], lambda d: d.replace(b"cmegatron.core.enums\nModelType\n",
                                                           b"cmegatron.core.transformer.enums\nAttnBackend\n"))
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert "refusing pickled global megatron.core.transformer.enums.AttnBackend" in _one_line(e)


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch PWNED",))


def _torch_like(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    z.writestr("archive/version", "3\n")


def test_a_payload_in_the_pickle_is_refused_and_does_not_run(tmp_path, tok, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cases = {"args": {"args": _Evil(), "iteration": 1, "model": {}},
           "extra_state": {"iteration": 1, "model": {"decoder.layers.0.mlp.linear_fc1._extra_state": _Evil()}}}
  for name, obj in cases.items():
    _torch_like(str(tmp_path / name / "mp_rank_00" / "model_optim_rng.pt"), obj)
    with pytest.raises(ConversionError) as e:
      megatron.read(str(tmp_path / name), tok)
    assert "refusing pickled global" in _one_line(e) and "system" in str(e.value)
    assert not (tmp_path / "PWNED").exists()
  # An allowed global called with arguments it must not take: refused, not executed.
  data = (b"\x80\x02}q\x00(X\x04\x00\x00\x00argsc_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13"
          b"\x86Ru.")
  path = tmp_path / "codec" / "mp_rank_00" / "model_optim_rng.pt"
  os.makedirs(path.parent)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data)
  with pytest.raises(ConversionError) as e:
    megatron.read(str(tmp_path / "codec"), tok)
  assert "refusing pickled call _codecs.encode(<str>, 'rot_13')" in _one_line(e)


def test_truncated_and_missing_shards_give_one_line(tmp_path, mdir, tok):
  root = _copy(mdir, "mcore_mha_untied_tp2", tmp_path)
  rank1 = root / "mp_rank_01" / "model_optim_rng.pt"
  good = rank1.read_bytes()
  rank1.write_bytes(good[: len(good) // 2])
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert str(rank1) in _one_line(e) and "truncated" in str(e.value)
  shutil.rmtree(root / "mp_rank_01")
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert "tensor-parallel shard mp_rank_01 of 2 is missing" in _one_line(e)
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root / "nowhere"), tok)
  assert "not found" in _one_line(e)


def test_missing_tensor_and_unexpected_shape_name_the_key(tmp_path, mdir, tok):
  root = _copy(mdir, "mcore_mha_untied_tp1", tmp_path)
  pt = _all_ranks(root)[0]
  _rewrite_pickle(pt, lambda d: _rename(d, "decoder.layers.1.mlp.linear_fc2.weight",
                                        "decoder.layers.1.mlp.linear_fc2._extra_state"))
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert f"{pt}: missing tensor 'decoder.layers.1.mlp.linear_fc2.weight'" in _one_line(e)
  root = _copy(mdir, "mcore_gqa_tied_tp1", tmp_path)
  _rewrite_pickle(_all_ranks(root)[0], lambda d: _set_arg(d, "kv_channels", b"K\x04"))
  with pytest.raises(ConversionError) as e:
    megatron.read(str(root), tok)
  assert "tensor 'decoder.layers.0.self_attention.linear_qkv.weight' has shape [128, 32], expected [64, 32]" in \
      _one_line(e)


def test_tokenizer_is_required_and_must_fit_the_embedding(tmp_path, mdir, golden_dir):
  src = os.path.join(mdir, "mcore_mha_untied_tp1")
  with pytest.raises(ConversionError) as e:
    megatron.read(src)
  assert "carries no tokenizer" in _one_line(e)
  spm = os.path.join(golden_dir, "spm", "tokenizer.model")  # 512 SentencePiece tokens, for 256 rows
  with pytest.raises(ConversionError) as e:
    megatron.read(src, spm)
  assert "tokenizer.model: 512 tokens, more than the checkpoint's 256 embedding rows" in _one_line(e)
  with open(os.path.join(mdir, "tokenizer.json")) as f:
    small = json.load(f)
  small["model"]["vocab"] = {k: v for k, v in small["model"]["vocab"].items() if v < 100}
  (tmp_path / "small.json").write_text(json.dumps(small))
  with pytest.raises(ConversionError) as e:
    megatron.read(src, str(tmp_path / "small.json"))
  assert "small.json: 100 tokens pad to 128" in _one_line(e) and "args.padded_vocab_size=256" in str(e.value)


ARGS = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "kv_channels": 8,
        "position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True}


@pytest.mark.parametrize("key,value,text", [
    ("normalization", "LayerNorm", "args.normalization='LayerNorm': a normalization other than RMSNorm"),
    ("swiglu", False, "args.swiglu=False: an MLP other than SwiGLU"),
    ("add_bias_linear", True, "args.add_bias_linear=True: linear-layer biases"),
    ("add_qkv_bias", True, "args.add_qkv_bias=True: linear-layer biases"),
    ("position_embedding_type", "learned_absolute", "args.position_embedding_type='learned_absolute'"),
    ("use_rope_scaling", True, "args.use_rope_scaling=True"),
    ("num_experts", 8, "args.num_experts=8: mixture of experts"),
    ("qk_layernorm", True, "args.qk_layernorm=True"),
])
def test_architectures_it_cannot_represent_are_refused_by_name(key, value, text):
  with pytest.raises(ConversionError) as e:
    megatron.config_from_args({**ARGS, key: value}, "f.pt", 200, 1, (2,))
  assert text in _one_line(e) and _one_line(e).startswith("f.pt: ")


def test_dmc_settings_from_args():
  assert megatron.dmc_settings(ARGS, "f.pt") == (None, None)
  d, cr = megatron.dmc_settings({**ARGS, "dmc_init_val": 5.0, "dmc_window_size": 12, "dmc_temp": 0.1,
                                 "dmc_cr": 8.0}, "f.pt")
  assert DMCConfig.from_dict(d) == DMCConfig() and cr == 8.0  # NVIDIA's values are this project's defaults
  with pytest.raises(ConversionError) as e:
    megatron.dmc_settings({**ARGS, "dmc_init_val": 5.0, "dmc_window_size": 0}, "f.pt")
  assert "args.dmc_window_size=0" in _one_line(e)
