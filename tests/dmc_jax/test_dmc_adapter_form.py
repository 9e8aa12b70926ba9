"""The adapter form of DMC (dmc.decisions = "adapter"): a zero-initialised decision adapter is the original model,
and parallel ≡ prefill + decode holds for it as for the channel form (tests/dmc_jax/test_dmc_equivalence.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import cache as dmc_cache
from dmc_jax.config import DMCConfig
from dmc_jax.model.llama import Llama


def _equivalence_helpers():
  """The channel form's equivalence harness (a sibling test file; tests are not a package)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).with_name("test_dmc_equivalence.py")
  spec = importlib.util.spec_from_file_location("_dmc_equivalence_helpers", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


_eq = _equivalence_helpers()
GQA, _forced, _tokens, random_params, run_both = _eq.GQA, _eq._forced, _eq._tokens, _eq.random_params, _eq.run_both

DMC = DMCConfig(window=4, decisions="adapter")


def adapter_params(cfg, seed=0):
  """Random base weights plus the zero-initialised decision adapter the DMC model adds."""
  base = random_params(cfg, seed)
  full = nn.unbox(Llama(cfg, DMC, "eval").init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))
  for i in range(cfg.n_layers):
    w = full["params"][f"layers_{i}"]["attn"]["decision_adapter"]["kernel"]
    assert w.shape == (cfg.d_model, cfg.n_kv_heads, 2) and not np.any(np.asarray(w))
    base["params"][f"layers_{i}"]["attn"]["decision_adapter"] = {"kernel": w}
  return base


@pytest.mark.slow  # 32 s in the fresh-clone run: full and adapter-form models compiled side by side
def test_adapter_at_init_is_the_original_model():
  cfg = GQA
  params, tokens = adapter_params(cfg), _tokens()
  original = Llama(cfg).apply(params, tokens)  # the extra adapter weights are unused by the vanilla model
  logits, aux = Llama(cfg, DMC, "eval").apply(params, tokens)
  assert not np.any(np.asarray(aux["alpha"]))
  # The same function up to float32 rounding of the two attention implementations (ω k / ω, another softmax).
  np.testing.assert_allclose(logits, original, atol=2e-5, rtol=1e-5)
  # Train mode (Gumbel noise at τ = 0.1 around a = −5): merges are rare and soft, the output barely moves.
  train_logits, _ = Llama(cfg, DMC, "train").apply(params, tokens, rngs={"dmc": jax.random.key(3)})
  assert float(jnp.max(jnp.abs(train_logits - original))) < 0.5


@pytest.mark.slow  # 21 s: prefill and decode compiles per setting
def test_forced_adapter_form_parallel_equals_prefill_plus_decode():
  cfg = GQA
  want, got, cache = run_both(cfg, DMC, adapter_params(cfg), _tokens(), _forced(cfg, 0.6))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert 1.5 < dmc_cache.realised_cr(cache)["overall"] < 4.5


@pytest.mark.slow  # 27 s in the fresh-clone run: prefill and decode compiles
def test_adapter_decisions_parallel_equals_prefill_plus_decode():
  """Unforced: the adapter's decision column fitted (least squares, layer by layer) so that a ≈ N(0, 1)."""
  cfg = GQA
  tokens = _tokens(seed=5)
  params = adapter_params(cfg)
  rng = np.random.default_rng(0)
  model = Llama(cfg, DMC, "eval")
  for layer in range(cfg.n_layers):
    _, state = model.apply(params, tokens, capture_intermediates=True, mutable=["intermediates"])
    h = np.asarray(state["intermediates"][f"layers_{layer}"]["attn_norm"]["__call__"][0]).reshape(-1, cfg.d_model)
    w = np.array(params["params"][f"layers_{layer}"]["attn"]["decision_adapter"]["kernel"])
    for head in range(cfg.n_kv_heads):
      w[:, head, 0] = np.linalg.lstsq(h, DMC.offset + rng.standard_normal(h.shape[0]), rcond=None)[0]
      w[:, head, 1] = 0.3 * rng.standard_normal(cfg.d_model)  # unequal importances
    params["params"][f"layers_{layer}"]["attn"]["decision_adapter"]["kernel"] = jnp.asarray(w)
  _, aux = model.apply(params, tokens)
  frac = np.asarray(aux["alpha"][:, :, 1:]).mean(axis=(1, 2))
  assert np.all((frac > 0.25) & (frac < 0.75)), frac
  want, got, _ = run_both(cfg, DMC, params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4)
