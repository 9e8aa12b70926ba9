"""Pure DMC retrofitting losses and train steps (the harness drives them; see docs/dmc.md §5–6).

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


@jax.named_scope("lm_loss")  # the profiler scopes: docs/profiling.md
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
    with jax.named_scope("forward"):
      logits = model.apply(params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"), fade=fade)
    loss = lm_loss(logits, batch["targets"], batch["loss_mask"])
    return loss, {"lm_loss": loss, "fade": jnp.asarray(fade, jnp.float32)}
  return loss_fn


def dmc_loss(cfg: LlamaConfig, dmc: DMCConfig) -> Callable:
  """Stages 2–3: (params, batch, rng, target_cr) -> (loss, metrics) with relaxed decisions."""
  model = Llama(cfg, dmc, "train")

  def loss_fn(params, batch: Batch, rng: Array, target_cr) -> tuple[Array, dict]:
    with jax.named_scope("forward"):
      logits, aux = model.apply(params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"),
                                rngs={"dmc": rng})
    lm = lm_loss(logits, batch["targets"], batch["loss_mask"])
    valid = _valid(batch)
    with jax.named_scope("cr_loss"):
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
  """Multiplies the updates of the decision rows by `factor` (their own learning rate: docs/dmc.md §6 notes that
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
                       ramp_steps: int, target_cr: float, mode: str = "dmc", grad_accum: int = 1,
                       cr_weight: float = 1.0) -> Callable:
  """The three-stage retrofit as one pure step over state {"step", "params", "opt_state"} (docs/dmc.md §6):

  steps [0, stage1_steps): vanilla model, channel ch faded out; at step == stage1_steps the decision rows are
  zeroed (surgery) and DMC takes over with the target CR ramped 1 → target over `ramp_steps`, then held
  (stage 3). Being a function of the step counter alone, a resumed run continues exactly where it stopped.

  mode="vanilla" is the continued-training baseline: the same optimizer, data and metrics, no DMC at all.
  grad_accum > 1 splits the batch into that many microbatches (a scan: activations of one microbatch live at a
  time); token- and sequence-weighted, so the gradient equals the whole batch's.
  cr_weight multiplies the CR loss (the paper: 1). Per decision, the CR gradient is 1/(rows·length·heads·layers)
  while the LM gradient through a noise-triggered merge is of order 1/(rows·length): at 1 the CR signal only
  emerges from the LM noise over thousands of steps (on SmolLM2 the LM gradient on the decision rows measured
  ≈10× the CR gradient), so short runs raise it.
  """
  if mode not in ("dmc", "vanilla"):
    raise ValueError(f"train.mode: expected 'dmc' or 'vanilla', got {mode!r}")
  stage1_loss, later_loss = vanilla_loss(cfg, dmc), dmc_loss(cfg, dmc)
  zero = jnp.zeros((), jnp.float32)

  def with_all_metrics(m):  # both stages report the same keys (lax.cond needs one output structure)
    out = {"lm_loss": m["lm_loss"], "cr_loss": m.get("cr_loss", zero), "fade": m.get("fade", zero),
           "target_cr": m.get("target_cr", jnp.ones((), jnp.float32)),
           "realised_cr": m.get("realised_cr", jnp.ones((), jnp.float32)),
           "merge_fraction_per_head": m.get("merge_fraction_per_head",
                                            jnp.zeros((cfg.n_layers, cfg.n_kv_heads), jnp.float32))}
    return out

  def micro_loss(p, micro: Batch, rng: Array, s: Array, lm_weight: Array, seq_weight: Array):
    """The microbatch's share of the whole batch's loss: LM loss by its token share, CR loss by its row share."""
    def stage1(p):
      fade = 1.0 if mode == "vanilla" else dmc_math.stage1_fade(s, stage1_steps)
      return with_all_metrics(stage1_loss(p, micro, fade)[1])

    def later(p):
      return with_all_metrics(later_loss(p, micro, rng, dmc_math.cr_schedule(s, stage1_steps, ramp_steps,
                                                                             target_cr))[1])
    m = stage1(p) if mode == "vanilla" else jax.lax.cond(s < stage1_steps, stage1, later, p)
    return m["lm_loss"] * lm_weight + cr_weight * m["cr_loss"] * seq_weight, m

  def step(state, batch: Batch, rng: Array):
    s = state["step"]
    params, opt_state = state["params"], state["opt_state"]
    if mode == "dmc":
      # The surgery also clears the rows' Adam moments: they hold stage-1 statistics of a different objective,
      # and a second moment built from stage-1 LM gradients would damp the (much smaller) post-surgery decision
      # gradients for tens of steps (β2 = 0.95).
      params, opt_state = jax.lax.cond(s == stage1_steps, lambda t: dmc_math.zero_decision_rows(t, dmc),
                                       lambda t: t, (params, opt_state))
    rows = batch["tokens"].shape[0]
    if rows % grad_accum:
      raise ValueError(f"train.grad_accum {grad_accum} does not divide the per-step batch of {rows} rows")
    # Backward ops carry the forward's scopes under transpose(jvp(...)) (docs/profiling.md).
    grad_fn = jax.named_scope("forward_backward")(jax.value_and_grad(micro_loss, has_aux=True))
    if grad_accum == 1:  # no scan: keeps the single-batch step's HLO (and its RNG draws) unchanged
      (loss, metrics), grads = grad_fn(params, dict(batch), rng, s, jnp.ones((), jnp.float32), 1.0)
    else:
      # Microbatch i takes rows i, i + A, i + 2A, ...: the batch is split over devices in contiguous blocks, so
      # every microbatch keeps one slice on every data-parallel device (a plain reshape would put each
      # microbatch on one device).
      micro = jax.tree.map(lambda x: x.reshape((rows // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1),
                           dict(batch))
      tokens_A = jnp.sum(micro["loss_mask"].astype(jnp.float32), axis=(1, 2))
      lm_weight_A = tokens_A / jnp.maximum(jnp.sum(tokens_A), 1.0)

      def accumulate(carry, xs):
        grads, loss, metrics = carry
        mb, i, lm_weight = xs
        (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i), s, lm_weight, 1.0 / grad_accum)
        metrics = {k: metrics[k] + (m[k] * lm_weight if k == "lm_loss" else m[k] / grad_accum) for k in metrics}
        return (jax.tree.map(jnp.add, grads, g), loss + l, metrics), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      m0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, s, zero, zero)[0][1])
      m0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), m0)
      (grads, loss, metrics), _ = jax.lax.scan(accumulate, (zeros, zero, m0),
                                               (micro, jnp.arange(grad_accum), lm_weight_A))
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    stage = jnp.asarray(0 if mode == "vanilla" else 1 + (s >= stage1_steps) + (s >= stage1_steps + ramp_steps))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), stage=stage)
    return {"step": s + 1, "params": params, "opt_state": opt_state}, metrics
  return step
