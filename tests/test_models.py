"""The adapters shipped under models/: each loads onto the base it names (digest checked, tensors verified) and
records what was measured of it."""

import glob
import json
import os

import pytest

import dmc_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "models", "smollm2-135m-instruct", "*", "adapter.json")))


def test_there_is_a_shipped_adapter():
  assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_shipped_adapter_applies_to_smollm2_and_records_its_measurement(path, smollm2_ckpt):
  with open(path) as f:
    meta = json.load(f)
  model = dmc_jax.load(smollm2_ckpt, adapter=os.path.dirname(path))  # refuses another base or changed tensors
  assert model.method == meta["method"] and os.path.getsize(path.replace(".json", ".safetensors")) < 8 << 20
  ev = meta["evaluation"]
  assert ev["realised_cr"] >= meta["target_cr"] - 0.1 and ev["perplexity"] > ev["vanilla_perplexity"] > 1
  assert ev["tokens_scored"] > 8000 and meta["provenance"]["tokens"] > 0
