"""`dmc-jax`: convert checkpoints, export to HF, generate text, retrofit to DMC, inspect experiment configs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from experiments.harness import cli, profiling

log = logging.getLogger("dmc_jax")


# -- convert ------------------------------------------------------------------------------------------------


def _configure_convert(p: argparse.ArgumentParser) -> None:
  from dmc_jax.convert import SOURCES
  p.add_argument("src", help="HF directory, Meta checkpoint directory, .gguf file, Megatron-LM checkpoint (root, "
                 "iter_*/mp_rank_* directory, or .pt file), or a dmc-jax checkpoint")
  p.add_argument("--from", dest="src_format", required=True, choices=SOURCES,
                 help="source format (dmc-jax: rewrite an older checkpoint in the current format, tensors unchanged)")
  p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                 help="stored parameter dtype (auto: the source's float dtype; quantized GGUF → float32)")
  p.add_argument("--tokenizer", help="tokenizer.json or tokenizer.model to store instead of the source's "
                 "(required for megatron: those files carry none)")
  p.add_argument("--force", action="store_true", help="replace --out if it exists")
  p.add_argument("--max-shard-gb", type=cli.positive_float, default=2.0, help="largest params shard file, in GiB")


def _run_convert(args: argparse.Namespace) -> None:
  import dmc_jax
  from experiments.harness import progress
  t0 = time.perf_counter()
  with progress.bar(total=None, desc=f"writing {os.path.basename(os.path.abspath(args.out))}", unit="B",
                    unit_scale=True) as bar:
    def on_progress(done, total):
      bar.total = total
      bar.update(done - bar.n)
    out = dmc_jax.convert(args.src, args.out, source=args.src_format, dtype=args.dtype, tokenizer=args.tokenizer,
                          force=args.force, max_shard_bytes=int(args.max_shard_gb * 2**30), on_progress=on_progress)
  ck = dmc_jax.Checkpoint(out)
  c = ck.config
  log.info("converted %s (%s): %d layers, d_model %d, %d heads / %d KV heads, vocab %d, %.1f M params, %s%s → %s "
           "in %.1f s%s", args.src, args.src_format, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads,
           c.vocab_size, c.num_params() / 1e6, ck.meta["param_dtype"],
           f", compression {ck.compression}" if ck.compression else "", out, time.perf_counter() - t0,
           "" if ck.tokenizer_info else " (no tokenizer found)")


# -- export-hf ----------------------------------------------------------------------------------------------


def _configure_export(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="dmc-jax checkpoint directory")
  p.add_argument("--out", required=True, help="HF output directory (written atomically)")
  p.add_argument("--force", action="store_true", help="replace --out if it exists")
  p.add_argument("--max-shard-gb", type=cli.positive_float, default=5.0, help="largest safetensors shard, in GiB")


def _run_export(args: argparse.Namespace) -> None:
  from dmc_jax import checkpoint
  from dmc_jax.convert import hf
  from experiments.harness import progress
  ckpt = checkpoint.Checkpoint(args.ckpt)
  if ckpt.dmc:
    log.warning("%s has DMC settings; the HF export holds the weights only (a vanilla Llama)", args.ckpt)
  tensors = ckpt.lazy_tensors()
  tokenizer = ckpt.tokenizer_bytes()
  total = sum(t.nbytes for t in tensors.values())
  with checkpoint.atomic_directory(args.out, args.force, inputs=[ckpt.directory]) as tmp:
    with progress.bar(total=total, desc="exporting", unit="B", unit_scale=True) as bar:
      hf.write(tmp, ckpt.config, tensors, tokenizer, int(args.max_shard_gb * 2**30),
               on_tensor=lambda t, _: bar.update(t.nbytes))
  log.info("exported %s → %s", args.ckpt, os.path.abspath(args.out))


# -- generate -----------------------------------------------------------------------------------------------


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
  """`--cache NAME [--cr CR] [--dmc-force-cr CR]` (dmc_jax.api's cache-selection contract) and its aliases."""
  from dmc_jax.api import CACHES
  g = p.add_argument_group("KV cache (default: the checkpoint's own learned method, else vanilla)")
  g.add_argument("--cache", choices=CACHES, default=None,
                 help="vanilla; dmc or dms (the paged compressed cache, the checkpoint's settings); or an eviction "
                 "policy (streaming, h2o, tova: a compact cache of ceil(T / CR) + 1 slots per layer and KV head)")
  g.add_argument("--cr", type=cli.float_range(1.0), default=None, help="an eviction policy's target compression ratio")
  g.add_argument("--dmc-force-cr", type=cli.float_range(1.0), default=None,
                 help="force the learned cache's decisions: DMC merges (DMS evicts) with probability 1 - 1/CR "
                 "(benchmarks; ignores the model); without --cache, the checkpoint's method, else dmc")
  g.add_argument("--dmc", action="store_true", help="alias of --cache dmc")
  g.add_argument("--policy", default=None, help="alias of --cache POLICY (streaming, h2o, tova)")
  g.add_argument("--policy-cr", type=cli.float_range(1.0), default=None, help="alias of --cr (default 2 with --policy)")


def cache_choice_arguments(args: argparse.Namespace) -> dict:
  """The keyword arguments (cache, cr, dmc_force_cr) for dmc_jax's API from `add_cache_arguments`' flags."""
  from dmc_jax.errors import ArgumentError
  cache, cr = args.cache, args.cr
  if args.dmc:
    if cache not in (None, "dmc"):
      raise ArgumentError(f"--dmc is an alias of --cache dmc; it contradicts --cache {cache}")
    cache = "dmc"
  if args.policy:
    if cache not in (None, args.policy):
      raise ArgumentError(f"--policy {args.policy} is an alias of --cache {args.policy}; it contradicts "
                          f"--cache {cache}")
    cache = args.policy
    if args.policy_cr is not None and cr is not None and args.policy_cr != cr:
      raise ArgumentError("--policy-cr is an alias of --cr; give one of them")
    cr = cr if cr is not None else (args.policy_cr if args.policy_cr is not None else 2.0)
  elif args.policy_cr is not None:
    raise ArgumentError("--policy-cr: needs --policy (or use --cache POLICY --cr CR)")
  return dict(cache=cache, cr=cr, dmc_force_cr=args.dmc_force_cr)


def _configure_generate(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="dmc-jax checkpoint directory")
  p.add_argument("--prompt", action="append", required=True,
                 help="prompt text; repeat for a batch (prompts may differ in length)")
  p.add_argument("--max-new-tokens", type=cli.positive_int, default=64)
  p.add_argument("--temperature", type=cli.float_range(0.0), default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=cli.non_negative_int, default=0, help="0 = off; at most the vocabulary size")
  p.add_argument("--top-p", type=cli.float_range(0.0, 1.0, lo_open=True), default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: float32; bfloat16 is faster on GPU, slower on CPU)")
  p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
  p.add_argument("--no-special-tokens", action="store_true", help="encode prompts without BOS/EOS")
  p.add_argument("--no-verify", action="store_true", help="skip the checkpoint's sha256 check (large checkpoints)")
  p.add_argument("--adapter", default=None, help="adapter directory to apply (its method becomes the default cache)")
  p.add_argument("--attention-impl", choices=("auto", "xla", "pallas", "tpu"), default="auto",
                 help="DMC attention and decode kernels (auto: Pallas on a GPU, the TPU decode kernel on a TPU, "
                 "XLA elsewhere; a kernel off its platform runs interpreted: slow, for checking)")
  add_cache_arguments(p)
  g = p.add_argument_group("DMC page pool")
  g.add_argument("--page-size", type=cli.positive_int, default=None,
                 help="slots per cache page (default: fitted to the longest prompt + --max-new-tokens: 8 up to "
                 "128 tokens, 16 up to 256, else 32)")
  g.add_argument("--kv-budget-mb", type=cli.positive_float, default=None,
                 help="size the page pool from this KV-memory budget (default: never run out)")
  profiling.add_profile_arguments(p, unit="decode step")


def _run_generate(args: argparse.Namespace) -> None:
  import jax

  import dmc_jax
  prof = profiling.from_args(args, "decode", unit="decode step")  # a bad --profile-steps fails before the load
  t0 = time.perf_counter()
  model = dmc_jax.load(args.ckpt, adapter=args.adapter, dtype=args.dtype, verify=not args.no_verify,
                       attention_impl=None if args.attention_impl == "auto" else args.attention_impl)
  load_s = time.perf_counter() - t0
  with prof:  # on_step(s) runs after decode step s
    c = model.complete(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, kv_budget_mb=args.kv_budget_mb, page_size=args.page_size,
                       stop_at_eos=not args.ignore_eos, add_special_tokens=not args.no_special_tokens,
                       on_step=lambda s: profiling.step(s + 1), **cache_choice_arguments(args))
  for i, (text, new) in enumerate(zip(args.prompt, c.texts)):
    if len(args.prompt) > 1:
      print(f"--- [{i}] ---")
    print(text + new)
  sys.stdout.flush()
  result = c.result
  n_new = sum(len(t) for t in result.tokens)
  print(f"[generate] batch {len(args.prompt)}, prompt tokens {result.prompt_lengths}, new tokens {n_new}, cache "
        f"{c.cache.label()}; load {load_s:.2f} s, compile {result.compile_seconds:.2f} s, prefill "
        f"{result.prefill_seconds:.3f} s, decode {result.decode_steps} steps in {result.decode_seconds:.2f} s = "
        f"{result.decode_tokens_per_second:.1f} tokens/s; "
        f"KV cache {result.cache_bytes / 2**20:.2f} MiB on {jax.devices()[0].platform}", file=sys.stderr)
  if result.dmc:
    _report_dmc(c.generator.dmc, result.dmc)
  if c.cache.kind in dmc_jax.api.POLICIES:
    from dmc_jax.baselines.policy_generate import kept_entries
    print(f"[policy] {c.generator.policy.label()}: entries kept per layer and KV head at the end "
          f"{kept_entries(c.generator.policy, result.prompt_lengths, result.decode_steps)}",
          file=sys.stderr)


def _report_dmc(options, stats) -> None:
  import numpy as np
  cr, mem = stats["cr"], stats["memory"]
  fmt = lambda xs: " ".join(f"{x:.2f}" for x in np.ravel(xs))
  rate, method = options.forced_merge_rate, options.dmc.method
  tag = f"[{method}]"
  verb = "eviction" if method == "dms" else "merge"
  forced = "" if rate is None else f", decisions forced ({verb} rate {rate:.3f})"
  print(f"{tag} settings: {options.dmc.to_dict()}, page size {options.page_size}, pool "
        f"{mem['pool'] / 2**20:.2f} MiB{forced}", file=sys.stderr)
  state, what = (mem["ring"], "pending ring") if "ring" in mem else (mem["merge_state"], "merge state")  # DMS, DMC
  print(f"{tag} realised CR {cr['overall']:.2f}; cache in use {mem['total'] / 2**20:.2f} MiB "
        f"(pages {mem['pages'] / 2**20:.2f} + {what} {state / 2**20:.2f} + tables "
        f"{mem['tables'] / 2**20:.2f}) vs vanilla {stats['vanilla_bytes'] / 2**20:.2f} MiB "
        f"= {mem['total'] / max(stats['vanilla_bytes'], 1):.2f}x", file=sys.stderr)
  if "crossover_tokens" in stats:
    cross = ", ".join(f"{n} tokens at CR {cr:g}" for cr, n in stats["crossover_tokens"].items())
    print(f"{tag} {method.upper()} holds less than vanilla from {cross} (fixed per-row state and whole pages below)",
          file=sys.stderr)
  print(f"{tag} CR per layer: {fmt(cr['per_layer'])}", file=sys.stderr)
  for layer, heads in enumerate(cr["per_head"]):
    print(f"{tag} CR layer {layer:2d} per KV head: {fmt(heads)}", file=sys.stderr)


# -- config -------------------------------------------------------------------------------------------------


def _configure_config(p: argparse.ArgumentParser) -> None:
  cli.add_config_argument(p)


def run_config(args: argparse.Namespace) -> None:
  from experiments.harness import config
  print(config.load(args.config, args.config_overrides))


def _configure_train(p: argparse.ArgumentParser) -> None:
  cli.add_config_argument(p)
  p.add_argument("--init-from", metavar="CKPT",
                 help="converted checkpoint to retrofit (same as --config.model.init_from=CKPT)")
  p.add_argument("--workdir", help="run directory (same as --config.workdir=DIR)")
  cli.add_workdir_arguments(p)
  g = p.add_argument_group("multi-host (default: DMC_JAX_* environment, a detected SLURM/MPI/TPU-pod cluster, "
                           "else one process)")
  g.add_argument("--coordinator", help="host:port of process 0's coordination service")
  g.add_argument("--num-processes", type=int, help="processes forming the global mesh")
  g.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
  profiling.add_profile_arguments(p, unit="optimizer step")


def _run_train(args: argparse.Namespace) -> None:
  import json

  from experiments.dmc import train as dmc_run
  from experiments.harness import config, distributed
  overrides = list(args.config_overrides)
  if args.init_from:
    if not os.path.exists(os.path.join(args.init_from, "checkpoint.json")):
      raise FileNotFoundError(f"--init-from {args.init_from}: not a dmc-jax checkpoint (no checkpoint.json); "
                            "convert one with `dmc-jax convert`")
    overrides.append(f"--config.model.init_from={args.init_from}")
  if args.workdir:
    overrides.append(f"--config.workdir={args.workdir}")
  cfg = config.load(args.config, overrides)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  with profiling.from_args(args, "train", unit="optimizer step"):
    summary = dmc_run.train(cfg, break_lock=args.break_lock, allow_config_change=args.allow_config_change)
  print(json.dumps(summary, indent=2, default=str))


def _configure_bench(p: argparse.ArgumentParser) -> None:
  from experiments.bench import dmc as bench_dmc
  bench_dmc.configure(p)


def _run_bench(args: argparse.Namespace) -> int:
  from experiments.bench import dmc as bench_dmc
  return bench_dmc.run(args)


# -- serve --------------------------------------------------------------------------------------------------


def _configure_serve(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="dmc-jax checkpoint directory")
  p.add_argument("--adapter", default=None, help="adapter directory to apply (its method becomes the default cache)")
  add_cache_arguments(p)
  p.add_argument("--kv-budget-mb", type=cli.positive_float, default=None,
                 help="KV page pool size in MiB (default: every slot at the model's full length, uncompressed)")
  p.add_argument("--page-size", type=cli.positive_int, default=32, help="slots per cache page")
  p.add_argument("--max-batch", type=cli.positive_int, default=8, help="decode slots (requests running at once)")
  p.add_argument("--max-len", type=cli.positive_int, default=None,
                 help="tokens per sequence, prompt + output (default: 2048, or the model's positions if fewer)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=cli.positive_int, default=8000)
  p.add_argument("--chat-template", default=None, help="a jinja2 chat template file (overrides the checkpoint's)")
  p.add_argument("--model-name", default=None, help="the model id clients name (default: the directory's name)")
  p.add_argument("--drain-seconds", type=cli.positive_float, default=30.0,
                 help="on SIGTERM, how long in-flight requests may run before they are cancelled")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default float32)")


def _run_serve(args: argparse.Namespace) -> int:
  import dmc_jax
  from dmc_jax.errors import ArgumentError
  from dmc_jax.serving import Engine, paged_kv
  from dmc_jax.serving.server import serve
  template = None
  if args.chat_template is not None:
    try:
      with open(args.chat_template, encoding="utf-8") as f:
        template = f.read()
    except OSError as e:
      raise ArgumentError(f"--chat-template: cannot read {args.chat_template}: {e.strerror}") from None
  model = dmc_jax.load(args.ckpt, adapter=args.adapter, dtype=args.dtype)
  kv = paged_kv(model, **cache_choice_arguments(args), max_batch=args.max_batch,
                kv_budget_mb=args.kv_budget_mb, page_size=args.page_size,
                max_len=args.max_len or min(2048, model.config.max_position_embeddings))
  engine = Engine(kv, eos_ids=model.eos_ids)
  name = args.model_name or os.path.basename(os.path.abspath(args.ckpt))
  log.info("serving %s (%s cache, %d slots, %d pages of %d = %.1f MiB) on http://%s:%d", name, kv.kind,
           kv.max_batch, kv.num_pages, kv.page_size, kv.bytes_in_use(kv.num_pages) / 2**20, args.host, args.port)
  return serve(model, engine, name, args.host, args.port, template, args.drain_seconds)


def _configure_plan(p: argparse.ArgumentParser) -> None:
  cli.add_config_argument(p)
  p.add_argument("--devices", type=cli.positive_int, default=None,
                 help="fake CPU devices (default: the product of the mesh sizes; needed when one is -1)")
  p.add_argument("--layers", type=cli.positive_int, default=None,
                 help="plan only this many layers (same widths; quick checks)")
  p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run_plan(args: argparse.Namespace) -> None:
  import json

  from experiments.dmc import plan
  from experiments.harness import config
  p = plan.plan(config.load(args.config, args.config_overrides), devices=args.devices, n_layers=args.layers)
  print(json.dumps(p.to_dict(), indent=2) if args.json else plan.report(p))


# -- eval, gqa-pool, report (baselines: experiments/dmc/eval.py, dmc_jax/baselines, experiments/dmc/report.py) --


def _configure_eval(p: argparse.ArgumentParser) -> None:
  from experiments.dmc import eval as eval_dmc
  eval_dmc.configure(p)


def _run_eval(args: argparse.Namespace) -> None:
  from experiments.dmc import eval as eval_dmc
  eval_dmc.run(args)


def _configure_calibrate(p: argparse.ArgumentParser) -> None:
  from experiments.dmc import calibrate
  calibrate.configure(p)


def _run_calibrate(args: argparse.Namespace) -> None:
  from experiments.dmc import calibrate
  calibrate.run(args)


def _configure_gqa_pool(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="dmc-jax checkpoint directory")
  p.add_argument("--kv-heads", type=cli.positive_int, required=True,
                 help="KV heads after pooling (divides the current count)")
  p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
  p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _run_gqa_pool(args: argparse.Namespace) -> None:
  from dmc_jax.baselines import gqa
  out, cr = gqa.pool_checkpoint(args.ckpt, args.kv_heads, args.out, force=args.force)
  log.info("pooled %s to %d KV heads (cache CR %g) → %s", args.ckpt, args.kv_heads, cr, out)


def _configure_report(p: argparse.ArgumentParser) -> None:
  p.add_argument("results", nargs="+", help="JSON files written by `dmc-jax eval --out`")
  p.add_argument("--out", required=True, help="directory for report.md and ppl_vs_cr.png")
  p.add_argument("--pair", action="append", default=[], metavar="LABEL=REFERENCE",
                 help="compare the row LABEL with the row REFERENCE (default: the vanilla row of its own file); "
                 "repeat")


def _run_report(args: argparse.Namespace) -> None:
  from dmc_jax.errors import ConfigError
  from experiments.dmc import report as report_dmc
  pairs = {}
  for p in args.pair:
    label, sep, ref = p.partition("=")
    if not sep or not label or not ref:
      raise ConfigError(f"--pair {p!r}: expected LABEL=REFERENCE")
    pairs[label] = ref
  md, png = report_dmc.write(args.results, args.out, pairs)
  print(open(md).read())
  log.info("wrote %s and %s", md, png)


def _configure_merge_adapter(p: argparse.ArgumentParser) -> None:
  p.add_argument("base", help="the base checkpoint the adapter was trained on")
  p.add_argument("adapter", help="adapter directory (WORKDIR/adapter of a train.trainable != all run)")
  p.add_argument("--out", required=True, help="output checkpoint directory")
  p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _run_merge_adapter(args: argparse.Namespace) -> None:
  from dmc_jax import adapter
  print(adapter.merge_into_checkpoint(args.base, args.adapter, args.out, force=args.force))


COMMANDS = [
    cli.Command("convert", "convert an HF / Meta / GGUF Llama checkpoint into a dmc-jax checkpoint",
                _configure_convert, _run_convert),
    cli.Command("export-hf", "export a dmc-jax checkpoint as an HF LlamaForCausalLM directory",
                _configure_export, _run_export),
    cli.Command("generate", "generate text from a checkpoint (batched; vanilla, DMC or eviction-policy cache)",
                _configure_generate, _run_generate),
    cli.Command("train", "retrofit a checkpoint to DMC (three stages) from an experiment config",
                _configure_train, _run_train, takes_config_overrides=True),
    cli.Command("bench", "DMC vs vanilla decode tokens/s at equal KV memory, decode-kernel bandwidth, train step time",
                _configure_bench, _run_bench),
    cli.Command("serve", "an OpenAI-compatible server: continuous batching over the paged vanilla or DMC cache",
                _configure_serve, _run_serve, requires=("serve",)),
    cli.Command("plan", "AOT-compile an experiment's train step on fake CPU devices; per-device memory vs analytic",
                _configure_plan, _run_plan, takes_config_overrides=True),
    cli.Command("eval", "held-out perplexity and realised CR: vanilla beside DMC and eviction policies, same tokens",
                _configure_eval, _run_eval),
    cli.Command("calibrate", "set an adapter's decision bias so its noise-free decisions realise a target CR",
                _configure_calibrate, _run_calibrate),
    cli.Command("gqa-pool", "mean-pool a checkpoint's KV heads into fewer groups (GQA up-training's start)",
                _configure_gqa_pool, _run_gqa_pool),
    cli.Command("report", "Markdown table and perplexity-vs-CR plot from `dmc-jax eval` JSON files",
                _configure_report, _run_report),
    cli.Command("merge-adapter", "apply an adapter to its base checkpoint; writes an ordinary checkpoint",
                _configure_merge_adapter, _run_merge_adapter),
    cli.Command("config", "print an experiment config after variant and overrides",
                _configure_config, run_config, takes_config_overrides=True),
]


def main(argv=None) -> int:
  return cli.main("dmc-jax", __doc__, COMMANDS, argv)


if __name__ == "__main__":
  sys.exit(main())
