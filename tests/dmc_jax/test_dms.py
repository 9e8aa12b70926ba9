"""DMS (docs/dmc.md §10): the hard parallel forward and prefill + decode through the DMS cache agree; keep-all is
vanilla; evicted slots are reused in place; the realised CR counts evictions; the relaxed forward's gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import dms_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import CachePoolExhausted
from dmc_jax.generate import decode_dmc, prefill_dmc
from dmc_jax.model.llama import Llama
from dmc_jax.model.llama import init_cache as vanilla_cache

# One layer in the default tier (compilation dominates: the machine has 2 shared cores); two in the slow tier, where
# the second layer's input comes from the first layer's cache.
MHA = LlamaConfig(vocab_size=61, d_model=48, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64, head_dim=12)
GQA = MHA.replace(n_kv_heads=2)
PAGE = 4
PROMPTS = [1, 5, 8]  # a single token, past a page boundary, two full pages
STEPS = 6


def random_params(cfg, dmc=None, seed=0):
  model = Llama(cfg) if dmc is None else Llama(cfg, dmc, "eval")
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, params)  # peakier attention: errors show


def tokens_for(seed=1, n=max(PROMPTS) + STEPS):
  return jax.random.randint(jax.random.key(seed), (len(PROMPTS), n), 0, MHA.vocab_size)


@functools.lru_cache(maxsize=None)
def compiled(cfg, dmc):
  """Jitted (forward, prefill, decode), shared by the tests that use the same settings (op by op, a decode step of
  even this tiny model costs seconds; compiling it, more)."""
  model = Llama(cfg, dmc, "eval")
  return (jax.jit(lambda p, t, f: model.apply(p, t, forced_alpha=f)),
          jax.jit(lambda p, t, n, c, f: prefill_dmc(model, p, t, n, c, f)),
          jax.jit(lambda p, t, c, f: decode_dmc(model, p, t, c, f)))


def run_both(cfg, dmc, params, tokens, forced=None, steps=STEPS, num_pages=None):
  """(parallel logits at the decoded positions, decode logits, cache): prefill PROMPTS, then decode `steps`."""
  forward, prefill, decode = compiled(cfg, dmc)
  ref, aux = forward(params, tokens, forced)
  lengths = jnp.array(PROMPTS)
  p = max(PROMPTS)
  cache = dms_cache.init_cache(cfg, dmc, len(PROMPTS), p + steps, page_size=PAGE, num_pages=num_pages)
  prompt = jnp.where(jnp.arange(p)[None, :] < lengths[:, None], tokens[:, :p], 0)  # right-padded
  logits, cache = prefill(params, prompt, lengths, cache, None if forced is None else forced[:, :, :p])
  for b, n in enumerate(PROMPTS):
    np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=1e-4)
  got, want = [], []
  batch = jnp.arange(len(PROMPTS))
  for s in range(steps):
    pos = lengths + s
    out, cache = decode(params, tokens[batch, pos], cache, None if forced is None else forced[:, batch, pos])
    got.append(out)
    want.append(ref[batch, pos])
  if not steps:
    return None, None, cache, np.asarray(aux["alpha"])
  return np.stack(want, 1), np.stack(got, 1), cache, np.asarray(aux["alpha"])


def forced_marks(cfg, rate, seed=2, n=max(PROMPTS) + STEPS):
  alpha = jax.random.bernoulli(jax.random.key(seed), rate, (cfg.n_layers, len(PROMPTS), n, cfg.n_kv_heads))
  return alpha.astype(jnp.float32).at[:, :, 0].set(0.0)


def expected_evictions(alpha_LyxBxTxK, tokens_B, w):
  """Independent count: token j is gone once token j + w + 1 arrived, if the decision at j + 1 marked it."""
  ly, b, _, kv = alpha_LyxBxTxK.shape
  out = np.zeros((ly, b, kv), np.int64)
  for bi, n in enumerate(tokens_B):
    for j in range(n):
      if j + w + 1 <= n - 1:
        out[:, bi] += alpha_LyxBxTxK[:, bi, j + 1] > 0.5
  return out


@pytest.mark.parametrize("cfg, window, rate", [
    (MHA, 1, 0.6), (GQA, 4, 0.5), pytest.param(GQA, 40, 0.7, marks=pytest.mark.slow),
    pytest.param(GQA.replace(n_layers=2), 4, 0.5, marks=pytest.mark.slow)],
    ids=["mha-w1", "gqa-w4", "gqa-w40", "gqa-w4-2layers"])
def test_forced_decisions_match(cfg, window, rate):
  dmc = DMCConfig(method="dms", dms_window=window)
  forced = forced_marks(cfg, rate)
  want, got, cache, alpha = run_both(cfg, dmc, random_params(cfg), tokens_for(), forced)
  np.testing.assert_allclose(got, want, atol=1e-4)
  tokens = np.asarray(cache.positions)
  evicted = expected_evictions(alpha, tokens, window)
  np.testing.assert_array_equal(np.asarray(cache.evictions), evicted)
  np.testing.assert_array_equal(np.asarray(cache.lengths), tokens[None, :, None] - evicted)
  # Realised CR = tokens ÷ (tokens − evictions), pooled over rows.
  ly, _, kv = evicted.shape
  want_cr = tokens.sum() * ly * kv / (tokens.sum() * ly * kv - evicted.sum())
  assert dms_cache.realised_cr(cache)["overall"] == pytest.approx(want_cr, rel=1e-12)
  assert (evicted.sum() > 0) == (window < max(PROMPTS) + STEPS)  # a window longer than the sequence never evicts
  assert not bool(cache.overflow)


@pytest.mark.parametrize("decisions, cfg, window", [
    ("channel", GQA, 4), ("adapter", MHA, 1),
    pytest.param("adapter", MHA.replace(n_layers=2), 1, marks=pytest.mark.slow)],
    ids=["channel", "adapter", "adapter-2layers"])
def test_model_decisions_match(decisions, cfg, window):
  """The model's own decisions (random weights: about half the logits 100·q[ch] − 5 are positive)."""
  dmc = DMCConfig(method="dms", dms_window=window, decisions=decisions)
  params = random_params(cfg, dmc)
  if decisions == "adapter":  # zero-initialised: give it weights that decide something
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.key(3), x.shape) if "decision_adapter" in str(p) else x,
        params)
  want, got, cache, alpha = run_both(cfg, dmc, params, tokens_for())
  np.testing.assert_allclose(got, want, atol=1e-4)
  frac = alpha[:, :, 1:].mean()
  assert 0.2 < frac < 0.8, frac
  evicted = expected_evictions(alpha, np.asarray(cache.positions), window)
  assert evicted.sum() > 0
  np.testing.assert_array_equal(np.asarray(cache.evictions), evicted)


def test_keep_all_is_vanilla_cache_included():
  """The zero-initialised adapter keeps every token and repurposes no channel: DMS is the original model, and its
  pages hold exactly the vanilla cache's keys and values, in order."""
  cfg = MHA
  dmc = DMCConfig(method="dms", dms_window=1, decisions="adapter")
  params = random_params(cfg, dmc)
  vanilla_params = {"params": {k: {**v, "attn": {n: w for n, w in v["attn"].items() if n != "decision_adapter"}}
                               if k.startswith("layers_") else v for k, v in params["params"].items()}}
  tokens = tokens_for()
  want, got, cache, alpha = run_both(cfg, dmc, params, tokens)
  assert not alpha.any()
  vanilla = np.asarray(Llama(cfg).apply(vanilla_params, tokens))
  batch = np.arange(len(PROMPTS))
  pos = np.asarray(PROMPTS)[:, None] + np.arange(STEPS)[None, :]
  np.testing.assert_allclose(got, vanilla[batch[:, None], pos], atol=1e-4)
  n = max(PROMPTS) + STEPS
  _, vcache = Llama(cfg).apply(vanilla_params, tokens, vanilla_cache(cfg, len(PROMPTS), n),
                               jnp.zeros(len(PROMPTS), jnp.int32), method=Llama.forward_with_cache)
  k_pages, v_pages, table = map(np.asarray, (cache.k_pages, cache.v_pages, cache.block_table))
  for layer in range(cfg.n_layers):
    for b, t in enumerate(np.asarray(cache.positions)):
      for h in range(cfg.n_kv_heads):
        assert cache.lengths[layer, b, h] == t
        slots = np.arange(t)
        pages = table[layer, b, h][slots // PAGE]
        for name, pool in (("k", k_pages), ("v", v_pages)):
          np.testing.assert_allclose(pool[pages, slots % PAGE], np.asarray(vcache[layer][name])[b, h, :t],
                                     atol=1e-5, err_msg=f"{name} layer {layer} seq {b} head {h}")


def test_evicted_slots_are_reused_in_place():
  """Every token marked: after the first w + 1 each new token overwrites the oldest, so a row never grows past
  w + 1 slots and one page per row (w + 1 ≤ the page size) lasts any number of steps; one page fewer is
  exhaustion."""
  cfg = MHA
  w = 1
  dmc = DMCConfig(method="dms", dms_window=w)
  forced = forced_marks(cfg, 1.0)
  rows = cfg.n_layers * len(PROMPTS) * cfg.n_kv_heads
  params = random_params(cfg)
  want, got, cache, _ = run_both(cfg, dmc, params, tokens_for(), forced)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.all(np.asarray(cache.lengths) == w + 1)
  assert int(cache.next_free) == rows and not bool(cache.overflow)
  dms_cache.check(cache)
  ring = np.asarray(cache.ring_slot)
  assert np.all(np.sort(ring, axis=-1) == np.arange(w + 1))  # the pending tokens occupy the only two slots
  _, _, small, _ = run_both(cfg, dmc, params, tokens_for(), forced, 0, rows - 1)  # prefill only
  with pytest.raises(CachePoolExhausted, match="DMS cache pool exhausted"):
    dms_cache.check(small)


@pytest.mark.parametrize("decisions", [pytest.param("channel", marks=pytest.mark.slow), "adapter"])
def test_relaxed_forward_gradients_match_finite_differences(decisions):
  """d(loss)/d(decision parameters) of the train-mode forward (logistic noise, sigmoid, the soft bias beyond the
  window), in float64. τ = 0.5 and offset 0 put the sigmoids in their sensitive range (at τ = 0.1 and offset 5 almost
  every one is saturated at initialisation). The straight-through hard decisions are piecewise constant: their
  surrogate gradient is not checkable."""
  jax.config.update("jax_enable_x64", True)
  try:
    cfg = GQA.replace(n_layers=1, dtype="float64", param_dtype="float64")
    dmc = DMCConfig(method="dms", dms_window=1, decisions=decisions, temperature=0.5, offset=0.0)
    model = Llama(cfg, dmc, "train")
    params = nn.unbox(Llama(cfg, dmc, "eval").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    attn = params["params"]["layers_0"]["attn"]
    name = "decision_adapter" if decisions == "adapter" else "q_proj"
    kernel = attn[name]["kernel"]
    rng = np.random.default_rng(0)
    ch = dmc.channel(cfg.head_dim)
    if decisions == "adapter":  # the decision parameters: the adapter, or q_proj's rows producing channel ch
      kernel = jnp.asarray(rng.normal(0, 3e-4, kernel.shape))  # 100·x̂·W of order 1 (x̂ has unit RMS)
      direction = rng.normal(size=kernel.shape)
    else:
      kernel = kernel.at[..., ch].multiply(0.05)  # logits 100·q[ch] of order 1
      direction = np.zeros(kernel.shape)
      direction[..., ch] = rng.normal(size=kernel.shape[:-1])
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)

    def loss(k):
      p = {"params": {**params["params"], "layers_0": {**params["params"]["layers_0"],
                                                       "attn": {**attn, name: {"kernel": k}}}}}
      logits, _ = model.apply(p, tokens, rngs={"dmc": jax.random.key(3)})
      assert logits.dtype == jnp.float64
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0])
    analytic = float(jnp.sum(jax.jit(jax.grad(loss))(kernel) * direction))
    at = jax.jit(loss)
    numeric = float((at(kernel + 1e-6 * direction) - at(kernel - 1e-6 * direction)) / 2e-6)
    assert abs(analytic) > 1e-3, analytic  # not trivially zero
    assert abs(analytic - numeric) <= 1e-4 * abs(numeric), (analytic, numeric)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_settings_are_validated_and_select_the_cache():
  from dmc_jax.api import CacheChoice, resolve_cache
  from dmc_jax.errors import ArgumentError, ConfigError
  with pytest.raises(ConfigError, match="dmc.method"):
    DMCConfig(method="evict")
  with pytest.raises(ConfigError, match="dmc.dms_window"):
    DMCConfig(method="dms", dms_window=0)
  assert DMCConfig.from_dict(DMCConfig(method="dms", dms_window=8).to_dict()).dms_window == 8
  assert resolve_cache("dms") == CacheChoice("dms") and resolve_cache("dmc", "dms") == CacheChoice("dms")
  with pytest.raises(ArgumentError, match="learned ratio"):
    resolve_cache("dms", "dms", cr=2)

