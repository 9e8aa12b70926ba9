"""The one training loop of both systems (SDC-Net and DMC retrofits): model-agnostic, sharded, checkpointed, resumable.

A `Task` supplies pure pieces; the loop supplies everything else:

* mesh `(data, fsdp, tensor)` from `mesh_shape`, shardings of the state from its logical axis names (the init
  may return `nn.Partitioned` boxes; the loop unboxes them), the batch's leading dimension split over
  (data, fsdp), `jax.jit` with in/out shardings and the state donated;
* step RNG = fold_in(key(seed), step), so a resumed run draws what the uninterrupted one drew;
* Orbax async checkpoints (state + data-iterator state) every `ckpt_every` steps and at the end, keep-N,
  resume from the latest finished one (a run killed with -9 continues from there);
* metrics every `log_every` steps (means over the interval) to TensorBoard + metrics.jsonl, a tqdm bar,
  `eval_fn` every `eval_every` steps and at the end, curves.png at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np

from dmc_jax.convert.tensors import read_json
from experiments.harness import mesh as mesh_lib
from experiments.harness import metrics as metrics_lib
from experiments.harness import orbax_ckpt, profiling, progress
from experiments.harness import workdir as workdir_lib
from experiments.harness.errors import TrainCheckpointError

log = logging.getLogger("dmc_jax")


@dataclasses.dataclass
class Task:
  # rng -> train state (a pytree; parameters may carry logical partitioning boxes)
  init: Callable[[jax.Array], Any]
  # (state, batch, rng) -> (state, metrics dict of scalars): pure, jitted by the loop
  train_step: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, jax.Array]]]
  # () -> an endless iterator of numpy batches with get_state() / set_state(dict) (grain's do)
  data: Callable[[], Iterator]
  # (state) -> dict of floats; run on the host every eval_every steps and at the end
  eval_fn: Callable[[Any], Mapping[str, float]] | None = None
  # written to WORKDIR/run.json before training (what eval/predict need to rebuild the model)
  describe: Mapping[str, Any] | None = None
  # (state shardings) -> the initial state of a fresh run placed with those shardings, e.g. weights loaded from a
  # converted checkpoint (jit-compiling `init` would bake them in as constants); default: jit(init)
  load: Callable[[Any], Any] | None = None
  # throughput accounting per optimizer step: tokens (or frames) and model FLOPs (for the MFU estimate)
  items_per_step: float = 0.0
  flops_per_step: float = 0.0
  items_name: str = "tokens"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int
  seed: int = 0
  log_every: int = 10
  ckpt_every: int = 100
  eval_every: int = 0  # 0: only at the end
  keep: int = 3
  async_ckpt: bool = True
  mesh_shape: tuple[int, int, int] = (-1, 1, 1)
  # RBG keys: initialising ~40 arrays with threefry compiles for 10-20 s on a 2-core CPU, RBG in ~2 s.
  prng_impl: str = "rbg"
  # peak FLOP/s of ALL devices together, for MFU (None: throughput only)
  peak_flops: float | None = None
  break_lock: bool = False  # take over the workdir lock even if its holder may be alive
  allow_config_change: bool = False  # resume with a changed config (recorded in run.json's history)


@dataclasses.dataclass
class Result:
  state: Any
  history: list[dict]
  start_step: int  # > 0 when resumed
  seconds: float
  steps_per_second: float


def train(task: Task, cfg: LoopConfig, workdir: str,
          on_step: Callable[[int, Mapping[str, float]], None] | None = None) -> Result:
  """Holds the workdir's lock (process 0) for the whole run; see `_train`."""
  with workdir_lib.WorkdirLock(workdir, cfg.break_lock, enabled=jax.process_index() == 0):
    try:
      return _train(task, cfg, workdir, on_step)
    except Exception as e:
      if workdir_lib.disk_full(e):
        raise TrainCheckpointError(f"{workdir}: disk full ({e.__class__.__name__}: No space left on device); the "
                                   "checkpoints already finished are intact — free space and rerun to resume") from None
      raise


def _train(task: Task, cfg: LoopConfig, workdir: str,
           on_step: Callable[[int, Mapping[str, float]], None] | None = None) -> Result:
  mesh = mesh_lib.make_mesh(cfg.mesh_shape)
  key = jax.random.key(cfg.seed, impl=cfg.prng_impl)
  init_key, step_key = jax.random.split(key)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
    boxed = jax.eval_shape(task.init, init_key)
    state_sh = mesh_lib.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            strip_boxes(boxed), state_sh)
    batch_sh = mesh_lib.batch_sharding(mesh)
    rep = mesh_lib.replicated(mesh)
    primary = jax.process_index() == 0  # multi-host: one process writes the run's files
    ckpt = orbax_ckpt.Checkpointer(workdir, keep=cfg.keep, async_save=cfg.async_ckpt, primary=primary)
    data_it = task.data()
    try:
      # The config check comes first: checkpoints of another model would fail to restore and be taken for corrupt.
      describe = dict(task.describe) if task.describe is not None else None
      latest = ckpt.latest_step() or 0
      run_json = os.path.join(workdir, orbax_ckpt.RUN_JSON)
      if describe is not None and latest and os.path.exists(run_json):
        previous = read_json(run_json, "missing", TrainCheckpointError)
        describe = workdir_lib.check_resume(previous if isinstance(previous, dict) else {}, describe, latest,
                                            cfg.allow_config_change, workdir)
      start, state, data_state = ckpt.restore_latest_intact(abstract, move_aside=primary)
    except BaseException:
      ckpt.close()
      raise
    if describe is not None and primary:
      orbax_ckpt.write_run_json(workdir, describe)
    if start:
      if data_state is not None:
        data_it.set_state(data_state)
      log.info("resumed %s at step %d", workdir, start)
    else:
      if task.load is not None:
        state = task.load(state_sh)
      else:
        state = jax.jit(lambda k: nn.unbox(task.init(k)), out_shardings=state_sh)(init_key)
    step_fn = jax.jit(task.train_step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                      donate_argnums=(0,))
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start, enabled=primary)
    sums: dict[str, Any] = {}
    count = 0
    t0 = time.perf_counter()
    t_first = t_interval = None
    timed_steps = 0
    try:
      with progress.bar(total=cfg.steps, initial=start, desc="train", unit="step") as bar:
        for step in range(start + 1, cfg.steps + 1):
          profiling.step(step)  # --profile: the trace window and the step annotation (a no-op otherwise)
          batch = mesh_lib.global_batch(next(data_it), batch_sh)
          state, m = step_fn(state, batch, jax.random.fold_in(step_key, step))
          m = {k: np.asarray(v, np.float64) for k, v in jax.device_get(m).items()}
          if t_first is None:
            t_first = t_interval = time.perf_counter()  # exclude compilation from the throughput
          else:
            timed_steps += 1
          for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
          count += 1
          bar.update(1)
          if step % cfg.log_every == 0 or step == cfg.steps:
            means = {f"train/{k}": v / count for k, v in sums.items()}
            now = time.perf_counter()
            if timed_steps and task.items_per_step:
              per_s = timed_steps / (now - t_interval)
              means[f"train/{task.items_name}_per_s"] = np.float64(per_s * task.items_per_step)
              if cfg.peak_flops and task.flops_per_step:
                means["train/mfu"] = np.float64(per_s * task.flops_per_step / cfg.peak_flops)
            t_interval, timed_steps = now, 0
            scalars = {k: float(v) for k, v in means.items() if v.ndim == 0}
            writer.write(step, scalars)
            for k, v in means.items():
              if v.ndim:
                writer.write_array(step, k, v)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(scalars.items())[:3]})
            if not progress.enabled():
              log.info("step %d/%d %s", step, cfg.steps, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
            sums, count = {}, 0
          t_aside = time.perf_counter()
          if task.eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            ev = {f"eval/{k}": float(v) for k, v in task.eval_fn(state).items()}
            writer.write(step, ev)
            log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
          if step % cfg.ckpt_every == 0 or step == cfg.steps:
            ckpt.save(step, state, _data_state(data_it), force=step == cfg.steps)
          if t_interval is not None:  # evaluation and checkpointing are not training throughput
            t_interval += time.perf_counter() - t_aside
          if on_step is not None:
            on_step(step, m)
    finally:
      try:
        ckpt.close()  # waits for the last async save: a disk-full error surfaces here
      finally:
        writer.close()
    seconds = time.perf_counter() - t0
    done = cfg.steps - start
    sps = (done - 1) / (time.perf_counter() - t_first) if t_first and done > 1 else float("nan")
    writer.plot()
    return Result(state, writer.history, start, seconds, sps)


def strip_boxes(tree):
  """Partitioning boxes → their values, without sharding constraints (fine outside jit, on abstract values)."""
  from flax.core import meta
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def _data_state(it) -> dict | None:
  get = getattr(it, "get_state", None)
  return get() if get is not None else None


def batch_size_check(batch_size: int, mesh_shape) -> None:
  """The global batch must split evenly over the data-parallel devices."""
  mesh = mesh_lib.make_mesh(mesh_shape)
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise mesh_lib.MeshError(f"train.batch_size {batch_size} is not divisible by the {n} data-parallel devices")


