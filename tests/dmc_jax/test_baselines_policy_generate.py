"""generate with an eviction policy: equals re-running the exact parallel policy forward; CR 1 = vanilla; CLI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dmc_jax.baselines import evict_model
from dmc_jax.baselines.policies import Policy
from dmc_jax.baselines.policy_generate import PolicyGenerator, kept_entries
from dmc_jax.config import LlamaConfig
from dmc_jax.generate import Generator
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
WIDTH = 32


@pytest.fixture(scope="module")
def params():
  p = nn.unbox(jax.jit(Llama(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, p)  # peakier logits: fewer argmax ties


_forward = jax.jit(evict_model.forward, static_argnums=(0, 1))


def _greedy_reference(params, policy, prompt, n):
  """Greedy decoding by re-running the parallel policy forward on the whole (right-padded) sequence."""
  seq = list(prompt)
  for _ in range(n):
    logits, _ = _forward(CFG, policy, params, jnp.asarray([seq + [0] * (WIDTH - len(seq))]))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("policy", [Policy("h2o", 3.0), Policy("tova", 2.0), Policy("streaming", 2.0, sinks=2)],
                         ids=Policy.label)
def test_decode_with_the_policy_equals_the_parallel_policy_forward(params, policy):
  prompts = [[3, 7, 9], [5, 1, 2, 8, 8, 4, 0, 11], [42]]
  res = PolicyGenerator(CFG, params, policy).generate(prompts, 10, stop_at_eos=False)
  for p, out in zip(prompts, res.tokens):
    assert _greedy_reference(params, policy, p, 10) == out
  # The policy changes the logits (else this test could not tell the caches apart).
  seq = jnp.asarray([prompts[1] + res.tokens[1] + [0] * (WIDTH - 18)])
  assert jnp.abs(_forward(CFG, policy, params, seq)[0] - Llama(CFG).apply(params, seq))[0, :18].max() > 1e-3
  assert kept_entries(policy, res.prompt_lengths, res.decode_steps) == [policy.budget(n + 9) for n in (3, 8, 1)]
  # The compact cache, sized for 64 tokens (32-token prompt bucket + 10, rounded up to 32): its bytes are its
  # slots', not vanilla's 64 (at CR 3 fewer than the 32 prompt slots it is prefilled from).
  slots = evict_model.capacity(policy, 64)
  assert slots == policy.budget(64) + 1 < 64
  per_slot = CFG.n_layers * 3 * CFG.n_kv_heads * (2 * CFG.head_dim * 4 + 4 + 4 + 1)
  assert res.cache_bytes == slots * per_slot


def test_cr_1_generates_like_the_vanilla_cache(params):
  prompts = [[3, 7, 9], [5, 1, 2, 8, 8, 4, 0, 11]]
  want = Generator(CFG, params).generate(prompts, 8, stop_at_eos=False).tokens
  assert PolicyGenerator(CFG, params, Policy("tova", 1.0)).generate(prompts, 8, stop_at_eos=False).tokens == want


def test_generate_cli_with_a_policy(tmp_path, smollm2_ckpt, params, capsys):
  from helpers import write_checkpoint

  from dmc_jax import checkpoint
  from experiments.cli import dmc as cli_dmc
  real = checkpoint.Checkpoint(smollm2_ckpt).config
  cfg = CFG.replace(vocab_size=real.vocab_size, eos_token_ids=real.eos_token_ids, bos_token_id=real.bos_token_id)
  p = nn.unbox(jax.jit(Llama(cfg).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))
  ckpt = write_checkpoint(tmp_path / "tiny", cfg, p, smollm2_ckpt)
  args = ["generate", ckpt, "--prompt", "The capital of France is", "--max-new-tokens", "6", "--ignore-eos"]
  assert cli_dmc.main(args + ["--policy", "h2o", "--policy-cr", "2"]) == 0
  err = capsys.readouterr().err
  assert "[policy] h2o@2: entries kept per layer and KV head at the end" in err
  assert cli_dmc.main(args + ["--policy", "lru"]) == 2
  assert "cache: unknown 'lru'" in capsys.readouterr().err
  assert cli_dmc.main(args + ["--policy", "h2o", "--dmc"]) == 2


def test_decode_step_updates_the_compact_cache_in_place(params):
  """Per-layer buffers, donated: a decode step writes one slot per (layer, sequence, KV head), so its compiled
  temporaries are a small fraction of the cache (restacking it through a scan would need a whole copy)."""
  policy = Policy("h2o", 2.0)
  gen = PolicyGenerator(CFG, params, policy)
  b = 8
  cache = gen._new_cache(b, 2048)
  key = jax.random.key(0)
  step = gen.compiled_step(cache, jnp.zeros((b,), jnp.int32), jnp.full((b,), 3, jnp.int32), key)
  total = sum(x.nbytes for x in jax.tree.leaves(cache))
  temp = step.memory_analysis().temp_size_in_bytes
  assert temp < 0.25 * total, (temp, total)
