#!/usr/bin/env python3
"""HF transformers (CPU torch, float32) greedy generation worker for `make bench` (experiments/bench/generate.py).

Runs in the reference venv (.venv-ref: Python 3.11, transformers + CPU torch), never in the project's own
environment. It loads the real SmolLM2 GGUF once, then serves timing requests so that the bench can interleave
its repetitions with ours (this machine is noisy; interleaving exposes both sides to the same conditions).

Protocol: one JSON object per line. After loading, the worker writes {"ready": true, ...info} to stdout; then
for each request line on stdin {"prompt_ids": [...], "batch": B, "new_tokens": N} it runs
`generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` on the prompt repeated B times and answers
{"seconds": wall time of the call, "tokens": new tokens of sequence 0}; {"quit": true} or EOF ends it.
Anything else transformers prints goes to stderr, with the progress log.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [transformers] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the GGUF file (transformers dequantizes it to float32)")
    ap.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    args = ap.parse_args()
    # The protocol owns the real stdout; stray prints (library warnings) go to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    attn = getattr(model.config, "_attn_implementation", None)
    n_params = sum(p.numel() for p in model.parameters())
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    log(f"loaded {os.path.basename(args.gguf)} in {load_s:.1f} s ({n_params / 1e6:.1f} M parameters, attention "
        f"{attn}, {torch.get_num_threads()} threads)")
    proto.write(json.dumps({
        "ready": True, "model_load_seconds": load_s, "n_params": n_params, "attn_implementation": attn,
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__}}) + "\n")

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("quit"):
            break
        b, n = int(req["batch"]), int(req["new_tokens"])
        ids = torch.tensor([req["prompt_ids"]] * b, dtype=torch.long)
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad)
            dt = time.perf_counter() - t
        assert out.shape == (b, ids.shape[1] + n), (out.shape, ids.shape, n)
        proto.write(json.dumps({"seconds": dt, "tokens": out[0, ids.shape[1]:].tolist()}) + "\n")


if __name__ == "__main__":
    main()
