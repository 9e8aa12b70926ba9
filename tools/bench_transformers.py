#!/usr/bin/env python3
"""Decode throughput of HF transformers (CPU torch, float32) on the real SmolLM2 GGUF, for `make bench`.

Runs in the reference venv (.venv-ref: Python 3.11, transformers + CPU torch), never in the project's own
environment; experiments/bench_generate.py starts it as a subprocess and compares its numbers with ours.

Input (--spec, JSON): {"gguf": path, "prompt_ids": [...], "batches": [1, 8], "new_tokens": N, "reps": R,
"threads": T, "check_tokens": K}. Every sequence of a batch is the same prompt (token ids made by our tokenizer).

Decode-only time per repetition = t(generate N tokens) - t(generate 1 token) (the second is prefill + the first
token), so throughput = B * (N - 1) / (t_N - t_1); the median over repetitions is reported, after a warm-up.
Output (--out, JSON): versions, settings, per batch the repetitions and the median, and the first greedy tokens
at batch 1. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [transformers] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help="JSON file with the settings and prompt token ids")
    ap.add_argument("--out", required=True, help="JSON file to write the results to")
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    gguf = spec["gguf"]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    attn = getattr(model.config, "_attn_implementation", None)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {os.path.basename(gguf)} in {load_s:.1f} s ({n_params / 1e6:.1f} M parameters, attention "
        f"{attn}, {torch.get_num_threads()} threads)")

    prompt = list(spec["prompt_ids"])
    n = int(spec["new_tokens"])
    reps = int(spec["reps"])
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    @torch.inference_mode()
    def gen(ids, mask, new: int):
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=pad)
        dt = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + new, (out.shape, ids.shape, new)
        return out[:, ids.shape[1]:], dt

    results = []
    greedy = None
    for b in spec["batches"]:
        ids = torch.tensor([prompt] * b, dtype=torch.long)
        mask = torch.ones_like(ids)
        gen(ids, mask, 4)  # warm-up
        runs = []
        for r in range(reps):
            _, t1 = gen(ids, mask, 1)
            toks, tn = gen(ids, mask, n)
            decode_s = tn - t1
            runs.append({"t_1": t1, "t_n": tn, "decode_seconds": decode_s,
                         "tokens_per_second": b * (n - 1) / decode_s if decode_s > 0 else float("nan")})
            log(f"batch {b} rep {r + 1}/{reps}: t(1 token) {t1:.3f} s, t({n} tokens) {tn:.3f} s -> "
                f"{runs[-1]['tokens_per_second']:.1f} tokens/s")
            if b == 1 and greedy is None:
                greedy = toks[0].tolist()
        decode_s = statistics.median(r["decode_seconds"] for r in runs)
        results.append({
            "batch": b, "runs": runs,
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
            "decode_seconds": decode_s, "ms_per_step": 1e3 * decode_s / (n - 1),
            "prefill_seconds": statistics.median(r["t_1"] for r in runs),
        })

    out = {
        "impl": "transformers",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(), "attn_implementation": attn, "n_params": n_params,
        "model_load_seconds": load_s, "new_tokens": n, "reps": reps,
        "method": "generate(max_new_tokens=N, min_new_tokens=N, do_sample=False) minus generate(1 token); "
                  "throughput = B*(N-1)/(t_N - t_1); median over reps after a warm-up",
        "results": results, "greedy_batch1": greedy,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
