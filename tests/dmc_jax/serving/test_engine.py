"""The continuous-batching engine on a tiny random model: pages freed and reused, preemption that recomputes to the
same greedy text, admission, and equality with the fixed-batch Generator at batch 1.

Shapes are kept to one prefill bucket (contexts ≤ 16 tokens) so each cache compiles one prefill and one step."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import RequestRejected, UserError
from dmc_jax.generate import DMCOptions, Generator
from dmc_jax.model.llama import Llama
from dmc_jax.serving import Engine, PagedKV

CFG = LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, head_dim=8,
                  max_position_embeddings=64, tie_embeddings=True, remat_policy="none")
PAGE = 4
MAX_NEW = 8
RATE = 0.5  # forced DMC merge probability: CR 2


@pytest.fixture(scope="module")
def params():
  return nn.unbox(Llama(CFG).init(jax.random.key(3), np.zeros((1, 4), np.int32)))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(7)
  return [rng.integers(1, CFG.vocab_size, n).tolist() for n in (3, 8, 5, 7, 2, 6)]


# DMS with a window of 2, so that forced evictions take effect within these 16-token rows.
LEARNED = {"dmc": DMCConfig(), "dms": DMCConfig(method="dms", dms_window=2)}


def alone(params, kind, prompts):
  """Greedy tokens of each prompt generated alone by the fixed-batch Generator."""
  dmc = None if kind == "vanilla" else DMCOptions(LEARNED[kind], page_size=PAGE, forced_merge_rate=RATE)
  gen = Generator(CFG, params, dmc=dmc)
  return [gen.generate([p], MAX_NEW, stop_at_eos=False).tokens[0] for p in prompts]


# A pool too small for three requests at full length (3 x 2 layers x 2 heads x 4 pages = 48 pages for 16 tokens):
# the third admitted request is preempted as the others grow.
POOL = 36


@pytest.fixture(scope="module")
def paged(params):
  """One PagedKV per cache kind, shared by the tests (each compiles its prefill and step once)."""
  made = {}
  def get(kind):
    if kind not in made:
      made[kind] = PagedKV(CFG, params, kind=kind, dmc=LEARNED.get(kind),
                           forced_merge_rate=None if kind == "vanilla" else RATE, max_batch=3, max_len=16,
                           page_size=PAGE, num_pages=POOL)
    return made[kind]
  return get


@pytest.mark.parametrize("kind", ["vanilla", "dmc", "dms"])
def test_stream_equals_alone_with_preemption_and_frees_every_page(params, prompts, kind, paged):
  kv = paged(kind)
  engine = Engine(kv, trace=True)
  reqs = [engine.submit(p, MAX_NEW) for p in prompts]
  engine.run_until_idle()
  expected = alone(params, kind, prompts)
  assert [r.tokens for r in reqs] == expected  # alone and among concurrent requests, preempted or not
  assert all(r.finish_reason == "length" for r in reqs)
  if kind == "vanilla":
    # Vanilla's need is exact (every token its slot), so this pool must preempt; DMC at CR 2 may not.
    assert engine.preemptions > 0 and any(r.preemptions for r in reqs)
  # Every page back on the free stack, none ever dropped; pages were reused (more were taken than the pool has).
  assert engine.pages_in_use == 0 and int(engine.cache.next_free) == 0
  assert not kv.overflowed(engine.cache)
  assert int(np.asarray(engine.cache.lengths).sum()) == 0 and not np.asarray(engine.cache.active).any()
  assert max(t["pages"] for t in engine.trace) <= POOL
  # The forced decisions compress (DMS: an eviction frees a slot for the token w + 1 later).
  full = max(t["kv_tokens"] * kv.rows_per_sequence / t["kv_slots"] for t in engine.trace if t["kv_slots"])
  assert full == 1.0 if kind == "vanilla" else full > 1.3
  taken = sum(kv.prefill_pages(len(p) + MAX_NEW - 1) for p in prompts)
  if kind == "vanilla":
    assert taken > POOL
  free_list = np.asarray(engine.cache.free_list)
  assert sorted(free_list.tolist()) == list(range(POOL))  # the stack still holds each page id exactly once
  # The same engine serves again from the recycled pages, with the same answers.
  again = engine.submit(prompts[1], MAX_NEW)
  engine.run_until_idle()
  assert again.tokens == expected[1] and engine.pages_in_use == 0


def test_admission_refuses_what_can_never_fit_and_sampling_is_per_request(params, prompts):
  kv = PagedKV(CFG, params, kind="vanilla", max_batch=2, max_len=16, page_size=PAGE, num_pages=12)
  engine = Engine(kv)
  with pytest.raises(RequestRejected, match="16 tokens per sequence"):
    engine.submit(list(range(1, 12)), 6)
  # 3 tokens need 1 page per row (4 rows) plus their outputs: 2 + 6 = 8 tokens = 2 pages per row = 8 pages fit;
  # 10 + 6 tokens = 16 pages do not (the pool holds 12).
  with pytest.raises(RequestRejected, match=r"needs up to 16 KV pages .* holds 12"):
    engine.submit(list(range(1, 11)), 6)
  assert issubclass(RequestRejected, UserError)
  # A sampled request draws the same tokens alone and beside another (its key: its seed and its token count).
  a = engine.submit(prompts[0], 5, temperature=1.0, seed=11)
  engine.run_until_idle()
  b = engine.submit(prompts[0], 5, temperature=1.0, seed=11)
  c = engine.submit(prompts[2], 5)
  engine.run_until_idle()
  assert a.tokens == b.tokens and len(c.tokens) == 5
  # Cancelling frees at once.
  d = engine.submit(prompts[4], 6)
  engine.step()
  assert engine.pages_in_use > 0
  engine.cancel(d)
  engine.step()
  assert d.finish_reason == "cancelled" and engine.pages_in_use == 0 and d.done.is_set()


def _row_slots(cache, layer: int, slot: int, head: int) -> tuple[np.ndarray, np.ndarray]:
  """A row's keys and values in slot order, read through its block table."""
  n = int(cache.lengths[layer, slot, head])
  pages = np.asarray(cache.block_table[layer, slot, head])[:-(-n // PAGE)]
  k, v = (np.asarray(x)[pages].reshape(-1, x.shape[-1])[:n] for x in (cache.k_pages, cache.v_pages))
  return k, v


@pytest.mark.parametrize("kind", ["dmc", "dms"])
def test_a_live_row_equals_the_state_its_tokens_build(prompts, kind, paged):
  """Mid-stream, among concurrent requests and on recycled pages, every row of a running request holds what a
  fresh cache builds from the same tokens (its prompt and the outputs fed back so far) in one prefill."""
  kv = paged(kind)
  engine = Engine(kv)
  engine.submit(prompts[5], MAX_NEW)
  engine.run_until_idle()  # its pages go back to the stack in another order than the identity
  reqs = [engine.submit(prompts[i], MAX_NEW) for i in (1, 3, 0)]
  for _ in range(5):
    engine.step()
  live = [r for r in reqs if r in engine._slots]
  assert len(live) >= 2
  for req in live:
    slot = engine._slots.index(req)
    seq = list(req.prompt) + req.tokens[:-1]  # the last output is not in the cache until the next step
    assert int(engine.cache.positions[slot]) == len(seq)
    *_, alone = kv.prefill(kv.init(), seq, 0, (0.0, 1.0, 0, 0))
    np.testing.assert_array_equal(np.asarray(engine.cache.lengths[:, slot]), np.asarray(alone.lengths[:, 0]))
    for layer in range(CFG.n_layers):
      for head in range(CFG.n_kv_heads):
        for got, want in zip(_row_slots(engine.cache, layer, slot, head), _row_slots(alone, layer, 0, head)):
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert int(np.asarray(alone.lengths).sum()) < CFG.n_layers * CFG.n_kv_heads * len(seq)  # it compressed


# Eviction policies at CR 2: a row is charged ceil((budget(t) + 1) / 4) pages, 3 at 16 tokens (12 a request), so a
# pool of 20 cannot hold the three slots at full length and the newest is preempted as they grow.
POLICY_POOL = 20


@pytest.mark.parametrize("name", ["h2o", pytest.param("tova", marks=pytest.mark.slow),
                                  pytest.param("streaming", marks=pytest.mark.slow)])
def test_policy_stream_equals_its_generator_alone_with_preemption(params, prompts, name):
  from dmc_jax.baselines.policies import Policy
  from dmc_jax.baselines.policy_generate import PolicyGenerator
  from dmc_jax.serving import PolicyKV
  policy = Policy(name, 2.0, sinks=2)
  kv = PolicyKV(CFG, params, policy=policy, max_batch=3, max_len=16, page_size=PAGE, num_pages=POLICY_POOL)
  engine = Engine(kv, trace=True)
  reqs = [engine.submit(p, MAX_NEW) for p in prompts]
  engine.run_until_idle()
  gen = PolicyGenerator(CFG, params, policy)
  expected = [gen.generate([p], MAX_NEW, stop_at_eos=False).tokens[0] for p in prompts]
  assert [r.tokens for r in reqs] == expected  # preempted requests recompute their state by a parallel prefill
  assert engine.preemptions > 0
  assert max(t["pages"] for t in engine.trace) <= POLICY_POOL
  assert engine.pages_in_use == 0
  assert kv.occupancy(engine.cache) == (0, 0) and not np.asarray(engine.cache.active).any()
  # Entries held match the budget: the realised CR of a full row is t / ceil(t / 2) ≈ 2.
  cr = max(t["kv_tokens"] * kv.rows_per_sequence / t["kv_slots"] for t in engine.trace if t["kv_slots"])
  assert 1.7 < cr <= 2.0
  # A prompt whose first step cannot fit the pool is refused up front, naming the limit.
  small = PolicyKV(CFG, params, policy=policy, max_batch=1, max_len=16, page_size=PAGE, num_pages=7)
  with pytest.raises(RequestRejected, match="needs up to 8 KV pages"):
    Engine(small).submit(list(range(1, 13)), 2)
