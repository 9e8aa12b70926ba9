"""`sdc-jax`: SDC-Net video prediction (training, evaluation and prediction arrive with the SDC-Net issue)."""

from __future__ import annotations

import sys

from experiments.cli_dmc import _configure_config, run_config
from experiments.harness import cli

COMMANDS = [
    cli.Command("config", "print an experiment config after variant and overrides",
                _configure_config, run_config, takes_config_overrides=True),
]


def main(argv=None) -> int:
  return cli.main("sdc-jax", __doc__, COMMANDS, argv)


if __name__ == "__main__":
  sys.exit(main())
