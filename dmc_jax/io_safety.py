"""Output paths that cannot destroy inputs: the one atomic directory writer and its checks.

Every command that writes a directory (convert, export-hf, gqa-pool, the retrofit's export) goes through
`atomic_directory`:

* the output may not be, contain, or lie inside any of the command's inputs (with or without `--force`: a
  `--force` that deletes the model being read is never what was meant);
* a lock file `.NAME.lock` beside the output (an `flock`, released by the kernel when its holder dies) keeps two
  writers of one output apart; the second is refused in one line;
* the directory is built in a hidden sibling `.NAME.tmp-*` (holding a marker file, so that only directories this
  writer made are ever deleted as stale) and renamed into place at the end;
* the commit re-checks the output under the lock: a directory that appeared there during the write, or one that
  was replaced since the start, is never deleted — the write is refused instead;
* every error path (including an exception from the body) removes the temporary sibling; siblings left by a killed
  run are removed by the next writer of the same output (their lock is free, so their writer is gone);
* OSErrors (read-only filesystem, disk full, a mount point) become one line naming the path and the OS reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import platform
import shutil
import tempfile
import uuid
from typing import Iterable, Iterator

from dmc_jax.errors import CheckpointError

log = logging.getLogger("dmc_jax")

MARKER = ".dmc-jax-partial"  # inside a temporary sibling while it is being written


class OutputError(CheckpointError):
  """An output path is refused (it overlaps an input, is in use, or the filesystem refused the write)."""


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_not_overlapping(out: str, inputs: Iterable[str | None], flag: str = "--out") -> None:
  """Refuses an output that is, contains, or lies inside one of `inputs` (paths compared after symlinks)."""
  o = _real(out)
  for src in inputs:
    if not src:
      continue
    s = _real(src)
    if o == s:
      raise OutputError(f"{flag} {out}: is the input {src} (refusing to overwrite what is being read)")
    if _inside(s, o):
      raise OutputError(f"{flag} {out}: contains the input {src} (replacing it would delete the input)")
    if _inside(o, s):
      raise OutputError(f"{flag} {out}: lies inside the input {src} (choose a folder outside it)")


def os_error(path: str, e: OSError) -> OutputError:
  """One line for a filesystem error on an output: the path and the OS's reason."""
  reason = e.strerror or str(e)
  where = e.filename if e.filename else path
  return OutputError(f"{where}: cannot write ({reason})" + (f" [output {path}]" if where != path else ""))


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
  """An exclusive, non-blocking `flock` on `.NAME.lock` beside `out`; refused in one line when held."""
  parent, name = os.path.split(out)
  path = os.path.join(parent, f".{name}.lock")
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise os_error(out, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = ""
      with contextlib.suppress(OSError):
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise OutputError(f"{out}: another process is writing it ({holder or 'holder unknown'}); "
                          f"wait for it or choose another --out") from None
      raise os_error(out, e) from None
    # The lock file may have been unlinked by a finishing holder between our open and flock: lock the live one.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
  except OSError:
    pass  # the holder's name is a courtesy
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def waiting_lock(path: str) -> Iterator[None]:
  """A blocking exclusive `flock` on `path` (created, never removed: unlinking a lock file others wait on would
  let a third process lock a new inode beside them). For work that a second process should wait for and then
  reuse, such as preparing a shared dataset, rather than be refused."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def remove_stale_siblings(out: str) -> list[str]:
  """Removes `.NAME.tmp-*` siblings left by a killed writer (called under the output's lock, so their writer is
  gone). Only directories holding our marker are deleted; others are reported and kept. A `.NAME.old-*` (the
  previous output, moved aside by a `--force` commit) is removed once the new output is in place, else kept."""
  parent, name = os.path.split(out)
  removed = []
  pattern = os.path.join(glob.escape(parent), f".{glob.escape(name)}")
  for path in sorted(glob.glob(pattern + ".tmp-*")):
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER)):
      shutil.rmtree(path, ignore_errors=True)
      log.warning("%s: removed %s, left by an interrupted write", out, os.path.basename(path))
      removed.append(path)
    else:
      log.warning("%s: %s was not written by dmc-jax (no %s marker); left in place", out, path, MARKER)
  for path in sorted(glob.glob(pattern + ".old-*")):
    if os.path.exists(out):
      shutil.rmtree(path, ignore_errors=True)
      log.warning("%s: removed %s, the output an interrupted --force replaced", out, os.path.basename(path))
      removed.append(path)
    else:
      log.warning("%s: missing, and %s holds its previous contents (an interrupted --force); rename it back to "
                  "restore them", out, path)
  return removed


def _identity(path: str):
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    return None
  return (st.st_dev, st.st_ino)


def _non_empty(path: str) -> bool:
  return not os.path.isdir(path) or bool(os.listdir(path))


@contextlib.contextmanager
def atomic_directory(out: str, force: bool = False, inputs: Iterable[str | None] = ()) -> Iterator[str]:
  """Yields a temporary sibling of `out`; on success it replaces `out`, on any failure it is removed.

  `inputs`: paths the caller reads; `out` may not overlap any of them. `force` replaces an existing non-empty
  `out` — the one seen at the start, never one that appeared or was swapped in during the write."""
  out = os.path.abspath(out)
  check_not_overlapping(out, inputs)
  if os.path.ismount(out):
    raise OutputError(f"{out}: is a mount point (a directory is written beside its output and renamed into "
                      f"place; choose a folder inside the mount)")
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise os_error(out, e) from None
  with output_lock(out):
    remove_stale_siblings(out)
    start = _identity(out)
    if start is not None and _non_empty(out) and not force:
      kind = "a file" if not os.path.isdir(out) else "not empty"
      raise OutputError(f"{out}: exists and is {kind} (use --force to replace it)")
    try:
      tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
      os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
      open(os.path.join(tmp, MARKER), "w").close()
    except OSError as e:
      raise os_error(out, e) from None
    try:
      yield tmp
      _commit(out, tmp, start, force)
    except OSError as e:
      shutil.rmtree(tmp, ignore_errors=True)
      raise os_error(out, e) from None
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def _commit(out: str, tmp: str, start, force: bool) -> None:
  now = _identity(out)
  if now != start:
    what = "appeared" if start is None else "was replaced"
    raise OutputError(f"{out}: {what} while this command was writing it; left untouched (nothing written)")
  os.unlink(os.path.join(tmp, MARKER))
  if now is not None and _non_empty(out):
    if not force:  # unreachable unless a file appeared inside an (empty) output during the write
      raise OutputError(f"{out}: files appeared in it while this command was writing; left untouched")
    old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
      os.rename(tmp, out)
    except OSError:
      os.rename(old, out)  # put the original back
      raise
    shutil.rmtree(old, ignore_errors=True)
    return
  try:
    os.rename(tmp, out)  # over nothing, or over the empty directory seen at the start
  except OSError as e:
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
      raise OutputError(f"{out}: files appeared in it while this command was writing; left untouched") from None
    raise
