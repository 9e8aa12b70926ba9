"""`dmc-jax train`: the three-stage retrofit on the shared harness, end to end on real text (tiny model)."""

import json
import os

import numpy as np
import pytest
from helpers import ROOT, random_hf_model, write_hf_dir

from dmc_jax import checkpoint
from dmc_jax.convert import hf
from dmc_jax.presets import preset
from experiments.cli import dmc as cli_dmc
from experiments.dmc import train as dmc_run
from experiments.harness import config

CONFIG = os.path.join(ROOT, "experiments", "dmc", "configs", "smollm2_135m_cr2.py")


@pytest.mark.slow  # 25 s: a whole toy retrofit, killed and resumed
def test_tiny_retrofit_runs_all_stages_exports_and_resumes(tmp_path, smollm2_ckpt, capsys):
  args = [f"--config.workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
          f"--config.model.tokenizer_from={smollm2_ckpt}"]
  assert cli_dmc.main(["train", "--config", f"{CONFIG}:toy", *args]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["steps"] == 8 and summary["tokens"] == 8 * 2 * 64 and summary["resumed_from"] == 0
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  stages = [r["train/stage"] for r in rows if "train/stage" in r]
  targets = [r["train/target_cr"] for r in rows if "train/target_cr" in r]
  assert stages[0] == 1 and stages[-1] == 3 and targets[0] == 1.0 and targets[-1] == 2.0
  assert all(r["train/tokens_per_s"] > 0 and 0 < r["train/mfu"] < 1 for r in rows[1:] if "train/lm_loss" in r)
  # Per-layer and per-head CR: TensorBoard + arrays.jsonl, logged from stage 2 on (1.0 before).
  arrays = [json.loads(l) for l in open(tmp_path / "run" / "arrays.jsonl")]
  heads = [a for a in arrays if a["name"] == "train/cr_per_head"]
  assert np.asarray(heads[-1]["values"]).shape == (2, 2) and len(heads) == len(stages)
  assert [a["values"] for a in arrays if a["name"] == "train/cr_per_layer"][0] == [1.0, 1.0]
  ev = summary["eval"]
  assert abs(ev["perplexity"] - np.exp(ev["lm_loss"])) < 1e-6 * ev["perplexity"] and ev["realised_cr"] >= 1
  assert os.path.exists(summary["heatmap"]) and os.path.getsize(summary["curves"]) > 1000
  # The exported checkpoint carries its DMC settings and decodes with the compressed cache.
  ck = checkpoint.Checkpoint(summary["dmc_checkpoint"])
  assert ck.dmc["window"] == 12 and ck.dmc["decision_channel"] == "last"
  assert ck.config.n_layers == 2 and not ck.config.scan_layers
  assert cli_dmc.main(["generate", summary["dmc_checkpoint"], "--dmc", "--max-new-tokens", "4",
                       "--prompt", "Hello"]) == 0
  assert "[dmc] realised CR" in capsys.readouterr().err
  # Asking for more steps resumes from the last checkpoint.
  assert cli_dmc.main(["train", "--config", f"{CONFIG}:toy", *args, "--config.train.steps=10"]) == 0
  assert json.loads(capsys.readouterr().out)["resumed_from"] == 8
  steps = [a["step"] for a in map(json.loads, open(tmp_path / "run" / "arrays.jsonl"))]
  assert sorted(steps) == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10]  # per-head and per-layer CR, nothing logged twice


def test_init_from_flag_must_name_a_checkpoint(tmp_path, capsys):
  assert cli_dmc.main(["train", "--config", f"{CONFIG}:toy", "--init-from", str(tmp_path)]) == 2
  assert "--init-from" in capsys.readouterr().err


@pytest.mark.slow  # 26 s in the fresh-clone run: a whole training run
def test_vanilla_continued_training_from_a_converted_checkpoint(tmp_path, smollm2_ckpt):
  cfg_model = preset("smollm2-tiny").replace(tie_embeddings=False)
  tensors = random_hf_model(cfg_model, seed=4)
  src = checkpoint.write(str(tmp_path / "src"), hf.read(write_hf_dir(tmp_path / "hf", cfg_model, tensors)))
  cfg = config.load(f"{CONFIG}:toy", [f"--config.workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'd'}",
                                      f"--config.model.init_from={src}", f"--config.model.tokenizer_from={smollm2_ckpt}",
                                      "--config.train.mode=vanilla", "--config.train.steps=1",
                                      "--config.train.lr=1e-12", "--config.train.decision_lr=1e-12"])
  summary = dmc_run.train(cfg)
  # A vanilla run exports a plain checkpoint; at a negligible LR it still is the source model, so its held-out
  # perplexity equals the unretrofitted one measured on the same tokens.
  assert summary["mode"] == "vanilla" and "dmc_checkpoint" not in summary and "heatmap" not in summary
  assert checkpoint.Checkpoint(summary["checkpoint"]).dmc is None
  assert summary["eval"]["realised_cr"] == 1.0 and abs(summary["perplexity_ratio"] - 1) < 1e-4
  before = checkpoint.Checkpoint(src).load_params()["params"]
  after = checkpoint.Checkpoint(summary["checkpoint"]).load_params()["params"]
  for name in ("embed", "lm_head"):
    np.testing.assert_allclose(after[name]["kernel"], before[name]["kernel"], atol=1e-6)
  np.testing.assert_allclose(after["layers_1"]["mlp"]["down"]["kernel"], before["layers_1"]["mlp"]["down"]["kernel"],
                             atol=1e-6)


@pytest.mark.slow  # a whole (toy) train run + generate: ~50 CPU-seconds
def test_distill_lora_adapter_run_writes_an_adapter_that_loads_and_merges(tmp_path, smollm2_ckpt, capsys):
  """The adapter-form LoRA recipe from a converted (random, toy-sized) base: only the parts train, WORKDIR/adapter
  names the base by digest; generate --adapter and merge-adapter use it on that base and refuse another."""
  cfg_model = preset("smollm2-tiny").replace(tie_embeddings=False)
  import dataclasses
  converted = hf.read(write_hf_dir(tmp_path / "hf", cfg_model, random_hf_model(cfg_model, seed=4)))
  converted = dataclasses.replace(converted, tokenizer=checkpoint.Checkpoint(smollm2_ckpt).tokenizer_bytes())
  src = checkpoint.write(str(tmp_path / "src"), converted)
  args = [f"--config.workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
          f"--config.model.init_from={src}", f"--config.model.tokenizer_from={smollm2_ckpt}",
          "--config.train.steps=4", "--config.train.eval_baseline=False"]
  assert cli_dmc.main(["train", "--config", f"{CONFIG}:distill_lora_toy", *args]) == 0
  summary = json.loads(capsys.readouterr().out)
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert all(r["train/stage"] >= 2 for r in rows if "train/stage" in r)  # no stage 1 in the adapter form
  assert any(r.get("train/distill_loss", 0) > 0 for r in rows)
  from dmc_jax import adapter
  ad = adapter.load(summary["adapter"])
  assert [p["kind"] for p in ad.meta["parts"]] == ["decision_adapter", "lora"] and ad.dmc.decisions == "adapter"
  assert ad.meta["provenance"]["tokens"] == summary["tokens"] == 4 * 2 * 64
  assert ad.base_digest == checkpoint.Checkpoint(src).param_digest
  # merge-adapter reproduces the run's own export (the base with the trained parts merged).
  assert cli_dmc.main(["merge-adapter", src, summary["adapter"], "--out", str(tmp_path / "full")]) == 0
  merged = checkpoint.Checkpoint(str(tmp_path / "full")).load_params()["params"]
  export = checkpoint.Checkpoint(summary["dmc_checkpoint"]).load_params()["params"]
  for name in ("layers_0/attn/q_proj/kernel", "layers_1/attn/decision_adapter/kernel", "lm_head/kernel"):
    from dmc_jax.convert import layout
    np.testing.assert_allclose(layout.flatten(merged)[name], layout.flatten(export)[name], atol=1e-6)
  capsys.readouterr()
  assert cli_dmc.main(["generate", src, "--adapter", summary["adapter"], "--prompt", "Hi",
                       "--max-new-tokens", "2"]) == 0
  assert "[dmc] realised CR" in capsys.readouterr().err  # the adapter's method is the default cache
  # The export is not the adapter's base: refused, in one line.
  assert cli_dmc.main(["generate", summary["dmc_checkpoint"], "--adapter", summary["adapter"], "--prompt", "Hi",
                       "--max-new-tokens", "2"]) == 2
  assert "was trained on base" in capsys.readouterr().err
