"""Hostile and careless inputs to the converters: every malformed tensor table, config, tokenizer and output path
is one line (exit 2 at the CLI), never a crash, a traceback, a silent coercion or a deleted source. Each case is a
small file crafted here from the golden fixtures."""

import collections
import gzip
import io
import json
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from dmc_jax import checkpoint, io_safety
from dmc_jax.convert import gguf as gguf_convert
from dmc_jax.convert import meta
from experiments.cli import dmc as cli_dmc

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "golden")
HF = os.path.join(GOLDEN, "hf_llama2_mha")
META = os.path.join(GOLDEN, "meta_llama2_1shard")
GGUF = os.path.join(GOLDEN, "spm", "tiny_spm.gguf")


def convert(capsys, *argv):
  """rc, stderr of `dmc-jax convert ...` in-process."""
  rc = cli_dmc.main(["convert", *map(str, argv)])
  return rc, capsys.readouterr().err


def one_line_error(capsys, match, *argv):
  rc, err = convert(capsys, *argv)
  lines = [l for l in err.splitlines() if "error:" in l or "Traceback" in l]
  assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert match in lines[0], lines[0]
  return lines[0]


# -- .pth views ---------------------------------------------------------------------------------------------


def _pth_with_views(tmp_path, views: dict) -> str:
  """A copy of the golden Meta checkpoint whose pickle gives some tensors other (offset, size, stride)."""
  src_zip = zipfile.ZipFile(os.path.join(META, "consolidated.00.pth"))
  pkl = next(n for n in src_zip.namelist() if n.endswith("data.pkl"))

  class Reader(pickle.Unpickler):
    def find_class(self, module, name):
      if name == "_rebuild_tensor_v2":
        return lambda st, off, size, stride, *rest: ("T", st, off, size, stride)
      if name == "OrderedDict":
        return collections.OrderedDict
      return name

    def persistent_load(self, pid):
      return ("S", pid[2], pid[4])
  state = Reader(src_zip.open(pkl)).load()
  # torch-style globals without torch: a fake module the pickler can name
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*a):
    pass
  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  FloatStorage = type("FloatStorage", (), {"__module__": "torch", "__qualname__": "FloatStorage"})
  torch.FloatStorage, torch._utils = FloatStorage, utils

  class T:
    def __init__(self, args):
      self.args = args

    def __reduce__(self):
      return _rebuild_tensor_v2, self.args

  class Writer(pickle.Pickler):
    def persistent_id(self, o):
      return ("storage", FloatStorage, o[1], "cpu", o[2]) if isinstance(o, tuple) and o[:1] == ("S",) else None
  out = collections.OrderedDict()
  for k, (_, st, off, size, stride) in state.items():
    off, size, stride = views.get(k, (off, size, stride))
    out[k] = T((st, off, tuple(size), tuple(stride), False, collections.OrderedDict()))
  saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    bio = io.BytesIO()
    Writer(bio, protocol=2).dump(out)
  finally:
    for m, v in saved.items():
      if v is None:
        sys.modules.pop(m, None)
      else:
        sys.modules[m] = v
  d = tmp_path / "pth"
  d.mkdir()
  shutil.copy(os.path.join(META, "params.json"), d)
  with zipfile.ZipFile(d / "consolidated.00.pth", "w", zipfile.ZIP_STORED) as z:
    for info in src_zip.infolist():
      z.writestr(info, bio.getvalue() if info.filename == pkl else src_zip.read(info.filename))
  return str(d)


@pytest.mark.parametrize("view,match", [
    ((0, (64, 64), (-64, 1)), "every stride must be an integer >= 0, got -64"),  # was SIGSEGV
    ((-1, (64, 64), (64, 1)), "storage offset must be an integer >= 0, got -1"),  # read past the storage
    ((-10**9, (64, 64), (0, 0)), "storage offset must be an integer >= 0"),  # one constant everywhere
    ((4096, (64, 64), (64, 1)), "reaches element 8191 of a storage of 4096"),
])
def test_pth_views_outside_their_storage(tmp_path, capsys, view, match):
  src = _pth_with_views(tmp_path, {"layers.0.attention.wq.weight": view})
  line = one_line_error(capsys, match, src, "--from", "meta", "--out", tmp_path / "out")
  assert "'layers.0.attention.wq.weight'" in line
  assert not os.path.exists(tmp_path / "out") and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_pth_untouched_views_still_convert(tmp_path):
  src = _pth_with_views(tmp_path, {})
  a = meta.read(src).tensors
  b = meta.read(META).tensors
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.load(), y.load())


# -- safetensors tables -------------------------------------------------------------------------------------


def _st_copy(tmp_path, edit=None, raw_header=None) -> str:
  d = tmp_path / "st"
  shutil.copytree(HF, d)
  blob = open(d / "model.safetensors", "rb").read()
  n = struct.unpack("<Q", blob[:8])[0]
  header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
  if edit:
    edit(header)
  hb = raw_header if raw_header is not None else json.dumps(header).encode()
  with open(d / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hb)) + hb + data)
  return str(d)


K, K2 = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"


def _set(key, field, value):
  def edit(h):
    if value is None:
      del h[key][field]
    else:
      h[key][field] = value(h) if callable(value) else value
  return edit


@pytest.mark.parametrize("edit,raw,match", [
    (_set(K, "data_offsets", lambda h: [-8, h[K]["data_offsets"][1] - h[K]["data_offsets"][0] - 8]), None,
     "data offset must be an integer >= 0, got -8"),
    (_set(K2, "data_offsets", lambda h: h[K]["data_offsets"]), None, "overlap"),
    (_set(K, "dtype", "I32"), None, "has dtype int32, expected a float dtype"),
    (None, b"[1,2,3]", "corrupt safetensors header (a JSON list"),
    (_set(K, "shape", "64,160"), None, "shape must be a list of integers"),
    (_set(K, "data_offsets", None), None, "expected an object with dtype, shape and data_offsets"),
    (_set(K, "shape", [-64, -160]), None, "every shape dimension must be an integer >= 0"),
    (_set(K, "data_offsets", lambda h: [x + 10**12 for x in h[K]["data_offsets"]]), None,
     f"truncated: tensor '{K}' needs 40960 bytes at offset"),
])
def test_malformed_safetensors_tables(tmp_path, capsys, edit, raw, match):
  src = _st_copy(tmp_path, edit, raw)
  one_line_error(capsys, match, src, "--from", "hf", "--out", tmp_path / "out")


def test_sharded_index_is_confined_to_the_model_folder(tmp_path, capsys):
  src = tmp_path / "m"
  shutil.copytree(HF, src)
  os.rename(src / "model.safetensors", tmp_path / "outside.safetensors")
  names = list(json.loads(open(tmp_path / "outside.safetensors", "rb").read()[8:][:struct.unpack(
      "<Q", open(tmp_path / "outside.safetensors", "rb").read(8))[0]]))
  for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
    json.dump({"weight_map": {n: shard for n in names if n != "__metadata__"}},
              open(src / "model.safetensors.index.json", "w"))
    one_line_error(capsys, "is outside the model folder", src, "--from", "hf", "--out", tmp_path / "o")
  json.dump({"weight_map": 5}, open(src / "model.safetensors.index.json", "w"))
  one_line_error(capsys, "not a safetensors index", src, "--from", "hf", "--out", tmp_path / "o")


# -- configs ------------------------------------------------------------------------------------------------


def _cfg_copy(tmp_path, change=None, raw=None) -> str:
  d = tmp_path / "cfg"
  shutil.copytree(HF, d)
  cfg = json.load(open(d / "config.json"))
  if change:
    cfg.update(change)
  with open(d / "config.json", "w") as f:
    f.write(raw if raw is not None else json.dumps(cfg))
  return str(d)


@pytest.mark.parametrize("change,raw,match", [
    ({"hidden_size": 64.5}, None, "hidden_size must be a positive integer, got 64.5"),
    ({"tie_word_embeddings": "yes"}, None, "tie_word_embeddings must be a boolean"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, None, "rope_theta must be a positive number"),
    ({"max_position_embeddings": 0}, None, "max_position_embeddings must be a positive integer"),
    ({"bos_token_id": 100000}, None, "bos_token_id: 100000 is outside the vocabulary of 320 tokens"),
    ({"eos_token_id": [2, 9999]}, None, "eos_token_ids: 9999 is outside the vocabulary"),
    ({"rms_norm_eps": "tiny"}, None, "rms_norm_eps must be a positive number, got 'tiny'"),
    ({"num_hidden_layers": None}, None, "num_hidden_layers is null"),
    ({"hidden_size": "64"}, None, "hidden_size must be a positive integer, got '64'"),
    (None, "[1, 2]", "expected a JSON object, got a list"),
])
def test_bad_config_json_values(tmp_path, capsys, change, raw, match):
  one_line_error(capsys, match, _cfg_copy(tmp_path, change, raw), "--from", "hf", "--out", tmp_path / "out")


def test_params_json_types(tmp_path, capsys):
  d = tmp_path / "m"
  shutil.copytree(META, d)
  p = json.load(open(d / "params.json"))
  json.dump({**p, "norm_eps": None}, open(d / "params.json", "w"))  # null = Meta's default, as absent
  assert meta.read(str(d)).config.rms_norm_eps == 1e-5
  json.dump({**p, "norm_eps": "x"}, open(d / "params.json", "w"))
  one_line_error(capsys, "norm_eps must be a positive number", d, "--from", "meta", "--out", tmp_path / "o")
  json.dump({**p, "dim": 64.5}, open(d / "params.json", "w"))
  one_line_error(capsys, "dim must be a positive integer", d, "--from", "meta", "--out", tmp_path / "o")


# -- tokenizers ---------------------------------------------------------------------------------------------


def test_tokenizer_checked_against_the_vocabulary_at_convert_time(tmp_path, capsys):
  big = tmp_path / "tokenizer.json"  # SmolLM2's 49,152 ids on a 320-token model
  big.write_bytes(gzip.decompress(open(os.path.join(GOLDEN, "smollm2", "hf_tokenizer", "tokenizer.json.gz"),
                                       "rb").read()))
  one_line_error(capsys, "the tokenizer has 49152 tokens, the model's vocabulary only 320", HF, "--from", "hf",
                 "--out", tmp_path / "o", "--tokenizer", big)
  junk = tmp_path / "passwd"
  junk.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" + bytes(range(256)))
  one_line_error(capsys, "not a readable SentencePiece model", HF, "--from", "hf", "--out", tmp_path / "o",
                 "--tokenizer", junk)
  (tmp_path / "bad.json").write_bytes(os.urandom(64))
  one_line_error(capsys, "not a readable tokenizer.json", HF, "--from", "hf", "--out", tmp_path / "o",
                 "--tokenizer", tmp_path / "bad.json")
  assert not os.path.exists(tmp_path / "o")
  # a garbage tokenizer.model beside a Meta checkpoint (starts like a proto)
  d = tmp_path / "meta"
  shutil.copytree(META, d)
  (d / "tokenizer.model").write_bytes(b"\n" + os.urandom(300))
  one_line_error(capsys, "not a readable SentencePiece model", d, "--from", "meta", "--out", tmp_path / "o")


# -- GGUF ---------------------------------------------------------------------------------------------------


def _gguf_fields(b: bytes):
  """{key: value offset}, {tensor: (offset-field position, data offset)} of a GGUF v3 file."""
  o = 24
  def rd(fmt):
    nonlocal o
    v = struct.unpack_from(fmt, b, o)[0]
    o += struct.calcsize(fmt)
    return v
  sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
  def skip(t):
    nonlocal o
    if t == 8:
      n = rd("<Q")
      o += n
    elif t == 9:
      et, n = rd("<I"), rd("<Q")
      for _ in range(n):
        skip(et)
    else:
      o += sizes[t]
  n_t, n_kv = struct.unpack_from("<QQ", b, 8)
  kvs, tis = {}, {}
  for _ in range(n_kv):
    n = rd("<Q")
    k = b[o:o + n].decode()
    o += n
    t = rd("<I")
    kvs[k] = o
    skip(t)
  for _ in range(n_t):
    n = rd("<Q")
    name = b[o:o + n].decode()
    o += n
    nd = rd("<I")
    o += 8 * nd + 4
    tis[name] = (o, rd("<Q"))
  return kvs, tis


def test_malformed_gguf(tmp_path, capsys):
  b = open(GGUF, "rb").read()
  kvs, tis = _gguf_fields(b)

  def case(name, data, match):
    (tmp_path / name).write_bytes(data)
    one_line_error(capsys, match, tmp_path / name, "--from", "gguf", "--out", tmp_path / "out")

  def patch(pos, fmt, v):
    d = bytearray(b)
    struct.pack_into(fmt, d, pos, v)
    return bytes(d)
  for cut in (20, 700, 12790, 300000, len(b) - 1):
    case(f"cut{cut}.gguf", b[:cut], "truncated")
  case("last.gguf", b[:-1], "needs")  # the message names the tensor, its size and offset and the file's size
  assert "file has %d" % (len(b) - 1) in one_line_error(capsys, "truncated: tensor", tmp_path / "last.gguf",
                                                         "--from", "gguf", "--out", tmp_path / "out")
  case("heads0.gguf", patch(kvs["llama.attention.head_count"], "<I", 0),
       "llama.attention.head_count must be a positive integer, got 0")
  case("overlap.gguf", patch(tis["blk.0.attn_k.weight"][0], "<Q", tis["blk.0.attn_q.weight"][1]), "overlap")
  case("bos.gguf", patch(kvs["tokenizer.ggml.bos_token_id"], "<I", 10**6),
       "bos_token_id: 1000000 is outside the vocabulary")
  case("count.gguf", patch(8, "<Q", 2**50), "cannot fit in")
  case("misaligned.gguf", patch(tis["output.weight"][0], "<Q", tis["output.weight"][1] + 4), "not aligned")


# -- output paths -------------------------------------------------------------------------------------------


def test_force_never_deletes_an_input(tmp_path, capsys):
  src = tmp_path / "parent" / "model"
  shutil.copytree(HF, src)
  before = sorted(os.listdir(src))
  one_line_error(capsys, "is the input", src, "--from", "hf", "--out", src, "--force")
  one_line_error(capsys, "contains the input", src, "--from", "hf", "--out", tmp_path / "parent", "--force")
  one_line_error(capsys, "lies inside the input", src, "--from", "hf", "--out", src / "sub", "--force")
  assert sorted(os.listdir(src)) == before
  ck = tmp_path / "ck"
  assert convert(capsys, GGUF, "--from", "gguf", "--out", ck)[0] == 0
  rc = cli_dmc.main(["export-hf", str(ck), "--out", str(ck), "--force"])
  assert rc == 2 and "is the input" in capsys.readouterr().err
  checkpoint.Checkpoint(str(ck)).load_params()  # still the checkpoint it was
  rc = cli_dmc.main(["gqa-pool", str(ck), "--kv-heads", "1", "--out", str(ck / "x"), "--force"])
  assert rc == 2 and "lies inside the input" in capsys.readouterr().err


def test_commit_rechecks_and_never_deletes_what_appeared(tmp_path, capsys):
  out = tmp_path / "out"
  converted = gguf_convert.read(GGUF)

  def appear(done, total):  # another program creates --out with a file while we write
    if not out.exists():
      out.mkdir()
      (out / "precious.txt").write_text("keep me")
  with pytest.raises(io_safety.OutputError, match="appeared while this command was writing"):
    checkpoint.write(str(out), converted, on_progress=appear)
  assert (out / "precious.txt").read_text() == "keep me"
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
  # with --force, an output replaced during the write is not deleted either
  out2 = tmp_path / "out2"
  checkpoint.write(str(out2), converted)

  def swap(done, total):
    if (out2 / "checkpoint.json").exists():
      shutil.move(str(out2), str(tmp_path / "moved"))
      out2.mkdir()
      (out2 / "new.txt").write_text("new")
  with pytest.raises(io_safety.OutputError, match="was replaced while"):
    checkpoint.write(str(out2), converted, force=True, on_progress=swap)
  assert (out2 / "new.txt").read_text() == "new"


def test_concurrent_writers_and_stale_siblings(tmp_path, capsys):
  out = tmp_path / "out"
  with io_safety.output_lock(str(out)):  # another convert into the same --out holds the lock
    one_line_error(capsys, "another process is writing it (pid", GGUF, "--from", "gguf", "--out", out)
  stale = tmp_path / ".out.tmp-dead1"  # left by a killed convert
  stale.mkdir()
  (stale / io_safety.MARKER).touch()
  (stale / "params.safetensors").write_bytes(b"x" * 100)
  foreign = tmp_path / ".out.tmp-notours"
  foreign.mkdir()
  rc, err = convert(capsys, GGUF, "--from", "gguf", "--out", out)
  assert rc == 0
  assert not stale.exists() and foreign.exists()  # ours removed, a folder we did not write is left alone
  assert "removed .out.tmp-dead1" in err and "not written by dmc-jax" in err
  assert not (tmp_path / ".out.lock").exists()


def test_filesystem_errors_are_one_line(tmp_path, capsys, monkeypatch):
  import errno
  import tempfile

  from dmc_jax.convert import tensors

  def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(tensors, "write_sharded", enospc)
  monkeypatch.setattr(checkpoint, "write_sharded", enospc)
  line = one_line_error(capsys, "cannot write (No space left on device)", GGUF, "--from", "gguf", "--out",
                        tmp_path / "out")
  assert str(tmp_path / "out") in line
  assert os.listdir(tmp_path) == []  # temp sibling and lock file removed
  monkeypatch.undo()

  def erofs(*a, **k):
    raise OSError(errno.EROFS, "Read-only file system", k.get("dir") or a[-1])
  monkeypatch.setattr(tempfile, "mkdtemp", erofs)
  one_line_error(capsys, "cannot write (Read-only file system)", GGUF, "--from", "gguf", "--out", tmp_path / "o")
  monkeypatch.undo()
  monkeypatch.setattr(os.path, "ismount", lambda p: p == str(tmp_path / "mnt"))
  one_line_error(capsys, "is a mount point", GGUF, "--from", "gguf", "--out", tmp_path / "mnt", "--force")
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".mnt")]


def test_checkpoint_json_that_is_a_list(tmp_path, capsys):
  (tmp_path / "ck").mkdir()
  (tmp_path / "ck" / "checkpoint.json").write_text("[1, 2]")
  rc = cli_dmc.main(["export-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])
  err = capsys.readouterr().err
  assert rc == 2 and "expected a JSON object, got a list" in err and len(err.strip().splitlines()) == 1
