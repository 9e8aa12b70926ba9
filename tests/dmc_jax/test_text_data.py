"""Text data: the stdlib corpus and its fixed split, the local-files builder, packing, grain determinism and resume."""

import json

import numpy as np
import pytest

from dmc_jax import text_data as td


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def stdlib(data_dir):
  return td.open_splits(td.TextSource(), data_dir)


@pytest.fixture(scope="module")
def tok(smollm2_ckpt):
  from dmc_jax.checkpoint import Checkpoint
  return Checkpoint(smollm2_ckpt).tokenizer()


def records(src, key="text"):
  return [td.as_text(src[i][key]) for i in range(len(src))]


def test_stdlib_corpus_is_real_english_with_a_fixed_disjoint_split(stdlib):
  train_keys, val_keys = records(stdlib["train"], "key"), records(stdlib["validation"], "key")
  assert len(train_keys) > 300 and 1 <= len(val_keys) <= 0.05 * len(train_keys)
  # The split is the documented rule on each key, and the stored order is the corpus order.
  corpus = td.stdlib_documents()
  assert [k for k, _ in corpus if td.split_hash(k) >= 0.02] == train_keys
  assert [k for k, _ in corpus if td.split_hash(k) < 0.02] == val_keys
  train_text, val_text = records(stdlib["train"]), records(stdlib["validation"])
  assert not set(train_keys) & set(val_keys) and not set(train_text) & set(val_text)
  assert not any(k.split("/")[0] in ("test", "idlelib", "site-packages") for k in train_keys + val_keys)
  text = "\n".join(train_text)
  assert len(text) > 1_000_000
  by_key = dict(zip(train_keys + val_keys, train_text + val_text))
  assert "JSON (JavaScript Object Notation)" in by_key["json/__init__.py"]
  assert any(k.startswith("pydoc_data/topics.py:") for k in by_key)  # the shipped documentation topics
  words = text.lower().split()
  for w in ("the", "of", "is", "return", "a"):
    assert words.count(w) > 2000, w  # running English prose, not code or tables
  assert sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text) > 0.8 * len(text)


def test_builder_reads_local_txt_and_jsonl_and_prepared_tfds(tmp_path, data_dir):
  folder = tmp_path / "corpus"
  (folder / "sub").mkdir(parents=True)
  (folder / "a.txt").write_text("The first document.\nIt has two lines.\n")
  (folder / "sub" / "b.txt").write_text("A second document in a sub-folder.")
  (folder / "notes.md").write_text("ignored: not .txt/.jsonl")
  (folder / "c.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"text": "Line one of the JSONL file.", "id": 1}, {"text": "   "}, {"text": "Line three."})) + "\n\n")
  extra = tmp_path / "extra.jsonl"
  extra.write_text(json.dumps({"body": "Text under another key."}) + "\n")
  src = td.TextSource(kind="files", paths=(str(folder), str(extra)), text_key="body", validation_fraction=0.3)
  with pytest.raises(td.DataError, match=r"c.jsonl:1: no 'body' key"):
    td.open_splits(src, data_dir)
  (folder / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in (
      "Line one of the JSONL file.", "   ", "Line three.")) + "\n")
  splits = td.open_splits(src, data_dir)
  keys = records(splits["train"], "key") + records(splits["validation"], "key")
  assert sorted(keys) == sorted(["a.txt", "c.jsonl:1", "c.jsonl:3", "sub/b.txt", "extra.jsonl:1"])
  assert set(records(splits["validation"], "key")) == {k for k in keys if td.split_hash(k) < 0.3}
  assert "The first document.\nIt has two lines.\n" in records(splits["train"]) + records(splits["validation"])
  # Prepared once: opening again reuses it; an edited file gives a new dataset.
  builder = td.prepare(src, data_dir)
  assert builder.is_prepared() and td.prepare(src, data_dir).data_dir == builder.data_dir
  (folder / "a.txt").write_text("The first document, edited.")
  assert td.prepare(src, data_dir).data_dir != builder.data_dir
  # The prepared dataset reads back through the TFDS path, as any prepared TFDS dataset does.
  back = td.tfds_source(td.TextSource(kind="tfds", tfds_name=builder.data_dir), "train")
  assert records(back) == records(splits["train"])
  # ... and by its catalog name under data_dir, as c4 or lm1b are read where a user has prepared them.
  name = f"text_documents/{builder.builder_config.name}"
  by_name = td.open_splits(td.TextSource(kind="tfds", tfds_name=name), data_dir)
  assert records(by_name["validation"]) == records(splits["validation"])
  with pytest.raises(td.DataError, match=r"no feature 'content'"):
    td.tfds_source(td.TextSource(kind="tfds", tfds_name=name, text_key="content"), "train", data_dir)


def check_rows(batches, docs_tokens, eos):
  """Packing invariants over a finite, in-order pass; returns the number of rows."""
  rows = {k: np.concatenate([b[k] for b in batches]) for k in td.BATCH_KEYS}
  for v in rows.values():
    assert v.dtype == np.int32 and v.shape == rows["tokens"].shape
  tokens, seg, pos, tgt, mask = (rows[k] for k in ("tokens", "segment_ids", "positions", "targets", "loss_mask"))
  real = seg > 0
  # Every token of the source appears exactly once, in order; each document ends with EOS.
  assert np.array_equal(tokens[real], np.concatenate(docs_tokens))
  assert all(d[-1] == eos for d in docs_tokens)
  for r in range(len(seg)):
    s, p, n = seg[r], pos[r], int(real[r].sum())
    assert not real[r, n:].any() and not tokens[r, n:].any()  # padding only at the end, token 0
    if n == 0:
      continue
    assert s[0] == 1 and set(np.diff(s[:n])) <= {0, 1}  # segments 1, 2, ... in order
    starts = np.r_[True, s[1:n] != s[:n - 1]]
    assert np.all(p[:n][starts] == 0) and np.all(p[:n][~starts] == p[:n - 1][~starts[1:]] + 1)
    # Loss exactly where the next token is in the same document piece; the target is that token.
    want = np.r_[s[1:n] == s[:n - 1], False]  # the last real token's successor is in the next row or padding
    assert np.array_equal(mask[r, :n].astype(bool), want) and not mask[r, n:].any()
    assert np.array_equal(tgt[r, :n - 1][want[:-1]], tokens[r, 1:n][want[:-1]])
    assert not mask[r, -1]
  # No loss across a boundary: a masked-in position never targets the first token of a document.
  assert not (mask[:, :-1].astype(bool) & (seg[:, 1:] != seg[:, :-1])).any()
  return len(seg)


def test_packing_invariants_on_real_text(stdlib, tok):
  val = stdlib["validation"]
  docs_tokens = [td.Tokenize(tok)(val[i])["tokens"] for i in range(len(val))]
  for seq_len, batch in ((128, 8), (37, 3)):
    batches = list(td.eval_batches(val, tok, seq_len=seq_len, batch_size=batch))
    n = check_rows(batches, docs_tokens, tok.eos_token_ids[0])
    assert n == batch * len(batches) and n >= sum(map(len, docs_tokens)) / seq_len
  # Documents longer than a row continue in the next one: the split keeps every token.
  assert max(map(len, docs_tokens)) > 128


def test_train_iterator_is_deterministic_endless_and_resumable(stdlib, tok, tmp_path, data_dir):
  kw = dict(seq_len=64, batch_size=4)
  a, b, c = (td.train_iterator(stdlib["train"], tok, seed=s, **kw) for s in (0, 0, 1))
  first = [next(a) for _ in range(4)]
  for x in first:
    y = next(b)
    assert all(np.array_equal(x[k], y[k]) and x[k].shape == (4, 64) for k in td.BATCH_KEYS)
  assert not np.array_equal(first[0]["tokens"], next(c)["tokens"])
  state = json.loads(json.dumps(a.get_state()))  # the trainer stores it as JSON
  want = [next(a) for _ in range(3)]
  resumed = td.train_iterator(stdlib["train"], tok, seed=0, **kw)
  resumed.set_state(state)
  for x in want:
    y = next(resumed)
    assert all(np.array_equal(x[k], y[k]) for k in td.BATCH_KEYS)
  # A tiny corpus: the iterator runs through many epochs, each in a new order, and resumes mid-epoch.
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"Document number {i} is short."})
                                              for i in range(6)) + "\n")
  small = td.open_splits(td.TextSource(kind="files", paths=(str(tmp_path / "d.jsonl"),)), data_dir)["train"]
  it = td.train_iterator(small, tok, seed=3, seq_len=16, batch_size=2)
  seen = [next(it)["tokens"] for _ in range(20)]
  state = json.loads(json.dumps(it.get_state()))
  nxt = next(it)
  it2 = td.train_iterator(small, tok, seed=3, seq_len=16, batch_size=2)
  it2.set_state(state)
  assert np.array_equal(next(it2)["tokens"], nxt["tokens"])
  stream = np.concatenate([s.ravel() for s in seen])
  assert stream.size > 4 * sum(len(td.Tokenize(tok)(small[i])["tokens"]) for i in range(len(small)))


def test_bad_inputs_are_one_line_errors_naming_the_file_or_key(tmp_path, data_dir):
  from experiments.harness import cli

  def error(src, match):
    with pytest.raises(td.DataError, match=match) as e:
      td.open_splits(src, data_dir)
    assert "\n" not in str(e.value)
    return str(e.value)

  files = lambda *p, **kw: td.TextSource(kind="files", paths=tuple(str(x) for x in p), **kw)
  assert issubclass(td.DataError, cli.user_error_types())
  error(files(tmp_path / "missing.jsonl"), r"missing.jsonl: no such file or folder")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
  error(files(bad), r"bad.jsonl:2: no 'text' key")
  bad.write_text('{"text": "fine"}\n{not json\n')
  error(files(bad), r"bad.jsonl:2: not a JSON line")
  bad.write_text('{"text": 3}\n')
  error(files(bad), r"bad.jsonl:1: 'text' is a int")
  empty = tmp_path / "empty"
  empty.mkdir()
  error(files(empty), r"empty: folder holds no .txt/.jsonl files")
  (empty / "blank.txt").write_text("  \n")
  (empty / "none.jsonl").write_text("\n")
  error(files(empty), r"empty: 0 non-blank document\(s\)")
  (tmp_path / "x.csv").write_text("a,b")
  error(files(tmp_path / "x.csv"), r"x.csv: expected a .txt or .jsonl file")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  error(files(tmp_path / "latin1.txt"), r"latin1.txt: not UTF-8 text")
  error(td.TextSource(kind="web"), r"data.kind: unknown 'web'")
  error(td.TextSource(validation_fraction=0.0), r"data.validation_fraction")
  error(td.TextSource(kind="tfds", tfds_name="no_such_dataset_xyz"), r"tfds 'no_such_dataset_xyz'.*cannot open")
  error(td.TextSource(kind="tfds", tfds_name="lm1b"), r"tfds 'lm1b': not prepared under")


def test_preparing_local_text_says_one_line_of_ours(tmp_path, capfd, caplog):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(f'{{"text": "document number {i} of a tiny corpus"}}\n' for i in range(5)))
  src = td.TextSource(kind="files", paths=(str(path),))
  with caplog.at_level("INFO"):
    splits = td.open_splits(src, str(tmp_path / "data"))
    td.open_splits(src, str(tmp_path / "data"))  # prepared once: the second open says nothing
  out, err = capfd.readouterr()
  assert len(splits["train"]) + len(splits["validation"]) == 5
  msgs = [r.getMessage() for r in caplog.records if r.levelname in ("INFO", "WARNING")]
  assert len(msgs) == 1 and msgs[0].startswith(f"preparing 5 documents from {path} → ") and msgs[0].endswith(
      "(once)"), msgs
  for noise in ("Downloading and preparing", "custom data configuration", "dataset_info.json", "Dataset text"):
    assert noise not in out + err + "".join(msgs)


def test_two_processes_preparing_one_source_both_succeed(tmp_path):
  """Two runs started together (as two retrofit runs were) share one prepared dataset: the second waits on the
  first's lock instead of failing on TFDS's rename onto the first's output."""
  import subprocess
  import sys
  (tmp_path / "docs").mkdir()
  for i in range(40):
    (tmp_path / "docs" / f"{i}.txt").write_text(f"Document number {i}. " * 50)
  code = ("import sys; from dmc_jax import text_data as td; "
          "s = td.open_splits(td.TextSource(kind='files', paths=(sys.argv[1],)), sys.argv[2]); "
          "print(len(s['train']) + len(s['validation']))")
  args = [sys.executable, "-c", code, str(tmp_path / "docs"), str(tmp_path / "tfds")]
  procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-1] == "40"
