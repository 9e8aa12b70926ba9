"""The parallel eval-mode forward and prefill + step-by-step decode through the paged cache agree (docs/dmc.md §5)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import cache as dmc_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.generate import decode_dmc, prefill_dmc
from dmc_jax.model.llama import Llama

MHA = LlamaConfig(vocab_size=61, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, head_dim=12)
GQA = MHA.replace(n_kv_heads=2)
PAGE = 4
PROMPTS = [1, 4, 7]  # a single token, a page boundary, a partial page
STEPS = 9


def random_params(cfg, seed=0):
  params = nn.unbox(Llama(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, params)  # peakier attention: errors show


def run_both(cfg, dmc, params, tokens, forced=None):
  """(parallel logits at each sequence's decoded positions, decode logits, final cache, prefill logits)."""
  eval_model = Llama(cfg, dmc, "eval")
  ref = eval_model.apply(params, tokens, forced_alpha=forced)[0]
  lengths = jnp.array(PROMPTS)
  p = max(PROMPTS)
  cache = dmc_cache.init_cache(cfg, dmc, len(PROMPTS), p + STEPS, page_size=PAGE)
  prompt = jnp.where(jnp.arange(p)[None, :] < lengths[:, None], tokens[:, :p], 0)  # right-padded
  logits, cache = prefill_dmc(eval_model, params, prompt, lengths, cache,
                              None if forced is None else forced[:, :, :p])
  for b, n in enumerate(PROMPTS):
    np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=1e-4)
  got, want = [], []
  batch = jnp.arange(len(PROMPTS))
  for s in range(STEPS):
    pos = lengths + s
    step_forced = None if forced is None else forced[:, batch, pos]  # [layers, B, K]
    out, cache = decode_dmc(eval_model, params, tokens[batch, pos], cache, step_forced)
    got.append(out)
    want.append(ref[batch, pos])
  return np.stack(want, 1), np.stack(got, 1), cache


def _tokens(seed=1):
  return jax.random.randint(jax.random.key(seed), (len(PROMPTS), max(PROMPTS) + STEPS), 0, MHA.vocab_size)


def _forced(cfg, merge_rate, seed=2):
  t = max(PROMPTS) + STEPS
  alpha = jax.random.bernoulli(jax.random.key(seed), merge_rate, (cfg.n_layers, len(PROMPTS), t, cfg.n_kv_heads))
  return alpha.astype(jnp.float32).at[:, :, 0].set(0.0)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("window, merge_rate", [(3, 0.5), (12, 0.75), (None, 0.6)])
def test_forced_decisions(cfg, window, merge_rate):
  dmc = DMCConfig(window=window)
  want, got, cache = run_both(cfg, dmc, random_params(cfg), _tokens(), _forced(cfg, merge_rate))
  np.testing.assert_allclose(got, want, atol=1e-4)
  cr = dmc_cache.realised_cr(cache)["overall"]
  assert 1.5 < cr < 4.5, cr
  assert not bool(cache.overflow)


def calibrated_params(cfg, dmc, tokens, seed=0):
  """Random weights whose decision rows make every head merge about half of the tokens.

  Layer by layer (each layer's input depends on the decisions below it), the k_proj row producing channel ch is
  fitted by least squares so that k[ch] ≈ c + N(0, 1) on these tokens, i.e. a = k[ch] − c ≈ N(0, 1).
  """
  params = random_params(cfg, seed)
  ch = dmc.channel(cfg.head_dim)
  rng = np.random.default_rng(seed)
  model = Llama(cfg, dmc, "eval")
  for layer in range(cfg.n_layers):
    _, state = model.apply(params, tokens, capture_intermediates=True, mutable=["intermediates"])
    h = np.asarray(state["intermediates"][f"layers_{layer}"]["attn_norm"]["__call__"][0])
    h = h.reshape(-1, cfg.d_model)
    kernel = np.array(params["params"][f"layers_{layer}"]["attn"]["k_proj"]["kernel"])
    for head in range(cfg.n_kv_heads):
      target = dmc.offset + rng.standard_normal(h.shape[0])
      kernel[:, head, ch] = np.linalg.lstsq(h, target, rcond=None)[0]
    params["params"][f"layers_{layer}"]["attn"]["k_proj"]["kernel"] = jnp.asarray(kernel)
  return params


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_decisions_computed_by_the_model(cfg):
  dmc = DMCConfig(window=4)
  tokens = _tokens(seed=5)
  params = calibrated_params(cfg, dmc, tokens)
  _, aux = Llama(cfg, dmc, "eval").apply(params, tokens)
  frac = np.asarray(aux["alpha"][:, :, 1:]).mean(axis=(1, 2))  # [layers, K], token 0 always appends
  assert np.all((frac > 0.3) & (frac < 0.7)), frac
  want, got, cache = run_both(cfg, dmc, params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_always_append_is_vanilla_with_channel_ch_zeroed():
  cfg, dmc = GQA, DMCConfig()
  params = random_params(cfg)
  tokens = _tokens()
  never = jnp.zeros((cfg.n_layers,) + tokens.shape + (cfg.n_kv_heads,))
  dmc_logits, _ = Llama(cfg, dmc, "eval").apply(params, tokens, forced_alpha=never)
  vanilla = Llama(cfg, dmc, "off").apply(params, tokens, fade=jnp.float32(0.0))
  np.testing.assert_allclose(dmc_logits, vanilla, atol=1e-5)
  # ... and it is not the untouched vanilla model (channel ch matters).
  assert not np.allclose(dmc_logits, Llama(cfg).apply(params, tokens), atol=1e-3)
  # The same cache contents: every DMC slot is the vanilla cache entry of its token.
  n = tokens.shape[1]
  from dmc_jax.model.llama import init_cache
  _, vanilla_cache = Llama(cfg, dmc, "off").apply(
      params, tokens, init_cache(cfg, tokens.shape[0], n), jnp.zeros(tokens.shape[0], jnp.int32),
      fade=jnp.float32(0.0), method=Llama.forward_with_cache)
  cache = dmc_cache.init_cache(cfg, dmc, tokens.shape[0], n, page_size=PAGE)
  _, cache = prefill_dmc(Llama(cfg, dmc, "eval"), params, tokens, jnp.full(tokens.shape[0], n), cache, never)
  bt, kp, vp = np.asarray(cache.block_table), np.asarray(cache.k_pages), np.asarray(cache.v_pages)
  for layer in range(cfg.n_layers):
    for b in range(tokens.shape[0]):
      for h in range(cfg.n_kv_heads):
        assert int(cache.lengths[layer, b, h]) == n
        k = kp[bt[layer, b, h]].reshape(-1, cfg.head_dim)[:n]
        v = vp[bt[layer, b, h]].reshape(-1, cfg.head_dim)[:n]
        np.testing.assert_allclose(k, vanilla_cache[layer]["k"][b, h], atol=1e-5)
        np.testing.assert_allclose(v, vanilla_cache[layer]["v"][b, h], atol=1e-5)


@pytest.mark.slow  # 24 s: scanned and unrolled models compiled side by side
def test_scanned_layers_prefill_and_decode():
  """A scanned model (one compiled layer body; the page pool rides in the scan carry) computes the same."""
  from dmc_jax.convert import layout
  dmc = DMCConfig(window=3)
  params = random_params(GQA)
  scanned = {"params": layout.stack_layers(params["params"], GQA.n_layers)}
  forced = _forced(GQA, 0.6)
  want, got, _ = run_both(GQA.replace(scan_layers=True), dmc, scanned, _tokens(), forced)
  np.testing.assert_allclose(got, want, atol=1e-4)
  unscanned_want, _, _ = run_both(GQA, dmc, params, _tokens(), forced)
  np.testing.assert_allclose(want, unscanned_want, atol=1e-4)


def _count_tpu_kernel_calls(monkeypatch) -> list:
  """Counts calls of the Pallas TPU decode kernel (so a test knows the model really went through it)."""
  from pallas_kernels.dmc_decode import tpu
  calls, kernel = [], tpu.paged_decode_attention
  monkeypatch.setattr(tpu, "paged_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  return calls


def _decode_jitted(cfg, dmc, params, tokens, forced, prompts, steps):
  """Prefill + `steps` decode steps, each one compiled program (run_both decodes op by op, which costs more
  than the compiles here). Returns (decode logits [B, steps, V], the parallel forward's at the same positions,
  final cache)."""
  model = Llama(cfg, dmc, "eval")
  b, p = len(prompts), max(prompts)
  lengths = jnp.asarray(prompts)
  cache = dmc_cache.init_cache(cfg, dmc, b, p + steps, page_size=PAGE)
  prompt = jnp.where(jnp.arange(p)[None] < lengths[:, None], tokens[:, :p], 0)
  _, cache = jax.jit(lambda w, t, c: prefill_dmc(model, w, t, lengths, c, forced[:, :, :p]))(params, prompt, cache)
  step = jax.jit(lambda w, t, c, f: decode_dmc(model, w, t, c, f))
  rows, got = jnp.arange(b), []
  for s in range(steps):
    out, cache = step(params, tokens[rows, lengths + s], cache, forced[:, rows, lengths + s])
    got.append(out)
  ref = np.asarray(jax.jit(lambda w, t: model.apply(w, t, forced_alpha=forced)[0])(params, tokens))
  want = np.stack([ref[np.arange(b), np.asarray(prompts) + s] for s in range(steps)], 1)
  return np.stack(got, 1), want, cache


def test_tpu_decode_kernel_in_the_model(monkeypatch):
  """attention_impl="tpu": the Pallas TPU decode kernel (interpreted on this host) in the model's DMC decode
  keeps parallel ≡ prefill + decode."""
  calls = _count_tpu_kernel_calls(monkeypatch)
  # Weights, tokens and decisions drawn with numpy: Llama.init and jax.random compile for longer than this test.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: nn.unbox(Llama(GQA).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 3 / np.sqrt(x.shape[0]), x.shape) if x.ndim > 1
                                              else 1 + 0.1 * rng.standard_normal(x.shape), x.dtype), shapes)
  tokens = jnp.asarray(rng.integers(0, GQA.vocab_size, (len(PROMPTS), max(PROMPTS) + STEPS)))
  forced = rng.random((GQA.n_layers,) + tokens.shape + (GQA.n_kv_heads,)) < 0.6
  forced = jnp.asarray(forced, jnp.float32).at[:, :, 0].set(0.0)
  got, want, cache = _decode_jitted(GQA.replace(attention_impl="tpu"), DMCConfig(window=3), params, tokens, forced,
                                    PROMPTS, STEPS)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert len(calls) == GQA.n_layers  # traced once per layer into the compiled step
  assert 1.5 < dmc_cache.realised_cr(cache)["overall"] < 4.5 and not bool(cache.overflow)


@pytest.mark.slow
def test_smollm2_decode_with_the_tpu_kernel(smollm2_ckpt, monkeypatch):
  """The real SmolLM2-135M (30 layers, G = 3, head_dim 64) with forced decisions: prefill + decode through the
  TPU kernel equals the XLA decode path and the parallel eval-mode forward."""
  from dmc_jax import checkpoint
  from dmc_jax.convert import layout
  from dmc_jax.generate import forced_merge_decisions
  ck = checkpoint.Checkpoint(smollm2_ckpt)
  cfg = ck.config.replace(scan_layers=True)  # one compiled layer body: one interpreted kernel to compile
  params = {"params": layout.stack_layers(jax.device_put(ck.load_params())["params"], cfg.n_layers)}
  text = ck.tokenizer().encode("The capital of France is Paris, and water boils at one hundred degrees Celsius "
                               "at sea level.")
  prompts, steps = [3, 8], 6
  n = max(prompts) + steps
  tokens = jnp.asarray([text[:n], text[2:n + 2]])
  forced = forced_merge_decisions(jax.random.key(7), jnp.arange(n)[None].repeat(2, 0), cfg.n_layers,
                                  cfg.n_kv_heads, 0.5)
  calls = _count_tpu_kernel_calls(monkeypatch)
  dmc = DMCConfig(window=4)
  got, want, cache = _decode_jitted(cfg.replace(attention_impl="tpu"), dmc, params, tokens, forced, prompts, steps)
  assert calls and not bool(cache.overflow)
  xla, _, _ = _decode_jitted(cfg.replace(attention_impl="xla"), dmc, params, tokens, forced, prompts, steps)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, xla, atol=1e-4 * scale)
  np.testing.assert_allclose(got, want, atol=1e-3 * scale)
