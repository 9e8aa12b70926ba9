"""Calibration of the decision bias (dmc_jax/calibrate.py): the bias it finds makes the *inference cache* — a prefill
into the paged DMC or DMS cache, not the count calibration itself uses — realise the target CR; bias 0 is the
model as trained; the CLI writes a calibrated adapter without touching its input."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import cache as dmc_cache
from dmc_jax import calibrate, dms_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import ConfigError
from dmc_jax.generate import prefill_dmc
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=61, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, head_dim=12)
ROWS, LEN = 3, 48


def _adapter_model(dmc):
  params = nn.unbox(Llama(CFG, dmc, "eval").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  # Random adapter weights: logits spread over a few units around −c, so the bias has something to move.
  return jax.tree_util.tree_map_with_path(
      lambda p, x: 0.05 * jax.random.normal(jax.random.key(3), x.shape) if "decision_adapter" in str(p) else x,
      params)


def _batches():
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (ROWS, LEN), 0, CFG.vocab_size), np.int32)
  return [{"tokens": tokens[i:i + 1], "segment_ids": np.ones((1, LEN), np.int32)} for i in range(ROWS)]


def _cache_cr(dmc, params, batches) -> float:
  """The realised CR of the real paged cache after prefilling every calibration row."""
  lib = dms_cache if dmc.method == "dms" else dmc_cache
  tokens = jnp.asarray(np.concatenate([b["tokens"] for b in batches]))
  cache = lib.init_cache(CFG, dmc, ROWS, LEN, page_size=8)
  _, cache = prefill_dmc(Llama(CFG, dmc, "eval"), params, tokens, jnp.full((ROWS,), LEN), cache, None)
  return lib.realised_cr(cache)["overall"]


@pytest.mark.parametrize("method, scale, target", [
    ("dms", 100.0, 2.0), pytest.param("dmc", 100.0, 3.0, marks=pytest.mark.slow)])  # a compile per iteration
def test_calibrated_bias_realises_the_target_in_the_cache(method, scale, target):
  dmc = DMCConfig(method=method, decisions="adapter", dms_window=4, window=4)
  params = _adapter_model(dmc)
  if method == "dmc":  # DMC's adapter logit is x̂·W − c with no scale: widen W so that logits spread as DMS's do
    params = jax.tree_util.tree_map_with_path(lambda p, x: x * scale if "decision_adapter" in str(p) else x, params)
  batches = _batches()
  before = _cache_cr(dmc, params, batches)
  cal = calibrate.calibrate(CFG, params, dmc, batches, target, tol=0.01)
  assert cal.dmc.decision_bias != 0.0 and cal.dmc.offset == dmc.offset
  assert abs(cal.realised_cr / target - 1) <= 0.01, cal.history
  assert abs(before / target - 1) > 0.05  # the uncalibrated model was elsewhere: the test moved something
  # The cache, counting its own slots or evictions, agrees with calibration's count.
  assert _cache_cr(cal.dmc, params, batches) == pytest.approx(cal.realised_cr, rel=1e-6)
  # A bias 0 config is the model as trained: the first iteration measured the uncalibrated model.
  assert cal.history[0]["decision_bias"] == 0.0
  assert cal.history[0]["realised_cr"] == pytest.approx(before, abs=1e-4)  # rounded to 4 places


def test_decision_bias_is_validated_and_round_trips():
  d = DMCConfig(decision_bias=-1.25)
  assert DMCConfig.from_dict(d.to_dict()) == d
  legacy = {k: v for k, v in d.to_dict().items() if k != "decision_bias"}  # adapters written before the field
  assert DMCConfig.from_dict(legacy).decision_bias == 0.0
  for bad in (float("nan"), float("inf"), "1", True):
    with pytest.raises(ConfigError, match="decision_bias"):
      DMCConfig(decision_bias=bad)
  with pytest.raises(ConfigError, match="target-cr"):
    calibrate.calibrate(CFG, None, d, [], 0.5)


def _dms_adapter(base: str, out: str) -> str:
  """A random-weight DMS decision adapter for the checkpoint `base`, written as training writes one."""
  from dmc_jax import adapter as adapter_lib
  from dmc_jax import checkpoint
  ckpt = checkpoint.Checkpoint(base)
  dmc = DMCConfig(method="dms", decisions="adapter", dms_window=4)
  params = nn.unbox(Llama(ckpt.config, dmc, "eval").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  spec = adapter_lib.AdapterSpec.for_trainable("decisions", dmc)
  parts = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                       adapter_lib.split(params, spec, dmc))
  return adapter_lib.save(out, parts, spec, dmc, n_layers=None, base_digest=ckpt.param_digest,
                          base_param_dtype="float32")


def test_cli_writes_a_calibrated_adapter_and_keeps_its_input(tmp_path, tiny_checkpoint):
  """`dmc-jax calibrate` on a DMS adapter of the tiny real-format checkpoint (SmolLM2's tokenizer, stdlib text)."""
  from dmc_jax import adapter as adapter_lib
  from experiments.cli.dmc import main
  base, ad_dir = tiny_checkpoint, _dms_adapter(tiny_checkpoint, str(tmp_path / "adapter"))
  before = open(os.path.join(ad_dir, "adapter.json")).read()
  out = tmp_path / "cal"
  assert main(["calibrate", base, ad_dir, "--target-cr", "1.5", "--out", str(out), "--tokens", "256",
               "--seq-len", "64", "--tol", "0.02"]) == 0
  assert open(os.path.join(ad_dir, "adapter.json")).read() == before
  cal = adapter_lib.load(str(out))
  meta = json.load(open(out / "adapter.json"))
  rec = meta["provenance"]["calibration"]
  assert meta["target_cr"] == 1.5 and rec["data"]["split"] == "train" and rec["data"]["rows"] == 4
  assert cal.dmc.decision_bias == pytest.approx(rec["decision_bias"], abs=1e-6)
  assert abs(rec["realised_cr"] / 1.5 - 1) <= 0.02
  assert dataclasses.replace(cal.dmc, decision_bias=0.0) == adapter_lib.load(ad_dir).dmc
  # An existing --out is refused without --force; --force never replaces an input.
  assert main(["calibrate", base, ad_dir, "--target-cr", "1.5", "--out", str(out), "--tokens", "64",
               "--seq-len", "64"]) == 2
  assert main(["calibrate", base, ad_dir, "--target-cr", "1.5", "--out", ad_dir, "--force", "--tokens", "64",
               "--seq-len", "64"]) == 2
  assert open(os.path.join(ad_dir, "adapter.json")).read() == before
