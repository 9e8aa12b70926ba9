"""The continuous-batching engine: a host loop over a `PagedKV` or `PolicyKV` (as JetStream's and vLLM's are).

Each `step()`: take new submissions and cancellations; admit waiting requests (first come, first served) while a
slot is free and the pool can hold the prompt plus a reserve, prefilling each into its slot; make room for the
next decode step (the most it can take is one page per row at a page boundary, counted on the device and returned
with the tokens); run one decode step for every active slot; deliver the tokens; free at once the pages of every
request that finished (EOS, max_tokens, a stop the caller detected, a cancel) so its slot takes the next request.

Exhaustion never corrupts the cache and never drops a request: when the next step could need more pages than are
free, the newest running request is preempted (pages freed, put back at the head of the queue with the tokens it
has produced, recomputed by a prefill when readmitted; counted). A request alone in the pool that still cannot
step ends with finish reason "length" (it reached the cache's capacity). A request that can never fit (its prompt
alone, or for the vanilla cache its prompt plus max_tokens, exceeds the pool or a row's capacity) is refused by
`submit` with `RequestRejected`, naming the limit.

Page allocation is on the device (a free stack in the cache, `dmc_jax.cache.free_rows`); the host only counts
pages, from the one small transfer per step that also carries the sampled tokens.

Threading: `submit` and `cancel` may be called from any thread; `step` runs in one thread (`start()` runs it in a
background thread, `run_until_idle()` in the caller's). A request reports through `on_event(request, kind,
value)`: ("token", id) for each new token and ("done", finish reason) once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import numpy as np

from dmc_jax.errors import ArgumentError, RequestRejected
from dmc_jax.serving.kv import PagedKV, PolicyKV

log = logging.getLogger(__name__)

# Histogram bucket upper bounds (seconds) for time to first token and time per output token.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclasses.dataclass(eq=False)
class Request:
  prompt: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  ignore_eos: bool = False
  on_event: Callable[["Request", str, object], None] | None = None
  id: int = 0
  tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far (EOS included when it ends one)
  finish_reason: str | None = None  # "stop" (EOS or a stop the caller detected), "length", "cancelled"
  preemptions: int = 0
  submitted: float = 0.0
  first_token_at: float | None = None
  finished_at: float | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  _slot: int | None = None
  _order: int = 0  # admission order (the newest running request is preempted first)
  _last_token_at: float = 0.0


class Histogram:
  """Cumulative-bucket histogram in Prometheus' sense."""

  def __init__(self, bounds):
    self.bounds = tuple(bounds)
    self.counts = [0] * (len(self.bounds) + 1)
    self.sum = 0.0

  def observe(self, v: float) -> None:
    self.sum += v
    for i, b in enumerate(self.bounds):
      if v <= b:
        self.counts[i] += 1
        return
    self.counts[-1] += 1

  @property
  def count(self) -> int:
    return sum(self.counts)

  def prometheus(self, name: str) -> list[str]:
    out, acc = [f"# TYPE {name} histogram"], 0
    for b, c in zip(self.bounds, self.counts):
      acc += c
      out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
    out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
    return out


class Engine:
  def __init__(self, kv: PagedKV | PolicyKV, eos_ids=(), trace: bool = False):
    self.kv = kv
    self.eos_ids = frozenset(int(e) for e in eos_ids)
    self.cache = kv.init()
    b = kv.max_batch
    self._slots: list[Request | None] = [None] * b
    self._tokens = np.zeros(b, np.int32)  # each slot's last token (the next step's input)
    self._temperature = np.zeros(b, np.float32)
    self._top_p = np.ones(b, np.float32)
    self._seed = np.zeros(b, np.uint32)
    self._boundary = np.zeros(b, np.int64)  # rows per slot that may open a page in the next step
    self.pages_in_use = 0
    self.slots_in_use = 0  # KV slots summed over every row (pages hold them)
    self._waiting: collections.deque[Request] = collections.deque()
    self._inbox: list[Request] = []
    self._cancels: list[Request] = []
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._ids = itertools.count(1)
    self._order = itertools.count()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._accepting = True
    # Counters and histograms (`metrics`).
    self.preemptions = 0
    self.tokens_generated = 0
    self.prompt_tokens = 0
    self.requests_finished = 0
    self.decode_steps = 0
    self.free_seconds = 0.0  # host + device time spent freeing pages (the allocator's cost on the host side)
    self.host_seconds = 0.0  # time in step() outside the compiled prefill and decode calls
    self.ttft = Histogram(TTFT_BUCKETS)
    self.tpot = Histogram(TPOT_BUCKETS)
    self.trace: list[dict] | None = [] if trace else None
    self._prefills_since_step: list[int] = []  # context lengths prefilled since the last decode step (trace)
    self._tokens_seen = 0  # tokens in the cache, summed over running requests (realised CR)

  # -- submission (any thread) ---------------------------------------------------------------------------------

  def check(self, prompt_len: int, max_tokens: int) -> None:
    """Raises RequestRejected if a request of this shape can never be served, whatever else runs."""
    kv = self.kv
    if prompt_len < 1:
      raise RequestRejected("prompt: needs at least one token")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
      raise RequestRejected(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
    if prompt_len + max_tokens > kv.max_len:
      raise RequestRejected(f"{prompt_len} prompt + {max_tokens} new tokens exceed the cache's {kv.max_len} tokens "
                            f"per sequence")
    # The prompt plus its first step must fit an empty pool; for vanilla (no compression) the whole output too.
    n = prompt_len + (max_tokens if kv.kind == "vanilla" else 1)
    need = kv.prefill_pages(n)
    if need > kv.num_pages:
      what = "prompt + max_tokens" if kv.kind == "vanilla" else "prompt"
      raise RequestRejected(f"{what} ({n} tokens) needs up to {need} KV pages of {kv.page_size} slots; the pool "
                            f"holds {kv.num_pages} ({kv.bytes_in_use(kv.num_pages) / 2**20:.1f} MiB): raise "
                            f"--kv-budget-mb or shorten the request")

  def submit(self, prompt, max_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             ignore_eos: bool = False, on_event=None) -> Request:
    prompt = [int(t) for t in prompt]
    self.check(len(prompt), max_tokens)
    if not (temperature >= 0 and temperature < float("inf")):
      raise ArgumentError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
      raise ArgumentError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if not 0 <= seed < 2**32:
      raise ArgumentError(f"seed: expected an integer in [0, 2^32), got {seed!r}")
    req = Request(prompt, max_tokens, float(temperature), float(top_p), int(seed), ignore_eos, on_event,
                  id=next(self._ids), submitted=time.perf_counter())
    with self._lock:
      if not self._accepting:
        raise RequestRejected("the server is shutting down")
      self._inbox.append(req)
      self._wake.notify()
    return req

  def cancel(self, req: Request) -> None:
    """Ends `req` (finish reason "cancelled" unless it ended already); its pages are freed by the next step."""
    with self._lock:
      self._cancels.append(req)
      self._wake.notify()

  # -- the host loop (one thread) ------------------------------------------------------------------------------

  @property
  def running(self) -> int:
    return sum(r is not None for r in self._slots)

  @property
  def waiting(self) -> int:
    return len(self._waiting) + len(self._inbox)

  def idle(self) -> bool:
    with self._lock:
      return not self._inbox and not self._cancels and not self._waiting and self.running == 0

  def step(self) -> bool:
    """One iteration of the loop; False when there was nothing to do."""
    t0 = time.perf_counter()
    compiled = 0.0
    with self._lock:
      inbox, self._inbox = self._inbox, []
      cancels, self._cancels = self._cancels, []
    self._waiting.extend(inbox)
    self._apply_cancels(cancels)
    compiled += self._admit()
    active = [i for i, r in enumerate(self._slots) if r is not None]
    if not active:
      self.host_seconds += time.perf_counter() - t0 - compiled
      return bool(inbox or cancels)
    active = self._make_room(active)
    if not active:
      self.host_seconds += time.perf_counter() - t0 - compiled
      return True
    count = np.array([len(r.tokens) if r else 0 for r in self._slots], np.int32)
    t1 = time.perf_counter()
    tokens, boundary, pages, self.slots_in_use, self.cache = self.kv.step(
        self.cache, self._tokens, self._temperature, self._top_p, self._seed, count)
    t2 = time.perf_counter()
    compiled += t2 - t1
    self.decode_steps += 1
    self.pages_in_use = pages
    self._boundary[:] = boundary
    finished = []
    for i in active:
      req = self._slots[i]
      self._tokens_seen += 1
      if self._deliver(req, int(tokens[i]), t2):
        finished.append(i)
    self._tokens[:] = tokens
    if self.trace is not None:
      self.trace.append({"t": t2, "step_s": t2 - t1, "active": len(active), "slots": self.kv.max_batch,
                         "pages": pages, "prefill_lengths": self._prefills_since_step,
                         "waiting": len(self._waiting), "kv_tokens": self._tokens_seen,
                         "kv_slots": self.slots_in_use})
    self._prefills_since_step = []
    self._release(finished)
    self.host_seconds += time.perf_counter() - t0 - compiled
    return True

  def _deliver(self, req: Request, token: int, now: float) -> bool:
    """Appends a sampled token to `req`; True when that ends it."""
    req.tokens.append(token)
    self.tokens_generated += 1
    if req.first_token_at is None:
      req.first_token_at = now
      self.ttft.observe(now - req.submitted)
    else:
      self.tpot.observe(now - req._last_token_at)
    req._last_token_at = now
    if req.on_event:
      req.on_event(req, "token", token)
    if token in self.eos_ids and not req.ignore_eos:
      req.finish_reason = "stop"
    elif len(req.tokens) >= req.max_tokens:
      req.finish_reason = "length"
    return req.finish_reason is not None

  def _finish(self, req: Request) -> None:
    req.finished_at = time.perf_counter()
    self.requests_finished += 1
    if req.on_event:
      req.on_event(req, "done", req.finish_reason)
    req.done.set()

  def _release(self, slots) -> None:
    """Frees the pages of the requests in `slots` at once and ends them."""
    if not slots:
      return
    t0 = time.perf_counter()
    self.cache = self.kv.free(self.cache, slots)
    self.pages_in_use, self.slots_in_use = self.kv.occupancy(self.cache)
    self.free_seconds += time.perf_counter() - t0
    for i in slots:
      req = self._slots[i]
      self._slots[i] = None
      self._boundary[i] = 0
      self._tokens_seen -= len(req.prompt) + len(req.tokens) - 1
      req._slot = None
      if req.finish_reason is not None:
        self._finish(req)

  def _apply_cancels(self, cancels) -> None:
    drop = []
    for req in cancels:
      if req.finish_reason is not None:
        continue
      req.finish_reason = "cancelled"
      if req._slot is not None:
        drop.append(req._slot)
      else:
        self._waiting = collections.deque(r for r in self._waiting if r is not req)
        self._finish(req)
    self._release(drop)

  def _free_pages(self) -> int:
    return self.kv.num_pages - self.pages_in_use

  def _admit(self) -> float:
    """Prefills waiting requests into free slots while the pool holds them; returns the compiled time spent."""
    spent = 0.0
    kv = self.kv
    while self._waiting and None in self._slots:
      req = self._waiting[0]
      context = req.prompt + req.tokens  # a preempted request recomputes what it had
      reserve = int(self._boundary.sum())  # the running requests' next step
      if kv.prefill_pages(len(context)) + kv.rows_per_sequence + reserve > self._free_pages():
        break
      self._waiting.popleft()
      slot = self._slots.index(None)
      t0 = time.perf_counter()
      token, boundary, pages, self.slots_in_use, self.cache = kv.prefill(self.cache, context, slot,
                                                      (req.temperature, req.top_p, req.seed, len(req.tokens)))
      now = time.perf_counter()
      spent += now - t0
      self.pages_in_use = pages
      self.prompt_tokens += len(req.prompt) if not req.tokens else 0
      self._prefills_since_step.append(len(context))
      self._tokens_seen += len(context)
      req._slot, req._order = slot, next(self._order)
      self._slots[slot] = req
      self._boundary[slot] = boundary
      self._temperature[slot], self._top_p[slot], self._seed[slot] = req.temperature, req.top_p, req.seed
      self._tokens[slot] = token
      if self._deliver(req, token, now):
        self._release([slot])
    return spent

  def _make_room(self, active: list[int]) -> list[int]:
    """Preempts the newest requests until the next step's worst case fits the free pages; the active slots left."""
    while int(self._boundary[active].sum()) > self._free_pages():
      newest = max(active, key=lambda i: self._slots[i]._order)
      req = self._slots[newest]
      if len(active) == 1:
        # Alone and still no room: the request has reached what the cache can hold.
        req.finish_reason = "length"
        log.warning("request %d ended at %d tokens: the KV pool (%d pages) is full", req.id,
                    len(req.prompt) + len(req.tokens), self.kv.num_pages)
      else:
        req.preemptions += 1
        self.preemptions += 1
        self._waiting.appendleft(req)
      self._release([newest])
      active = [i for i in active if i != newest]
      if not active:
        break
    return active

  # -- driving the loop ----------------------------------------------------------------------------------------

  def run_until_idle(self) -> None:
    while not self.idle():
      self.step()

  def start(self) -> None:
    """Runs the loop in a background thread until `stop`."""
    self._thread = threading.Thread(target=self._loop, name="dmc-jax-engine", daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._stopping and not self._inbox and not self._cancels and not self._waiting \
            and self.running == 0:
          self._wake.wait(timeout=1.0)
        if self._stopping and not self._inbox and not self._waiting and self.running == 0:
          return
      try:
        self.step()
      except Exception:  # a bug: end every request rather than leave clients waiting forever
        log.exception("engine step failed; ending all requests")
        self._fail_all()
        return

  def _fail_all(self) -> None:
    with self._lock:
      pending = list(self._waiting) + self._inbox + [r for r in self._slots if r is not None]
      self._waiting.clear()
      self._inbox = []
      self._slots = [None] * len(self._slots)
      self._accepting = False
    for req in pending:
      req.finish_reason = req.finish_reason or "error"
      self._finish(req)

  def stop(self, drain_seconds: float = 30.0) -> None:
    """Stops accepting, lets in-flight requests finish for up to `drain_seconds`, cancels the rest, joins."""
    with self._lock:
      self._accepting = False
    deadline = time.monotonic() + drain_seconds
    while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
      with self._lock:
        if not self._inbox and not self._waiting and self.running == 0:
          break
      time.sleep(0.02)
    with self._lock:
      self._cancels.extend(list(self._waiting) + self._inbox + [r for r in self._slots if r is not None])
      self._stopping = True
      self._wake.notify()
    if self._thread is not None:
      self._thread.join(timeout=max(5.0, drain_seconds))

  # -- metrics -------------------------------------------------------------------------------------------------

  def realised_cr(self) -> float:
    """Tokens held per slot over the running requests' rows (1 for vanilla; nan when nothing runs)."""
    if not self._tokens_seen or not self.slots_in_use:
      return float("nan")
    return self._tokens_seen * self.kv.rows_per_sequence / self.slots_in_use

  def metrics(self) -> str:
    """Prometheus text exposition."""
    g = [("dmc_jax_requests_running", "gauge", self.running), ("dmc_jax_requests_waiting", "gauge", self.waiting),
         ("dmc_jax_requests_finished_total", "counter", self.requests_finished),
         ("dmc_jax_preemptions_total", "counter", self.preemptions),
         ("dmc_jax_kv_pages_used", "gauge", self.pages_in_use),
         ("dmc_jax_kv_pages_free", "gauge", self.kv.num_pages - self.pages_in_use),
         ("dmc_jax_kv_bytes_used", "gauge", self.kv.bytes_in_use(self.pages_in_use)),
         ("dmc_jax_kv_realised_cr", "gauge", self.realised_cr()),
         ("dmc_jax_generation_tokens_total", "counter", self.tokens_generated),
         ("dmc_jax_prompt_tokens_total", "counter", self.prompt_tokens),
         ("dmc_jax_decode_steps_total", "counter", self.decode_steps)]
    out = []
    for name, kind, v in g:
      out += [f"# TYPE {name} {kind}", f"{name} {v}"]
    out += self.ttft.prometheus("dmc_jax_time_to_first_token_seconds")
    out += self.tpot.prometheus("dmc_jax_time_per_output_token_seconds")
    return "\n".join(out) + "\n"
