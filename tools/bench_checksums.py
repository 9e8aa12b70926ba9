"""What verifying a checkpoint's sha256s costs on load: `python tools/bench_checksums.py CKPT [--big-gib 2]`.

Prints CPU and wall seconds of hashing each tensor file, a synthetic file of --big-gib GiB, and load_params()
with and without verification (docs/results.md, "Checkpoint checksums").
"""

import argparse
import os
import tempfile
import time

from dmc_jax.checkpoint import Checkpoint, _sha256_file


def timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.process_time() - c0, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("ckpt")
  ap.add_argument("--big-gib", type=float, default=2.0)
  args = ap.parse_args()
  ck = Checkpoint(args.ckpt)
  for name in sorted(ck.meta["files"]):
    path = os.path.join(ck.directory, name)
    cpu, wall = timed(lambda path=path: _sha256_file(path))
    print(f"sha256 {name}: {os.path.getsize(path) / 1e6:.0f} MB, cpu {cpu:.2f} s, wall {wall:.2f} s")
  if args.big_gib > 0:
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(ck.directory)) as f:
      block = os.urandom(1 << 24)
      for _ in range(int(args.big_gib * 64)):
        f.write(block)
      f.flush()
      cpu, wall = timed(lambda: _sha256_file(f.name))
      print(f"sha256 {args.big_gib:g} GiB file: cpu {cpu:.2f} s, wall {wall:.2f} s")
  for verify in (True, False):
    cpu, wall = timed(lambda verify=verify: Checkpoint(args.ckpt, verify=verify).load_params())
    print(f"load_params(verify={verify}): cpu {cpu:.2f} s, wall {wall:.2f} s")


if __name__ == "__main__":
  main()
