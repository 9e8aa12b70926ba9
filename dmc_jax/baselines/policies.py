"""Training-free KV eviction policies with a target compression ratio: StreamingLLM, H2O, TOVA.

Each policy runs per (sequence, layer, KV head): the query heads of a GQA group share one cache, so their
attention weights are pooled (summed for H2O's accumulated score, averaged for TOVA).

Budget. After step t of a document (t tokens seen, the current one included) the cache holds at most
b(t) = ceil(t / CR) entries, so its size grows like DMC's and the realised CR at the end of a document of length T
is T / ceil(T / CR). StreamingLLM never drops its sinks: its budget is max(ceil(t / CR), min(t, sinks + 1)) (the
first ≈ CR · sinks tokens are kept whole). CR 1 keeps everything: exactly vanilla attention.

One step (the same function drives the parallel evaluation scan and `generate`'s decode):
  1. the new token joins the cache: cand = kept ∪ {new};
  2. the query attends to cand (softmax over cand only);
  3. if |cand| > b(t), one entry leaves (b grows by at most one per step, so one eviction is always enough):
     * StreamingLLM — the oldest entry that is not one of the document's first `sinks` tokens;
     * H2O — among entries outside the recent window (the ⌊b · recent_fraction⌋ newest positions), the one with
       the smallest attention accumulated over every query that saw it (while b = 1 there is no window, so the
       first token, usually the attention sink, is not forced out by the second);
     * TOVA — the entry with the smallest attention from the current query (the new token included).

Parallel evaluation is exact: at layer l, position i depends only on positions ≤ i of layer l − 1, so computing
every query's logits at once and then scanning the policy over positions gives the same outputs as decoding
token by token with eviction (`tests/dmc_jax/test_baselines_policies.py` checks this against an independent step-by-step
decoder). It simulates the policy; it does not save memory (the full L × L logits exist).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dmc_jax.config import ConfigError
from dmc_jax.dmc import document_starts
from dmc_jax.model.llama import positions_from_segments

Array = jax.Array
POLICIES = ("streaming", "h2o", "tova")
_NEG = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  cr: float
  sinks: int = 4  # StreamingLLM: attention sinks (first tokens of a document)
  recent_fraction: float = 0.5  # H2O: share of the budget kept as a recent window

  def __post_init__(self):
    if self.name not in POLICIES:
      raise ConfigError(f"policy: unknown {self.name!r}; expected one of {list(POLICIES)}")
    if not self.cr >= 1:
      raise ConfigError(f"policy CR: expected >= 1, got {self.cr}")
    if self.sinks < 0:
      raise ConfigError(f"policy sinks: expected >= 0, got {self.sinks}")
    if not 0 <= self.recent_fraction <= 1:
      raise ConfigError(f"policy recent_fraction: expected in [0, 1], got {self.recent_fraction}")

  def budget(self, t):
    """Cache entries allowed after t tokens of a document (an int, or an int array for an array t)."""
    if isinstance(t, int):
      b = min(t, math.ceil(t / self.cr))
      return max(b, min(t, self.sinks + 1)) if self.name == "streaming" else b
    b = jnp.minimum(t, jnp.ceil(t.astype(jnp.float32) / self.cr).astype(t.dtype))
    if self.name == "streaming":
      b = jnp.maximum(b, jnp.minimum(t, self.sinks + 1))
    return b

  def label(self) -> str:
    return f"{self.name}@{self.cr:g}"


def init_state(batch: int, kv_heads: int, slots: int) -> dict:
  """keep [B, KV, S] (slots held by the cache), score [B, KV, S] (H2O's accumulated attention)."""
  return {"keep": jnp.zeros((batch, kv_heads, slots), bool),
          "score": jnp.zeros((batch, kv_heads, slots), jnp.float32)}


def step(policy: Policy, state: dict, logits_BxKxGxS: Array, new_slot_in: Array, t_B: Array, slot_pos_in: Array,
         active_B: Array | None = None):
  """One query per sequence: attend to the cache plus the new token, then evict to the budget.

  logits: scaled float32 logits of the new query's G heads against every slot; new_slot: the slot of the new
  token, [B] or per KV head [B, KV]; t: tokens seen in its document (the new one included); slot_pos: position in
  the document of each slot, [B, S] or per KV head [B, KV, S] (the new token's is t − 1). Inactive rows (padding
  past a prompt) keep their state.
  Returns (probs [B, KV, G, S] over cand, new state).
  """
  s = logits_BxKxGxS.shape[-1]
  new_slot = new_slot_in if new_slot_in.ndim == 2 else new_slot_in[:, None]
  slot_pos = slot_pos_in if slot_pos_in.ndim == 3 else slot_pos_in[:, None, :]
  cand = state["keep"] | (jnp.arange(s) == new_slot[..., None])
  probs = jax.nn.softmax(jnp.where(cand[:, :, None, :], logits_BxKxGxS, _NEG), axis=-1)
  probs = jnp.where(cand[:, :, None, :], probs, 0.0)
  budget_B = policy.budget(t_B)
  cur_pos_Bx1 = (t_B - 1)[:, None]
  score = state["score"]
  if policy.name == "streaming":
    protected = jnp.broadcast_to(slot_pos < policy.sinks, cand.shape)
    priority = jnp.broadcast_to(slot_pos.astype(jnp.float32), cand.shape)
  elif policy.name == "h2o":
    score = jnp.where(cand, score + probs.sum(axis=2), 0.0)
    recent_B = jnp.floor(budget_B * policy.recent_fraction).astype(budget_B.dtype)
    protected = jnp.broadcast_to(slot_pos > (cur_pos_Bx1 - recent_B[:, None])[:, None, :], cand.shape)
    priority = score
  else:
    protected = jnp.zeros_like(cand)
    priority = probs.mean(axis=2)
  eligible = cand & ~protected
  victim_BxK = jnp.argmin(jnp.where(eligible, priority, jnp.inf), axis=-1)
  need_BxK = (cand.sum(-1) > budget_B[:, None]) & eligible.any(-1)
  evict = need_BxK[..., None] & (jnp.arange(s) == victim_BxK[..., None])
  keep = cand & ~evict
  new = {"keep": keep, "score": jnp.where(keep, score, 0.0)}
  if active_B is not None:
    new = jax.tree.map(lambda n, o: jnp.where(active_B[:, None, None], n, o), new, state)
  return probs, new


def attend(policy: Policy, q_BxLxHxD: Array, k_BxLxKxD: Array, v_BxLxKxD: Array, segment_ids_BxL: Array,
           lengths_B: Array | None = None):
  """Parallel attention of a whole (packed) row under the policy, exact w.r.t. token-by-token decoding.

  Positions restart at every document start (segment ids), and so does the cache. lengths: rows are right-padded
  prompts; steps past a row's length leave its state unchanged. Returns (out [B, L, H, D], kept [B, L, KV]: cache
  entries held after each step, final policy state).
  """
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxLxKxD.shape[2]
  q = q_BxLxHxD.reshape(b, l, kv, h // kv, d)
  logits = jnp.einsum("blkgd,bskd->lbkgs", q, k_BxLxKxD, preferred_element_type=jnp.float32) * (d ** -0.5)
  pos_BxL = positions_from_segments(segment_ids_BxL)
  starts_BxL = document_starts(segment_ids_BxL)
  lengths_B = jnp.full((b,), l, jnp.int32) if lengths_B is None else lengths_B

  def body(state, xs):
    logits_i, i, pos_B, start_B = xs
    state = jax.tree.map(lambda a: jnp.where(start_B[:, None, None], jnp.zeros_like(a), a), state)
    # Keys of earlier documents are never kept (reset above); a slot's document position is pos_BxL itself.
    probs, state = step(policy, state, logits_i, jnp.full((b,), i), pos_B + 1, pos_BxL, i < lengths_B)
    return state, (probs, state["keep"].sum(-1))

  xs = (logits, jnp.arange(l), pos_BxL.T, starts_BxL.T)
  state, (probs_LxBxKxGxS, kept_LxBxK) = jax.lax.scan(body, init_state(b, kv, l), xs)
  out = jnp.einsum("lbkgs,bskd->blkgd", probs_LxBxKxGxS.astype(v_BxLxKxD.dtype), v_BxLxKxD,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, l, h, d).astype(q_BxLxHxD.dtype), jnp.moveaxis(kept_LxBxK, 0, 1), state
