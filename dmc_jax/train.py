"""Pure DMC retrofitting losses and train steps (the harness drives them; see docs/dmc.md §5–6).

Batches are dicts of int32 [B, L] arrays: `tokens`, `targets` (next tokens), `loss_mask` (0 on padding and
across document boundaries), optional `segment_ids` and `positions` for packed rows.

* Stage 1 (no DMC): `vanilla_loss` with the channel-ch fade factor.
* Stages 2–3: `dmc_loss` = mean LM loss + the one-sided CR loss at the step's target CR (relaxed decisions,
  noise from the step's PRNG key).
* Either can instead (`LossSpec.kind` "distill") or also ("distill+lm") be a KL divergence to a teacher's
  next-token distributions: the original parameters with DMC off (`distill_terms`).
* `make_retrofit_step` trains all parameters or only a subset (`dmc_jax.adapter.AdapterSpec`: the state then holds
  the frozen base once and the trainable parts, and the optimizer sees only the parts).
"""

from __future__ import annotations

import dataclasses
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


LOSSES = ("lm", "distill", "distill+lm")
KL_DIRECTIONS = ("forward", "reverse")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """What the token-level objective is (train.loss, train.distill_* in the experiment config)."""

  kind: str = "lm"  # lm: cross entropy; distill: KL to the teacher; distill+lm: cross entropy + weight · KL
  direction: str = "forward"  # forward KL(teacher ‖ student) (mass-covering) | reverse KL(student ‖ teacher)
  temperature: float = 1.0  # both distributions softened by T; the KL is multiplied by T² (gradient scale)
  weight: float = 1.0  # of the KL term in distill+lm
  chunk: int = 128  # tokens per block of vocabulary-sized logits (peak memory, see `distill_terms`)

  def __post_init__(self):
    if self.kind not in LOSSES:
      raise ValueError(f"train.loss: expected one of {LOSSES}, got {self.kind!r}")
    if self.direction not in KL_DIRECTIONS:
      raise ValueError(f"train.distill_direction: expected one of {KL_DIRECTIONS}, got {self.direction!r}")
    if not self.temperature > 0 or not self.chunk >= 1:
      raise ValueError(f"train.distill_temperature > 0 and train.distill_chunk >= 1 expected, got "
                       f"{self.temperature}, {self.chunk}")

  @property
  def distill(self) -> bool:
    return self.kind != "lm"

  def objective(self, lm: Array, kl: Array) -> Array:
    """The token-level loss from the mean cross entropy and the mean KL."""
    return {"lm": lm, "distill": kl, "distill+lm": lm + self.weight * kl}[self.kind]


LM = LossSpec()


def kl_terms(student_logits: Array, teacher_logits: Array, targets: Array, mask: Array,
             spec: LossSpec) -> tuple[Array, Array]:
  """(Σ cross entropy, Σ KL) over the masked positions of one block of logits [..., V] (float32 sums)."""
  m = mask.astype(jnp.float32)
  s32 = student_logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(s32, axis=-1)
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  t = spec.temperature
  logp_s = logp if t == 1.0 else jax.nn.log_softmax(s32 / t, axis=-1)
  logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  if spec.direction == "forward":
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
  else:
    kl = jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
  return jnp.sum(ce * m), jnp.sum(kl * m) * (t * t)


def distill_terms(head_s: Callable, head_t: Callable, h_s_BxLxD: Array, h_t_BxLxD: Array, targets_BxL: Array,
                  mask_BxL: Array, spec: LossSpec) -> tuple[Array, Array]:
  """(mean cross entropy, mean KL) from the student's and teacher's last hidden states, the logits built C =
  spec.chunk tokens at a time in a rematerialised scan.

  Peak memory of the loss: O(B·C·V) — the student's and teacher's logits of one block, their log-softmaxes and
  the student's gradient, about 5·B·C·V float32 values (SmolLM2, V = 49,152, B = 8, C = 128: ≈ 1 GB) instead
  of the ≈ 5·B·L·V a whole-sequence KL would hold; the backward pass recomputes each block's logits.
  """
  b, l, d = h_s_BxLxD.shape
  c = min(spec.chunk, l)
  n = -(-l // c)
  pad = n * c - l

  def blocks(x):  # [B, L, ...] -> [n, B, C, ...]; padding is masked out
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def body(carry, xs):
    hs, ht, tg, m = xs
    ce, kl = kl_terms(head_s(hs), head_t(ht), tg, m, spec)
    return (carry[0] + ce, carry[1] + kl), None
  zero = jnp.zeros((), jnp.float32)
  (ce, kl), _ = jax.lax.scan(body, (zero, zero), (blocks(h_s_BxLxD), blocks(jax.lax.stop_gradient(h_t_BxLxD)),
                                                  blocks(targets_BxL), blocks(mask_BxL)))
  count = jnp.maximum(jnp.sum(mask_BxL.astype(jnp.float32)), 1.0)
  return ce / count, kl / count


def _student_terms(cfg: LlamaConfig, model: Llama, spec: LossSpec, params, batch: Batch, teacher, **kw):
  """(mean cross entropy, mean KL (0 for spec lm), aux or None) of `model` on the batch."""
  args = (batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
  if not spec.distill:
    with jax.named_scope("forward"):
      out = model.apply(params, *args, **kw)
    logits, aux = (out, None) if model.dmc_mode == "off" else out
    return lm_loss(logits, batch["targets"], batch["loss_mask"]), jnp.zeros((), jnp.float32), aux
  if teacher is None:
    raise ValueError(f"train.loss={spec.kind!r} needs the teacher's parameters")
  with jax.named_scope("forward"):
    out = model.apply(params, *args, hidden=True, **kw)
  h_s, aux = (out, None) if model.dmc_mode == "off" else out
  # The teacher: the original weights, vanilla attention, no fade; nothing of it is differentiated.
  teacher_model = Llama(cfg)
  teacher = jax.lax.stop_gradient(teacher)
  h_t = teacher_model.apply(teacher, *args, hidden=True)
  ce, kl = distill_terms(lambda h: model.apply(params, h, method=Llama.head),
                         lambda h: teacher_model.apply(teacher, h, method=Llama.head),
                         h_s, h_t, batch["targets"], batch["loss_mask"], spec)
  return ce, kl, aux


def distill_loss(cfg: LlamaConfig, dmc: DMCConfig | None, dmc_mode: str, spec: LossSpec = LossSpec("distill")):
  """(params, teacher, batch, rng) -> (mean KL, mean cross entropy) of the model in `dmc_mode` ("off", "train",
  "eval") against the teacher (tests; the train step composes the same terms)."""
  model = Llama(cfg, dmc, dmc_mode)

  def loss_fn(params, teacher, batch: Batch, rng: Array | None = None):
    kw = {"rngs": {"dmc": rng}} if dmc_mode == "train" else {}
    ce, kl, _ = _student_terms(cfg, model, dataclasses.replace(spec, kind="distill"), params, batch, teacher, **kw)
    return kl, ce
  return loss_fn


def _valid(batch: Batch) -> Array:
  """Real tokens (segment id 0 marks padding in packed rows)."""
  seg = batch.get("segment_ids")
  return jnp.ones_like(batch["tokens"], bool) if seg is None else seg > 0


def vanilla_loss(cfg: LlamaConfig, dmc: DMCConfig, spec: LossSpec = LM) -> Callable:
  """Stage 1: (params, batch, fade, teacher=None) -> (loss, metrics); channel ch of q/k scaled by `fade`."""
  model = Llama(cfg, dmc, "off")

  def loss_fn(params, batch: Batch, fade, teacher=None) -> tuple[Array, dict]:
    lm, kl, _ = _student_terms(cfg, model, spec, params, batch, teacher, fade=fade)
    return spec.objective(lm, kl), {"lm_loss": lm, "distill_loss": kl, "fade": jnp.asarray(fade, jnp.float32)}
  return loss_fn


def dmc_loss(cfg: LlamaConfig, dmc: DMCConfig, spec: LossSpec = LM, cr_kind: str = "one_sided") -> Callable:
  """Stages 2–3: (params, batch, rng, target_cr, teacher=None) -> (loss, metrics) with relaxed decisions."""
  model = Llama(cfg, dmc, "train")

  def loss_fn(params, batch: Batch, rng: Array, target_cr, teacher=None) -> tuple[Array, dict]:
    lm, kl, aux = _student_terms(cfg, model, spec, params, batch, teacher, rngs={"dmc": rng})
    valid = _valid(batch)
    with jax.named_scope("cr_loss"):
      cr = dmc_math.cr_loss(aux["alpha"], valid, target_cr, cr_kind)
    weights = valid.astype(jnp.float32)[None, :, :, None]
    per_head = jnp.sum(aux["alpha"] * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
    metrics = {"lm_loss": lm, "distill_loss": kl, "cr_loss": cr, "target_cr": jnp.asarray(target_cr, jnp.float32),
               "realised_cr": dmc_math.realised_cr(jax.lax.stop_gradient(aux["alpha"]), valid),
               "merge_fraction_per_head": jax.lax.stop_gradient(per_head)}  # [layers, K]
    return spec.objective(lm, kl) + cr, metrics
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
  """True for the q/k weight entries that produce channel ch, split-out decision rows and the decision adapter
  (for a separate decision learning rate)."""
  def mark(path, x):
    names = [getattr(p, "key", None) for p in path]
    if names[-1] == "rows" or "decision_adapter" in names:  # split-out rows (dmc_jax.adapter), the adapter form
      return jnp.ones(x.shape, bool)
    mask = jnp.zeros(x.shape, bool)
    ch = dmc.channel(x.shape[-1])
    # DMS reads its decisions from q alone (its k[ch] is an ordinary attention channel); DMC from q and k.
    decides = dmc_math.is_decision_kernel(path) and (dmc.method == "dmc" or "q_proj" in names)
    return mask.at[..., ch].set(True) if ch is not None and decides else mask
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
                       cr_weight: float = 1.0, loss: LossSpec = LM, adapter_spec=None,
                       cr_kind: str = "one_sided") -> Callable:
  """The three-stage retrofit as one pure step over state {"step", "params", "opt_state"} (docs/dmc.md §6):

  steps [0, stage1_steps): vanilla model, channel ch faded out; at step == stage1_steps the decision rows are
  zeroed (surgery) and DMC takes over with the target CR ramped 1 → target over `ramp_steps`, then held
  (stage 3). Being a function of the step counter alone, a resumed run continues exactly where it stopped.

  mode="vanilla" is the continued-training baseline: the same optimizer, data and metrics, no DMC at all.
  grad_accum > 1 splits the batch into that many microbatches (a scan: activations of one microbatch live at a
  time); token- and sequence-weighted, so the gradient equals the whole batch's.
  cr_kind: "one_sided" (the paper's) or "two_sided" CR loss (dmc_jax.dmc.cr_loss).
  cr_weight multiplies the CR loss (the paper: 1). Per decision, the CR gradient is 1/(rows·length·heads·layers)
  while the LM gradient through a noise-triggered merge is of order 1/(rows·length): at 1 the CR signal only
  emerges from the LM noise over thousands of steps (on SmolLM2 the LM gradient on the decision rows measured
  ≈10× the CR gradient), so short runs raise it.

  loss: the token-level objective (LossSpec: cross entropy, KL to the teacher, or both). The teacher is
  state["frozen"]: the original parameters (DMC off, no fade) — with a trainable subset the frozen base itself
  (held once: the student's parameters are merged from it and the parts each step), otherwise a copy of the
  initial parameters (`init_state` puts it there).
  adapter_spec (dmc_jax.adapter.AdapterSpec, None = train everything): state["params"] is then only the trainable
  parts (the optimizer holds state for those alone) and state["frozen"] the base; the student's parameters are
  `adapter.merge(frozen, params)`, differentiated with respect to the parts only.
  The adapter form (dmc.decisions = "adapter") has no repurposed channel: no stage 1, no surgery.
  """
  from dmc_jax import adapter as adapter_lib
  if mode not in ("dmc", "vanilla"):
    raise ValueError(f"train.mode: expected 'dmc' or 'vanilla', got {mode!r}")
  if dmc.decisions == "adapter" and stage1_steps and mode == "dmc":
    raise ValueError("train.stage1_steps: must be 0 with dmc.decisions='adapter' (no channel to fade out)")
  if dmc.method == "dms" and stage1_steps and mode == "dmc":
    # DMS starts from the pre-trained channel (its logit 100·q[ch] − 5 keeps almost every token): no fade, no surgery.
    raise ValueError("train.stage1_steps: must be 0 with dmc.method='dms' (DMS has no stage 1)")
  stage1_loss, later_loss = vanilla_loss(cfg, dmc, loss), dmc_loss(cfg, dmc, loss, cr_kind)
  zero = jnp.zeros((), jnp.float32)

  def with_all_metrics(m):  # both stages report the same keys (lax.cond needs one output structure)
    out = {"lm_loss": m["lm_loss"], "distill_loss": m["distill_loss"], "cr_loss": m.get("cr_loss", zero),
           "fade": m.get("fade", zero),
           "target_cr": m.get("target_cr", jnp.ones((), jnp.float32)),
           "realised_cr": m.get("realised_cr", jnp.ones((), jnp.float32)),
           "merge_fraction_per_head": m.get("merge_fraction_per_head",
                                            jnp.zeros((cfg.n_layers, cfg.n_kv_heads), jnp.float32))}
    return out

  def micro_loss(p, micro: Batch, rng: Array, s: Array, lm_weight: Array, seq_weight: Array, frozen):
    """The microbatch's share of the whole batch's loss: LM loss by its token share, CR loss by its row share."""
    full = p if adapter_spec is None else adapter_lib.merge(frozen, p, adapter_spec, dmc)
    teacher = frozen if loss.distill else None

    def stage1(p):
      fade = 1.0 if mode == "vanilla" else dmc_math.stage1_fade(s, stage1_steps)
      return with_all_metrics(stage1_loss(p, micro, fade, teacher)[1])

    def later(p):
      return with_all_metrics(later_loss(p, micro, rng, dmc_math.cr_schedule(s, stage1_steps, ramp_steps,
                                                                             target_cr), teacher)[1])
    if mode == "vanilla":
      m = stage1(full)
    elif stage1_steps == 0:
      m = later(full)
    else:
      m = jax.lax.cond(s < stage1_steps, stage1, later, full)
    token_loss = loss.objective(m["lm_loss"], m["distill_loss"])
    return token_loss * lm_weight + cr_weight * m["cr_loss"] * seq_weight, m

  def step(state, batch: Batch, rng: Array):
    s = state["step"]
    params, opt_state = state["params"], state["opt_state"]
    frozen = state.get("frozen")
    if (adapter_spec is not None or loss.distill) and frozen is None:
      raise ValueError("the state has no 'frozen' parameters (trainable subsets and distillation need them; "
                       "build the state with init_state)")
    if mode == "dmc" and dmc.decisions == "channel" and dmc.method == "dmc":
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
      (total, metrics), grads = grad_fn(params, dict(batch), rng, s, jnp.ones((), jnp.float32), 1.0, frozen)
    else:
      # Microbatch i takes rows i, i + A, i + 2A, ...: the batch is split over devices in contiguous blocks, so
      # every microbatch keeps one slice on every data-parallel device (a plain reshape would put each
      # microbatch on one device).
      micro = jax.tree.map(lambda x: x.reshape((rows // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1),
                           dict(batch))
      tokens_A = jnp.sum(micro["loss_mask"].astype(jnp.float32), axis=(1, 2))
      lm_weight_A = tokens_A / jnp.maximum(jnp.sum(tokens_A), 1.0)

      def accumulate(carry, xs):
        grads, total, metrics = carry
        mb, i, lm_weight = xs
        (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i), s, lm_weight, 1.0 / grad_accum, frozen)
        token_weighted = ("lm_loss", "distill_loss")
        metrics = {k: metrics[k] + (m[k] * lm_weight if k in token_weighted else m[k] / grad_accum) for k in metrics}
        return (jax.tree.map(jnp.add, grads, g), total + l, metrics), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      m0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, s, zero, zero,
                                          frozen)[0][1])
      m0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), m0)
      (grads, total, metrics), _ = jax.lax.scan(accumulate, (zeros, zero, m0),
                                               (micro, jnp.arange(grad_accum), lm_weight_A))
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    stage = jnp.asarray(0 if mode == "vanilla" else 1 + (s >= stage1_steps) + (s >= stage1_steps + ramp_steps))
    metrics = dict(metrics, loss=total, grad_norm=optax.tree.norm(grads), stage=stage)
    new = {"step": s + 1, "params": params, "opt_state": opt_state}
    if frozen is not None:
      new["frozen"] = frozen
    return new, metrics
  return step


def init_state(params: Any, tx: optax.GradientTransformation, dmc: DMCConfig, adapter_spec=None,
               loss: LossSpec = LM, rng: Array | None = None) -> dict:
  """The retrofit state from the initial parameters: {"step", "params" (what trains), "opt_state" (for that
  only), "frozen" (the base: with a trainable subset, or the teacher's copy when distilling everything)}."""
  from dmc_jax import adapter as adapter_lib
  state = {"step": jnp.zeros((), jnp.int32)}
  if adapter_spec is not None:
    state["params"] = adapter_lib.split(params, adapter_spec, dmc, rng)
    state["frozen"] = params
  else:
    state["params"] = params
    if loss.distill:
      state["frozen"] = jax.tree.map(jnp.copy, params)  # the teacher must not follow the student
  state["opt_state"] = tx.init(state["params"])
  return state
