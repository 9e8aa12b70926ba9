"""Text for language-model training: documents → TFDS ArrayRecord → tokens packed into fixed-length rows (grain).

* Sources (`TextSource.kind`):
  - `stdlib`: an offline corpus of real English present on every machine — the docstrings of the running
    interpreter's standard library (module, class and function docstrings in source order, one document per
    module; tests, idlelib, lib2to3, encodings etc. skipped; exact duplicates dropped) plus the documentation
    topics shipped in `pydoc_data/topics.py` (one document per topic). It depends on the Python version.
  - `files`: .txt files (one document each), .jsonl files (one document per line, in the field `text_key`), or
    folders of them (walked in sorted order).
  - `tfds`: any prepared TFDS dataset read through `tfds.data_source` (no TensorFlow): a catalog name such as
    `lm1b` or `c4/en` under `data_dir`, or a prepared dataset directory; the text is the feature `text_key`.
* `stdlib` and `files` go through one TFDS builder (ArrayRecord, `Text` feature), prepared once per setting under
  `data_dir` (a hash of the settings, file sizes and mtimes names the TFDS config). Their train/validation split is
  fixed: a document is held out when a stable hash of its key (module path, topic, file path relative to the
  folder given, plus the line for JSONL) falls below `validation_fraction`; if no document or every document
  does, the one with the smallest hash alone is held out.
* Packing: each document is tokenised (with the tokenizer's own special tokens, e.g. Llama's BOS) and followed by
  EOS when the tokenizer has one; documents are concatenated and split into rows of `seq_len` (grain's
  concat-then-split: nothing is dropped, a long document continues in the next row). Per row: `segment_ids`
  1, 2, ... per document piece (0 = padding), `positions` restart at 0 for each piece, `targets` is the next token
  and `loss_mask` is 0 where the next token belongs to another piece or is padding (so the last position of a row
  carries no loss). All arrays are int32 [B, L].
* Training batches come from an endless, deterministic grain iterator (shuffled documents, a new order each
  epoch) whose `get_state()`/`set_state()` are JSON-serialisable, so the trainer checkpoints it.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import sys
import sysconfig
from typing import Any, Iterator

import numpy as np

from dmc_jax import io_safety
from dmc_jax.errors import DataError
from dmc_jax.tokenizer import Tokenizer

log = logging.getLogger("dmc_jax")

KINDS = ("stdlib", "files", "tfds")
TEXT_EXTS = (".txt", ".jsonl")
# Bump when the stdlib extraction rules change (part of the prepared dataset's name).
STDLIB_RULES = "1"
# Standard-library folders that hold tests, tools, generated codecs or vendored code rather than documentation.
STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "encodings", "ensurepip",
                         "site-packages", "dist-packages", "lib-dynload", "pydoc_data", "__pycache__", "__phello__"})
MIN_DOCSTRING_CHARS = 40  # one-liners like "Return self." are noise, not English
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class TextSource:
  """Where the documents come from (see the module docstring)."""
  kind: str = "stdlib"  # "stdlib" | "files" | "tfds"
  paths: tuple[str, ...] = ()  # files: .txt/.jsonl files or folders of them
  tfds_name: str = ""  # tfds: catalog name ("lm1b", "c4/en:3.1.0") or a prepared dataset directory
  text_key: str = "text"  # JSONL field / TFDS feature holding the text
  train_split: str = "train"  # tfds only; stdlib/files always store "train" and "validation"
  validation_split: str = "validation"
  validation_fraction: float = 0.02  # stdlib/files: share of documents held out by key hash


def default_data_dir() -> str:
  return os.environ.get("DMC_JAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dmc-jax", "tfds")


# -- documents ----------------------------------------------------------------------------------------------


def _docstrings(node: ast.AST) -> Iterator[str]:
  """Docstrings of a module and every class/function in it, in source order."""
  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
    doc = ast.get_docstring(node, clean=True)
    if doc:
      yield doc
  for child in ast.iter_child_nodes(node):
    yield from _docstrings(child)


@functools.lru_cache(maxsize=1)  # parsing ~1000 modules takes seconds; the result is fixed per interpreter
def stdlib_documents() -> tuple[tuple[str, str], ...]:
  """(key, text) of the standard-library corpus, in a fixed order."""
  root = sysconfig.get_paths()["stdlib"]
  seen: set[str] = set()
  docs = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-"))
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      try:
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read(), filename=path)
      except (SyntaxError, UnicodeDecodeError, ValueError):  # e.g. a stray python2 file in a vendor's build
        continue
      parts = []
      for doc in _docstrings(tree):
        if len(doc) >= MIN_DOCSTRING_CHARS and doc not in seen:
          seen.add(doc)
          parts.append(doc)
      if parts:
        docs.append((os.path.relpath(path, root).replace(os.sep, "/"), "\n\n".join(parts)))
  try:
    topics = importlib.import_module("pydoc_data.topics").topics
  except ImportError:  # some distributions split the docs out; the docstrings still make a corpus
    topics = {}
  for name in sorted(topics):
    text = topics[name].strip()
    if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
      seen.add(text)
      docs.append((f"pydoc_data/topics.py:{name}", text))
  return tuple(docs)


def _input_files(paths: tuple[str, ...]) -> list[tuple[str, str]]:
  """(path, split key) of every input file: folders are walked in sorted order; keys are folder-relative."""
  if not paths:
    raise DataError("data.paths: empty (give .txt/.jsonl files or folders of them)")
  out = []
  for arg in paths:
    if os.path.isdir(arg):
      found = []
      for folder, dirs, files in os.walk(arg):
        dirs.sort()
        found += [os.path.join(folder, n) for n in sorted(files) if n.endswith(TEXT_EXTS)]
      if not found:
        raise DataError(f"{arg}: folder holds no {'/'.join(TEXT_EXTS)} files")
      out += [(p, os.path.relpath(p, arg).replace(os.sep, "/")) for p in found]
    elif os.path.isfile(arg):
      if not arg.endswith(TEXT_EXTS):
        raise DataError(f"{arg}: expected a {' or '.join(TEXT_EXTS)} file")
      out.append((arg, os.path.basename(arg)))
    else:
      raise DataError(f"{arg}: no such file or folder")
  return out


def file_documents(paths: tuple[str, ...], text_key: str) -> Iterator[tuple[str, str, str]]:
  """(split key, unique key, text) of every non-blank document in the files, in order."""
  for path, key in _input_files(paths):
    try:
      with open(path, encoding="utf-8") as f:
        if path.endswith(".txt"):
          text = f.read()
          if text.strip():
            yield key, os.path.abspath(path), text
          continue
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            rec = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
          if not isinstance(rec, dict) or text_key not in rec:
            raise DataError(f"{path}:{n}: no {text_key!r} key (set data.text_key to the field holding the text)")
          text = rec[text_key]
          if not isinstance(text, str):
            raise DataError(f"{path}:{n}: {text_key!r} is a {type(text).__name__}, expected a string")
          if text.strip():
            yield f"{key}:{n}", f"{os.path.abspath(path)}:{n}", text
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def documents(src: TextSource) -> Iterator[tuple[str, str, str]]:
  if src.kind == "stdlib":
    return ((k, k, t) for k, t in stdlib_documents())
  if src.kind == "files":
    return file_documents(src.paths, src.text_key)
  raise DataError(f"data.kind: {src.kind!r} has no local documents")


def split_hash(key: str) -> float:
  """A stable number in [0, 1) per document key (fixed across machines and Python runs)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


# -- the TFDS builder ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # TFDS registers builder classes by name: define it once
def _builder_class():
  import tensorflow_datasets as tfds

  class TextDocuments(tfds.core.GeneratorBasedBuilder):
    """Documents of local text/JSONL files or of the stdlib corpus (see dmc_jax/text_data.py)."""
    VERSION = tfds.core.Version("1.0.0")
    # Not a catalog dataset: no checksums file next to the code (finding one needs importlib_resources).
    code_path = None

    def __init__(self, *, source: TextSource, name: str, held_out: str | None, **kwargs):
      self.source, self.held_out = source, held_out
      super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=json.dumps(dataclasses.asdict(self.source)),
                                   features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                                        "key": tfds.features.Text()}),
                                   disable_shuffling=True)  # keep corpus order; training shuffles with grain

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(False), "validation": self._generate_examples(True)}

    def _generate_examples(self, validation: bool):
      for split_key, key, text in documents(self.source):
        if _is_validation(split_key, self.source.validation_fraction, self.held_out) == validation:
          yield key, {"text": text, "key": split_key}

  return TextDocuments


def _is_validation(split_key: str, fraction: float, held_out: str | None) -> bool:
  return split_key == held_out if held_out is not None else split_hash(split_key) < fraction


def _settings_name(src: TextSource) -> str:
  """TFDS config name: the settings plus what identifies the inputs (interpreter version; file sizes, mtimes)."""
  blob: dict[str, Any] = {"kind": src.kind, "fraction": src.validation_fraction}
  if src.kind == "stdlib":
    blob.update(python=sys.version, rules=STDLIB_RULES)
  else:
    blob.update(text_key=src.text_key, files=[(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns)
                                              for p, _ in _input_files(src.paths)])
  return src.kind + "-" + hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def _held_out_key(src: TextSource) -> tuple[str | None, int]:
  """(None when the hash split gives both splits a document, else the one key that alone is held out; the number
  of documents)."""
  n = n_val = 0
  smallest = None
  for split_key, _, _ in documents(src):
    h = split_hash(split_key)
    n += 1
    n_val += h < src.validation_fraction
    smallest = min(smallest or (h, split_key), (h, split_key))
  where = "stdlib corpus" if src.kind == "stdlib" else ", ".join(src.paths)
  if n < 2:
    raise DataError(f"{where}: {n} non-blank document(s); need at least 2 for a train/validation split")
  return (None if 0 < n_val < n else smallest[1]), n


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS narrates building a local dataset as if it downloaded one ("Downloading and preparing dataset Unknown
  size", "Using custom data configuration", "Variant folder ... has no dataset_info.json"); none of it helps a user
  here, so its loggers and prints are silenced while it builds (errors still raise)."""
  import logging as _logging
  loggers = [_logging.getLogger(n) for n in ("tensorflow_datasets", "absl")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(_logging.ERROR)
  try:
    from absl import logging as absl_logging
    absl_level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    absl_logging = None
  try:
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
    if absl_logging is not None:
      absl_logging.set_verbosity(absl_level)


def prepare(src: TextSource, data_dir: str | None = None):
  """Builds the ArrayRecord dataset of a stdlib/files source once (cached by its settings); returns the builder."""
  import tensorflow_datasets as tfds
  if not 0 < src.validation_fraction < 1:
    raise DataError(f"data.validation_fraction: {src.validation_fraction} is not in (0, 1)")
  data_dir = data_dir or default_data_dir()
  name = _settings_name(src)
  tfds.disable_progress_bar()
  cls = _builder_class()
  # Two runs started together would both prepare, and the second's rename onto the first's output fails: the
  # second waits for the first and then finds the dataset prepared.
  with io_safety.waiting_lock(os.path.join(data_dir, f".{name}.prepare.lock")):
    return _prepare_locked(cls, src, name, data_dir)


def _prepare_locked(cls, src: TextSource, name: str, data_dir: str):
  with _quiet_tfds():
    builder = cls(source=src, name=name, held_out=None, data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  if not prepared:
    # A first pass checks every input (one-line errors before TFDS writes anything) and fixes the split.
    held_out, n = _held_out_key(src)
    where = "the stdlib corpus" if src.kind == "stdlib" else ", ".join(src.paths)
    log.info("preparing %d documents from %s → %s (once)", n, where, os.path.join(data_dir, builder.name, name))
    with _quiet_tfds():
      builder = cls(source=src, name=name, held_out=held_out, data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare()
  return builder


def open_splits(src: TextSource, data_dir: str | None = None) -> dict[str, Any]:
  """{"train": source, "validation": source}: random-access sources of records holding `src.text_key` (or "text")."""
  if src.kind not in KINDS:
    raise DataError(f"data.kind: unknown {src.kind!r}; expected one of {list(KINDS)}")
  if src.kind != "tfds":
    srcs = prepare(src, data_dir).as_data_source()
    return {"train": srcs["train"], "validation": srcs["validation"]}
  return {"train": tfds_source(src, src.train_split, data_dir),
          "validation": tfds_source(src, src.validation_split, data_dir)}


def tfds_source(src: TextSource, split: str, data_dir: str | None = None):
  """One split of a prepared TFDS dataset, read without TensorFlow; checks that it holds `text_key`."""
  import tensorflow_datasets as tfds
  name = src.tfds_name
  if not name:
    raise DataError("data.tfds_name: empty (a catalog name such as 'lm1b' or a prepared dataset directory)")
  try:
    if os.path.isdir(name):
      builder = tfds.builder_from_directory(name)
    else:
      builder = tfds.builder(name, data_dir=data_dir)
      if not builder.is_prepared():
        raise DataError(f"tfds {name!r}: not prepared under {builder.data_dir} (prepare it where the data is, "
                        "with file_format='array_record', and point data_dir at it)")
    if split not in builder.info.splits:
      raise DataError(f"tfds {name!r}: no split {split!r} (splits: {', '.join(sorted(builder.info.splits))})")
    ds = builder.as_data_source(split=split)
  except DataError:
    raise
  except Exception as e:  # TFDS raises many types (not found, not prepared, bad split); all mean "cannot read"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"tfds {name!r} split {split!r}: cannot open ({first})") from None
  if len(ds) == 0:
    raise DataError(f"tfds {name!r} split {split!r}: empty")
  rec = ds[0]
  if not isinstance(rec, dict) or src.text_key not in rec:
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise DataError(f"tfds {name!r}: no feature {src.text_key!r} (features: {keys}; set data.text_key)")
  return ds


# -- tokenise, pack, batch ----------------------------------------------------------------------------------


def as_text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Tokenize:
  """record → {"tokens": int32 ids of the document, then EOS when the tokenizer has one}."""
  tokenizer: Tokenizer
  text_key: str = "text"

  def __call__(self, record: Any) -> dict[str, np.ndarray]:
    text = as_text(record[self.text_key] if isinstance(record, dict) else record)
    ids = self.tokenizer.encode(text)
    eos = self.tokenizer.eos_token_ids
    if eos and (not ids or ids[-1] != eos[0]):
      ids = ids + [eos[0]]
    return {"tokens": np.asarray(ids, np.int32)}


def lm_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row (grain's tokens/_segment_ids/_positions) → the model's next-token inputs and targets."""
  tokens = np.asarray(packed["tokens"], np.int32)
  seg = np.asarray(packed["tokens_segment_ids"], np.int32)
  targets = np.zeros_like(tokens)
  targets[:-1] = tokens[1:]
  # A target counts only inside one document piece: never across a boundary, never onto padding (segment 0).
  loss_mask = np.zeros_like(tokens)
  loss_mask[:-1] = (seg[:-1] == seg[1:]) & (seg[:-1] != 0)
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg,
          "positions": np.asarray(packed["tokens_positions"], np.int32)}


def _packed(ds, seq_len: int):
  import grain
  from grain.experimental import ConcatThenSplitIterDataset
  if seq_len < 2:
    raise DataError(f"seq_len: {seq_len}, need at least 2 (a token and its target)")
  ds = ds.filter(lambda x: len(x["tokens"]) > 0)  # e.g. empty text from a TFDS dataset, with no EOS to add
  # grain reads ahead 500 elements on 16 threads by default: whole corpora of tokenisation before the first batch.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
  return ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len}).map(lm_row)


def _slices_as_tuples(state: Any) -> Any:
  """grain 0.2's packing tests `slice != (-1, -1)`, which a JSON round trip (tuples → lists) breaks."""
  if not isinstance(state, dict):
    return state
  return {k: ({f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices" else _slices_as_tuples(v))
          for k, v in state.items()}


class Batches:
  """grain's iterator, whose state may come back from JSON (the trainer stores it so)."""

  def __init__(self, it):
    self._it = it

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(_slices_as_tuples(state))


def train_iterator(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   text_key: str = "text"):
  """An endless, deterministic iterator of int32 [B, L] batches (BATCH_KEYS); get_state()/set_state() resume it."""
  import grain
  if len(source) == 0:
    raise DataError("training split is empty")
  # Shuffle before repeat: grain reshuffles every epoch with a seed derived from `seed`.
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None).map(Tokenize(tokenizer, text_key))
  return Batches(iter(_packed(ds, seq_len).batch(batch_size, drop_remainder=True)))


def eval_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, max_batches: int = 0,
                 text_key: str = "text") -> Iterator[dict[str, np.ndarray]]:
  """One pass over a split in stored order; the last batch is filled up with padding rows (loss_mask 0)."""
  import grain
  ds = grain.MapDataset.source(source).map(Tokenize(tokenizer, text_key))
  rows = iter(_packed(ds, seq_len))
  done = 0
  while not max_batches or done < max_batches:
    batch = [row for _, row in zip(range(batch_size), rows)]
    if not batch:
      return
    pad = {k: np.zeros_like(v) for k, v in batch[0].items()}
    batch += [pad] * (batch_size - len(batch))
    yield {k: np.stack([r[k] for r in batch]) for k in BATCH_KEYS}
    done += 1
