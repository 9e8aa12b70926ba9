"""One DMC decode-step trace and one retrofit-step trace of a model shape (random weights), for the viewer.

    python -m experiments.bench.profile_steps --out DIR [--json FILE]      # `make gpu-check` runs this

Both go through the `--profile` machinery (experiments/harness/profiling.py): steps 3 .. 5 are traced, after
compilation and two warm-up steps, each a `StepTraceAnnotation` with the library's named scopes inside
(docs/profiling.md):

* DIR/decode — `Generator`'s compiled DMC decode step (decisions forced to --cr), the batch that fits
  --budget-mb at --context tokens (`dmc-jax bench`'s analytic plan and synthetic cache);
* DIR/retrofit — `dmc_jax.train.make_retrofit_step` in stage 2 (LM + CR loss, AdamW), --train-model at
  --train-batch × --train-len.

Defaults: the Llama-2-7B shape in bfloat16 (the whole model decoding; 2 layers of it training, as `dmc-jax bench`'s
GPU preset), sized for one accelerator of ≥ 40 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def decode_trace(out: str, spec: str, dtype: str, budget_mb: float, context: int, cr: float, page_size: int,
                 window=(3, 6)) -> dict:
  import jax
  import jax.numpy as jnp

  from dmc_jax.config import DMCConfig
  from dmc_jax.generate import DMCOptions, Generator
  from experiments.bench import dmc as bench
  from experiments.bench.decode import random_params
  from experiments.harness import profiling
  cfg = bench.model_config(spec, dtype, None)
  dmc = DMCConfig()
  steps = window[1]
  pl_ = bench.plan(cfg, dmc, int(budget_mb * 2**20), context, steps + 1, cr, page_size)
  if pl_.batch < 1:
    raise ValueError(f"profile_steps: --budget-mb {budget_mb} holds no sequence of {context} tokens for {spec}")
  gen = Generator(cfg, random_params(cfg), dmc=DMCOptions(dmc, page_size, pl_.pool_pages, forced_merge_rate=1 - 1 / cr))
  cache = bench.synthetic_dmc_cache(gen.cfg, dmc, pl_, context, page_size)
  token = jnp.zeros((pl_.batch,), jnp.int32)
  key = jax.random.key(0)
  step = gen.compiled_step(cache, token, jnp.full((pl_.batch,), context, jnp.int32), key)
  times = []
  with profiling.Profiler(out, "decode", window, unit="decode step") as prof:
    for i in range(1, steps + 1):
      prof.step(i)
      t0 = time.perf_counter()
      token, cache = step(gen.params, cache, token, jnp.full((pl_.batch,), context + i, jnp.int32), key)
      jax.block_until_ready(token)  # each annotated step spans its device work
      times.append(time.perf_counter() - t0)
  return {"model": spec, "dtype": dtype, "batch": pl_.batch, "context": context, "cr": cr,
          "ms_per_step": [round(t * 1e3, 3) for t in times], "trace": prof.run_dir}


def retrofit_trace(out: str, spec: str, dtype: str, batch: int, length: int, window=(3, 6)) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from dmc_jax import train as dmc_train
  from dmc_jax.config import DMCConfig
  from dmc_jax.model.llama import Llama
  from experiments.bench import dmc as bench
  from experiments.harness import profiling
  cfg = bench.model_config(spec, dtype, None).replace(scan_layers=True, remat_policy="dots")
  dmc = DMCConfig()
  tx = optax.adamw(1e-5)
  # stage1_steps=0: every step is stage 2 (relaxed decisions, the CR loss at a target of 4).
  step_fn = jax.jit(dmc_train.make_retrofit_step(cfg, dmc, tx, 0, 1, 4.0), donate_argnums=(0,))
  tokens = jax.random.randint(jax.random.key(0), (batch, length + 1), 3, cfg.vocab_size)
  data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((batch, length), jnp.float32),
          "segment_ids": jnp.ones((batch, length), jnp.int32)}

  @jax.jit
  def init(k):
    params = nn.unbox(Llama(cfg).init(k, jnp.zeros((1, 8), jnp.int32)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  state = init(jax.random.key(1))
  steps = window[1]
  times = []
  with profiling.Profiler(out, "train", window, unit="optimizer step") as prof:
    for i in range(1, steps + 1):
      prof.step(i)
      t0 = time.perf_counter()
      state, m = step_fn(state, data, jax.random.key(i))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  return {"model": spec, "dtype": dtype, "batch": batch, "length": length,
          "ms_per_step": [round(t * 1e3, 3) for t in times], "loss": float(np.asarray(m["loss"])),
          "trace": prof.run_dir}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="trace directory: OUT/decode and OUT/retrofit (xprof --logdir OUT/...)")
  p.add_argument("--json", help="also write the step times and trace paths here")
  p.add_argument("--model", default="llama2-7b", help="decode: preset name, 'name@layers' for fewer layers")
  p.add_argument("--train-model", default="llama2-7b@2", help="retrofit: preset name, 'name@layers'")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--budget-mb", type=float, default=8192, help="decode: KV budget that sets the batch")
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--cr", type=float, default=4.0)
  p.add_argument("--page-size", type=int, default=32)
  p.add_argument("--train-batch", type=int, default=1)
  p.add_argument("--train-len", type=int, default=4096)
  p.add_argument("--skip", default="", help="comma-separated: decode, retrofit")
  args = p.parse_args(argv)
  import jax
  skip = set(filter(None, args.skip.split(",")))
  result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "window": [3, 6]}
  if "decode" not in skip:
    result["decode"] = decode_trace(os.path.join(args.out, "decode"), args.model, args.dtype, args.budget_mb,
                                    args.context, args.cr, args.page_size)
  if "retrofit" not in skip:
    result["retrofit"] = retrofit_trace(os.path.join(args.out, "retrofit"), args.train_model, args.dtype,
                                        args.train_batch, args.train_len)
  text = json.dumps(result, indent=2)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
