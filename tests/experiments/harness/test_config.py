import os

import pytest
from helpers import ROOT, TESTS

from experiments.harness import config

EXAMPLE = os.path.join(TESTS, "data", "example_experiment.py")


def test_variant_and_overrides():
  cfg = config.load(f"{EXAMPLE}:tiny", ["--config.train.lr=1e-3", "--config.model.ckpt=/tmp/x"])
  assert cfg.train.steps == 10 and cfg.train.lr == 1e-3 and cfg.model.ckpt == "/tmp/x"
  assert config.load(EXAMPLE).train.steps == 1000
  assert isinstance(config.load(EXAMPLE, ["--config.train.lr=5"]).train.lr, float)


def test_config_is_locked():
  cfg = config.load(EXAMPLE)
  with pytest.raises(AttributeError):
    cfg.train.new_field = 1


@pytest.mark.parametrize("spec, overrides, message", [
    (EXAMPLE, ["--config.train.nope=1"], "unknown config key 'train.nope'"),
    (EXAMPLE, ["--config.trainx.steps=1"], "unknown config key 'trainx'"),
    (EXAMPLE + ":huge", [], "unknown variant 'huge'"),
    ("no/such/file.py", [], "config file not found"),
    (EXAMPLE, ["--config.train.steps=abc"], "--config.train.steps='abc': expected int"),
    (EXAMPLE, ["--train.steps=3"], "overrides look like --config"),
])
def test_errors_are_one_line_and_name_the_key(spec, overrides, message):
  with pytest.raises(config.ExperimentConfigError) as e:
    config.load(spec, overrides)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_the_resolved_config(capsys):
  from experiments.cli import dmc as cli_dmc
  assert cli_dmc.main(["config", "--config", f"{EXAMPLE}:tiny", "--config.train.steps=7"]) == 0
  assert "steps: 7" in capsys.readouterr().out
  assert cli_dmc.main(["config", "--config", EXAMPLE, "--config.train.bogus=7"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.endswith("unknown config key 'train.bogus'") and "\n" not in err


@pytest.mark.parametrize("name, preset, cr, grad_accum, mesh", [
    ("llama2_7b_cr4", "llama2-7b", 4, 128, (-1, 8, 1)),
    ("llama3_8b_cr4", "llama3-8b", 4, 128, (-1, 8, 1)),
    ("llama2_70b_cr2", "llama2-70b", 2, 256, (-1, 4, 8)),
])
def test_paper_recipe_configs(name, preset, cr, grad_accum, mesh):
  path = os.path.join(ROOT, "experiments", "dmc", "configs", f"{name}.py")
  cfg = config.load(path)
  t = cfg.train
  assert cfg.model.preset == preset and cfg.model.init_from is None and cfg.model.dtype == "bfloat16"
  assert t.target_cr == cr and t.lr == 3e-5 and t.stage1_steps == 250 and t.seq_len == 4096
  assert t.batch_size == 1024 and t.grad_accum == grad_accum and t.steps == 250 + 6000 * (cr - 1) + 2000
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == mesh
  toy = config.load(f"{path}:toy", ["--config.mesh.fsdp=2"])
  assert toy.model.preset == "smollm2-tiny" and toy.train.target_cr == cr and toy.mesh.fsdp == 2
  with pytest.raises(config.ExperimentConfigError, match="unknown variant 'huge'"):
    config.load(f"{path}:huge")
