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


def alone(params, kind, prompts):
  """Greedy tokens of each prompt generated alone by the fixed-batch Generator."""
  dmc = None if kind == "vanilla" else DMCOptions(DMCConfig(), page_size=PAGE, forced_merge_rate=RATE)
  gen = Generator(CFG, params, dmc=dmc)
  return [gen.generate([p], MAX_NEW, stop_at_eos=False).tokens[0] for p in prompts]


# A pool too small for three requests at full length (3 x 2 layers x 2 heads x 4 pages = 48 pages for 16 tokens):
# the third admitted request is preempted as the others grow.
POOL = 36


@pytest.mark.parametrize("kind", ["vanilla", "dmc"])
def test_stream_equals_alone_with_preemption_and_frees_every_page(params, prompts, kind):
  kv = PagedKV(CFG, params, kind=kind, dmc=DMCConfig() if kind == "dmc" else None,
               forced_merge_rate=RATE if kind == "dmc" else None, max_batch=3, max_len=16, page_size=PAGE,
               num_pages=POOL)
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
