"""`dmc-jax train`: the three-stage retrofit on the shared harness, end to end on real text (tiny model)."""

import json
import os

import numpy as np

from conftest import random_hf_model, write_hf_dir
from dmc_jax.convert import hf
from dmc_jax.presets import preset
from experiments import cli_dmc, dmc_run
from experiments.harness import checkpoint, config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "dmc", "smollm2_135m_cr2.py")


def test_tiny_retrofit_runs_all_stages_exports_and_resumes(tmp_path, smollm2_ckpt, capsys):
  args = [f"--config.workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
          f"--config.model.tokenizer_from={smollm2_ckpt}"]
  assert cli_dmc.main(["train", "--config", f"{CONFIG}:tiny", *args]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["steps"] == 8 and summary["tokens"] == 8 * 2 * 64 and summary["resumed_from"] == 0
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  stages = [r["train/stage"] for r in rows if "train/stage" in r]
  targets = [r["train/target_cr"] for r in rows if "train/target_cr" in r]
  assert stages[0] == 1 and stages[-1] == 3 and targets[0] == 1.0 and targets[-1] == 2.0
  assert os.path.exists(summary["heatmap"])
  # The exported checkpoint carries its DMC settings and decodes with the compressed cache.
  ck = checkpoint.Checkpoint(summary["dmc_checkpoint"])
  assert ck.dmc["window"] == 12 and ck.dmc["decision_channel"] == "last"
  assert ck.config.n_layers == 2 and not ck.config.scan_layers
  assert cli_dmc.main(["generate", summary["dmc_checkpoint"], "--dmc", "--max-new-tokens", "4",
                       "--prompt", "Hello"]) == 0
  assert "[dmc] realised CR" in capsys.readouterr().err
  # Asking for more steps resumes from the last checkpoint.
  assert cli_dmc.main(["train", "--config", f"{CONFIG}:tiny", *args, "--config.train.steps=10"]) == 0
  assert json.loads(capsys.readouterr().out)["resumed_from"] == 8


def test_init_from_a_converted_checkpoint(tmp_path, smollm2_ckpt):
  cfg_model = preset("smollm2-tiny").replace(tie_embeddings=False)
  tensors = random_hf_model(cfg_model, seed=4)
  src = checkpoint.write(str(tmp_path / "src"), hf.read(write_hf_dir(tmp_path / "hf", cfg_model, tensors)),
                         show_progress=False)
  cfg = config.load(f"{CONFIG}:tiny", [f"--config.workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'd'}",
                                       f"--config.model.init_from={src}", f"--config.model.tokenizer_from={smollm2_ckpt}",
                                       "--config.train.steps=1", "--config.train.lr=1e-12",
                                       "--config.train.decision_lr=1e-12"])
  summary = dmc_run.train(cfg)
  before = checkpoint.Checkpoint(src).load_params()["params"]
  after = checkpoint.Checkpoint(summary["dmc_checkpoint"]).load_params()["params"]
  for name in ("embed", "lm_head"):
    np.testing.assert_allclose(after[name]["kernel"], before[name]["kernel"], atol=1e-6)
  np.testing.assert_allclose(after["layers_1"]["mlp"]["down"]["kernel"], before["layers_1"]["mlp"]["down"]["kernel"],
                             atol=1e-6)
