import os

import pytest

from experiments.harness import config

EXAMPLE = os.path.join(os.path.dirname(__file__), "data", "example_experiment.py")


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
  from experiments import cli_dmc
  assert cli_dmc.main(["config", "--config", f"{EXAMPLE}:tiny", "--config.train.steps=7"]) == 0
  assert "steps: 7" in capsys.readouterr().out
  assert cli_dmc.main(["config", "--config", EXAMPLE, "--config.train.bogus=7"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.endswith("unknown config key 'train.bogus'") and "\n" not in err
