"""`--profile DIR [--profile-steps A:B]`: a jax.profiler trace of chosen steps of a long-running command.

Every command that loops (dmc-jax train / generate / eval / bench, sdc-jax train / predict) registers the flags
with `add_profile_arguments`, wraps its work in `with from_args(args, "decode"):` and calls `step(i)` right
before its step i runs (i counts from 1: train optimizer steps as logged, generate decode steps after the
prefill, eval batches, predict frames). Steps A .. B-1 are traced (a half-open window, like a Python slice;
default 3:6), so compilation and the first, warming-up steps stay out of the trace. Each traced step is a
host-side `jax.profiler.StepTraceAnnotation(name, step_num=i)`; the phases inside the jitted steps are
`jax.named_scope`s in the library (docs/profiling.md lists them).

The trace lands where TensorBoard's profile plugin and xprof look: DIR/plugins/profile/<run>/<host>.xplane.pb
and <host>.trace.json.gz (Perfetto / chrome://tracing). XLA:CPU's op events carry only HLO instruction names, so
on a CPU the .trace.json.gz is rewritten with each op's named scope as `args.scope` (read from the HLO modules
the .xplane.pb holds), and a "scopes" track of those scopes is added beside the ops; GPU and TPU traces carry
the scopes themselves (xprof's "Framework Name Scope" rows).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import glob
import gzip
import json
import os
import sys

from experiments.harness.errors import HarnessError

DEFAULT_STEPS = "3:6"


class ProfileError(HarnessError):
  """--profile / --profile-steps are malformed."""


def add_profile_arguments(p: argparse.ArgumentParser, unit: str = "step", steps: bool = True) -> None:
  """`--profile DIR` and (with steps) `--profile-steps A:B`, where the window counts `unit`s from 1."""
  g = p.add_argument_group("profiling (docs/profiling.md)")
  g.add_argument("--profile", metavar="DIR", default=None,
                 help="write a jax.profiler trace under DIR/plugins/profile/<run>/ (open with xprof or TensorBoard)")
  if steps:
    g.add_argument("--profile-steps", metavar="A:B", default=None,
                   help=f"trace {_plural(unit)} A .. B-1, counted from 1 (default {DEFAULT_STEPS}: after "
                   "compilation and warm-up)")


def _plural(unit: str) -> str:
  return unit + ("es" if unit.endswith(("ch", "sh", "s")) else "s")


def parse_steps(text: str) -> tuple[int, int]:
  a, sep, b = text.partition(":")
  try:
    start, stop = int(a), int(b)
  except ValueError:
    start = stop = None
  if not sep or start is None or not 1 <= start < stop:
    raise ProfileError(f"--profile-steps: expected A:B with 1 <= A < B (steps A .. B-1), got {text!r}")
  return start, stop


class Profiler:
  """Starts jax.profiler at step `window[0]`, stops it before step `window[1]` (or at close); `whole` traces
  everything between enter and exit instead. Use as a context manager; `step(i)` before step i runs."""

  def __init__(self, directory: str, name: str, window: tuple[int, int] | None = None, unit: str = "step"):
    self.directory = os.path.abspath(directory)
    self.name = name
    self.window = window  # None: the whole context
    self.unit = unit
    self.active = False
    self.traced: list[int] = []
    self.run_dir: str | None = None
    self._annotation = None
    self._before: set[str] = set()
    self._token = None

  def __enter__(self):
    self._token = _current.set(self)
    if self.window is None:
      self._start()
    return self

  def __exit__(self, *exc):
    _current.reset(self._token)
    self.close()
    return False

  def _start(self):
    import jax
    os.makedirs(self.directory, exist_ok=True)
    self._before = set(_run_dirs(self.directory))
    options = jax.profiler.ProfileOptions()
    # No Python-function events: with them (jax's default) two steps of a toy `train` (grain workers, Orbax's
    # threads) made a 77 MB .xplane.pb and a 50 MB .trace.json.gz; the host annotations and XLA ops remain.
    options.python_tracer_level = 0
    jax.profiler.start_trace(self.directory, profiler_options=options)
    self.active = True

  def _end_annotation(self):
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None

  def step(self, i: int) -> None:
    """Step i is about to run: open/close the trace at the window's edges, annotate the step."""
    import jax
    self._end_annotation()
    if self.window is not None:
      start, stop = self.window
      if not self.active and start <= i < stop and not self.traced:
        self._start()
      elif self.active and i >= stop:
        self._stop()
    if self.active:
      self._annotation = jax.profiler.StepTraceAnnotation(self.name, step_num=i)
      self._annotation.__enter__()
      self.traced.append(i)

  def _stop(self):
    import jax
    self._end_annotation()
    jax.profiler.stop_trace()
    self.active = False
    new = sorted(set(_run_dirs(self.directory)) - self._before)
    self.run_dir = new[-1] if new else None
    if self.run_dir:
      annotate_scopes(self.run_dir)

  def close(self) -> None:
    if self.active:
      self._stop()
    what = (f"{_plural(self.unit)} {self.traced[0]}-{self.traced[-1]}" if self.traced and self.window
            else self.name)
    if self.run_dir:
      print(f"[profile] trace of {what} → {self.run_dir} (view: xprof --logdir {self.directory} --port 8791; "
            "docs/profiling.md)", file=sys.stderr)
    elif self.window:
      print(f"[profile] nothing traced: no {self.unit} in --profile-steps {self.window[0]}:{self.window[1]} ran",
            file=sys.stderr)


_current: contextvars.ContextVar[Profiler | None] = contextvars.ContextVar("profiler", default=None)


def step(i: int) -> None:
  """Step i of the current command is about to run (a no-op without --profile)."""
  prof = _current.get()
  if prof is not None:
    prof.step(i)


def from_args(args: argparse.Namespace, name: str, unit: str = "step", whole: bool = False):
  """The Profiler the flags ask for (a no-op context without --profile). whole: trace the entire context
  (commands without a step loop of their own, e.g. bench)."""
  directory, steps = getattr(args, "profile", None), getattr(args, "profile_steps", None)
  if directory is None:
    if steps is not None:
      raise ProfileError("--profile-steps: needs --profile DIR")
    return contextlib.nullcontext()
  return Profiler(directory, name, None if whole else parse_steps(steps or DEFAULT_STEPS), unit)


def _run_dirs(directory: str) -> list[str]:
  return [d for d in glob.glob(os.path.join(directory, "plugins", "profile", "*")) if os.path.isdir(d)]


def trace_files(run_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(run_dir, "*.trace.json.gz")))


def read_events(run_dir: str) -> list[dict]:
  """The events of a run's .trace.json.gz files."""
  events = []
  for path in trace_files(run_dir):
    with gzip.open(path, "rt") as f:
      events += json.load(f).get("traceEvents", [])
  return events


# -- named scopes for XLA:CPU op events -------------------------------------------------------------------------
# The .xplane.pb holds every compiled module's HloProto (with each instruction's OpMetadata.op_name, the
# jax.named_scope path); no protobuf schema for XSpace ships with jax, so the few fields needed are read straight
# from the wire format: XSpace.planes(1) → XPlane.event_metadata(4, map entry value 2) → XEventMetadata.stats(5)
# → XStat.bytes_value(6) = HloProto;
# HloProto.hlo_module(1) → HloModuleProto.computations(3) → HloComputationProto.instructions(2) →
# HloInstructionProto{name(1), metadata(7) → OpMetadata.op_name(2)}.


def _fields(buf: bytes):
  """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
  i, n = 0, len(buf)

  def varint():
    nonlocal i
    shift = result = 0
    while True:
      b = buf[i]
      i += 1
      result |= (b & 0x7F) << shift
      if b < 0x80:
        return result
      shift += 7
  while i < n:
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      yield field, wire, varint()
    elif wire == 1:
      yield field, wire, buf[i:i + 8]
      i += 8
    elif wire == 2:
      size = varint()
      yield field, wire, buf[i:i + size]
      i += size
    elif wire == 5:
      yield field, wire, buf[i:i + 4]
      i += 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")


def _sub(buf: bytes, field: int):
  return [v for f, w, v in _fields(buf) if f == field and w == 2]


def hlo_scopes(xplane_path: str) -> dict[str, dict[str, str]]:
  """module name → {HLO instruction name → its op_name (the named-scope path)} from an .xplane.pb.

  The plane holds every module the process compiled; two jitted functions of one name (jit__step_fn) would share
  an entry, so the library's compiled functions have distinct names."""
  with open(xplane_path, "rb") as f:
    space = f.read()
  modules: dict[str, dict[str, str]] = {}
  for plane in _sub(space, 1):
    for entry in _sub(plane, 4):  # map<int64, XEventMetadata> entries: key 1, value 2
      for meta in _sub(entry, 2):
        for hlo in [h for stat in _sub(meta, 5) for h in _sub(stat, 6)]:
          try:
            module = next(iter(_sub(hlo, 1)), None)
            if module is None:
              continue
            name = next(iter(_sub(module, 1)), b"").decode()
            ops = {}
            for comp in _sub(module, 3):
              for inst in _sub(comp, 2):
                iname = next(iter(_sub(inst, 1)), b"").decode()
                md = next(iter(_sub(inst, 7)), None)
                op_name = next(iter(_sub(md, 2)), b"").decode() if md is not None else ""
                if iname and op_name:
                  ops[iname] = op_name
          except (ValueError, IndexError, UnicodeDecodeError):
            continue  # not an HloProto (other metadata planes hold other messages)
          if ops:
            modules[name] = ops
  return modules


# The scopes the library opens (docs/profiling.md). An op's scope is the path of these in its op_name: Flax's
# per-method frames (Llama._run_layers, attn.decode), control flow (while/body), autodiff's jvp() and the
# primitive are dropped; autodiff's transpose(jvp()) frame becomes `backward`.
SCOPES = ("prefill", "decode_step", "layers", "attention", "dmc_update", "paged_attention", "mlp", "logits",
          "sample", "forward_backward", "forward", "backward", "lm_loss", "cr_loss", "sdc_loss", "optimizer")
_KERNEL_PREFIXES = ("dmc_decode_attention", "dmc_attention")  # the Pallas/XLA kernels' own scopes


def _scope_of(op_name: str) -> str:
  """'jit(_step_fn)/decode_step/Llama.decode_dmc/layers/while/body/attn.decode/attention/dot_general' →
  'decode_step/layers/attention'; 'jit(train_step)/forward_backward/transpose(jvp())/cond/forward/Llama/layers/…'
  → 'forward_backward/backward/forward/layers'."""
  keep = []
  for part in op_name.split("/")[1:-1]:
    if part.startswith("transpose("):  # autodiff's transpose(jvp()) frame: what follows is the backward pass
      part = "backward"
    core = part
    while core.endswith(")") and "(" in core:  # jvp(forward) → forward
      core = core[core.index("(") + 1:-1]
    # Flax frames that share a scope's name (the scanned `layers` module, the `mlp` submodule) fold into it.
    if (core in SCOPES or core.startswith(_KERNEL_PREFIXES)) and (not keep or keep[-1] != part):
      keep.append(part)
  return "/".join(keep)


_SCOPE_TID = 7_000_000_000


def annotate_scopes(run_dir: str) -> int:
  """Adds args.scope (and a 'scopes' track) to the XLA op events of a run's .trace.json.gz files that lack
  them (XLA:CPU). Returns the number of op events annotated."""
  modules = {}
  for xp in glob.glob(os.path.join(run_dir, "*.xplane.pb")):
    modules.update(hlo_scopes(xp))
  if not modules:
    return 0
  total = 0
  for path in trace_files(run_dir):
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
    events = trace.get("traceEvents", [])
    seen = {e.get("name") for e in events if e.get("ph") == "X"}
    # An instruction name (fusion.3) may occur in several modules: events without an hlo_module argument take
    # the module most of the trace's op names belong to (the command's step function).
    rank = sorted(modules, key=lambda m: -len(seen & modules[m].keys()))
    added, tracks = [], {}
    for e in events:
      if e.get("ph") != "X" or "scope" in e.get("args", {}):
        continue
      module = e.get("args", {}).get("hlo_module")  # XLA:CPU names the module; else the ranking decides
      op_name = (modules[module].get(e.get("name")) if module in modules else
                 next((modules[m][e["name"]] for m in rank if e.get("name") in modules[m]), None))
      if op_name is None:
        continue
      scope = _scope_of(op_name)
      e.setdefault("args", {}).update(scope=scope, op_name=op_name)
      total += 1
      if scope:
        # One new track per op thread (integer tids: Perfetto's JSON importer wants them).
        tid = tracks.setdefault((e["pid"], e["tid"]), _SCOPE_TID + len(tracks))
        added.append({"ph": "X", "pid": e["pid"], "tid": tid, "ts": e["ts"], "dur": e["dur"], "name": scope,
                      "args": {"hlo_op": e["name"]}})
    if added:
      events += [{"ph": "M", "pid": p, "tid": tid, "name": "thread_name", "args": {"name": f"XLA scopes of {t}"}}
                 for (p, t), tid in tracks.items()]
      events += added
      with gzip.open(path + ".tmp", "wt") as f:
        json.dump(trace, f)
      os.replace(path + ".tmp", path)
  return total


# -- a loopback-only viewer ------------------------------------------------------------------------------------


def serve(logdir: str, port: int = 8791, host: str = "127.0.0.1") -> None:
  """xprof's web UI on `host` only (xprof's own launcher binds every interface and starts a gRPC worker
  service on 0.0.0.0:50051; the single-process viewer needs neither)."""
  try:
    from xprof import server as xs
  except ImportError:
    raise ProfileError("needs the optional extra [profile] (module 'xprof' is missing): "
                       "pip install 'dmc-jax[profile]'") from None
  logdir = xs.get_abs_path(logdir)
  if not os.path.isdir(logdir):
    raise ProfileError(f"{logdir}: no such directory")
  context = xs.TBContext(logdir, xs.DataProvider(logdir), xs.TBContext.Flags(False))
  context.hide_capture_profile_button = True
  context.enable_tab_name_label = False
  context.src_prefix = None
  plugin = xs.ProfilePluginLoader().load(context)
  print(f"xprof on http://{host}:{port}/ for {logdir} (Ctrl-C stops it)", file=sys.stderr)
  xs.run_server(plugin, host, port)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.harness.profiling",
                              description="serve DIR: open --profile traces in xprof, bound to loopback only")
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("serve", help="xprof's UI for a --profile DIR on 127.0.0.1")
  s.add_argument("logdir")
  s.add_argument("--port", type=int, default=8791)
  args = p.parse_args(argv)
  try:
    serve(args.logdir, args.port)
  except ProfileError as e:
    print(f"profiling serve: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
