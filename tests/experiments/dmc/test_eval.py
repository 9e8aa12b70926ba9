"""dmc-jax eval and report: perplexity on the same held-out tokens for every method, realised CR, the report."""

import argparse
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_checkpoint

from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model.llama import Llama
from experiments.cli import dmc as cli_dmc
from experiments.dmc import eval as eval_dmc

DMC = DMCConfig(window=4)
EVAL = ["--tokens", "256", "--seq-len", "128"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_ckpt):
  """A 2-layer random model with SmolLM2's real tokenizer and DMC settings; decision rows scaled so it merges."""
  from dmc_jax import checkpoint
  real = checkpoint.Checkpoint(smollm2_ckpt).config
  cfg = LlamaConfig(vocab_size=real.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    bos_token_id=real.bos_token_id, eos_token_ids=real.eos_token_ids)
  p = jax.tree.map(np.array, nn.unbox(jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
  for i in range(cfg.n_layers):
    p["params"][f"layers_{i}"]["attn"]["k_proj"]["kernel"][:, :, -1] *= 400
  d = tmp_path_factory.mktemp("eval")
  return write_checkpoint(d / "tiny", cfg, p, smollm2_ckpt, dmc=DMC.to_dict()), cfg, p, d


@pytest.fixture(scope="module")
def result(tiny):
  path, _, _, d = tiny
  out = str(d / "a.json")
  args = ["eval", path, "--dmc", "--policy", "tova", "--policy", "streaming", "--cr", "1", "--cr", "2", *EVAL,
          "--out", out]
  assert cli_dmc.main(args) == 0
  return json.load(open(out))


def _batches(path):
  from dmc_jax import checkpoint
  a = argparse.Namespace(data_kind="stdlib", data_path=[], data_dir=None, seq_len=128, batch_size=1, tokens=256)
  return eval_dmc.held_out_batches(checkpoint.Checkpoint(path).tokenizer(), a)


def test_every_method_on_the_same_tokens_vanilla_and_dmc_match_direct_forwards(tiny, result):
  path, cfg, params, _ = tiny
  rows = {(r["method"], r["cr_target"]): r for r in result["rows"]}
  assert set(rows) == {("vanilla", 1.0), ("dmc", None), ("tova", 1.0), ("tova", 2.0), ("streaming", 1.0),
                       ("streaming", 2.0)}
  batches = _batches(path)
  assert result["tokens_scored"] == sum(int(b["loss_mask"].sum()) for b in batches) > 200
  assert result["tokens_sha256"] == eval_dmc.tokens_digest(batches)
  nll, merges, valid = 0.0, 0.0, 0
  for b in batches:
    logp = jax.nn.log_softmax(Llama(cfg).apply(params, b["tokens"], segment_ids_BxL=b["segment_ids"]), -1)
    nll -= float(jnp.sum(jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["loss_mask"]))
    _, aux = Llama(cfg, DMC, "eval").apply(params, b["tokens"], segment_ids_BxL=b["segment_ids"])
    merges += float(jnp.sum(aux["alpha"] * (b["segment_ids"] > 0)[None, :, :, None]))
    valid += int((b["segment_ids"] > 0).sum())
  assert rows[("vanilla", 1.0)]["ppl"] == pytest.approx(math.exp(nll / result["tokens_scored"]), rel=1e-5)
  n = valid * cfg.n_layers * cfg.n_kv_heads
  assert rows[("dmc", None)]["realised_cr"] == pytest.approx(n / (n - merges), abs=1e-4)
  assert rows[("dmc", None)]["realised_cr"] > 1.3
  # Document pieces of the packed rows: a policy keeps ceil(T / CR) of T entries (per layer and head).
  lengths = [c for b in batches for c in np.unique(b["segment_ids"][b["segment_ids"] > 0], return_counts=True)[1]]
  for name in ("tova", "streaming"):
    assert rows[(name, 1.0)]["ppl"] == pytest.approx(rows[("vanilla", 1.0)]["ppl"], rel=1e-5)
    assert rows[(name, 1.0)]["realised_cr"] == 1.0
  want = sum(lengths) / sum(math.ceil(t / 2) for t in lengths)
  assert rows[("tova", 2.0)]["realised_cr"] == pytest.approx(want, abs=1e-4)
  assert abs(rows[("tova", 2.0)]["nll"] - rows[("vanilla", 1.0)]["nll"]) > 1e-5  # random model: a small effect


def test_report_table_plot_and_refusals(tiny, result, capsys):
  path, cfg, _, d = tiny
  b = str(d / "b.json")
  assert cli_dmc.main(["eval", path, "--label", "GQA", "--base-kv-heads", "4", *EVAL, "--out", b]) == 0
  gqa = json.load(open(b))["rows"]
  assert [(r["method"], r["cr_target"], r["realised_cr"]) for r in gqa] == [("gqa", 2.0, 2.0)]
  assert cli_dmc.main(["report", str(d / "a.json"), b, "--out", str(d / "report")]) == 0
  md = open(d / "report" / "report.md").read()
  assert "| GQA | 2 | 2.00 |" in md and "| TOVA on tiny | 2 |" in md and "| tiny | — |" in md
  # The DMC checkpoint's vanilla row is its weights without the cache, and is labelled so (once); it is the
  # default reference of that file's rows (the DMC row, the policies).
  assert md.count("| tiny, vanilla attention | 1 | 1.00 |") == 1
  assert md.count("| tiny, vanilla attention | +") + md.count("| tiny, vanilla attention | -") == 5
  assert cli_dmc.main(["report", str(d / "a.json"), b, "--out", str(d / "r3"), "--pair", "tiny=GQA"]) == 0
  assert re.search(r"^\| tiny \| — \|[^\n]*\| GQA \| [+-]\d", open(d / "r3" / "report.md").read(), re.M)
  assert cli_dmc.main(["report", str(d / "a.json"), "--out", str(d / "r4"), "--pair", "nope=GQA"]) == 2
  assert "no row labelled 'nope'" in capsys.readouterr().err
  # A policy's label covers its CRs: a reference must name one (LABEL@CR).
  assert cli_dmc.main(["report", str(d / "a.json"), "--out", str(d / "r5"), "--pair", "tiny=TOVA"]) == 2
  assert "names 2 rows; add @CR" in capsys.readouterr().err
  assert cli_dmc.main(["report", str(d / "a.json"), "--out", str(d / "r5"), "--pair", "tiny=TOVA@2"]) == 0
  assert re.search(r"^\| tiny \| — \|[^\n]*\| TOVA \| [+-]\d", open(d / "r5" / "report.md").read(), re.M)
  assert os.path.getsize(d / "report" / "ppl_vs_cr.png") > 5000
  other = json.load(open(b))
  other["tokens_sha256"] = "0" * 16
  json.dump(other, open(d / "c.json", "w"))
  capsys.readouterr()
  assert cli_dmc.main(["report", str(d / "a.json"), str(d / "c.json"), "--out", str(d / "r2")]) == 2
  assert "evaluated on other tokens" in capsys.readouterr().err


def test_eval_refuses_dmc_without_settings_and_cr_without_policy(tmp_path, tiny, capsys):
  path, cfg, params, _ = tiny
  from dmc_jax import checkpoint
  plain = write_checkpoint(tmp_path / "plain", cfg, params, path)
  assert cli_dmc.main(["eval", plain, "--dmc", *EVAL]) == 2
  assert "has no DMC settings" in capsys.readouterr().err
  assert cli_dmc.main(["eval", plain, "--cr", "2", *EVAL]) == 2
  assert "no --policy given" in capsys.readouterr().err
  del checkpoint


def _row(label, per_token, size=128):
  return {"label": label, "blocks": eval_dmc.token_blocks(np.asarray(per_token, np.float64), size)}


def test_paired_bootstrap_interval():
  from experiments.dmc import report
  rng = np.random.default_rng(1)
  hard = rng.gamma(2.0, 1.5, size=5000)  # token difficulty, shared by both rows
  ref = _row("ref", hard)
  # A constant per-token difference is known exactly whatever blocks are drawn.
  same = report.paired_bootstrap(_row("shift", hard + 0.05), ref)
  assert same["mean"] == pytest.approx(0.05) and same["lo"] == pytest.approx(0.05) and same["hi"] == pytest.approx(0.05)
  assert same["blocks"] == 40  # 39 of 128 and one of 8
  # Independent noise of sd 0.5 per token: the interval is about ±1.96·0.5/√5000 around the sample mean, and the
  # pairing removes the difficulty's own spread (sd 2.1), which an unpaired comparison would carry.
  noisy = report.paired_bootstrap(_row("noisy", hard + 0.02 + rng.normal(0, 0.5, 5000)), ref)
  half = 1.96 * 0.5 / np.sqrt(5000)
  assert noisy["lo"] < noisy["mean"] < noisy["hi"]
  assert 0.7 * half < (noisy["hi"] - noisy["lo"]) / 2 < 1.3 * half
  with pytest.raises(Exception, match="blocks of other tokens"):
    report.paired_bootstrap(_row("short", hard[:4000]), ref)
