"""Logging and progress conventions shared by every command.

* Logs go to stderr as `HH:MM:SS level message`; `-v` shows debug messages.
* Long work shows a tqdm bar on stderr when stderr is a terminal (and `DMC_JAX_PROGRESS` is not 0); in logs
  and CI the bar stays silent and the caller logs one summary line instead.
* Results a command exists to produce (generated text, tables) go to stdout; statistics go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is when a record is emitted, not the stream current at setup: a command line
  run in-process (tests, notebooks) must not leave a handler bound to a stream that is later closed."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass


def setup_logging(verbose: bool = False) -> None:
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[_StderrHandler()],
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def enabled() -> bool:
  if os.environ.get("DMC_JAX_PROGRESS") == "0":
    return False
  return os.environ.get("DMC_JAX_PROGRESS") == "1" or sys.stderr.isatty()


def bar(total=None, desc: str = "", unit: str = "it", disable: bool = False, **kwargs) -> tqdm:
  return tqdm(total=total, desc=desc, unit=unit, disable=disable or not enabled(), file=sys.stderr,
              dynamic_ncols=True, leave=False, **kwargs)
