"""lm-eval adapter: log-likelihoods equal a direct forward pass (vanilla, DMC, a policy); a local multiple-choice
task runs end to end through lm_eval.simple_evaluate and lm-eval's command line (no downloads)."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, TESTS, write_checkpoint

from dmc_jax.baselines import evict_model
from dmc_jax.baselines.policies import Policy
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model.llama import Llama

DATA = os.path.join(TESTS, "data", "lm_eval_mc.jsonl")
DMC = DMCConfig(window=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_ckpt):
  """A 2-layer random model with SmolLM2's real tokenizer; decision rows scaled so DMC merges often."""
  from dmc_jax import checkpoint
  real = checkpoint.Checkpoint(smollm2_ckpt).config
  cfg = LlamaConfig(vocab_size=real.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    bos_token_id=real.bos_token_id, eos_token_ids=real.eos_token_ids, max_position_embeddings=256)
  p = jax.tree.map(np.array, nn.unbox(jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
  for i in range(cfg.n_layers):
    p["params"][f"layers_{i}"]["attn"]["k_proj"]["kernel"][:, :, -1] *= 400  # a = k[ch] - 5: about half merge
  path = write_checkpoint(tmp_path_factory.mktemp("lm") / "tiny", cfg, p, smollm2_ckpt, dmc=DMC.to_dict())
  return path, cfg, p


WIDTH = 40  # the direct forward pads every sequence to this width (one compile; the adapter uses 64 and batches)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _forward(cfg, params, method, tokens_1xL):
  if method == "vanilla":
    return Llama(cfg).apply(params, tokens_1xL), None
  if method == "dmc":
    return Llama(cfg, DMC, "eval").apply(params, tokens_1xL)
  return evict_model.forward(cfg, Policy(method, 2.0), params, tokens_1xL)[0], None


def _direct(cfg, params, method, ids):
  """Log-probs of ids[1:] given the prefix, from the model's own forward (one row, no batching)."""
  t = np.zeros((1, WIDTH), np.int32)
  t[0, :len(ids) - 1] = ids[:-1]
  logits, aux = _forward(cfg, params, method, jnp.asarray(t))
  if method == "dmc" and len(ids) > 12:
    assert 0.2 < float(aux["alpha"][:, :, 1:len(ids) - 1].mean()) < 0.8  # DMC really merges here
  logp = jax.nn.log_softmax(logits[0, :len(ids) - 1], -1)
  return np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], -1)[:, 0])


@pytest.mark.parametrize("method", ["vanilla", "dmc", "h2o"])
def test_loglikelihoods_equal_a_direct_forward(tiny, method):
  from lm_eval.api.instance import Instance

  from dmc_jax.lm_eval_adapter import DMCJaxLM
  path, cfg, params = tiny
  lm = DMCJaxLM(path, method=method, cr=2, batch_size=2)
  pairs = [("The capital of France is", " Paris"), ("def fib(n):", "\n    return n"),
           ("Once upon a time there was a very long story about a green", " dragon who slept in a cave"),
           ("", "Hello world")]
  reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
  got = lm.loglikelihood(reqs)
  tok = lm.tokenizer
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    ctx_ids = tok.encode(ctx) if ctx else [cfg.bos_token_id]
    whole = tok.encode(ctx + cont) if ctx else [cfg.bos_token_id] + tok.encode(cont)
    lp = _direct(cfg, params, method, whole)
    np.testing.assert_allclose(ll, lp[len(ctx_ids) - 1:].sum(), rtol=1e-5, atol=1e-4)
    assert isinstance(greedy, bool)
  # Rolling log-likelihood of a text = its tokens scored after the prefix token (it fits one window).
  text = "Perplexity of a whole string, token by token."
  (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  ids = [cfg.bos_token_id] + tok.encode(text, add_special_tokens=False)
  np.testing.assert_allclose(rolling, _direct(cfg, params, method, ids).sum(), rtol=1e-5, atol=1e-4)


def test_generate_until_stops_at_the_stop_string(tiny):
  from lm_eval.api.instance import Instance

  from dmc_jax.baselines.policy_generate import PolicyGenerator
  from dmc_jax.lm_eval_adapter import DMCJaxLM
  path, cfg, params = tiny
  lm = DMCJaxLM(path, method="tova", cr=2)
  free = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": [], "max_gen_toks": 12}), 0)])[0]
  assert free
  stop = free[len(free) // 2:len(free) // 2 + 2]
  cut = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": [stop], "max_gen_toks": 12}), 0)])[0]
  assert cut == free[:free.index(stop)]
  # The text is the policy's own greedy decoding (dmc_jax.baselines.policy_generate), EOS removed.
  eos = sorted(set(cfg.eos_token_ids) | set(lm.tokenizer.eos_token_ids))
  direct = PolicyGenerator(cfg, params, Policy("tova", 2.0)).generate([lm.tokenizer.encode("Hello")], 12,
                                                                      eos_ids=eos).tokens[0]
  assert free == lm.tokenizer.decode([t for t in direct if t not in eos])


@pytest.mark.slow  # 48 s: lm-eval's whole task pipeline on the real model
def test_local_multiple_choice_task_end_to_end(tiny, tmp_path, monkeypatch):
  import lm_eval
  from lm_eval.tasks import TaskManager

  from dmc_jax.lm_eval_adapter import DMCJaxLM
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
  (tmp_path / "task.yaml").write_text(f"""task: dmcjax_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
  path, cfg, params = tiny
  lm = DMCJaxLM(path, method="streaming", cr=2, batch_size=4)
  res = lm_eval.simple_evaluate(model=lm, tasks=["dmcjax_local_mc"],
                                task_manager=TaskManager(include_path=str(tmp_path)))
  acc = res["results"]["dmcjax_local_mc"]["acc,none"]
  docs = [json.loads(line) for line in open(DATA)]
  # The reported accuracy is the adapter's own argmax over the choices' log-likelihoods.
  from lm_eval.api.instance import Instance
  want = np.mean([int(np.argmax([ll for ll, _ in lm.loglikelihood(
      [Instance("loglikelihood", {}, (d["question"], c), 0) for c in d["choices"]])]) == d["answer"]) for d in docs])
  assert len(docs) == 6 and acc == pytest.approx(want)
  # The same task through lm-eval's command line (python -m dmc_jax.lm_eval_adapter registers the model name).
  out = tmp_path / "cli"
  subprocess.run([sys.executable, "-m", "dmc_jax.lm_eval_adapter", "--model", "dmc-jax", "--model_args",
                  f"ckpt={path},method=streaming,cr=2", "--batch_size", "4", "--tasks", "dmcjax_local_mc",
                  "--include_path", str(tmp_path), "--output_path", str(out)],
                 check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  (written,) = out.rglob("results*.json")
  assert json.loads(written.read_text())["results"]["dmcjax_local_mc"]["acc,none"] == pytest.approx(acc)
