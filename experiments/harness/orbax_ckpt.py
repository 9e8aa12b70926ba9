"""Orbax training checkpoints (the one place that talks to Orbax): train state + data-iterator state, async,
keep-N, resume; plus a small `run.json` beside them that describes the run (model config, normalisation,
experiment config) so that eval/predict need only the directory.

    WORKDIR/checkpoints/<step>/{state,data}   Orbax (state: params + optimizer + step; data: iterator JSON)
    WORKDIR/run.json                          written by the task (format tag + whatever it needs to rebuild)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from dmc_jax.convert.tensors import read_json
from experiments.harness.errors import TrainCheckpointError

RUN_JSON = "run.json"
log = logging.getLogger("dmc_jax")


PRUNED = "pruned"  # checkpoints/pruned/<step>: old checkpoints renamed here by Orbax (atomic), then deleted by us


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, primary: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.primary = primary
    self.purge_pruned()
    # Pruning renames a step out of the way before deleting it: a kill during the deletion leaves a partial
    # folder in pruned/, never a partial checkpoints/<step> that every later resume would warn about.
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                             enable_async_checkpointing=async_save,
                                                             todelete_subdir=PRUNED))

  def purge_pruned(self) -> None:
    """Deletes what pruning moved aside (a previous run may have been killed while deleting it)."""
    pruned = os.path.join(self.directory, PRUNED)
    if self.primary and os.path.isdir(pruned):
      shutil.rmtree(pruned, ignore_errors=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
    """`abstract_state`: a tree of jax.ShapeDtypeStruct (with shardings) shaped like the saved state."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if os.path.isdir(os.path.join(self.directory, str(step), "data")):
      args["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out.get("data") if "data" in args else None

  def restore_latest_intact(self, abstract_state: Any, move_aside: bool = True) -> tuple[int, Any, dict | None]:
    """(step, state, data state) of the newest checkpoint that restores; a corrupted newer one is named in a
    warning and moved aside to `<step>.corrupt-N` (so that training can write that step again), never deleted.
    (0, None, None) when there is no checkpoint; one line when none is intact."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # Orbax/TensorStore raise many types for a damaged directory
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log.warning("%s: checkpoint step %d is unreadable (%s); falling back to an older one", self.directory,
                    step, reason)
        bad.append(step)
        continue
      if bad and move_aside:
        self._move_aside(bad)
      return step, state, data
    if bad:
      raise TrainCheckpointError(f"{self.directory}: no intact checkpoint (steps {bad} are unreadable); move "
                                 f"them away to start over")
    return 0, None, None

  def _move_aside(self, steps) -> None:
    for step in steps:
      src = os.path.join(self.directory, str(step))
      n = 0
      while os.path.exists(f"{src}.corrupt-{n}"):
        n += 1
      os.rename(src, f"{src}.corrupt-{n}")
      log.warning("%s: moved the unreadable checkpoint to %s", self.directory, os.path.basename(f"{src}.corrupt-{n}"))
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    self.purge_pruned()


def restore_raw(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, state as nested dicts of numpy arrays) of the latest (or given) checkpoint — no target needed."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise TrainCheckpointError(f"{workdir}: no checkpoints/ folder (not a training run directory)")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
    steps = sorted(mgr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise TrainCheckpointError(f"{directory}: holds no finished checkpoint")
    bad = []
    for s in steps:
      try:
        out = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      except Exception as e:  # a damaged checkpoint: fall back to an older one
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log.warning("%s: checkpoint step %d is unreadable (%s); trying an older one", directory, s, reason)
        bad.append(s)
        continue
      return s, jax.tree.map(lambda x: x, out["state"])
  raise TrainCheckpointError(f"{directory}: no intact checkpoint (steps {bad} are unreadable)")


def write_run_json(workdir: str, meta: dict) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RUN_JSON)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2, default=str)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_run_json(workdir: str, expected_format: str) -> dict:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise TrainCheckpointError(f"{workdir}: not a run directory (a file)")
  path = os.path.join(workdir, RUN_JSON)
  meta = read_json(path, "missing (not a training run directory)", TrainCheckpointError)
  if not isinstance(meta, dict) or meta.get("format") != expected_format:
    got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise TrainCheckpointError(f"{path}: format {got!r}, expected {expected_format!r}")
  return meta
