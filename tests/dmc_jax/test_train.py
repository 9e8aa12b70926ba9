"""DMC retrofitting losses and steps (dmc_jax/train.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmc_jax import dmc as dmc_math
from dmc_jax import train
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=67, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
DMC = DMCConfig(window=4)


def _batch(seed=0, b=2, l=16):
  tokens = jax.random.randint(jax.random.key(seed), (b, l + 1), 0, CFG.vocab_size)
  seg = jnp.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4])
  mask = (seg > 0) & jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros((b, 1), bool)], axis=1)
  return {"tokens": tokens[:, :l], "targets": tokens[:, 1:], "segment_ids": seg, "loss_mask": mask.astype(jnp.int32)}


def test_lm_loss_is_masked_mean_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = jnp.array([[1, 2, 3], [4, 0, 1]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 0, 4]) / 3
  np.testing.assert_allclose(train.lm_loss(logits, targets, mask), want, rtol=1e-6)


def test_dmc_loss_is_lm_plus_cr_and_reports_metrics():
  params = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  batch = _batch()
  loss, m = train.dmc_loss(CFG, DMC)(params, batch, jax.random.key(1), 2.0)
  np.testing.assert_allclose(loss, m["lm_loss"] + m["cr_loss"], rtol=1e-6)
  assert m["merge_fraction_per_head"].shape == (CFG.n_layers, CFG.n_kv_heads)
  # Random decision rows: a = k[ch] - 5 is negative almost everywhere, so nothing merges and the CR loss is
  # the full one-sided gap p = 1 - 1/2.
  assert float(m["realised_cr"]) < 1.05
  np.testing.assert_allclose(m["cr_loss"], 0.5, atol=0.05)
  stage1, m1 = train.vanilla_loss(CFG, DMC)(params, batch, 1.0)
  np.testing.assert_allclose(stage1, train.lm_loss(Llama(CFG).apply(params, batch["tokens"],
                                                                    segment_ids_BxL=batch["segment_ids"]),
                                                   batch["targets"], batch["loss_mask"]), rtol=1e-6)


def test_cr_loss_drives_merges_after_stage1_surgery():
  """From zeroed decision rows (a = -c everywhere), the CR loss with a fast decision-row LR makes heads merge.

  Offset c = 1 instead of 5: at c = 5 the relaxed decisions start saturated (σ(−50 + 10u)) and a random tiny
  model has no shared hidden direction to push every a_t up at once, so it would need far more steps — the slow
  start docs/dmc.md §6 describes for real models at small learning rates.
  """
  dmc = DMCConfig(window=4, offset=1.0)
  params = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  params = dmc_math.zero_decision_rows(params, dmc)
  tx = optax.chain(optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1), train.scale_decision_rows(30.0, dmc))
  step = jax.jit(train.make_train_step(train.dmc_loss(CFG, dmc), tx))
  opt_state = tx.init(params)
  before = params
  probe = _batch(seed=999)

  def eval_cr(p):  # noiseless hard decisions, as inference makes them
    _, aux = Llama(CFG, dmc, "eval").apply(p, probe["tokens"], segment_ids_BxL=probe["segment_ids"])
    return float(dmc_math.realised_cr(aux["alpha"], probe["segment_ids"] > 0))
  assert eval_cr(params) == 1.0
  for i in range(20):
    params, opt_state, m = step(params, opt_state, _batch(seed=i), jax.random.key(100 + i), 4.0)
  assert eval_cr(params) > 1.3, eval_cr(params)
  # The decision rows moved ~30x more per step than the other q/k weights.
  q0, q1 = (p["params"]["layers_0"]["attn"]["k_proj"]["kernel"] for p in (before, params))
  moved_ch = float(jnp.mean(jnp.abs(q1[..., -1] - q0[..., -1])))
  moved_rest = float(jnp.mean(jnp.abs(q1[..., :-1] - q0[..., :-1])))
  assert moved_ch > 5 * moved_rest, (moved_ch, moved_rest)


def test_retrofit_step_runs_the_three_stages():
  dmc = DMCConfig(window=4)
  params = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  tx = optax.adamw(1e-3)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  step = jax.jit(train.make_retrofit_step(CFG, dmc, tx, stage1_steps=3, ramp_steps=4, target_cr=3.0))
  seen = []
  for i in range(9):
    state, m = step(state, _batch(seed=i), jax.random.key(i))
    seen.append((int(m["stage"]), float(m["fade"]), float(m["target_cr"])))
    k = state["params"]["params"]["layers_0"]["attn"]["k_proj"]["kernel"]
    if i == 2:  # stage 1 trains the decision rows like any other weight
      assert float(jnp.max(jnp.abs(k[..., -1]))) > 0.01
    if i == 3:  # the first DMC step zeroed them (surgery), then one Adam update (|step| <= lr) moved them
      assert float(jnp.max(jnp.abs(k[..., -1]))) <= 1.1e-3 < float(jnp.max(jnp.abs(k[..., :-1])))
      # ... and cleared their Adam moments, which now hold the one post-surgery gradient g: mu = 0.1 g and
      # nu = 0.001 g² (optax defaults), so nu = 0.1 mu² — stage-1 history would break this.
      adam = state["opt_state"][0]
      mu = adam.mu["params"]["layers_0"]["attn"]["k_proj"]["kernel"]
      nu = adam.nu["params"]["layers_0"]["attn"]["k_proj"]["kernel"]
      np.testing.assert_allclose(nu[..., -1], 0.1 * mu[..., -1] ** 2, rtol=1e-4, atol=1e-30)
      assert not np.allclose(nu[..., :-1], 0.1 * mu[..., :-1] ** 2, rtol=1e-2, atol=0)
  assert [s for s, _, _ in seen] == [1, 1, 1, 2, 2, 2, 2, 3, 3]
  np.testing.assert_allclose([f for _, f, _ in seen[:3]], [1.0, 1 - 1 / 2.4, 1 - 2 / 2.4], rtol=1e-5)
  np.testing.assert_allclose([c for _, _, c in seen[3:]], [1.0, 1.5, 2.0, 2.5, 3.0, 3.0], rtol=1e-5)
  assert int(state["step"]) == 9


def _state(tx, cfg=CFG):
  params = nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


@pytest.mark.slow  # 27 s: two retrofit-step compiles
def test_gradient_accumulation_equals_the_whole_batch():
  # Rows with different token counts: the microbatch losses must be token-weighted to match the full batch.
  tx = optax.sgd(1.0)
  batch = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), _batch(seed=1), _batch(seed=2))
  outs = []
  for accum in (1, 4):  # stage 1 of a DMC run (faded channel, no Gumbel noise): deterministic
    step = jax.jit(train.make_retrofit_step(CFG, DMC, tx, 3, 4, 2.0, grad_accum=accum))
    new, m = step(_state(tx) | {"step": jnp.ones((), jnp.int32)}, batch, jax.random.key(0))
    outs.append((new["params"], float(m["loss"]), float(m["lm_loss"]), float(m["grad_norm"])))
  np.testing.assert_allclose(outs[1][1:], outs[0][1:], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), outs[1][0], outs[0][0])


def test_vanilla_mode_never_touches_the_decision_rows_and_reports_stage_0():
  tx = optax.adamw(1e-3)
  step = jax.jit(train.make_retrofit_step(CFG, DMC, tx, 1, 2, 2.0, mode="vanilla"))
  state = _state(tx)
  for i in range(3):  # passes the step where a DMC run would do its surgery
    state, m = step(state, _batch(seed=i), jax.random.key(i))
    assert int(m["stage"]) == 0 and float(m["target_cr"]) == 1.0 and float(m["cr_loss"]) == 0.0
  k = state["params"]["params"]["layers_0"]["attn"]["k_proj"]["kernel"]
  assert float(jnp.min(jnp.max(jnp.abs(k[..., -1]), axis=0))) > 0.01
