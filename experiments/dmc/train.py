"""`dmc-jax train`: retrofit a Llama checkpoint to DMC on the shared training harness.

Three stages as one step function of the step counter (dmc_jax.train.make_retrofit_step); Orbax checkpoints of
params + optimizer state + step + data-iterator state (a killed run resumes); metrics to TensorBoard and
metrics.jsonl; at the end a self-describing DMC checkpoint in WORKDIR/dmc_checkpoint (usable by
`dmc-jax generate --dmc`) and a PNG heatmap of the realised CR per layer × KV head on validation text.
With train.trainable != all only a subset trains (the base frozen, held once) and WORKDIR/adapter holds just
what trained (dmc_jax.adapter); train.loss distill / distill+lm distils from the original model with DMC off.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

log = logging.getLogger("dmc_jax")
FORMAT = "dmc-jax-retrofit/1"


def _model_and_tokenizer(cfg):
  from dmc_jax import checkpoint
  from dmc_jax.config import DMCConfig
  from dmc_jax.presets import preset
  dmc = DMCConfig(decision_channel=cfg.dmc.decision_channel, window=cfg.dmc.window,
                  temperature=cfg.dmc.temperature, offset=cfg.dmc.offset, decisions=cfg.dmc.decisions,
                  method=cfg.dmc.get("method", "dmc"), dms_window=cfg.dmc.get("dms_window", 16),
                  dms_scale=cfg.dmc.get("dms_scale", 100.0))
  source = checkpoint.Checkpoint(cfg.model.init_from) if cfg.model.init_from else None
  tok_dir = cfg.model.tokenizer_from or cfg.model.init_from
  if not tok_dir:
    raise checkpoint.CheckpointError("model.tokenizer_from: needed when model.init_from is not set")
  tok_ckpt = source if tok_dir == cfg.model.init_from else checkpoint.Checkpoint(tok_dir)
  tokenizer = tok_ckpt.tokenizer()
  llama = source.config if source else preset(cfg.model.preset)
  llama = llama.replace(param_dtype="float32", dtype=cfg.model.dtype, scan_layers=True,
                        remat_policy=cfg.model.remat,
                        attention_impl=None if cfg.model.attention_impl == "auto" else cfg.model.attention_impl)
  if tokenizer.vocab_size > llama.vocab_size:
    raise checkpoint.CheckpointError(f"{tok_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model's "
                                     f"embedding only {llama.vocab_size}")
  return llama, dmc, source, tokenizer


def make_optimizer(cfg, dmc):
  import optax

  from dmc_jax import train as dmc_train
  t = cfg.train
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, 2))
  return optax.chain(optax.clip_by_global_norm(t.clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay),
                     dmc_train.scale_decision_rows(t.decision_lr / t.lr, dmc))


def loss_spec(cfg):
  from dmc_jax import train as dmc_train
  t = cfg.train
  return dmc_train.LossSpec(t.loss, direction=t.distill_direction, temperature=t.distill_temperature,
                            weight=t.distill_weight, chunk=t.distill_chunk)


def adapter_spec(cfg, dmc):
  """The trainable subset (dmc_jax.adapter.AdapterSpec), None for train.trainable = all."""
  from dmc_jax import adapter
  t = cfg.train
  return adapter.AdapterSpec.for_trainable(t.trainable, dmc, t.lora_rank, t.lora_alpha, tuple(t.lora_targets))


def make_retrofit_step(cfg, llama, dmc, tx):
  """The experiment's pure train step (`dmc-jax plan` compiles this same step)."""
  from dmc_jax import train as dmc_train
  t = cfg.train
  return dmc_train.make_retrofit_step(llama, dmc, tx, t.stage1_steps, t.ramp_steps, t.target_cr, mode=t.mode,
                                      grad_accum=t.grad_accum, cr_weight=t.cr_weight, loss=loss_spec(cfg),
                                      adapter_spec=adapter_spec(cfg, dmc), cr_kind=t.cr_loss)


def initial_state(cfg, dmc, tx, params) -> dict:
  """The train state from the initial parameters (boxed or not): everything trains, or the parts of
  `adapter_spec` do (unboxed: small, replicated) with the boxed base frozen beside them."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  spec, loss = adapter_spec(cfg, dmc), loss_spec(cfg)
  state = {"step": jnp.zeros((), jnp.int32)}
  if spec is None:
    state["params"] = params
    if loss.distill:
      state["frozen"] = jax.tree.map(jnp.copy, params)  # the teacher: the original, not the student
  else:
    from dmc_jax import adapter
    state["params"] = adapter.split(nn.unbox(params), spec, dmc, jax.random.key(cfg.seed))
    state["frozen"] = params
  state["opt_state"] = tx.init(state["params"])
  return state


def full_params(cfg, dmc, state):
  """The student's whole parameter tree (the frozen base with the trained parts merged in)."""
  spec = adapter_spec(cfg, dmc)
  if spec is None:
    return state["params"]
  from dmc_jax import adapter
  return adapter.merge(state["frozen"], state["params"], spec, dmc)


def check_config(cfg) -> None:
  """Every field against its range (experiments/dmc/configs/base.py RANGES): one line naming the key."""
  from experiments.dmc.configs.base import RANGES
  from experiments.harness.config import validate
  validate(cfg, RANGES, where=cfg.get("name", "config"))


def train(cfg, break_lock: bool = False, allow_config_change: bool = False) -> dict:
  import jax
  import jax.numpy as jnp

  from dmc_jax import text_data
  from dmc_jax import train as dmc_train
  from dmc_jax.convert import layout
  from dmc_jax.model.llama import Llama
  from experiments.harness import mesh as mesh_lib
  from experiments.harness import mfu, trainer
  check_config(cfg)
  llama, dmc, source, tokenizer = _model_and_tokenizer(cfg)
  workdir = cfg.workdir or os.path.join("runs", cfg.name)
  trainer.batch_size_check(cfg.train.batch_size, mesh_lib.mesh_shape(cfg.mesh))
  src = text_data.TextSource(kind=cfg.data.kind, paths=tuple(cfg.data.paths), tfds_name=cfg.data.tfds_name,
                             text_key=cfg.data.text_key)
  splits = text_data.open_splits(src, cfg.data.data_dir)
  tx = make_optimizer(cfg, dmc)
  vanilla = cfg.train.mode == "vanilla"
  retrofit = make_retrofit_step(cfg, llama, dmc, tx)

  def train_step(state, batch, rng):
    state, m = retrofit(state, batch, rng)
    frac = m.pop("merge_fraction_per_head")  # [layers, KV heads]
    if not vanilla:
      m["cr_per_head"] = 1.0 / jnp.maximum(1.0 - frac, 1e-6)
      m["cr_per_layer"] = 1.0 / jnp.maximum(1.0 - jnp.mean(frac, axis=-1), 1e-6)
    return state, m

  adapter_form = dmc.decisions == "adapter"
  spec = adapter_spec(cfg, dmc)

  def init(rng):
    # Boxed (logically named) parameters, so that the optimizer state inherits the names: the harness shards
    # both from them (unboxing here would replicate everything). The adapter form adds its decision adapters.
    model = Llama(llama, dmc, "eval") if adapter_form else Llama(llama)
    return initial_state(cfg, dmc, tx, model.init(rng, jnp.zeros((1, 8), jnp.int32)))

  def source_params(shardings=None):
    tree = {"params": layout.stack_layers(source.load_params()["params"], llama.n_layers)}
    return jax.device_put(tree) if shardings is None else jax.device_put(tree, shardings)

  def load(shardings):
    params = source_params()
    if adapter_form:  # zero-initialised decision adapters: at step 0 the model is the source
      attn = params["params"]["layers"]["layer"]["attn"]
      outs = 1 if dmc.method == "dms" else 2  # DMS's adapter gives one logit per KV head, DMC's two
      attn["decision_adapter"] = {"kernel": jnp.zeros((llama.n_layers, llama.d_model, llama.n_kv_heads, outs),
                                                      jnp.float32)}
    return jax.jit(lambda p: initial_state(cfg, dmc, tx, p), out_shardings=shardings)(params)

  merged_params = jax.jit(lambda st: full_params(cfg, dmc, st))

  eval_model = Llama(llama, dmc, "eval")
  vanilla_model = Llama(llama)

  @jax.jit
  def vanilla_eval_batch(params, batch):
    logits = vanilla_model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return dmc_train.lm_loss(logits, batch["targets"], batch["loss_mask"]), jnp.zeros((llama.n_layers,
                                                                                       llama.n_kv_heads))

  @jax.jit
  def dmc_eval_batch(params, batch):
    logits, aux = eval_model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    valid = batch["segment_ids"] > 0
    weights = valid.astype(jnp.float32)[None, :, :, None]
    per_head = jnp.sum(aux["alpha"] * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
    return dmc_train.lm_loss(logits, batch["targets"], batch["loss_mask"]), per_head

  tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
  validation = list(text_data.eval_batches(splits["validation"], tokenizer, seq_len=cfg.train.seq_len,
                                           batch_size=cfg.train.batch_size, max_batches=cfg.train.eval_batches))
  last_heads = {}

  def evaluate(params, dmc_mode: bool) -> dict:
    """Held-out loss/perplexity on the fixed validation tokens; realised CR with hard, noiseless decisions."""
    losses, heads = zip(*((dmc_eval_batch if dmc_mode else vanilla_eval_batch)(params, b) for b in validation))
    frac = np.mean(np.stack([np.asarray(h) for h in heads]), axis=0)
    loss = float(np.mean(losses))
    return {"lm_loss": loss, "perplexity": float(np.exp(loss)), "realised_cr": float(1 / (1 - frac.mean())),
            "merge_fraction": frac}

  def eval_fn(state):
    # DMC runs are evaluated with DMC only once decisions exist (after the stage-1 surgery).
    ev = evaluate(merged_params(state) if spec else state["params"],
                  not vanilla and int(state["step"]) > cfg.train.stage1_steps)
    last_heads["fraction"] = ev.pop("merge_fraction")
    return ev

  task = trainer.Task(
      init=init, train_step=train_step, load=load if source else None, eval_fn=eval_fn,
      data=lambda: text_data.train_iterator(splits["train"], tokenizer, seq_len=cfg.train.seq_len,
                                            batch_size=cfg.train.batch_size, seed=cfg.seed),
      describe={"format": FORMAT, "model": llama.to_dict(), "dmc": dmc.to_dict(),
                "experiment": json.loads(cfg.to_json_best_effort())},
      items_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * mfu.llama_train_flops_per_token(llama, cfg.train.seq_len))
  peak = cfg.train.peak_tflops * 1e12 or mfu.peak_flops(dtype=cfg.model.dtype)
  loop = trainer.LoopConfig(steps=cfg.train.steps, seed=cfg.seed, log_every=cfg.train.log_every,
                            ckpt_every=cfg.train.ckpt_every, eval_every=cfg.train.eval_every, keep=cfg.train.keep,
                            mesh_shape=mesh_lib.mesh_shape(cfg.mesh), peak_flops=peak, break_lock=break_lock,
                            allow_config_change=allow_config_change)
  t0 = time.perf_counter()
  res = trainer.train(task, loop, workdir)
  eval_rows = [r for r in res.history if "eval/lm_loss" in r]
  final_eval = {k.split("/", 1)[1]: v for k, v in eval_rows[-1].items() if k.startswith("eval/")} if eval_rows else {}
  summary = {"workdir": os.path.abspath(workdir), "mode": cfg.train.mode, "steps": cfg.train.steps,
             "resumed_from": res.start_step, "tokens": cfg.train.steps * tokens_per_step,
             "validation_tokens": int(sum(int(np.sum(b["loss_mask"])) for b in validation)),
             "seconds": round(time.perf_counter() - t0, 1), "steps_per_second": round(res.steps_per_second, 3),
             "eval": final_eval}
  if source is not None and cfg.train.eval_baseline:
    # The unretrofitted model on the same validation tokens: what "quality preserved" is measured against.
    before = evaluate(source_params(), False)
    summary["eval_before"] = {k: v for k, v in before.items() if k != "merge_fraction"}
    summary["perplexity_ratio"] = round(final_eval["perplexity"] / before["perplexity"], 4)
  final = merged_params(res.state) if spec else res.state["params"]
  if vanilla:
    summary["checkpoint"] = _export(final, llama, None, tokenizer, cfg, workdir)
  else:
    summary["dmc_checkpoint"] = _export(final, llama, dmc, tokenizer, cfg, workdir)
    summary["heatmap"] = _plot_heatmap(last_heads.get("fraction"), os.path.join(workdir, "cr_heatmap.png"))
  if spec is not None:
    summary["adapter"] = _export_adapter(res.state, spec, llama, dmc, source, cfg, workdir,
                                         tokens=summary["tokens"])
  summary["curves"] = _plot_curves(res.history, cfg, os.path.join(workdir, "loss_cr_curves.png"))
  log.info("retrofit done: %s", summary)
  if "eval_before" in summary:
    log.info("held-out perplexity on %d tokens: %s %.3f (realised CR %.2f, hard decisions) vs unretrofitted %.3f "
             "(%.2f×)", summary["validation_tokens"], cfg.train.mode, final_eval["perplexity"],
             final_eval["realised_cr"], summary["eval_before"]["perplexity"], summary["perplexity_ratio"])
  return summary


def _export(params, llama, dmc, tokenizer, cfg, workdir) -> str:
  """The trained weights as a self-describing checkpoint (unscanned, float32): WORKDIR/dmc_checkpoint with the
  DMC settings, or WORKDIR/checkpoint for a vanilla run (dmc None)."""
  import jax

  from dmc_jax import checkpoint
  from dmc_jax.convert import Converted, layout
  from dmc_jax.convert.tensors import LazyTensor
  tree = layout.unstack_layers(jax.device_get(params)["params"], llama.n_layers)
  flat = {k: np.asarray(v) for k, v in layout.flatten(tree).items()}
  tensors = [LazyTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()]
  source = checkpoint.Checkpoint(cfg.model.tokenizer_from or cfg.model.init_from)
  converted = Converted(llama.replace(scan_layers=False, remat_policy="none"), tensors, source.tokenizer_bytes(),
                        {"format": "dmc-jax retrofit", "path": os.path.abspath(workdir)},
                        chat_template=source.chat_template)
  name, dmc_fields = ("checkpoint", None) if dmc is None else ("dmc_checkpoint", dmc.to_dict())
  return checkpoint.write(os.path.join(workdir, name), converted, force=True, dmc=dmc_fields,
                          experiment=json.loads(cfg.to_json_best_effort()))


def _export_adapter(state, spec, llama, dmc, source, cfg, workdir, tokens: int) -> str:
  """WORKDIR/adapter: only what trained, naming its base by the base's parameter digest."""
  import jax

  from dmc_jax import adapter, checkpoint
  from dmc_jax.convert import layout
  if source is not None:
    digest, dtype = source.param_digest, source.meta.get("param_dtype")
  else:  # a random base (toy runs): the digest of the frozen parameters as an unscanned float32 checkpoint
    tree = layout.unstack_layers(jax.device_get(state["frozen"])["params"], llama.n_layers)
    d = checkpoint.ParamDigest()
    for name, a in sorted(layout.flatten(tree).items()):
      if "decision_adapter" not in name:
        d.add(name, np.asarray(a, np.float32))
    digest, dtype = d.hexdigest(), "float32"
  return adapter.save(os.path.join(workdir, "adapter"), state["params"], spec, dmc, n_layers=llama.n_layers,
                      base_digest=digest, base_param_dtype=dtype, tokens=tokens,
                      extra={"experiment": cfg.name, "workdir": os.path.abspath(workdir)})


def _plot_heatmap(fraction, path) -> str | None:
  if fraction is None:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm
  cr = 1.0 / np.maximum(1.0 - np.asarray(fraction), 1e-6)
  fig, ax = plt.subplots(figsize=(2.5 + 0.5 * cr.shape[1], 1 + 0.25 * cr.shape[0]))
  # Log scale: a head that merges whole documents reaches CR ~100 and would flatten every other head to one colour.
  im = ax.imshow(cr, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1.0, vmax=max(float(cr.max()), 2.0)))
  for (i, j), v in np.ndenumerate(cr):
    ax.text(j, i, f"{v:.1f}" if v < 10 else f"{v:.0f}", ha="center", va="center", fontsize=6,
            color="white" if v < np.sqrt(max(float(cr.max()), 2.0)) else "black")
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_title(f"realised CR per head\n(held-out, hard decisions; overall {1 / (1 - np.mean(fraction)):.2f})",
               fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_curves(history, cfg, path) -> str | None:
  """Two panels: LM loss (train, held-out) and compression (target, realised in training and held-out), with
  the stage boundaries."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def series(name):
    pts = [(r["step"], r[name]) for r in history if name in r]
    return tuple(zip(*pts)) if pts else ((), ())
  if not history:
    return None
  fig, (ax_loss, ax_cr) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, label in (("train/lm_loss", "train LM loss"), ("eval/lm_loss", "held-out LM loss")):
    xs, ys = series(name)
    ax_loss.plot(xs, ys, marker="o" if name.startswith("eval") else None, label=label)
  for name, label in (("train/target_cr", "target CR"), ("train/realised_cr", "realised CR (train, relaxed)"),
                      ("eval/realised_cr", "realised CR (held-out, hard)")):
    xs, ys = series(name)
    ax_cr.plot(xs, ys, marker="o" if name.startswith("eval") else None, label=label)
  if cfg.train.mode == "dmc":
    for ax in (ax_loss, ax_cr):
      for x in (cfg.train.stage1_steps, cfg.train.stage1_steps + cfg.train.ramp_steps):
        ax.axvline(x, color="grey", lw=0.8, ls=":")
  ax_loss.set_title(f"{cfg.name}: LM loss")
  ax_cr.set_title("compression ratio")
  for ax in (ax_loss, ax_cr):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
