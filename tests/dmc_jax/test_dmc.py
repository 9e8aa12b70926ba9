"""DMC math (dmc_jax/dmc.py) against direct formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import dmc as dmc_math
from dmc_jax.config import ConfigError, DMCConfig, LlamaConfig
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def _random_decisions(key, b, l, k, rate=0.6):
  alpha = jax.random.uniform(key, (b, l, k))
  alpha = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), (b, l, k)) < rate, alpha, 0.0)
  return alpha.at[:, 0].set(0.0)


@pytest.mark.parametrize("window", [1, 3, 12])
def test_windowed_accumulation_equals_a_direct_loop(window):
  b, l, kv, d = 2, 17, 3, 5
  keys = jax.random.split(jax.random.key(0), 4)
  k = jax.random.normal(keys[0], (b, l, kv, d))
  v = jax.random.normal(keys[1], (b, l, kv, d))
  alpha = _random_decisions(keys[2], b, l, kv)  # relaxed values in [0, 1), not just 0/1
  omega = jax.random.uniform(keys[3], (b, l, kv), minval=0.5, maxval=1.5)
  num_k, num_v, den = dmc_math.accumulate(k, v, alpha, omega, window)
  a, w, kk, vv = map(np.asarray, (alpha, omega, k, v))
  for t in range(l):
    ek, ev, ez = np.zeros((b, kv, d)), np.zeros((b, kv, d)), np.zeros((b, kv))
    for m in range(min(window, t + 1)):
      p = np.prod(a[:, t - m + 1:t + 1], axis=1) if m else np.ones((b, kv))
      ek += (p * w[:, t - m])[..., None] * kk[:, t - m]
      ev += (p * w[:, t - m])[..., None] * vv[:, t - m]
      ez += p * w[:, t - m]
    np.testing.assert_allclose(num_k[:, t], ek, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(num_v[:, t], ev, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(den[:, t], ez, rtol=1e-5, atol=1e-6)


def test_unbounded_window_is_the_plain_recurrence():
  b, l, kv, d = 2, 23, 2, 4
  keys = jax.random.split(jax.random.key(1), 4)
  k, v = jax.random.normal(keys[0], (b, l, kv, d)), jax.random.normal(keys[1], (b, l, kv, d))
  alpha = _random_decisions(keys[2], b, l, kv, rate=0.9)
  omega = jax.random.uniform(keys[3], (b, l, kv), minval=0.5, maxval=1.5)
  num_k, _, den = dmc_math.accumulate(k, v, alpha, omega, None)
  s, z = np.zeros((b, kv, d)), np.zeros((b, kv))
  for t in range(l):
    s = np.asarray(alpha[:, t])[..., None] * s + np.asarray(omega[:, t])[..., None] * np.asarray(k[:, t])
    z = np.asarray(alpha[:, t]) * z + np.asarray(omega[:, t])
    np.testing.assert_allclose(num_k[:, t], s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(den[:, t], z, rtol=1e-5)
  # A window longer than the sequence is the same function.
  np.testing.assert_allclose(dmc_math.accumulate(k, v, alpha, omega, l + 5)[0], num_k, rtol=1e-5, atol=1e-5)


def test_decision_and_importance_use_channel_ch():
  q = jax.random.normal(jax.random.key(0), (1, 3, 4, 8))
  k = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
  for convention, ch in (("last", 7), ("first", 0)):
    dmc = DMCConfig(decision_channel=convention)
    a, omega = dmc_math.decision_and_importance(q, k, dmc)
    np.testing.assert_allclose(a, k[..., ch] - 5.0, rtol=1e-6)
    group_mean = q[..., ch].reshape(1, 3, 2, 2).mean(-1)
    np.testing.assert_allclose(omega, jax.nn.sigmoid(group_mean + 5.0) + 2 ** -7, rtol=1e-6)


def test_relaxed_mask_tends_to_the_hard_mask():
  a = jnp.array([[[-2.0], [1.5], [-0.3], [0.7], [3.0]]])  # [B=1, L=5, K=1]
  starts = jnp.array([[True, False, False, True, False]])
  hard = dmc_math.key_bias_hard(jnp.where(starts[..., None], 0.0, (a > 0).astype(jnp.float32)))
  # As τ shrinks the soft bias approaches 0 / −∞ monotonically on the blocked keys.
  blocked = [float(dmc_math.key_bias_relaxed(a / tau, starts)[0, 0, 0]) for tau in (1.0, 0.1, 1e-3)]
  assert blocked[0] > blocked[1] > blocked[2]
  soft = np.asarray(dmc_math.key_bias_relaxed(a / 1e-4, starts))[0, :, 0]
  # Key j is blocked iff token j+1 merged (and j+1 is not a document start); the last key is never blocked.
  np.testing.assert_array_equal(soft < -1000, np.asarray(hard)[0, :, 0] < -1000)
  np.testing.assert_array_equal(np.asarray(hard)[0, :, 0] < -1000, [True, False, False, True, False])
  assert np.all(np.abs(soft[np.asarray(hard)[0, :, 0] == 0]) < 1e-6)


def test_straight_through_hard_forward_soft_gradient():
  x = jnp.array([0.2, 0.6, 0.9])
  np.testing.assert_array_equal(dmc_math.straight_through(x), [0.0, 1.0, 1.0])
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(dmc_math.straight_through(x) * jnp.arange(3.0)))(x),
                             [0.0, 1.0, 2.0])


def test_cr_loss_schedule_and_realised_cr():
  alpha = jnp.zeros((2, 3, 8, 2)).at[:, 0, 1:].set(1.0)  # sequence 0 merges 7 of 8 tokens, sequence 1 none
  valid = jnp.ones((3, 8), bool)
  f = dmc_math.merge_fraction(alpha, valid)
  np.testing.assert_allclose(f, [7 / 8, 0, 0])
  # Target CR 4: p = 0.75; sequence 0 is past it (no penalty), the others pay 0.75 each.
  np.testing.assert_allclose(dmc_math.cr_loss(alpha, valid, 4.0), (0 + 0.75 + 0.75) / 3, rtol=1e-6)
  # Two-sided: sequence 0's overshoot (7/8 − 3/4) is penalised too.
  np.testing.assert_allclose(dmc_math.cr_loss(alpha, valid, 4.0, "two_sided"), (0.125 + 0.75 + 0.75) / 3,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="train.cr_loss"):
    dmc_math.cr_loss(alpha, valid, 4.0, "capped")
  np.testing.assert_allclose(dmc_math.realised_cr(alpha, valid), 1 / (1 - 7 / 24), rtol=1e-6)
  # Padding is not counted.
  valid = valid.at[1:, 4:].set(False)
  np.testing.assert_allclose(dmc_math.merge_fraction(alpha, valid), [7 / 8, 0, 0])
  steps = jnp.array([0, 10, 15, 20, 30])
  np.testing.assert_allclose(dmc_math.cr_schedule(steps, 10, 10, 4.0), [1, 1, 2.5, 4, 4])
  np.testing.assert_allclose(dmc_math.stage1_fade(jnp.array([0, 100, 200, 250]), 250), [1, 0.5, 0, 0])


@pytest.mark.slow  # 22 s: retrofit-step compiles on both sides of the surgery
def test_stage1_surgery_zeroes_decision_rows_only():
  dmc = DMCConfig()
  for cfg in (CFG, CFG.replace(scan_layers=True)):
    params = nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    fixed = dmc_math.zero_decision_rows(params, dmc)
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                            zip(jax.tree.leaves(params), jax.tree.leaves(fixed))):
      name = jax.tree_util.keystr(path[0])
      if "q_proj" in name or "k_proj" in name:
        assert np.all(np.asarray(b)[..., -1] == 0) and np.array_equal(np.asarray(b)[..., :-1], np.asarray(a)[..., :-1])
      else:
        assert np.array_equal(a, b), name
    # Afterwards every decision logit is exactly −c and every token appends.
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    _, aux = Llama(cfg, dmc, "eval").apply(fixed, tokens)
    assert float(jnp.max(aux["alpha"])) == 0.0


@pytest.mark.slow  # 31 s: many forward passes for the finite differences
def test_relaxed_forward_gradients_match_finite_differences():
  """d(loss)/d(decision and importance rows) through noise, sigmoid, accumulation and the mask."""
  jax.config.update("jax_enable_x64", True)
  try:
    cfg = CFG.replace(n_layers=1, param_dtype="float64", dtype="float64")
    # A soft relaxation and offset 0 put decisions and importances in the sigmoids' sensitive range.
    dmc = DMCConfig(window=3, temperature=0.5, offset=0.0)
    params = nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    for proj in ("q_proj", "k_proj"):
      kern = params["params"]["layers_0"]["attn"][proj]["kernel"]
      params["params"]["layers_0"]["attn"][proj]["kernel"] = kern.at[..., -1].multiply(30.0)
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
    model = Llama(cfg, dmc, "train")
    # (The straight-through hard decisions are piecewise constant: their surrogate gradient is not checkable.)

    def loss(p):
      logits, _ = model.apply(p, tokens, rngs={"dmc": jax.random.key(3)})
      assert logits.dtype == jnp.float64
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0])
    grads = jax.grad(loss)(params)
    attn = ("params", "layers_0", "attn")
    rng = np.random.default_rng(0)
    largest = {}
    for proj in ("q_proj", "k_proj"):
      for _ in range(3):
        i, h = rng.integers(cfg.d_model), rng.integers(cfg.n_kv_heads)
        idx = (i, h, cfg.head_dim - 1)
        def bumped(eps):
          p = jax.tree.map(lambda x: x, params)
          kern = p["params"]["layers_0"]["attn"][proj]["kernel"]
          p["params"]["layers_0"]["attn"][proj]["kernel"] = kern.at[idx].add(eps)
          return float(loss(p))
        fd = (bumped(1e-5) - bumped(-1e-5)) / 2e-5
        g = float(grads[attn[0]][attn[1]][attn[2]][proj]["kernel"][idx])
        assert abs(g - fd) <= 1e-6 + 1e-4 * abs(fd), (proj, idx, g, fd)
        largest[proj] = max(largest.get(proj, 0.0), abs(fd))
    assert min(largest.values()) > 1e-4, largest  # the checked gradients are not trivially zero
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.slow  # 25 s: one compile per document length
def test_packed_documents_equal_separate_runs():
  dmc = DMCConfig(window=4)
  params = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  a = jax.random.randint(jax.random.key(1), (1, 6), 0, CFG.vocab_size)
  b = jax.random.randint(jax.random.key(2), (1, 5), 0, CFG.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 6 + [2] * 5])
  model = Llama(CFG, dmc, "eval")
  # Forced merges everywhere: without document handling, document 2 would merge into document 1's last slot.
  merge_all = lambda l: jnp.ones((CFG.n_layers, 1, l, CFG.n_kv_heads))
  out, _ = model.apply(params, packed, segment_ids_BxL=seg, forced_alpha=merge_all(11))
  np.testing.assert_allclose(out[:, :6], model.apply(params, a, forced_alpha=merge_all(6))[0], atol=2e-5)
  np.testing.assert_allclose(out[:, 6:], model.apply(params, b, forced_alpha=merge_all(5))[0], atol=2e-5)
  # Relaxed decisions: a document start appends whatever its noise and decision logit.
  big = jax.tree.map(lambda x: x * 10, params)
  _, aux = Llama(CFG, dmc, "train").apply(big, packed, segment_ids_BxL=seg, rngs={"dmc": jax.random.key(7)})
  assert float(aux["alpha"][:, 0, 0].max()) == 0.0 and float(aux["alpha"][:, 0, 6].max()) == 0.0
  assert float(aux["alpha"].max()) == 1.0  # ... while other tokens do merge


def test_config_validation():
  with pytest.raises(ConfigError, match="decision_channel"):
    DMCConfig(decision_channel="middle")
  with pytest.raises(ConfigError, match="window"):
    DMCConfig(window=0)
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tau'\]"):
    DMCConfig.from_dict({"tau": 0.2})
  assert DMCConfig.from_dict(DMCConfig(window=None).to_dict()) == DMCConfig(window=None)


def test_train_mode_attention_equals_the_dense_formula(monkeypatch):
  """One relaxed DMC attention layer (float64) against docs/dmc.md §5 written out as loops: same noise in the
  accumulation and the bias, bias log(1 − α̃_{j+1}) with the diagonal exempt, α̃ = 0 at document starts."""
  from dmc_jax.model import attention, modes, rope
  jax.config.update("jax_enable_x64", True)
  try:
    cfg = LlamaConfig(vocab_size=61, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32, head_dim=8,
                      dtype="float64", param_dtype="float64")
    dmc = DMCConfig(window=3, temperature=0.7, offset=0.0)
    l, g, ch, w, tau = 9, 2, 7, 3, 0.7
    noise = np.random.default_rng(0).logistic(size=(1, l, 2))
    monkeypatch.setattr(dmc_math, "logistic_noise", lambda key, shape: jnp.asarray(noise))
    seg = jnp.array([[1] * 5 + [2] * 4])
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    cos, sin = rope.cos_sin(pos, cfg)
    ctx = modes.Parallel(cos=cos, sin=sin, starts=dmc_math.document_starts(seg), segment_ids=seg)
    x = jax.random.normal(jax.random.key(1), (1, l, 16), jnp.float64)
    att = attention.Attention(cfg, dmc, "train")
    params = nn.unbox(att.init({"params": jax.random.key(0), "dmc": jax.random.key(2)}, x, ctx))
    params = jax.tree.map(lambda p: p * 3, params)
    out, _, _ = att.apply(params, x, ctx, rngs={"dmc": jax.random.key(3)})

    p = params["params"]
    wq, wk, wv, wo = (np.asarray(p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    xn = np.asarray(x)[0]
    q, k, v = (np.einsum("ld,dhk->lhk", xn, m) for m in (wq, wk, wv))
    a = k[..., ch]
    om = 1 / (1 + np.exp(-q[..., ch].reshape(l, 2, g).mean(-1))) + 2 ** -7
    al = 1 / (1 + np.exp(-(a + noise[0]) / tau))
    al[np.asarray(ctx.starts[0])] = 0
    q[..., ch] = 0
    k[..., ch] = 0
    inv = np.asarray(rope.inverse_frequencies(cfg), np.float64)

    def rot(y, t):
      ang = np.concatenate([t * inv, t * inv])
      return y * np.cos(ang) + np.concatenate([-y[..., 4:], y[..., :4]], -1) * np.sin(ang)
    kt, vt = np.zeros((l, 2, 8)), np.zeros((l, 2, 8))
    for t in range(l):
      for h in range(2):
        nk, nv, dz = 0, 0, 0
        for m in range(min(w, t + 1)):
          pr = np.prod(al[t - m + 1:t + 1, h]) if m else 1.0
          nk, nv, dz = nk + pr * om[t - m, h] * k[t - m, h], nv + pr * om[t - m, h] * v[t - m, h], dz + pr * om[t - m, h]
        kt[t, h] = rot(nk / dz, pos[0, t])
        kt[t, h, ch] = 0
        vt[t, h] = nv / dz
    s = np.asarray(seg[0])
    heads = np.zeros((l, 4, 8))
    for i in range(l):
      for hq in range(4):
        h = hq // g  # query head h uses KV head h // G
        qi = rot(q[i, hq], pos[0, i])
        qi[ch] = 0
        logits = np.full(l, -np.inf)
        for j in range(i + 1):
          if s[j] == s[i]:
            logits[j] = qi @ kt[j, h] / np.sqrt(8) + (0.0 if j == i else np.log(1 - al[j + 1, h]))
        pr = np.exp(logits - logits.max())
        heads[i, hq] = (pr / pr.sum()) @ vt[:, h]
    ref = np.einsum("lhk,hkd->ld", heads, wo)
    np.testing.assert_allclose(np.asarray(out)[0], ref, atol=1e-9)
  finally:
    jax.config.update("jax_enable_x64", False)
