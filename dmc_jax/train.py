"""Pure DMC retrofitting losses and train steps (the harness drives them; see DMC.md §5–6).

Batches are dicts of int32 [B, L] arrays: `tokens`, `targets` (next tokens), `loss_mask` (0 on padding and
across document boundaries), optional `segment_ids` and `positions` for packed rows.

* Stage 1 (no DMC): `vanilla_loss` with the channel-ch fade factor.
* Stages 2–3: `dmc_loss` = mean LM loss + the one-sided CR loss at the step's target CR (relaxed decisions,
  noise from the step's PRNG key).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from dmc_jax import dmc as dmc_math
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.model.llama import Llama

Array = jax.Array
Batch = Mapping[str, Array]


def lm_loss(logits_BxLxV: Array, targets_BxL: Array, loss_mask_BxL: Array) -> Array:
  """Mean next-token cross entropy over the positions the mask keeps (float32)."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  mask = loss_mask_BxL.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _valid(batch: Batch) -> Array:
  """Real tokens (segment id 0 marks padding in packed rows)."""
  seg = batch.get("segment_ids")
  return jnp.ones_like(batch["tokens"], bool) if seg is None else seg > 0


def vanilla_loss(cfg: LlamaConfig, dmc: DMCConfig) -> Callable:
  """Stage 1: (params, batch, fade) -> (loss, metrics); channel ch of q/k scaled by `fade`."""
  model = Llama(cfg, dmc, "off")

  def loss_fn(params, batch: Batch, fade) -> tuple[Array, dict]:
    logits = model.apply(params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"), fade=fade)
    loss = lm_loss(logits, batch["targets"], batch["loss_mask"])
    return loss, {"lm_loss": loss, "fade": jnp.asarray(fade, jnp.float32)}
  return loss_fn


def dmc_loss(cfg: LlamaConfig, dmc: DMCConfig) -> Callable:
  """Stages 2–3: (params, batch, rng, target_cr) -> (loss, metrics) with relaxed decisions."""
  model = Llama(cfg, dmc, "train")

  def loss_fn(params, batch: Batch, rng: Array, target_cr) -> tuple[Array, dict]:
    logits, aux = model.apply(params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"),
                              rngs={"dmc": rng})
    lm = lm_loss(logits, batch["targets"], batch["loss_mask"])
    valid = _valid(batch)
    cr = dmc_math.cr_loss(aux["alpha"], valid, target_cr)
    weights = valid.astype(jnp.float32)[None, :, :, None]
    per_head = jnp.sum(aux["alpha"] * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
    metrics = {"lm_loss": lm, "cr_loss": cr, "target_cr": jnp.asarray(target_cr, jnp.float32),
               "realised_cr": dmc_math.realised_cr(jax.lax.stop_gradient(aux["alpha"]), valid),
               "merge_fraction_per_head": jax.lax.stop_gradient(per_head)}  # [layers, K]
    return lm + cr, metrics
  return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """(params, opt_state, batch, *loss_args) -> (params, opt_state, metrics); pure, for jax.jit."""

  def step(params, opt_state, batch: Batch, *loss_args):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, *loss_args)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return step


def decision_rows_mask(params: Any, dmc: DMCConfig) -> Any:
  """True for the q/k weight entries that produce channel ch (for a separate decision-row learning rate)."""
  def mark(path, x):
    mask = jnp.zeros(x.shape, bool)
    return mask.at[..., dmc.channel(x.shape[-1])].set(True) if dmc_math.is_decision_kernel(path) else mask
  return jax.tree_util.tree_map_with_path(mark, params)


def scale_decision_rows(factor: float, dmc: DMCConfig) -> optax.GradientTransformation:
  """Multiplies the updates of the decision rows by `factor` (their own learning rate: DMC.md §6 notes that
  at small budgets only these rows must move fast). Chain it after the optimizer."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    mask = decision_rows_mask(updates, dmc)
    return jax.tree.map(lambda u, m: jnp.where(m, u * factor, u), updates, mask), state
  return optax.GradientTransformation(init, update)


def make_retrofit_step(cfg: LlamaConfig, dmc: DMCConfig, tx: optax.GradientTransformation, stage1_steps: int,
                       ramp_steps: int, target_cr: float) -> Callable:
  """The three-stage retrofit as one pure step over state {"step", "params", "opt_state"} (DMC.md §6):

  steps [0, stage1_steps): vanilla model, channel ch faded out; at step == stage1_steps the decision rows are
  zeroed (surgery) and DMC takes over with the target CR ramped 1 → target over `ramp_steps`, then held
  (stage 3). Being a function of the step counter alone, a resumed run continues exactly where it stopped.
  """
  stage1_loss, later_loss = vanilla_loss(cfg, dmc), dmc_loss(cfg, dmc)
  zero = jnp.zeros((), jnp.float32)

  def with_all_metrics(m):  # both stages report the same keys (lax.cond needs one output structure)
    out = {"lm_loss": m["lm_loss"], "cr_loss": m.get("cr_loss", zero), "fade": m.get("fade", zero),
           "target_cr": m.get("target_cr", jnp.ones((), jnp.float32)),
           "realised_cr": m.get("realised_cr", jnp.ones((), jnp.float32)),
           "merge_fraction_per_head": m.get("merge_fraction_per_head",
                                            jnp.zeros((cfg.n_layers, cfg.n_kv_heads), jnp.float32))}
    return out

  def step(state, batch: Batch, rng: Array):
    s = state["step"]
    params = jax.lax.cond(s == stage1_steps, lambda p: dmc_math.zero_decision_rows(p, dmc), lambda p: p,
                          state["params"])

    def loss_fn(p):
      def stage1(p):
        loss, m = stage1_loss(p, batch, dmc_math.stage1_fade(s, stage1_steps))
        return loss, with_all_metrics(m)

      def later(p):
        loss, m = later_loss(p, batch, rng, dmc_math.cr_schedule(s, stage1_steps, ramp_steps, target_cr))
        return loss, with_all_metrics(m)
      return jax.lax.cond(s < stage1_steps, stage1, later, p)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), stage=1 + (s >= stage1_steps)
                   + (s >= stage1_steps + ramp_steps))
    return {"step": s + 1, "params": params, "opt_state": opt_state}, metrics
  return step
