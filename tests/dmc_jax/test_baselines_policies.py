"""Eviction policies: known answers, cache size at the target CR, CR 1 = vanilla, parallel = token-by-token."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.baselines import evict_model, policies
from dmc_jax.baselines.policies import Policy
from dmc_jax.config import LlamaConfig
from dmc_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, rope_theta=100.0)
DOCS = (15, 9)  # one packed row: two documents
ALL = [Policy(n, cr) for n in policies.POLICIES for cr in (2.0, 3.0)]
_forward = jax.jit(evict_model.forward, static_argnums=(0, 1))


@pytest.fixture(scope="module")
def params():
  p = nn.unbox(jax.jit(Llama(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, p)  # peakier attention: no near-ties in eviction


@pytest.fixture(scope="module")
def row():
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, sum(DOCS)).astype(np.int32)
  seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(DOCS)])
  return tokens, seg


def _attend(policy, logits_LxS, v=None):
  """policies.attend on one head whose q·k products are given: q = one-hot rows, k = logits columns."""
  l = logits_LxS.shape[0]
  d = l
  q = jnp.eye(l, dtype=jnp.float32)[None, :, None, :] * d ** 0.5  # q_i · k_j = logits[i, j]
  k = jnp.asarray(logits_LxS, jnp.float32).T[None, :, None, :]
  v = jnp.eye(l, dtype=jnp.float32)[None, :, None, :] if v is None else v
  return policies.attend(policy, q, k, v, jnp.ones((1, l), jnp.int32))


def test_budget_rule():
  p = Policy("h2o", 3.0)
  assert [p.budget(t) for t in (1, 2, 3, 4, 7, 9, 10)] == [1, 1, 1, 2, 3, 3, 4]
  s = Policy("streaming", 3.0, sinks=4)
  assert [s.budget(t) for t in (1, 4, 5, 6, 15, 16, 30)] == [1, 4, 5, 5, 5, 6, 10]
  t = jnp.arange(1, 40)
  for pol in ALL + [Policy("tova", 1.0)]:
    assert np.array_equal(np.asarray(pol.budget(t)), [pol.budget(int(i)) for i in t])
  with pytest.raises(ValueError, match="policy: unknown 'lru'"):
    Policy("lru", 2.0)
  with pytest.raises(ValueError, match="CR: expected >= 1"):
    Policy("tova", 0.5)


def test_planted_heavy_hitter_survives_h2o():
  l, hitter = 40, 17
  logits = np.random.default_rng(0).normal(0, 0.3, (l, l))
  logits[:, hitter] += 4.0  # every later query attends mostly to token 17
  _, kept, state = _attend(Policy("h2o", 4.0), logits)
  keep = np.flatnonzero(np.asarray(state["keep"][0, 0]))
  assert hitter in keep and len(keep) == 10
  # Without the plant it is evicted: the test can fail.
  logits[:, hitter] -= 4.0
  _, _, state = _attend(Policy("h2o", 4.0), logits)
  assert hitter not in np.flatnonzero(np.asarray(state["keep"][0, 0]))


def test_tova_evicts_the_lowest_attention_token():
  s = 8
  keep = np.zeros((1, 1, s), bool)
  keep[0, 0, :5] = True  # 5 kept; the new token at slot 5 makes 6 > budget ceil(6 / 1.25) = 5
  logits = np.zeros((1, 1, 2, s), np.float32)
  logits[0, 0, :, :6] = [[1.0, 0.5, 2.0, -1.0, 0.3, 0.2], [1.0, 0.5, 2.0, -0.5, -0.9, 0.2]]
  # Mean over the 2 query heads: slot 3 (-1.0, -0.5) has the lowest mean attention, though slot 4 has the
  # lowest single logit.
  state = {"keep": jnp.asarray(keep), "score": jnp.zeros((1, 1, s))}
  probs, new = policies.step(Policy("tova", 1.25), state, jnp.asarray(logits), jnp.array([5]), jnp.array([6]),
                             jnp.arange(s)[None])
  assert np.flatnonzero(np.asarray(new["keep"][0, 0])).tolist() == [0, 1, 2, 4, 5]
  assert np.allclose(np.asarray(probs).sum(-1), 1) and np.all(np.asarray(probs)[..., 6:] == 0)


def test_streaming_keeps_the_sinks_and_the_window():
  l, sinks = 37, 4
  logits = np.random.default_rng(0).normal(size=(l, l))
  logits[:, 10] += 10.0  # attention does not matter to StreamingLLM
  pol = Policy("streaming", 3.0, sinks=sinks)
  _, kept, state = _attend(pol, logits)
  b = pol.budget(l)
  want = list(range(sinks)) + list(range(l - (b - sinks), l))
  assert np.flatnonzero(np.asarray(state["keep"][0, 0])).tolist() == want


@pytest.mark.parametrize("name", policies.POLICIES)
def test_cr_1_is_vanilla(params, row, name):
  tokens, seg = row
  logits, kept = _forward(CFG, Policy(name, 1.0), params, jnp.asarray(tokens[None]),
                                     jnp.asarray(seg[None]))
  ref = Llama(CFG).apply(params, jnp.asarray(tokens[None]), segment_ids_BxL=jnp.asarray(seg[None]))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=2e-5, rtol=1e-5)
  assert np.array_equal(np.asarray(kept[0, 0, :, 0]), np.concatenate([np.arange(1, n + 1) for n in DOCS]))


# -- an independent token-by-token decoder (float64 NumPy, Python lists as caches) ------------------------------


def _np_params(params):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  return p


def _rms(x, scale):
  return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + CFG.rms_norm_eps)


def _rope(x, pos):
  d = x.shape[-1]
  inv = 1.0 / CFG.rope_theta ** (np.arange(0, d, 2) / d)
  ang = np.concatenate([pos * inv, pos * inv])
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * np.cos(ang) + rot * np.sin(ang)


def _victim(policy, entries, t, probs_mean):
  """Index into `entries` to evict (t = tokens seen, new one included)."""
  b = policy.budget(t)
  if policy.name == "streaming":
    return min((i for i, e in enumerate(entries) if e["pos"] >= policy.sinks), key=lambda i: entries[i]["pos"])
  if policy.name == "h2o":
    r = math.floor(b * policy.recent_fraction)
    return min((i for i, e in enumerate(entries) if e["pos"] <= t - 1 - r), key=lambda i: entries[i]["score"])
  return int(np.argmin(probs_mean))


def _decode_document(p, policy, doc):
  kv, h, d = CFG.n_kv_heads, CFG.n_heads, CFG.head_dim
  g = h // kv
  caches = [[[] for _ in range(kv)] for _ in range(CFG.n_layers)]
  out = []
  for pos, tok in enumerate(doc):
    x = p["embed"]["kernel"][tok]
    for li in range(CFG.n_layers):
      lp = p[f"layers_{li}"]
      hid = _rms(x, lp["attn_norm"]["scale"])
      q = _rope(np.einsum("d,dhk->hk", hid, lp["attn"]["q_proj"]["kernel"]), pos)
      k = _rope(np.einsum("d,dhk->hk", hid, lp["attn"]["k_proj"]["kernel"]), pos)
      v = np.einsum("d,dhk->hk", hid, lp["attn"]["v_proj"]["kernel"])
      att = np.zeros((h, d))
      for j in range(kv):
        entries = caches[li][j] + [{"pos": pos, "k": k[j], "v": v[j], "score": 0.0}]
        ks = np.stack([e["k"] for e in entries])
        vs = np.stack([e["v"] for e in entries])
        lg = q[j * g:(j + 1) * g] @ ks.T / np.sqrt(d)
        pr = np.exp(lg - lg.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        att[j * g:(j + 1) * g] = pr @ vs
        for e, s in zip(entries, pr.sum(0)):
          e["score"] += s
        if len(entries) > policy.budget(pos + 1):
          entries.pop(_victim(policy, entries, pos + 1, pr.mean(0)))
        caches[li][j] = entries
      x = x + np.einsum("hk,hkd->d", att, lp["attn"]["o_proj"]["kernel"])
      hid = _rms(x, lp["mlp_norm"]["scale"])
      m = lp["mlp"]
      a = hid @ m["gate"]["kernel"]
      x = x + (a / (1 + np.exp(-a)) * (hid @ m["up"]["kernel"])) @ m["down"]["kernel"]
    out.append(_rms(x, p["final_norm"]["scale"]) @ p["lm_head"]["kernel"])
  return np.stack(out), [[len(c) for c in layer] for layer in caches]


@pytest.mark.parametrize("policy", ALL, ids=Policy.label)
def test_parallel_equals_token_by_token_decoding_and_the_cache_is_the_budget(params, row, policy):
  tokens, seg = row
  logits, kept = _forward(CFG, policy, params, jnp.asarray(tokens[None]), jnp.asarray(seg[None]))
  p = _np_params(params)
  decoded = [_decode_document(p, policy, tokens[seg == s]) for s in (1, 2)]
  ref = np.concatenate([logits for logits, _ in decoded])
  np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=2e-4, rtol=1e-4)
  # Cache size after every step = the budget, restarting with each document; the decoder ends at the same sizes.
  t = np.concatenate([np.arange(1, n + 1) for n in DOCS])
  want = np.array([policy.budget(int(i)) for i in t])
  assert np.array_equal(np.asarray(kept), np.broadcast_to(want[None, None, :, None], kept.shape))
  for (_, sizes), n in zip(decoded, DOCS):
    assert np.all(np.asarray(sizes) == policy.budget(n))
  if policy.name != "streaming":
    assert policy.budget(DOCS[0]) == math.ceil(DOCS[0] / policy.cr)
  # The policy matters: at this CR the logits differ from vanilla's.
  vanilla = np.concatenate([_decode_document(p, Policy(policy.name, 1.0), tokens[seg == s])[0] for s in (1, 2)])
  assert np.abs(vanilla - ref).max() > 1e-3
