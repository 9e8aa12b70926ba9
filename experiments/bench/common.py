"""What every benchmark here shares: the machine's copy bandwidth and matmul rate (the two terms of the roofline
beside each figure). One definition each, so every benchmark's roofline means the same thing."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


def copy_bandwidth(n_bytes: int = 2**30, repeats: int = 5, threads: int = 1) -> float:
  """Copy bandwidth in bytes/s, counting bytes read plus bytes written (best of `repeats`).

  On a CPU: a numpy copy (XLA:CPU elementwise loops are single-threaded; memcpy is not), by `threads` threads
  copying disjoint parts (numpy releases the GIL while copying). On an accelerator: ten dependent read+write passes
  over a device array in one launch (the launch overhead is amortised; no pass can be elided).
  """
  if jax.devices()[0].platform == "cpu":
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.zeros_like(src)  # touched: no page faults inside the timed copies
    k = max(1, int(threads))
    parts = [(dst[i * src.size // k:(i + 1) * src.size // k], src[i * src.size // k:(i + 1) * src.size // k])
             for i in range(k)]
    best = float("inf")
    for _ in range(repeats):
      ths = [threading.Thread(target=np.copyto, args=part) for part in parts]
      t0 = time.perf_counter()
      for th in ths:
        th.start()
      for th in ths:
        th.join()
      best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best
  x = jax.random.normal(jax.random.key(0), (n_bytes // 4,), jnp.float32)
  loops = 10
  # Ten dependent read+write passes in one launch: the launch overhead is amortised, no pass can be elided.
  copy = jax.jit(lambda a: jax.lax.fori_loop(0, loops, lambda i, b: b * 1.0000001, a))
  copy(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    copy(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n_bytes * loops / best


def matmul_rate(n: int = 2048, repeats: int = 3) -> float:
  """FLOP/s of a float32 n³ matmul on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best
