"""Calibrating learned decisions to their target CR at inference (docs/dmc.md §11).

Training counts the hard decisions of the *noisy* logits, 1[a + noise > 0], whose mean over the noise is σ(a/τ);
inference thresholds the noise-free logit, 1[a > 0]. After a short run most logits sit within a few units of 0,
where the two counts differ, so a run that met its target in training realises another CR at inference (DMS,
target 4: 4.02 on the last training batch, 5.03 on held-out text). `calibrate` moves one scalar,
`DMCConfig.decision_bias` b (subtracted from every decision logit), until the noise-free decisions on rows of the
*training* split realise the target CR; held-out text plays no part.

The realised CR is the inference cache's (`cache_entries`, the same count `dmc-jax eval` reports): DMC keeps one
slot per append; DMS keeps every token of a document's last w positions, so its CR sits below 1 / (1 − mean α).
Each iteration shifts b by the quantile of the logits that leaves the wanted fraction above 0, the wanted
fraction rescaled by how far the cache's CR is from the target; a few iterations suffice, since the decisions of
one layer move the next layers' logits only a little.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable

import numpy as np

from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.errors import ConfigError

log = logging.getLogger("dmc_jax")


def cache_entries(alpha_LyxBxLxK, segment_ids_BxL, dmc: DMCConfig):
  """(entries the compressed cache holds at the end of each document, uncompressed entries), summed over layers,
  rows and KV heads, from a hard pass's α ([layers, B, L, K]). DMS: a token is gone when the decision at the next
  position marked it and a token w positions later of the same document arrived; DMC: one slot per append (α = 0,
  a document's first token included)."""
  import jax.numpy as jnp
  seg = segment_ids_BxL
  valid = (seg > 0)[None, :, :, None]
  full = jnp.sum(seg > 0) * alpha_LyxBxLxK.shape[0] * alpha_LyxBxLxK.shape[-1]
  if dmc.method == "dms":
    w = dmc.dms_window
    later = jnp.concatenate([seg[:, w:], jnp.zeros_like(seg[:, :w])], axis=1)[:, :seg.shape[1]]
    gone = alpha_LyxBxLxK * ((later == seg) & (seg > 0))[None, :, :, None]
    return full - jnp.sum(gone), full
  return jnp.sum((1.0 - alpha_LyxBxLxK) * valid), full


@dataclasses.dataclass
class Calibration:
  dmc: DMCConfig  # the input settings with the calibrated decision_bias
  realised_cr: float  # on the calibration rows, at that bias
  target_cr: float
  history: list[dict]  # per iteration: decision_bias, realised_cr, decided fraction

  def to_dict(self) -> dict:
    return {"target_cr": self.target_cr, "decision_bias": round(self.dmc.decision_bias, 6),
            "realised_cr": round(self.realised_cr, 4), "iterations": self.history}


def measure(cfg: LlamaConfig, params, dmc: DMCConfig, batches: Iterable[dict]) -> tuple[float, np.ndarray]:
  """(the cache's realised CR over `batches`, the decision logits of every valid non-initial position, flat)."""
  import jax
  import jax.numpy as jnp

  from dmc_jax.model.llama import Llama
  model = Llama(cfg, dmc, "eval")

  @jax.jit
  def run(p, tokens, seg):
    _, aux = model.apply(p, tokens, segment_ids_BxL=seg)
    kept, full = cache_entries(aux["alpha"], seg, dmc)
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    decides = (seg > 0) & ~first  # a document's first token never merges or marks
    return kept, full, aux["logit"], decides

  kept = full = 0.0
  logits = []
  for b in batches:
    k, f, a_LyxBxLxK, m_BxL = run(params, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]))
    kept, full = kept + float(k), full + float(f)
    a = np.moveaxis(np.asarray(a_LyxBxLxK), 0, -1)  # [B, L, K, layers]
    logits.append(a[np.asarray(m_BxL)].ravel())
  if not kept:
    raise ConfigError("calibration rows: no tokens")
  return full / kept, np.concatenate(logits)


def calibrate(cfg: LlamaConfig, params, dmc: DMCConfig, batches: list[dict], target_cr: float, *,
              tol: float = 0.005, max_iters: int = 8,
              progress: Callable[[dict], None] | None = None) -> Calibration:
  """The decision_bias at which the noise-free decisions on `batches` realise `target_cr` (relative tolerance
  `tol`). `params`: the retrofitted model's tree (an adapter already applied), laid out as `cfg` says."""
  if not target_cr >= 1.0:
    raise ConfigError(f"--target-cr: expected >= 1, got {target_cr}")
  p_want = 1.0 - 1.0 / target_cr
  bias, history = dmc.decision_bias, []
  best = None
  for it in range(max_iters):
    cur = dataclasses.replace(dmc, decision_bias=float(bias))
    cr, a_N = measure(cfg, params, cur, batches)
    frac = float(np.mean(a_N > 0)) if a_N.size else 0.0
    row = {"iteration": it, "decision_bias": round(float(bias), 6), "realised_cr": round(cr, 4),
           "decided_fraction": round(frac, 5)}
    history.append(row)
    if progress is not None:
      progress(row)
    if best is None or abs(cr / target_cr - 1) < abs(best[1] / target_cr - 1):
      best = (cur, cr)
    if abs(cr / target_cr - 1) <= tol or not a_N.size:
      break
    # The cache's CR is below the decisions' own (DMS's last w tokens stay): rescale the wanted fraction by it.
    p_now = 1.0 - 1.0 / cr
    want = p_want if p_now <= 0 or frac <= 0 else float(np.clip(frac * p_want / p_now, 0.0, 1.0))
    bias += float(np.quantile(a_N, 1.0 - want))
  cur, cr = best
  if abs(cr / target_cr - 1) > tol:
    log.warning("calibration: closest realised CR %.4f after %d iterations (target %g)", cr, len(history),
                target_cr)
  return Calibration(cur, cr, float(target_cr), history)
