"""The Python API: load / generate / score, and the cache-selection contract."""

import importlib

import numpy as np
import pytest

import dmc_jax
from dmc_jax.api import CacheChoice, resolve_cache


@pytest.mark.parametrize("method, kwargs, want", [
    (None, {}, CacheChoice("vanilla")),
    ("dmc", {}, CacheChoice("dmc")),
    (None, {"dmc_force_cr": 4}, CacheChoice("dmc", force_cr=4.0)),
    ("dms", {"dmc_force_cr": 4}, CacheChoice("dms", force_cr=4.0)),  # forced evictions
    (None, {"cache": "dms", "dmc_force_cr": 2}, CacheChoice("dms", force_cr=2.0)),
    ("dmc", {"cache": "vanilla"}, CacheChoice("vanilla")),
    (None, {"cache": "h2o", "cr": 3}, CacheChoice("h2o", cr=3.0)),
])
def test_cache_contract(method, kwargs, want):
  assert resolve_cache(method, **kwargs) == want


@pytest.mark.parametrize("method, kwargs, message", [
    ("dmc", {"cr": 2}, "compresses at the model's own learned ratio"),
    (None, {"cache": "dmc", "cr": 2}, "use dmc_force_cr="),
    (None, {"cr": 2}, "the vanilla cache does not compress"),
    (None, {"cache": "tova"}, "needs its target ratio cr="),
    (None, {"cache": "h2o", "cr": 0.5}, "expected a finite ratio >= 1"),
    (None, {"cache": "h2o", "dmc_force_cr": 2, "cr": 2}, "cannot be used with cache='h2o'"),
    (None, {"cache": "lru"}, "cache: unknown 'lru'"),
])
def test_cache_contract_errors(method, kwargs, message):
  with pytest.raises(dmc_jax.ArgumentError, match=message):
    resolve_cache(method, **kwargs)


def test_load_generate_and_score(tiny_checkpoint):
  model = dmc_jax.load(tiny_checkpoint)
  assert model.method is None and "im_start" in model.chat_template
  out = model.generate(["Hello world", "A much longer prompt than the first"], max_new_tokens=4,
                       stop_at_eos=False)
  assert len(out) == 2 and all(isinstance(t, str) for t in out)
  c = model.complete("Hello world", max_new_tokens=4, stop_at_eos=False)
  assert len(c.tokens[0]) == 4 and c.texts[0] == out[0]  # greedy: batch-mates do not change a sequence's text
  # The same generator (compiled functions) serves repeated calls with the same cache choice.
  assert model.generator(c.cache) is c.generator
  texts = ["The quick brown fox jumps over the lazy dog.", "Hello there, friend"]
  ll = model.loglikelihood(texts)
  ids = [model.encode(t) for t in texts]
  rows = model.score([(i[:-1], i[1:]) for i in ids])
  assert np.allclose(ll, [lp.sum() for lp, _ in rows])
  n = sum(len(i) - 1 for i in ids)
  assert model.perplexity(texts) == pytest.approx(np.exp(-sum(ll) / n), rel=1e-6)
  # An eviction policy at CR 1 keeps everything: the same scores as vanilla.
  assert np.allclose(model.loglikelihood(texts, cache="streaming", cr=1), ll, atol=1e-4)
  with pytest.raises(dmc_jax.ArgumentError, match="no DMC settings"):
    model.perplexity(texts, cache="dmc")
  with pytest.raises(dmc_jax.ArgumentError, match="max_new_tokens"):
    model.generate("x", max_new_tokens=0)
  with pytest.raises(dmc_jax.CheckpointError, match="not a directory"):  # adapters: tests/dmc_jax/test_retrofit.py
    dmc_jax.load(tiny_checkpoint, adapter="a")


def test_fitted_page_size(tiny_checkpoint):
  from dmc_jax.cache import fitted_page_size
  assert [fitted_page_size(n) for n in (1, 128, 129, 256, 257, 4096)] == [8, 8, 16, 16, 32, 32]
  model = dmc_jax.load(tiny_checkpoint)
  kw = dict(max_new_tokens=12, stop_at_eos=False, dmc_force_cr=2)
  fitted, whole = model.complete("Hello world", **kw), model.complete("Hello world", page_size=32, **kw)
  assert fitted.generator.dmc.page_size == 8 and whole.generator.dmc.page_size == 32
  assert fitted.tokens == whole.tokens  # the page size changes where slots live, not what attention sees
  assert fitted.result.dmc["cr"]["overall"] == pytest.approx(whole.result.dmc["cr"]["overall"])
  assert fitted.result.cache_bytes < whole.result.cache_bytes


def test_root_reexports():
  from dmc_jax.checkpoint import Checkpoint
  from dmc_jax.config import DMCConfig, LlamaConfig
  from dmc_jax.generate import Generator
  from dmc_jax.model.llama import Llama
  assert (dmc_jax.Checkpoint, dmc_jax.LlamaConfig, dmc_jax.DMCConfig, dmc_jax.Generator, dmc_jax.Llama) == (
      Checkpoint, LlamaConfig, DMCConfig, Generator, Llama)
  assert issubclass(dmc_jax.CheckpointError, dmc_jax.UserError) and callable(dmc_jax.convert)
  importlib.import_module("dmc_jax.convert.hf")  # rebinds dmc_jax.convert to the package: still callable
  assert callable(dmc_jax.convert)
