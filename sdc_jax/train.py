"""Pure training and evaluation steps for SDC-Net (the harness jits and shards them).

A batch is `{"frames": Bx(s+1)xHxWx3 uint8, "flows": Bx(s-1)xHxWx2 float32}`: s input frames, the target, and
the backward flows between the inputs (flow.py conventions). The state is a plain dict
`{"step", "params", "opt_state"}` so that a checkpoint restores without the Python classes that made it.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pallas_kernels.displaced_conv import api as sdc_api
from sdc_jax import losses, metrics
from sdc_jax.model import SDCNet, SDCNetConfig


def make_optimizer(lr: float, decay_steps: Sequence[int] = (), decay_factor: float = 0.1,
                   grad_clip: float = 0.0) -> optax.GradientTransformation:
  """Adam with step decay: lr × decay_factor at each step in `decay_steps`."""
  schedule = optax.piecewise_constant_schedule(lr, {int(s): decay_factor for s in decay_steps})
  tx = optax.adam(schedule)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx


def split_batch(batch, frames: int):
  x = batch["frames"]
  return x[:, :frames].astype(jnp.float32), batch["flows"].astype(jnp.float32), x[:, frames].astype(jnp.float32)


def init_state(model: SDCNet, tx: optax.GradientTransformation, rng, height: int = 64, width: int = 64):
  s = model.cfg.frames
  params = model.init(rng, jnp.zeros((1, s, height, width, 3)), jnp.zeros((1, s - 1, height, width, 2)))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_train_step(model: SDCNet, tx: optax.GradientTransformation, weights=(0.7, 0.2, 0.1)):
  def train_step(state, batch, rng):
    del rng  # deterministic model; augmentation happens in the data pipeline
    inputs, flows, target = split_batch(batch, model.cfg.frames)

    def loss_fn(params):
      with jax.named_scope("forward"):  # the profiler scopes: docs/profiling.md (as a DMC retrofit step's)
        out = model.apply({"params": params}, inputs, flows)
      with jax.named_scope("sdc_loss"):
        total, terms = losses.sdc_loss(out["pred"], target, out["uv"], *weights)
      return total, terms

    grad_fn = jax.named_scope("forward_backward")(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, terms), grads = grad_fn(state["params"])
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new, {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
  return train_step


def baselines(inputs_BxSxHxWx3, flows_BxFxHxWx2):
  """copy-last-frame and flow extrapolation (warp the last frame by the last backward flow)."""
  last = inputs_BxSxHxWx3[:, -1]
  return {"copy_last": last, "flow_extrap": sdc_api.warp(last, flows_BxFxHxWx2[:, -1])}


def make_eval_step(model: SDCNet):
  """(params, batch) -> {method: {metric: B values}} for the model and both baselines on the same frames."""
  def eval_step(params, batch):
    inputs, flows, target = split_batch(batch, model.cfg.frames)
    preds = {"model": model.apply({"params": params}, inputs, flows)["pred"], **baselines(inputs, flows)}
    return {name: metrics.all_metrics(p, target) for name, p in preds.items()}
  return jax.jit(eval_step)


@functools.lru_cache(maxsize=8)  # one compiled step per model config in a process (eval of a run, then its export)
def eval_step_for(cfg: SDCNetConfig):
  return make_eval_step(SDCNet(cfg))


@functools.lru_cache(maxsize=8)
def make_predict_fn(cfg: SDCNetConfig):
  model = SDCNet(cfg)

  @jax.jit
  def predict(params, inputs_BxSxHxWx3, flows_BxFxHxWx2):
    return model.apply({"params": params}, inputs_BxSxHxWx3.astype(jnp.float32),
                       flows_BxFxHxWx2.astype(jnp.float32))["pred"]
  return predict


def unboxed(tree: Any) -> Any:
  return nn.unbox(tree)
