"""Batched generation: ragged prompts, sampling options, EOS, and the CLI."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.config import LlamaConfig
from dmc_jax.generate import Generator, Sampling, sample
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def gen():
  params = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # peakier logits: fewer argmax ties
  return Generator(CFG, params)


@jax.jit
def _forward(params, tokens):
  return Llama(CFG).apply(params, tokens)


def _greedy_reference(params, prompt, n, width=32):
  """Greedy decoding by re-running the parallel forward (no cache) on the whole sequence each step.

  The sequence is right-padded to a fixed width (causal: padding after position t cannot change its logits),
  so this compiles once.
  """
  seq = list(prompt)
  for _ in range(n):
    logits = _forward(params, jnp.asarray([seq + [0] * (width - len(seq))]))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_ragged_batch_equals_single_sequences_and_the_uncached_model(gen):
  prompts = [[3, 7, 9], [5, 1, 2, 8, 8, 4, 0, 11], [42]]
  batch = gen.generate(prompts, 10, stop_at_eos=False)
  for p, out in zip(prompts, batch.tokens):
    assert gen.generate([p], 10, stop_at_eos=False).tokens[0] == out
    assert _greedy_reference(gen.params, p, 10) == out


def test_eos_stops_each_sequence_on_its_own(gen):
  prompts = [[3, 7, 9], [5, 1, 2]]
  free = gen.generate(prompts, 12, stop_at_eos=False).tokens
  eos = free[0][4]
  stopped = gen.generate(prompts, 12, eos_ids=[eos]).tokens
  assert stopped[0] == free[0][:free[0].index(eos) + 1]
  cut = free[1].index(eos) + 1 if eos in free[1] else len(free[1])
  assert stopped[1] == free[1][:cut]


def test_sampling_is_seeded_and_top_k_1_is_greedy(gen):
  prompts = [[1, 2, 3], [4, 5]]
  hot = Sampling(temperature=1.5)
  a = gen.generate(prompts, 12, hot, seed=1, stop_at_eos=False).tokens
  assert a == gen.generate(prompts, 12, hot, seed=1, stop_at_eos=False).tokens
  assert a != gen.generate(prompts, 12, hot, seed=2, stop_at_eos=False).tokens
  greedy = gen.generate(prompts, 12, stop_at_eos=False).tokens
  assert gen.generate(prompts, 12, Sampling(temperature=1.0, top_k=1), seed=3, stop_at_eos=False).tokens == greedy
  assert gen.generate(prompts, 12, Sampling(temperature=1.0, top_p=1e-6), seed=4,
                      stop_at_eos=False).tokens == greedy


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda s: np.array([int(sample(logits, k, s)[0]) for k in keys])
  assert set(draw(Sampling(1.0, top_k=2))) == {0, 1}
  assert set(draw(Sampling(1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 ≤ 0.8: the two best
  assert set(draw(Sampling(1.0, top_p=0.85))) == {0, 1, 2}
  assert set(draw(Sampling(1.0))) == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options(bad):
  with pytest.raises(ValueError):
    Sampling(**bad)


def test_cli_generate_batch(smollm2_ckpt):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.cli.dmc", "generate", smollm2_ckpt, "--max-new-tokens", "8",
       "--prompt", "The capital of France is", "--prompt", "Water boils at a temperature of"],
      capture_output=True, text=True, check=True)
  assert "--- [0] ---\nThe capital of France is Paris." in out.stdout
  assert "--- [1] ---\nWater boils at a temperature of" in out.stdout
  stats = out.stderr.strip().splitlines()[-1]
  assert stats.startswith("[generate] batch 2, prompt tokens [5, 6]") and "tokens/s" in stats
  assert "KV cache" in stats


def test_cli_generate_errors_are_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.cli.dmc", "generate", str(tmp_path), "--prompt", "x"],
                       capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and "checkpoint.json: missing" in out.stderr


def test_dmc_generation_equals_the_parallel_dmc_forward():
  """Greedy decoding through the paged compressed cache == re-running the eval-mode parallel forward."""
  from dmc_jax.config import DMCConfig
  from dmc_jax.generate import _FORCED_KEY, DMCOptions, forced_merge_decisions
  params = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  dmc = DMCConfig(window=3)
  gen = Generator(CFG, params, dmc=DMCOptions(dmc, page_size=4, forced_merge_rate=0.6))
  prompts = [[3, 7, 9], [5, 1, 2, 8, 8, 4, 0, 11]]
  result = gen.generate(prompts, 10, stop_at_eos=False)
  model = Llama(CFG, dmc, "eval")
  width = 32
  forced = forced_merge_decisions(jax.random.key(_FORCED_KEY), jnp.arange(width)[None], CFG.n_layers,
                                  CFG.n_kv_heads, 0.6)
  forward = jax.jit(lambda t: model.apply(params, t, forced_alpha=forced)[0])
  for p, out in zip(prompts, result.tokens):
    seq = list(p)
    for _ in range(10):
      logits = forward(jnp.asarray([seq + [0] * (width - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert seq[len(p):] == out
  assert 1.8 < result.dmc["cr"]["overall"] < 3.2
  assert result.cache_bytes == result.dmc["memory"]["total"]


@pytest.mark.slow  # 71 s: the real model's prefill and decode compiled twice (checkpoint settings, then forced)
def test_cli_generate_with_dmc_settings_from_the_checkpoint(tmp_path, smollm2_ckpt):
  import json
  import shutil
  ckpt = tmp_path / "ck"
  shutil.copytree(smollm2_ckpt, ckpt)
  meta = json.load(open(ckpt / "checkpoint.json"))
  meta["compression"] = {"method": "dmc", "window": 5, "decision_channel": "first"}
  json.dump(meta, open(ckpt / "checkpoint.json", "w"))
  out = subprocess.run(
      [sys.executable, "-m", "experiments.cli.dmc", "generate", str(ckpt), "--max-new-tokens", "12", "--dmc",
       "--dmc-force-cr", "4", "--page-size", "16", "--prompt", "The capital of France is",
       "--prompt", "Water boils at"], capture_output=True, text=True, check=True)
  assert out.stdout.count("--- [") == 2
  err = out.stderr
  assert "'window': 5" in err and "'decision_channel': 'first'" in err and "page size 16" in err
  line = next(l for l in err.splitlines() if l.startswith("[dmc] realised CR"))
  cr = float(line.split()[3].rstrip(";"))
  assert 2.5 < cr < 5.5, line  # short sequences: CR 4 forced, token 0 always appends
  assert sum(l.startswith("[dmc] CR layer") for l in err.splitlines()) == 30
  meta["compression"] = {"method": "dmc", "window": 5, "tau": 1}
  json.dump(meta, open(ckpt / "checkpoint.json", "w"))
  bad = subprocess.run([sys.executable, "-m", "experiments.cli.dmc", "generate", str(ckpt), "--dmc", "--prompt", "x"],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "checkpoint.json: compression: unknown key(s) ['tau']" in bad.stderr


@pytest.mark.slow  # 42 s on 2 busy cores, as long with --attention-impl xla: the generator's compiles
def test_cli_generate_dmc_with_the_tpu_kernel(tmp_path, smollm2_ckpt, capsys, monkeypatch):
  """`generate --dmc --attention-impl tpu`: the DMC decode runs the Pallas TPU kernel (interpreted here)."""
  from helpers import write_checkpoint

  from dmc_jax import checkpoint
  from experiments.cli import dmc as cli_dmc
  from pallas_kernels.dmc_decode import tpu
  calls, kernel = [], tpu.paged_decode_attention
  monkeypatch.setattr(tpu, "paged_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  real = checkpoint.Checkpoint(smollm2_ckpt).config
  cfg = CFG.replace(vocab_size=real.vocab_size, eos_token_ids=real.eos_token_ids, bos_token_id=real.bos_token_id)
  rng = np.random.default_rng(1)  # numpy weights: compiling Llama.init for a 49152-token vocabulary costs more
  shapes = jax.eval_shape(lambda: nn.unbox(Llama(cfg).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))))
  p = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape) if x.ndim > 1 else np.ones(x.shape))
                   .astype(np.float32), shapes)
  ckpt = write_checkpoint(tmp_path / "tiny", cfg, p, smollm2_ckpt)
  assert cli_dmc.main(["generate", ckpt, "--prompt", "The capital of France is", "--max-new-tokens", "4",
                       "--ignore-eos", "--dmc", "--dmc-force-cr", "2", "--page-size", "4",
                       "--attention-impl", "tpu"]) == 0
  err = capsys.readouterr().err
  assert "[dmc] realised CR" in err and calls
