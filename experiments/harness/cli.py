"""The subcommand CLI both entry points share: argparse subcommands, logging, one-line errors.

Each entry point lists `Command`s: a name, a help line, `configure(parser)` to add its arguments and `run(args)`.
Errors the user can fix (the bases dmc_jax.errors.UserError, sdc_jax.errors.SDCError, harness HarnessError, and a
missing optional extra) are one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from typing import Callable, Sequence

from experiments.harness import progress

log = logging.getLogger("dmc_jax")


# -- argument types: every range is checked by argparse, so a bad value is one line and exit 2 -----------------


def _number(text: str, kind: type, lo=None, hi=None, lo_open=False, what=""):
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
  if kind is float and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  if lo is not None and (value < lo or (lo_open and value == lo)) or hi is not None and value > hi:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
  return value


def int_range(lo: int | None = None, hi: int | None = None, what: str | None = None):
  """argparse type: an integer in [lo, hi]."""
  what = what or (f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
  return lambda text: _number(text, int, lo, hi, what=what)


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, what: str | None = None):
  """argparse type: a finite number in [lo, hi] (or (lo, hi] with lo_open)."""
  what = what or (("a number in " + ("(" if lo_open else "[") + f"{lo}, {hi}]") if hi is not None else
                  f"a number {'>' if lo_open else '>='} {lo}")
  return lambda text: _number(text, float, lo, hi, lo_open, what)


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0.0, lo_open=True)


class _Parser(argparse.ArgumentParser):
  """Usage errors in one line (`prog: error: ...`, exit 2), like every other user error."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def user_error_types() -> tuple[type[BaseException], ...]:
  """One base per library (dmc_jax, sdc_jax) and the harness's own: each is one line, exit 2."""
  from dmc_jax.errors import UserError
  from experiments.harness.errors import HarnessError
  from sdc_jax.errors import SDCError
  # OSError: a filesystem refusing a read or write (permissions, read-only, disk full) is the user's to fix; its
  # text names the path and the reason.
  return (UserError, HarnessError, SDCError, OSError)


# Optional extras (pyproject.toml) and the modules that tell whether each is installed.
EXTRAS = {"sdc": ("cv2", "skvideo", "dm_pix", "skimage"), "eval": ("lm_eval",),
          "serve": ("fastapi", "uvicorn", "jinja2")}


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


def add_workdir_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--break-lock", action="store_true",
                      help="take over the workdir's lock even though its holder may be alive (e.g. on another host)")
  parser.add_argument("--allow-config-change", action="store_true",
                      help="resume although the config changed (the differences are recorded in run.json)")


def main(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None = None) -> int:
  parser = _Parser(prog=prog, description=description)
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  by_name = {}
  for c in commands:
    p = sub.add_parser(c.name, help=c.help, description=c.help)
    c.configure(p)
    by_name[c.name] = c
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args, rest = parser.parse_known_args(argv)
    command = by_name[args.command]
    if rest and not command.takes_config_overrides:
      parser.error(f"unrecognized arguments: {' '.join(repr(r) if not r else r for r in rest)}")
  except SystemExit as e:  # argparse exits (usage errors: 2, --help: 0); in-process callers get the status
    return int(e.code or 0)
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
