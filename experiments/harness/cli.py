"""The subcommand CLI both entry points share: argparse subcommands, logging, one-line errors.

Each entry point lists `Command`s: a name, a help line, `configure(parser)` to add its arguments and `run(args)`.
Errors the user can fix (the bases dmc_jax.errors.UserError, sdc_jax.errors.SDCError, harness HarnessError, and a
missing optional extra) are one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable, Sequence

from experiments.harness import progress

log = logging.getLogger("dmc_jax")


def user_error_types() -> tuple[type[BaseException], ...]:
  """One base per library (dmc_jax, sdc_jax) and the harness's own: each is one line, exit 2."""
  from dmc_jax.errors import UserError
  from experiments.harness.errors import HarnessError
  from sdc_jax.errors import SDCError
  return (UserError, HarnessError, SDCError, FileNotFoundError)


# Optional extras (pyproject.toml) and the modules that tell whether each is installed.
EXTRAS = {"sdc": ("cv2", "skvideo", "dm_pix", "skimage"), "eval": ("lm_eval",)}


def missing_extra(extras: Sequence[str]) -> str | None:
  """A one-line message naming the first extra in `extras` whose modules do not import, else None."""
  import importlib
  for extra in extras:
    for module in EXTRAS[extra]:
      try:
        importlib.import_module(module)
      except ImportError:
        return f"needs the optional extra [{extra}] (module {module!r} is missing): pip install 'dmc-jax[{extra}]'"
  return None


@dataclasses.dataclass
class Command:
  name: str
  help: str
  configure: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int | None]
  # Accepts experiment-config overrides (--config.a.b=value) after its own arguments.
  takes_config_overrides: bool = False
  requires: tuple[str, ...] = ()  # optional extras the command needs (EXTRAS)


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
  parser.add_argument("--config", required=required, metavar="PATH[:VARIANT]",
                      help="experiment config file and variant; override fields with --config.a.b=value")


def main(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=description)
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  by_name = {}
  for c in commands:
    p = sub.add_parser(c.name, help=c.help, description=c.help)
    c.configure(p)
    by_name[c.name] = c
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = parser.parse_known_args(argv)
  command = by_name[args.command]
  if rest and not command.takes_config_overrides:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  args.config_overrides = rest
  progress.setup_logging(args.verbose)
  missing = missing_extra(command.requires)
  if missing:
    print(f"{prog} {args.command}: error: {missing}", file=sys.stderr)
    return 2
  try:
    return int(command.run(args) or 0)
  except user_error_types() as e:
    print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog} {args.command}: interrupted", file=sys.stderr)
    return 130
