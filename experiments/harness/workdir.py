"""A training workdir's guards: one writer at a time (a lock naming its holder), and resume only with the config
the checkpoints were trained with.

Lock: `WORKDIR/lock.json` = {pid, host, started}, created with O_EXCL. A lock is stale only when it names this
host and its pid is not alive (the run was killed): it is taken over with a warning. Otherwise the second run is
refused in one line naming the holder and `--break-lock`. In a multi-host run process 0 holds it.

Resume: `run.json` records what the checkpoints compute. A resumed run compares its own description with it:
fields that change the computation (model, data, optimizer, DMC schedule) are an error listing the differences;
extending `train.steps` is allowed (the schedule is recomputed over the new total) and recorded;
`--allow-config-change` accepts any other change and records it in run.json's `history`.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import platform
from typing import Any, Iterable, Mapping

from experiments.harness.errors import TrainCheckpointError

log = logging.getLogger("dmc_jax")
LOCK = "lock.json"

# Experiment fields that do not change what is computed (bookkeeping, logging, where things are written).
NOT_COMPUTATION = ("experiment.name", "experiment.workdir", "experiment.train.log_every",
                   "experiment.train.ckpt_every", "experiment.train.eval_every", "experiment.train.eval_batches",
                   "experiment.train.keep", "experiment.train.peak_tflops", "experiment.train.eval_baseline",
                   "experiment.data.data_dir", "experiment.data.eval_windows", "experiment.model.tokenizer_from",
                   "experiment.model.init_from", "experiment.model.attention_impl", "experiment.model.remat",
                   "experiment.model.implementation", "experiment.data.eval_videos", "data.eval_videos",
                   "model.remat_policy", "model.attention_impl", "model.implementation", "history")
EXTENDABLE = "experiment.train.steps"


class LockHeld(TrainCheckpointError):
  """Another run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, another user's
  return True


class WorkdirLock:
  def __init__(self, workdir: str, break_lock: bool = False, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK)
    self.break_lock, self.enabled, self.held = break_lock, enabled, False

  def _record(self) -> dict:
    return {"pid": os.getpid(), "host": platform.node(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}

  def acquire(self) -> None:
    if not self.enabled:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = self._read()
        if holder is None:  # a lock file half-written by a run killed at that instant, or emptied
          log.warning("%s: unreadable lock file; taking it over", self.path)
        elif self._stale(holder):
          log.warning("%s: taking over the lock of pid %s on %s (%s), which is no longer running", self.path,
                      holder.get("pid"), holder.get("host"), holder.get("started", "?"))
        elif self.break_lock:
          log.warning("%s: --break-lock: taking the lock of pid %s on %s", self.path, holder.get("pid"),
                      holder.get("host"))
        else:
          raise LockHeld(f"{os.path.dirname(self.path)}: in use by pid {holder.get('pid')} on host "
                         f"{holder.get('host')} (since {holder.get('started', '?')}); if that run is gone, rerun "
                         f"with --break-lock") from None
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self._record(), f)
      self.held = True
      return
    raise LockHeld(f"{os.path.dirname(self.path)}: another run keeps taking its lock; rerun later")

  def _read(self) -> dict | None:
    try:
      with open(self.path) as f:
        d = json.load(f)
      return d if isinstance(d, dict) else None
    except (OSError, ValueError):
      return None

  @staticmethod
  def _stale(holder: Mapping[str, Any]) -> bool:
    pid = holder.get("pid")
    if holder.get("host") != platform.node() or not isinstance(pid, int):
      return False  # another host's pid cannot be checked from here
    return pid != os.getpid() and not _alive(pid)

  def release(self) -> None:
    if self.held:
      holder = self._read()
      if holder and holder.get("pid") == os.getpid():
        try:
          os.unlink(self.path)
        except OSError:
          pass
      self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


# -- resume ------------------------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  if isinstance(d, tuple):
    d = list(d)
  return {prefix: d}


def _ignored(key: str, ignore: Iterable[str]) -> bool:
  return any(key == i or key.startswith(i + ".") for i in ignore)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   ignore: Iterable[str] = NOT_COMPUTATION) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} for every field that differs, bookkeeping fields ignored."""
  a, b = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not _ignored(k, ignore) and a.get(k) != b.get(k)}


def check_resume(previous: Mapping[str, Any], describe: Mapping[str, Any], resume_step: int,
                 allow_change: bool, where: str) -> dict:
  """The run.json to write for a resumed run (history appended), or TrainCheckpointError listing the changes."""
  changes = config_changes(previous, describe)
  history = list(previous.get("history", []))
  extended = changes.pop(EXTENDABLE, None)
  if extended is not None:
    old, new = extended
    if not isinstance(new, int) or (isinstance(old, int) and new < resume_step):
      changes[EXTENDABLE] = extended  # fewer steps than already trained is not an extension
    else:
      history.append({"step": resume_step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                      "train.steps": [old, new], "note": "extended: the LR schedule is recomputed over the new total"})
  if changes:
    listed = "; ".join(f"{k.removeprefix('experiment.')}: {o!r} -> {n!r}" for k, (o, n) in list(changes.items())[:6])
    more = f" (and {len(changes) - 6} more)" if len(changes) > 6 else ""
    if not allow_change:
      raise TrainCheckpointError(f"{where}: resuming at step {resume_step} with a changed config: {listed}{more}; "
                                 f"use a new workdir, or pass --allow-config-change to accept (recorded in "
                                 f"run.json)")
    log.warning("%s: resuming at step %d with config changes (recorded in run.json): %s%s", where, resume_step,
                listed, more)
    history.append({"step": resume_step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                    "changes": {k: [o, n] for k, (o, n) in changes.items()}, "note": "--allow-config-change"})
  out = dict(describe)
  if history:
    out["history"] = history
  return out


def disk_full(e: BaseException) -> bool:
  """An ENOSPC anywhere in the exception's chain (Orbax wraps the writer's OSError)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    e = e.__cause__ or e.__context__
  return False
