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
