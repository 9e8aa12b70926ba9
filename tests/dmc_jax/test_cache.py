"""The paged compressed cache (dmc_jax/cache.py): prefill vs token-by-token state, CR, memory, no host trips."""

import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import cache as dmc_cache
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.generate import decode_dmc, forced_merge_decisions, prefill_dmc
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=61, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, head_dim=12)
DMC = DMCConfig(window=3)


@pytest.fixture(scope="module")
def params():
  p = nn.unbox(Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, p)


def slots(cache):
  """Logical slot contents per row: {(layer, b, head): (k [n, D], v [n, D])}, independent of page placement."""
  out = {}
  bt, lengths = np.asarray(cache.block_table), np.asarray(cache.lengths)
  kp, vp, s = np.asarray(cache.k_pages), np.asarray(cache.v_pages), cache.page_size
  for idx in np.ndindex(lengths.shape):
    n = lengths[idx]
    pages = bt[idx][: -(-n // s)]
    out[idx] = (kp[pages].reshape(-1, kp.shape[-1])[:n], vp[pages].reshape(-1, vp.shape[-1])[:n])
  return out


@pytest.mark.slow  # 31 s: a decode compile per token position
def test_parallel_prefill_state_equals_token_by_token_state(params):
  lengths = jnp.array([11, 6])
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, CFG.vocab_size)
  alpha = jax.random.bernoulli(jax.random.key(2), 0.6, (CFG.n_layers, 2, 11, CFG.n_kv_heads)).astype(jnp.float32)
  model = Llama(CFG, DMC, "eval")
  _, whole = prefill_dmc(model, params, tokens, lengths, dmc_cache.init_cache(CFG, DMC, 2, 16, page_size=4), alpha)
  # Token by token: prefill one token, then decode the rest (sequence 1 idles past its length... so run it alone).
  for b in range(2):
    n = int(lengths[b])
    _, step = prefill_dmc(model, params, tokens[b:b + 1, :1], jnp.array([1]),
                          dmc_cache.init_cache(CFG, DMC, 1, 16, page_size=4), alpha[:, b:b + 1, :1])
    for t in range(1, n):
      _, step = decode_dmc(model, params, tokens[b:b + 1, t], step, alpha[:, b:b + 1, t])
    got, want = slots(step), slots(whole)
    for (layer, bb, head), (k, v) in want.items():
      if bb != b:
        continue
      k2, v2 = got[(layer, 0, head)]
      assert k.shape == k2.shape, (layer, b, head)
      np.testing.assert_allclose(k2, k, atol=1e-5)
      np.testing.assert_allclose(v2, v, atol=1e-5)
    for field in ("lengths", "run", "sum_k", "sum_v", "sum_w", "ring_k", "ring_v", "ring_w"):
      np.testing.assert_allclose(np.asarray(getattr(step, field))[:, 0], np.asarray(getattr(whole, field))[:, b],
                                 atol=1e-5, err_msg=field)
    assert int(step.positions[0]) == n


def test_realised_cr_from_cache_equals_parallel_decisions(params):
  lengths = jnp.array([13, 9, 4])
  tokens = jax.random.randint(jax.random.key(3), (3, 13), 0, CFG.vocab_size)
  alpha = forced_merge_decisions(jax.random.key(4), jnp.broadcast_to(jnp.arange(13), (3, 13)), CFG.n_layers,
                                 CFG.n_kv_heads, merge_rate=0.7)
  model = Llama(CFG, DMC, "eval")
  _, aux = model.apply(params, tokens, forced_alpha=alpha)
  _, cache = prefill_dmc(model, params, tokens, lengths, dmc_cache.init_cache(CFG, DMC, 3, 16, page_size=4), alpha)
  valid = np.arange(13)[None, :] < np.asarray(lengths)[:, None]
  a = np.asarray(aux["alpha"])
  mean = a[:, valid].mean()
  assert 0.5 < mean < 0.8
  cr = dmc_cache.realised_cr(cache)
  np.testing.assert_allclose(cr["overall"], 1 / (1 - mean), rtol=1e-6)
  assert cr["per_layer"].shape == (CFG.n_layers,) and cr["per_head"].shape == (CFG.n_layers, CFG.n_kv_heads)
  per_head = 1 / (1 - a[:, valid].mean(axis=1))  # [layers, K]
  np.testing.assert_allclose(cr["per_head"], per_head, rtol=1e-6)


def test_4k_tokens_at_cr_4_take_under_a_third_of_the_vanilla_cache():
  cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32, head_dim=32)
  dmc = DMCConfig()
  params = nn.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  n = 4096
  tokens = jax.random.randint(jax.random.key(1), (1, n), 0, cfg.vocab_size)
  alpha = forced_merge_decisions(jax.random.key(2), jnp.arange(n)[None], cfg.n_layers, cfg.n_kv_heads, 0.75)
  cache = dmc_cache.init_cache(cfg, dmc, 1, n, page_size=32)
  _, cache = jax.jit(lambda p, t, c, a: prefill_dmc(Llama(cfg, dmc, "eval"), p, t, jnp.array([n]), c, a))(
      params, tokens, cache, alpha)
  used = dmc_cache.memory_bytes(cache)
  vanilla = n * cfg.kv_bytes_per_token(4)
  cr = dmc_cache.realised_cr(cache)["overall"]
  print(f"CR {cr:.2f}: {used['total'] / 2**20:.2f} MiB in use vs vanilla {vanilla / 2**20:.2f} MiB "
        f"({used['total'] / vanilla:.3f}×)")
  assert 3.7 < cr < 4.3
  assert used["total"] <= 0.3 * vanilla


def test_decode_steps_make_no_host_round_trip(params):
  model = Llama(CFG, DMC, "eval")
  tokens = jax.random.randint(jax.random.key(5), (2, 5), 0, CFG.vocab_size)
  cache = dmc_cache.init_cache(CFG, DMC, 2, 32, page_size=4)
  _, cache = prefill_dmc(model, params, tokens, jnp.array([5, 3]), cache)
  step = jax.jit(lambda p, t, c: decode_dmc(model, p, t, c), donate_argnums=(2,))
  token = jnp.array([1, 2])
  jax.block_until_ready(step(params, token, jax.tree.map(jnp.copy, cache)))  # compile outside the guard
  with jax.transfer_guard("disallow"):
    for _ in range(6):
      logits, cache = step(params, token, cache)
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    jax.block_until_ready(cache)
  assert cache.positions.tolist() == [11, 9]


def _primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _primitives(sub)


def test_prefill_has_no_loop_over_positions(params):
  for window in (12, None):
    dmc = DMCConfig(window=window)
    cache = dmc_cache.init_cache(CFG, dmc, 2, 64, page_size=8)
    tokens = jnp.zeros((2, 40), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, t, c: prefill_dmc(Llama(CFG, dmc, "eval"), p, t, jnp.array([40, 17]), c))(
        params, tokens, cache)
    names = set(_primitives(jaxpr.jaxpr))
    assert not names & {"while", "scan", "fori_loop"}, names & {"while", "scan"}


def test_pool_exhaustion_is_an_error_not_silent(params):
  model = Llama(CFG, DMC, "eval")
  tokens = jax.random.randint(jax.random.key(6), (1, 9), 0, CFG.vocab_size)
  never = jnp.zeros((CFG.n_layers, 1, 9, CFG.n_kv_heads))
  rows = CFG.n_layers * CFG.n_kv_heads
  # Enough pages for the prompt (2 pages of 4 slots per row for 8 tokens) but not for the 9th slot.
  cache = dmc_cache.init_cache(CFG, DMC, 1, 12, page_size=4, num_pages=2 * rows)
  _, cache = prefill_dmc(model, params, tokens[:, :8], jnp.array([8]), cache, never[:, :, :8])
  dmc_cache.check(cache)  # fits so far
  before = np.asarray(cache.k_pages).copy()
  _, cache = decode_dmc(model, params, tokens[:, 8], cache, never[:, :, 8])
  with pytest.raises(dmc_cache.CachePoolExhausted, match="pool exhausted: 8 pages of 4 slots"):
    dmc_cache.check(cache)
  np.testing.assert_array_equal(np.asarray(cache.k_pages), before)  # nothing was written out of bounds
  # A prompt that does not fit at all is refused the same way.
  small = dmc_cache.init_cache(CFG, DMC, 1, 12, page_size=4, num_pages=rows)
  _, small = prefill_dmc(model, params, tokens[:, :8], jnp.array([8]), small, never[:, :, :8])
  with pytest.raises(dmc_cache.CachePoolExhausted):
    dmc_cache.check(small)


def test_pool_sized_from_a_memory_budget():
  pages = dmc_cache.pages_for_budget(CFG, 10 * 2**20, 32, jnp.bfloat16)
  assert pages == 10 * 2**20 // (2 * 32 * 12 * 2)
  cache = dmc_cache.init_cache(CFG, DMC, 2, 100, page_size=32, num_pages=pages, dtype=jnp.bfloat16)
  assert dmc_cache.memory_bytes(cache)["pool"] <= 10 * 2**20


def test_rows_outgrowing_their_block_table_are_flagged_not_folded(params):
  """A pool with spare pages must not hide a row that outgrew max_len (writes would land on other slots)."""
  model = Llama(CFG, DMC, "eval")
  tokens = jax.random.randint(jax.random.key(7), (1, 9), 0, CFG.vocab_size)
  never = jnp.zeros((CFG.n_layers, 1, 9, CFG.n_kv_heads))
  cache = dmc_cache.init_cache(CFG, DMC, 1, 8, page_size=4, num_pages=64)  # room in the pool, 2 pages per row
  _, cache = prefill_dmc(model, params, tokens[:, :8], jnp.array([8]), cache, never[:, :, :8])
  dmc_cache.check(cache)
  table, before = np.asarray(cache.block_table).copy(), np.asarray(cache.k_pages).copy()
  _, cache = decode_dmc(model, params, tokens[:, 8], cache, never[:, :, 8])
  with pytest.raises(dmc_cache.CachePoolExhausted, match="outgrew the 8 slots"):
    dmc_cache.check(cache)
  np.testing.assert_array_equal(np.asarray(cache.block_table), table)  # no slot re-pointed
  np.testing.assert_array_equal(np.asarray(cache.k_pages), before)  # nothing overwritten
  # A prompt longer than the cache was sized for.
  small = dmc_cache.init_cache(CFG, DMC, 1, 4, page_size=4, num_pages=64)
  _, small = prefill_dmc(model, params, tokens[:, :8], jnp.array([8]), small, never[:, :, :8])
  with pytest.raises(dmc_cache.CachePoolExhausted):
    dmc_cache.check(small)


def test_first_token_appends_even_without_a_prefill(params):
  model = Llama(CFG, DMC, "eval")
  cache = dmc_cache.init_cache(CFG, DMC, 2, 8, page_size=4)
  merge = jnp.ones((CFG.n_layers, 2, CFG.n_kv_heads))
  _, cache = decode_dmc(model, params, jnp.array([3, 4]), cache, merge)
  assert np.all(np.asarray(cache.lengths) == 1)


def _step_temporaries(params, scan_layers: bool, window: int, max_len: int, b: int = 8):
  """(compiled temporaries of a donated decode step, pool bytes, ring bytes) for a cache of max_len slots a row."""
  from dmc_jax.convert import layout
  dmc = DMCConfig(window=window)
  model = Llama(CFG.replace(scan_layers=scan_layers), dmc, "eval")
  p = {"params": layout.stack_layers(params["params"], CFG.n_layers, stack=jnp.stack)} if scan_layers else params
  cache = dmc_cache.init_cache(CFG, dmc, b, max_len, page_size=16)  # the worst-case pool
  step = jax.jit(lambda p, t, c: decode_dmc(model, p, t, c), donate_argnums=(2,))
  compiled = step.lower(p, jnp.zeros((b,), jnp.int32), cache).compile()
  hlo = compiled.as_text()
  copied = [f for f in dmc_cache.LAYER_FIELDS + ("k_pages",) if re.search(
      re.escape(_hlo_shape(getattr(cache, f))) + r"\{[0-9,]*\} copy\(", hlo)]
  assert not copied, f"the compiled decode step copies {copied} whole"
  return (compiled.memory_analysis().temp_size_in_bytes, cache.k_pages.nbytes + cache.v_pages.nbytes,
          cache.ring_k.nbytes + cache.ring_v.nbytes + cache.ring_w.nbytes)


def _hlo_shape(a) -> str:
  return {"int32": "s32", "float32": "f32"}[str(a.dtype)] + "[" + ",".join(map(str, a.shape)) + "]"


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_decode_step_updates_the_pool_in_place(params, scan_layers):
  """Under donation a decode step writes one slot per row: its compiled temporaries (one block of gathered pages,
  activations) are a small fraction of the pool; a whole-pool rewrite would need a whole copy."""
  temp, pool, _ = _step_temporaries(params, scan_layers, window=12, max_len=4096)
  assert temp < 0.1 * pool, (temp, pool)


def test_decode_step_updates_the_merge_state_in_place(params):
  """One ring entry per row is read and written: a 4× wider ring adds (almost) nothing to the temporaries, where
  restacking the merge state per layer or rewriting the ring would add at least its size."""
  t12, _, ring12 = _step_temporaries(params, True, window=12, max_len=256)
  t48, _, ring48 = _step_temporaries(params, True, window=48, max_len=256)
  assert t48 - t12 < 0.1 * (ring48 - ring12), (t12, t48, ring12, ring48)
