"""`dmc-jax bench`'s equal-memory decode comparison: every cache fits the budget, batches follow the CR; the
same-batch rows and every row's roofline."""

import jax
import numpy as np
import pytest

from experiments.bench import dmc as bench_dmc


@pytest.mark.slow  # 25 s: every cache's decode compiled
def test_equal_memory_decode_sizes_every_cache_to_the_budget():
  budget, context, steps = 4 * 2**20, 64, 2
  rows = bench_dmc.decode_equal_memory("smollm2-135m@1", budget=budget, context=context, steps=steps, crs=[2.0],
                                       dtype="float32", page_size=32, attention_impl=None,
                                       policies=["h2o", "streaming"], same_batch=True, repeats=2, copy_bw=2e10,
                                       matmul_flops=1e11)
  by = {r["method"]: r for r in rows if r["group"] == "decode"}
  assert list(by) == ["vanilla", "dmc cr 2", "h2o cr 2", "streaming cr 2"]
  assert all(0 < r["kv_bytes"] <= budget and r["tokens_per_s"] > 0 for r in by.values())
  vanilla = by["vanilla"]
  assert vanilla["realised_cr"] == 1 and vanilla["ratio_vs_vanilla"] == 1
  # The policies' compact cache: ceil(67 / 2) + 1 = 35 slots for 67 tokens, plus 9 bytes of state on a 512-byte
  # slot, so ≈ 1.88× vanilla's batch; each row holds exactly ceil(67 / 2) = 34 entries at the end (checked inside).
  for name in ("h2o cr 2", "streaming cr 2"):
    assert 1.85 <= by[name]["batch"] / vanilla["batch"] <= 1.92
    assert abs(by[name]["realised_cr"] - 67 / 34) < 1e-9
  # DMC pays for whole 32-slot pages, merge state and a 6-sigma margin: at 67 tokens fewer sequences than vanilla.
  assert 0 < by["dmc cr 2"]["batch"] < vanilla["batch"]

  same = {r["method"]: r for r in rows if r["group"] == "same_batch"}
  assert list(same) == ["vanilla", "dmc cr 1", "dmc cr 2", "h2o cr 2", "streaming cr 2"]
  assert all(r["batch"] == vanilla["batch"] and r["context"] == context for r in same.values())
  assert same["dmc cr 1"]["realised_cr"] == 1  # forced merge rate 0: every token its own slot
  for r in rows:
    assert r["repeats"] == 2 and r["ms_spread"] >= 0
    # Every weight is read once; what differs between rows at one batch is the K/V (and state) in use.
    assert r["bytes_read"] > 4 * bench_dmc.matmul_params(bench_dmc.model_config("smollm2-135m@1", "float32", None))
    assert r["roofline_ms"] > 0 and r["roofline_fraction"] == r["roofline_ms"] / r["ms_per_step"]
  assert same["dmc cr 2"]["bytes_read"] < same["dmc cr 1"]["bytes_read"]
  assert same["dmc cr 2"]["flops"] < same["dmc cr 1"]["flops"]
  assert abs(same["dmc cr 1"]["flops"] - same["vanilla"]["flops"]) < 0.05 * same["vanilla"]["flops"]

  table = bench_dmc.tables({"device": "cpu", "platform": "cpu", "jax": "x", "copy_bandwidth_GBps": 1.0,
                            "matmul_GFLOPs": 100.0, "context": context, "steps": steps, "repeats": 2,
                            "dtype": "float32", "decode_impl": "xla",
                            "decode": [dict(r, budget_mb=4) for r in rows if r["group"] == "decode"],
                            "same_batch": [r for r in rows if r["group"] == "same_batch"], "kernel": [], "train": []})
  assert "| h2o cr 2 |" in table and "Same batch" in table and "| dmc cr 1 |" in table


@pytest.mark.slow  # 37 s on 2 busy cores: a whole-model compile with the interpreted kernel inside
def test_equal_memory_decode_with_the_tpu_kernel(monkeypatch):
  """`bench --impl tpu`: the DMC rows decode through the Pallas TPU kernel (interpreted here: the timings mean
  nothing off a TPU, the sizing and the cache checks still hold)."""
  from pallas_kernels.dmc_decode import tpu
  calls, kernel = [], tpu.paged_decode_attention
  monkeypatch.setattr(tpu, "paged_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  budget = 2 * 2**20
  rows = bench_dmc.decode_equal_memory("smollm2-135m@1", budget=budget, context=32, steps=1, crs=[4.0],
                                       dtype="float32", page_size=16, attention_impl="tpu", policies=[])
  assert [r["method"] for r in rows] == ["vanilla", "dmc cr 4"]
  assert all(0 < r["kv_bytes"] <= budget and r["tokens_per_s"] > 0 for r in rows)
  assert rows[1]["realised_cr"] > 1.5 and calls, rows[1]


@pytest.fixture(scope="module")
def merging_checkpoint(tiny_checkpoint, tmp_path_factory):
  """tiny_checkpoint with DMC settings and its decision channel (the last of each key head) scaled so it merges."""
  from helpers import write_checkpoint

  from dmc_jax.checkpoint import Checkpoint
  from dmc_jax.config import DMCConfig
  ckpt = Checkpoint(tiny_checkpoint)
  params = jax.tree.map(np.array, ckpt.load_params())
  for i in range(ckpt.config.n_layers):
    params["params"][f"layers_{i}"]["attn"]["k_proj"]["kernel"][:, :, -1] *= 400
  return write_checkpoint(tmp_path_factory.mktemp("bench") / "dmc", ckpt.config, params, tiny_checkpoint,
                          dmc=DMCConfig(window=4).to_dict())


@pytest.fixture(scope="module")
def evicting_checkpoint(tiny_checkpoint, tmp_path_factory):
  """tiny_checkpoint with DMS settings (window 4); its decision channel (100 · q[-1] − 5 of each group's first
  query head) scaled so that about half the tokens are marked for eviction."""
  from helpers import write_checkpoint

  from dmc_jax.checkpoint import Checkpoint
  from dmc_jax.config import DMCConfig
  ckpt = Checkpoint(tiny_checkpoint)
  params = jax.tree.map(np.array, ckpt.load_params())
  for i in range(ckpt.config.n_layers):
    params["params"][f"layers_{i}"]["attn"]["q_proj"]["kernel"][:, :, -1] *= 10
  return write_checkpoint(tmp_path_factory.mktemp("bench") / "dms", ckpt.config, params, tiny_checkpoint,
                          dmc=DMCConfig(method="dms", dms_window=4).to_dict())


@pytest.mark.slow  # 162 s (each method) on the loaded 2 cores: the prefill and decode compiles of four cases
@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_ckpt_rows_decode_a_checkpoints_own_decisions(method, request, tiny_checkpoint, monkeypatch):
  """`bench --ckpt`: the checkpoint's own decisions (DMC merges or DMS evictions) after a real-text prefill, at
  vanilla's batch and at the batch its realised CR fits; a checkpoint without a learned cache is refused in one
  line."""
  import argparse
  import inspect
  import json as json_module

  from dmc_jax import text_data
  from dmc_jax.errors import ArgumentError
  # Real text, but a few modules' docstrings: parsing the whole standard library takes longer than this test.
  docs = tuple((m.__name__, inspect.getdoc(m)) for m in (argparse, inspect, json_module, text_data))
  monkeypatch.setattr(text_data, "stdlib_documents", lambda: docs)
  budget, context, steps = 2**17, 64, 2
  learned = request.getfixturevalue("merging_checkpoint" if method == "dmc" else "evicting_checkpoint")
  rows = bench_dmc.ckpt_decode(learned, adapter=None, cache=None, budget=budget, context=context,
                               steps=steps, dtype="float32", page_size=8, attention_impl=None, repeats=2,
                               copy_bw=2e10, matmul_flops=1e11)
  by = {(r["group"], r["method"]): r for r in rows}
  label = f"{method} ckpt"
  assert list(by) == [("same_batch", "vanilla"), ("same_batch", label), ("decode", "vanilla"), ("decode", label)]
  vanilla, same, fitted = by["decode", "vanilla"], by["same_batch", label], by["decode", label]
  assert 0 < vanilla["kv_bytes"] <= budget and vanilla["ratio_vs_vanilla"] == 1
  assert same["batch"] == vanilla["batch"] and same["context"] == context
  # Its decisions merge or evict some tokens: fewer slots than tokens, so less K/V read and attended than vanilla.
  assert same["realised_cr"] > 1 and same["flops"] < by["same_batch", "vanilla"]["flops"]
  # The fitted batch fills the budget: it fits, and two more sequences of its size would not.
  per_seq = fitted["kv_bytes"] / fitted["batch"]
  assert 0 < fitted["kv_bytes"] <= budget < fitted["kv_bytes"] + 2 * per_seq
  assert fitted["realised_cr"] > 1
  for r in rows:
    assert r["repeats"] == 2 and r["ms_per_step"] > 0 and r["ms_spread"] >= 0
    assert r["bytes_read"] > 0 and r["flops"] > 0
    assert r["roofline_ms"] > 0 and r["roofline_fraction"] == r["roofline_ms"] / r["ms_per_step"]
  with pytest.raises(ArgumentError, match="no learned DMC/DMS decisions"):
    bench_dmc.ckpt_decode(tiny_checkpoint, adapter=None, cache=None, budget=budget, context=context, steps=steps,
                          dtype="float32", page_size=8, attention_impl=None)


@pytest.mark.parametrize("argv, message", [(["--cache", "dmc"], "give --ckpt DIR"),
                                           (["--ckpt", "x", "--ckpt-budget-mb", "0"], "--ckpt-budget-mb")])
def test_ckpt_arguments_are_checked_in_one_line(argv, message, capsys):
  from experiments.cli import dmc as cli_dmc
  assert cli_dmc.main(["bench", *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
