"""Decode throughput of `Generator` with random weights (speed does not depend on the values), any device.

    python -m experiments.bench.decode --model llama2-7b --batch 1,8,32 --prompt-len 512 --new-tokens 128

Prints a Markdown table: decode tokens/s, ms/step, the bytes one step must read (weights + the KV cache up to
the current length) over the device's measured copy bandwidth (the roofline), and the fraction reached.
Absolute numbers only mean something on the device they were measured on.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import copy_bandwidth


def random_params(cfg, seed=0):
  import flax.linen as nn

  from dmc_jax.model.llama import Llama
  init = jax.jit(lambda k: nn.unbox(Llama(cfg).init(k, jnp.zeros((1, 8), jnp.int32))))
  return init(jax.random.key(seed))


def run(model: str, batches, prompt_len: int, new_tokens: int, dtype: str, repeats: int,
        dmc_crs=()) -> dict:
  from dmc_jax.config import DMCConfig
  from dmc_jax.generate import DMCOptions, Generator
  from dmc_jax.presets import preset
  cfg = preset(model, param_dtype=dtype, dtype=dtype)
  params = random_params(cfg)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bw = copy_bandwidth()
  rows = []
  # cr 0 = the vanilla cache; cr ≥ 1 = the DMC cache with decisions forced to merge at rate 1 − 1/cr.
  for cr in [0, *dmc_crs]:
    dmc = None if cr == 0 else DMCOptions(DMCConfig(), forced_merge_rate=1 - 1 / cr)
    rows += _run_one(Generator(cfg, params, dmc=dmc), cfg, cr, batches, prompt_len, new_tokens, dtype, repeats,
                     param_bytes, bw, model)
  return {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
          "jax": jax.__version__, "copy_bandwidth_GBps": bw / 1e9, "param_bytes": param_bytes, "rows": rows}


def _run_one(gen, cfg, cr, batches, prompt_len, new_tokens, dtype, repeats, param_bytes, bw, model):
  rng = np.random.default_rng(0)
  rows = []
  for b in batches:
    prompts = rng.integers(3, cfg.vocab_size, (b, prompt_len)).tolist()
    times = []
    for i in range(repeats + 1):  # the first call compiles
      r = gen.generate(prompts, new_tokens, stop_at_eos=False)
      if i:
        times.append(r.decode_seconds / r.decode_steps)
    step = float(np.median(times))
    avg_ctx = prompt_len + new_tokens / 2
    kv_bytes = b * avg_ctx * cfg.kv_bytes_per_token(jnp.dtype(dtype).itemsize) / max(cr, 1)
    bytes_per_step = param_bytes + kv_bytes
    roofline_step = bytes_per_step / bw
    realised = r.dmc["cr"]["overall"] if r.dmc else 1.0
    rows.append({"model": model, "cache": "vanilla" if cr == 0 else f"dmc cr {cr:g}", "realised_cr": realised,
                 "batch": b, "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new_tokens,
                 "ms_per_step": step * 1e3, "tokens_per_s": b / step, "bytes_per_step": bytes_per_step,
                 "roofline_ms": roofline_step * 1e3, "roofline_fraction": roofline_step / step,
                 "cache_bytes": r.cache_bytes, "compile_s": r.compile_seconds})
  return rows


def table(result: dict) -> str:
  lines = [f"device: {result['device']} ({result['platform']}), jax {result['jax']}, measured copy bandwidth "
           f"{result['copy_bandwidth_GBps']:.0f} GB/s",
           "", "| model | cache | realised CR | dtype | batch | prompt+new | tokens/s | ms/step | "
           "roofline ms/step | of roofline |",
           "|---|---|---:|---|---:|---|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['model']} | {r['cache']} | {r['realised_cr']:.2f} | {r['dtype']} | {r['batch']} | "
                 f"{r['prompt_len']}+{r['new_tokens']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
                 f"{r['roofline_ms']:.2f} | {100 * r['roofline_fraction']:.0f}% |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m", help="preset name (dmc_jax.presets)")
  p.add_argument("--batch", default="1,8")
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dmc-cr", default="", help="also run the DMC cache with decisions forced to these CRs, e.g. 2,4")
  p.add_argument("--json", help="also write the result here")
  args = p.parse_args(argv)
  crs = [float(c) for c in args.dmc_cr.split(",") if c]
  result = run(args.model, [int(b) for b in args.batch.split(",")], args.prompt_len, args.new_tokens, args.dtype,
               args.repeats, crs)
  print(table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
