"""The experiment-config system shared by DMC and SDC: `ml_collections` files with variants.

An experiment is `experiments/<system>/<name>.py` whose `get_config(variant=None)` returns a ConfigDict
(every field with a default and a one-line comment). On the command line:

    --config experiments/dmc/configs/smollm2_135m_cr2.py:tiny --config.train.steps=200

The config is locked (a typo'd key is an error, not a new field), override values are parsed by the type of
the field they replace, and every failure — unknown key, bad value, unknown variant, missing file — is one
line naming the file and key.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

from ml_collections import config_dict

from experiments.harness.errors import ExperimentConfigError


def _import_config_module(path: str):
  if not os.path.isfile(path):
    raise ExperimentConfigError(f"{path}: config file not found")
  name = "_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ExperimentConfigError(f"{path}: cannot import ({type(e).__name__}: {e})") from None
  if not hasattr(module, "get_config"):
    raise ExperimentConfigError(f"{path}: defines no get_config(variant=None)")
  return module


def load(spec: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Loads `PATH[:VARIANT]`, applies `--config.a.b=value` overrides in order; returns a locked ConfigDict."""
  path, _, variant = spec.partition(":")
  module = _import_config_module(path)
  try:
    cfg = module.get_config(variant or None)
  except Exception as e:
    raise ExperimentConfigError(f"{path}: get_config({variant or None!r}) failed: {e}") from None
  if not isinstance(cfg, config_dict.ConfigDict):
    raise ExperimentConfigError(f"{path}: get_config must return a ConfigDict, got {type(cfg).__name__}")
  cfg.lock()
  for override in overrides:
    apply_override(cfg, override, path)
  return cfg


def apply_override(cfg: config_dict.ConfigDict, override: str, where: str) -> None:
  if not override.startswith("--config.") or "=" not in override:
    raise ExperimentConfigError(f"unexpected argument {override!r} (overrides look like --config.a.b=value)")
  key, _, text = override[len("--config."):].partition("=")
  *parents, leaf = key.split(".")
  node = cfg
  for i, p in enumerate(parents):
    if not isinstance(node, config_dict.ConfigDict) or p not in node:
      raise ExperimentConfigError(f"{where}: unknown config key {'.'.join(parents[:i + 1])!r}")
    node = node[p]
  if not isinstance(node, config_dict.ConfigDict) or leaf not in node:
    raise ExperimentConfigError(f"{where}: unknown config key {key!r}")
  field_type = node.get_ref(leaf).get_type()
  try:
    value = parse_value(text, field_type)
    node[leaf] = value
  except (TypeError, ValueError, SyntaxError) as e:
    name = getattr(field_type, "__name__", str(field_type))
    raise ExperimentConfigError(f"{where}: --config.{key}={text!r}: expected {name} ({e})") from None


def parse_value(text: str, field_type: Any) -> Any:
  """Parses an override string as the type of the field it replaces."""
  if text in ("None", "none", "null"):
    return None
  if field_type is bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError("not a boolean")
  if field_type is int:
    return int(text)
  if field_type is float:
    return float(text)
  if field_type is str:
    return text
  if field_type in (tuple, list):
    value = ast.literal_eval(text)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return field_type(value)
  return ast.literal_eval(text)


def variant_error(path: str, variant: str | None, known: Sequence[str | None]) -> ExperimentConfigError:
  """What a `get_config` raises for a variant it does not define."""
  return ExperimentConfigError(f"{path}: unknown variant {variant!r}; expected one of {list(known)}")


# -- ranges of experiment fields ------------------------------------------------------------------------------
#
# Each system declares its fields' ranges next to their defaults (experiments/dmc/configs/base.py RANGES,
# experiments/sdc/configs/skvideo_sdc.py RANGES); train and plan call `validate` before doing anything, so a
# nonsense setting is one line naming the key, never a traceback or a "successful" run with -128 tokens.


class Range:
  """A numeric range [lo, hi] (lo_open: (lo, hi]); `integer` also refuses 2.5; `allowed` extra values (e.g. -1)."""

  def __init__(self, lo=None, hi=None, *, integer=False, lo_open=False, allowed=(), optional=False):
    self.lo, self.hi, self.integer, self.lo_open = lo, hi, integer, lo_open
    self.allowed, self.optional = allowed, optional

  def check(self, value) -> str | None:
    if value is None:
      return None if self.optional else "must be set"
    if value in self.allowed and not isinstance(value, bool):
      return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
      return f"must be {'an integer' if self.integer else 'a number'}"
    if value != value or value in (float("inf"), float("-inf")):
      return "must be finite"
    lo_bad = self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))
    if lo_bad or (self.hi is not None and value > self.hi):
      return f"must be {self.describe()}"
    return None

  def describe(self) -> str:
    lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo}"
    hi = "" if self.hi is None else f"<= {self.hi}"
    extra = f" (or {', '.join(map(str, self.allowed))})" if self.allowed else ""
    return " and ".join(x for x in (lo, hi) if x) + extra


class OneOf:
  def __init__(self, *choices):
    self.choices = choices

  def check(self, value) -> str | None:
    return None if value in self.choices else f"must be one of {list(self.choices)}"


class Each:
  """Every item of a tuple/list field satisfies `rule`."""

  def __init__(self, rule):
    self.rule = rule

  def check(self, value) -> str | None:
    if not isinstance(value, (tuple, list)):
      return "must be a list"
    for v in value:
      why = self.rule.check(v)
      if why:
        return f"item {v!r} {why}"
    return None


def validate(cfg, rules, where: str = "config") -> None:
  """Checks every `dotted.key: rule` of `rules` (and cross-field `checks`: callables returning a message or None)
  against `cfg`; the first failure is one ExperimentConfigError naming the key and the allowed range."""
  for key, rule in rules.items():
    if callable(rule) and not hasattr(rule, "check"):
      why = rule(cfg)
      if why:
        raise ExperimentConfigError(f"{where}: {why}")
      continue
    node = cfg
    for part in key.split("."):
      if not isinstance(node, config_dict.ConfigDict) or part not in node:
        node = _ABSENT
        break
      node = node[part]
    if node is _ABSENT:
      continue  # a field this variant does not have
    why = rule.check(node)
    if why:
      raise ExperimentConfigError(f"{where}: {key}={node!r} {why}")


_ABSENT = object()
