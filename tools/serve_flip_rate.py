"""How often greedy decoding through the serving engine (requests batched together) departs from the same prompt
generated alone at batch 1 — batched float sums can flip a near-tie between the two best tokens.

    python tools/serve_flip_rate.py .work/ckpt/smollm2-135m-instruct --requests 16 --prompt 128 --new 128 \
        --json docs/results/serve_flip_rate_cpu.json

Prompts: the first `--prompt` tokens of distinct standard-library documents (real text, the checkpoint's own
tokenizer). For each cache (vanilla paged; DMC and DMS forced at CR 2 by default) every prompt is generated
alone (`Model.complete([p])`, the fixed-batch Generator, batch 1) and then all of them at once through the engine
(`max_batch` = the number of requests, so every decode step is batched). A request "flips" at the first position
where the two token sequences differ; after a flip the continuations are different texts, so the rate is flips
per token compared up to and including that position. For the vanilla cache each flip is reported with the gap
between the two tokens' log-probabilities in the parallel forward (a near-tie is a small gap).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("ckpt")
  p.add_argument("--requests", type=int, default=16)
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
  p.add_argument("--new", type=int, default=128, help="greedy tokens per request")
  p.add_argument("--caches", default="vanilla,dmc:2,dms:2", help="vanilla, dmc:CR, dms:CR (forced), h2o:CR, ...")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  import jax

  import dmc_jax
  from dmc_jax.text_data import stdlib_documents
  model = dmc_jax.load(args.ckpt)
  docs = (model.tokenizer.encode(text) for _, text in stdlib_documents())
  prompts = []
  for ids in docs:
    if len(ids) >= args.prompt:
      prompts.append(ids[:args.prompt])
    if len(prompts) == args.requests:
      break
  texts = [model.tokenizer.decode(ids) for ids in prompts]
  # Re-encoding a decoded prefix can change its tokens; use ids that round-trip so both paths see the same prompt.
  prompts = [model.tokenizer.encode(t) for t in texts]
  out = {"ckpt": os.path.basename(os.path.abspath(args.ckpt)), "requests": len(prompts), "prompt": args.prompt,
         "new_tokens": args.new, "device": str(jax.devices()[0].device_kind), "dtype": model.config.dtype,
         "caches": []}
  for spec in args.caches.split(","):
    name, _, cr = spec.partition(":")
    kw = {"cache": name}
    if cr:
      kw["dmc_force_cr" if name in ("dmc", "dms") else "cr"] = float(cr)
    alone = [model.complete([t], args.new, stop_at_eos=False, add_special_tokens=False, **kw) for t in texts]
    batched = model.complete(texts, args.new, stop_at_eos=False, add_special_tokens=False,
                             max_batch=len(texts), **kw)
    flips, compared = [], 0
    for i, (a, b) in enumerate(zip((c.tokens[0] for c in alone), batched.tokens)):
      first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
      compared += len(a) if first is None else first + 1
      if first is not None:
        flips.append({"request": i, "position": first, "alone": int(a[first]), "batched": int(b[first])})
    if name == "vanilla":  # the logit gap at each flip, from the parallel forward (a third summation order)
      for f in flips:
        seq = alone[f["request"]].prompt_tokens[0] + alone[f["request"]].tokens[0][:f["position"]]
        (a, _), (b, _) = model.score([(seq, seq[1:] + [f["alone"]]), (seq, seq[1:] + [f["batched"]])])
        f["logit_gap"] = float(a[-1] - b[-1])
    row = {"cache": spec, "requests_identical": len(prompts) - len(flips), "flips": flips,
           "tokens_compared": compared, "flip_rate_per_token": len(flips) / max(compared, 1)}
    out["caches"].append(row)
    print(f"{spec}: {row['requests_identical']}/{len(prompts)} requests identical, {len(flips)} flips over "
          f"{compared} tokens ({1e3 * row['flip_rate_per_token']:.2f} per 1000)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
