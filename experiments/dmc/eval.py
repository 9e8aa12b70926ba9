"""`dmc-jax eval CKPT`: held-out perplexity and realised CR of a checkpoint, vanilla beside DMC and/or eviction
policies, every method on the same tokens (the validation split of a text source, packed into rows).

Realised CR is total tokens / total cache entries at the end of every document piece, summed over layers and KV
heads: for DMC the eval-mode hard decisions (1 / (1 − mean α), as in `dmc-jax train`'s validation), for a policy
the entries it actually kept, for a GQA checkpoint base KV heads / its own (`--base-kv-heads`).
The JSON (`--out`) feeds `dmc-jax report`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time

import numpy as np

from dmc_jax.config import ConfigError
from experiments.harness import profiling

log = logging.getLogger("dmc_jax")
FORMAT = "dmc-jax-eval/1"
BLOCK = 128  # scored tokens per bootstrap block: long enough to hold the correlation between neighbouring tokens
LABELS = {"streaming": "StreamingLLM", "h2o": "H2O", "tova": "TOVA"}


def configure(p: argparse.ArgumentParser) -> None:
  from experiments.harness import cli
  p.add_argument("ckpt", help="dmc-jax checkpoint directory")
  p.add_argument("--adapter", default=None,
                 help="adapter directory applied to the checkpoint (implies --dmc unless --cache vanilla)")
  p.add_argument("--cache", action="append", default=[], choices=("vanilla", "dmc", "dms", "streaming", "h2o", "tova"),
                 help="evaluate with this cache beside vanilla (dmc/dms: the checkpoint's settings, hard α; an "
                 "eviction policy at every --cr); repeat")
  p.add_argument("--dmc", action="store_true", help="alias of --cache dmc")
  p.add_argument("--policy", action="append", default=[], help="alias of --cache POLICY; repeat")
  p.add_argument("--cr", action="append", type=cli.float_range(1.0), default=[],
                 help="target CR of every --policy; repeat")
  p.add_argument("--sinks", type=cli.non_negative_int, default=4, help="StreamingLLM attention sinks")
  p.add_argument("--recent-fraction", type=cli.float_range(0.0, 1.0), default=0.5,
                 help="H2O: share of the budget for recent tokens")
  p.add_argument("--tokens", type=cli.non_negative_int, default=0,
                 help="held-out tokens to use (whole rows; 0 = the whole split)")
  p.add_argument("--seq-len", type=cli.int_range(2), default=1024, help="at most the model's positions")
  p.add_argument("--batch-size", type=cli.positive_int, default=1)
  add_data_arguments(p)
  p.add_argument("--label", help="name of this checkpoint's vanilla row (default: its directory name; with --dmc "
                 "'LABEL, vanilla attention')")
  p.add_argument("--base-kv-heads", type=cli.positive_int, default=None,
                 help="KV heads of the model this checkpoint was GQA-pooled from (its CR = base / own)")
  p.add_argument("--out", help="write the results here as JSON")
  profiling.add_profile_arguments(p, unit="batch")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
  """The text source flags `split_batches` reads (eval, calibrate)."""
  p.add_argument("--data-kind", default="stdlib", help="text source kind (dmc_jax/text_data.py)")
  p.add_argument("--data-path", action="append", default=[], help="files/directories for --data-kind files")
  p.add_argument("--data-dir", default=None, help="where prepared datasets live")


def split_batches(tokenizer, args, split: str, tokens: int, batch_size: int) -> list[dict]:
  """Rows of `args.seq_len` from the start of `split` ("train" or "validation") of the --data-* source, whole rows
  covering `tokens` (0: the whole split)."""
  from dmc_jax import text_data
  src = text_data.TextSource(kind=args.data_kind, paths=tuple(args.data_path))
  rows = text_data.open_splits(src, args.data_dir)[split]
  per_batch = args.seq_len * batch_size
  max_batches = -(-tokens // per_batch) if tokens else 0
  batches = list(text_data.eval_batches(rows, tokenizer, seq_len=args.seq_len, batch_size=batch_size,
                                        max_batches=max_batches))
  if not batches:
    name = "training" if split == "train" else split
    raise ConfigError(f"data: the {name} split of {args.data_kind!r} is empty")
  return batches


def held_out_batches(tokenizer, args) -> list[dict]:
  return split_batches(tokenizer, args, "validation", args.tokens, args.batch_size)


def tokens_digest(batches) -> str:
  h = hashlib.sha256()
  for b in batches:
    for k in ("tokens", "segment_ids", "loss_mask"):
      h.update(np.ascontiguousarray(b[k], np.int32).tobytes())
  return h.hexdigest()[:16]


def document_ends(segment_ids_BxL: np.ndarray) -> np.ndarray:
  """True at the last token of every document piece of a packed row (padding, segment 0, excluded)."""
  nxt = np.concatenate([segment_ids_BxL[:, 1:], np.zeros_like(segment_ids_BxL[:, :1])], axis=1)
  return (segment_ids_BxL != nxt) & (segment_ids_BxL > 0)


def _nll(logits_BxLxV, targets_BxL, mask_BxL):
  """Per-token NLL [B, L] (0 where not scored): the host keeps each token's so rows can be compared pairwise."""
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  return nll * mask_BxL


def token_blocks(nll_N: np.ndarray, size: int = BLOCK) -> dict:
  """Sums and counts of the per-token NLL over blocks of `size` consecutive scored tokens (the last one may be
  shorter): enough for a paired block bootstrap between two rows scored on the same tokens (report.py)."""
  starts = np.arange(0, len(nll_N), size)
  return {"size": size, "nll_sums": [round(float(x), 6) for x in np.add.reduceat(nll_N, starts)] if len(nll_N) else [],
          "counts": [int(min(size, len(nll_N) - s)) for s in starts]}


def scorers(cfg, params, args, dmc_settings):
  """[(method, label, cr_target, fn(batch) -> (nll sum, cache entries at document ends or None))]."""
  import jax
  import jax.numpy as jnp

  from dmc_jax.baselines import evict_model
  from dmc_jax.baselines.policies import Policy
  from dmc_jax.calibrate import cache_entries
  from dmc_jax.convert import layout
  from dmc_jax.model.llama import Llama
  scanned = cfg.replace(scan_layers=True, remat_policy="none")
  sparams = {"params": layout.stack_layers(params["params"], cfg.n_layers, stack=jnp.stack)}
  out = []

  # Parameters are arguments, not closed-over constants (XLA would try to constant-fold them).
  @jax.jit
  def vanilla(p, b):
    return _nll(Llama(scanned).apply(p, b["tokens"], segment_ids_BxL=b["segment_ids"]), b["targets"],
                b["loss_mask"]), None
  base = args.base_kv_heads
  cr = base / cfg.n_kv_heads if base else 1.0
  label = args.label or os.path.basename(os.path.abspath(args.ckpt))
  if args.dmc:  # this row is the DMC checkpoint's weights without its cache, not a vanilla model
    label += ", vanilla attention"
  out.append(("gqa" if base else "vanilla", label, cr, functools.partial(vanilla, sparams)))

  if args.dmc:
    model = Llama(scanned, dmc_settings, "eval")

    @jax.jit
    def dmc(p, b):
      logits, aux = model.apply(p, b["tokens"], segment_ids_BxL=b["segment_ids"])
      kept, _ = cache_entries(aux["alpha"], b["segment_ids"], dmc_settings)
      return _nll(logits, b["targets"], b["loss_mask"]), kept
    out.append((dmc_settings.method, dmc_settings.method.upper(), None, functools.partial(dmc, sparams)))

  epar = evict_model.stack_params(cfg, params)
  for name in args.policy:
    for c in args.cr or [2.0]:
      pol = Policy(name, c, sinks=args.sinks, recent_fraction=args.recent_fraction)

      def run(p, b, pol=pol):
        logits, kept_LxBxLxK = evict_model.forward(cfg, pol, p, b["tokens"], b["segment_ids"])
        ends = b["ends"][None, :, :, None]
        return _nll(logits, b["targets"], b["loss_mask"]), jnp.sum(jnp.where(ends, kept_LxBxLxK, 0))
      out.append((name, LABELS[name], c, functools.partial(jax.jit(run), epar)))
  return out


def _fold_cache_aliases(args) -> None:
  """--cache NAME (the project-wide flag) into the --dmc / --policy lists this module works with."""
  for name in getattr(args, "cache", None) or []:
    if name in ("dmc", "dms"):
      args.dmc = True
      args.learned = name
    elif name != "vanilla" and name not in args.policy:
      args.policy.append(name)


def evaluate(args) -> dict:
  import jax
  _fold_cache_aliases(args)
  from dmc_jax import checkpoint
  from dmc_jax.config import DMCConfig
  ckpt = checkpoint.Checkpoint(args.ckpt)
  if args.out and os.path.isdir(args.out):
    raise ConfigError(f"--out {args.out}: is a directory (expected the path of a JSON file)")
  if args.seq_len > ckpt.config.max_position_embeddings:
    raise ConfigError(f"--seq-len: {args.seq_len} exceeds the model's {ckpt.config.max_position_embeddings} "
                      f"positions")
  if args.cr and not args.policy:
    raise ConfigError("--cr: sets the target CR of --policy; no --policy given")
  if any(c < 1 for c in args.cr):
    raise ConfigError(f"--cr: expected values >= 1, got {args.cr}")
  applied = None
  if getattr(args, "adapter", None):
    from dmc_jax import adapter as adapter_lib
    applied = adapter_lib.load(args.adapter)
    applied.check_base(ckpt)
    args.dmc = args.dmc or "vanilla" not in (args.cache or [])
  dmc_settings = None
  if args.dmc and applied is not None:
    dmc_settings = applied.dmc
  elif args.dmc:
    if not ckpt.dmc:
      raise ConfigError(f"--dmc: {ckpt.directory}/checkpoint.json has no DMC settings (not a DMC checkpoint)")
    dmc_settings = DMCConfig.from_dict(ckpt.dmc, where=f"{ckpt.directory}/checkpoint.json: compression")
  wanted = getattr(args, "learned", None)
  if dmc_settings is not None and wanted is not None and dmc_settings.method != wanted:
    raise ConfigError(f"--cache {wanted}: the weights were retrofitted with {dmc_settings.method}; use --cache "
                      f"{dmc_settings.method}")
  cfg = ckpt.config.replace(dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
  params = ckpt.load_params() if applied is None else applied.apply(ckpt.load_params())
  params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), params))
  batches = held_out_batches(ckpt.tokenizer(), args)
  for b in batches:
    b["ends"] = document_ends(b["segment_ids"])
  n_scored = int(sum(b["loss_mask"].sum() for b in batches))
  # The documents' lengths add up to the real tokens: the uncompressed entries, per layer and KV head.
  full_entries = int(sum((b["segment_ids"] > 0).sum() for b in batches)) * cfg.n_layers * cfg.n_kv_heads
  rows = []
  for method, label, cr_target, fn in scorers(cfg, params, args, dmc_settings):
    t0 = time.perf_counter()
    per_token, entries = [], 0.0
    for i, b in enumerate(batches):
      profiling.step(i + 1)  # --profile: batch i + 1 of the first method whose batches reach the window
      n, e = fn(b)
      per_token.append(np.asarray(n, np.float64)[np.asarray(b["loss_mask"]) > 0])  # row-major: the token order
      entries += float(e) if e is not None else 0.0
    nll_N = np.concatenate(per_token)
    nll = float(nll_N.sum())
    realised = cr_target if method in ("vanilla", "gqa") else full_entries / entries
    row = {"method": method, "label": label, "cr_target": cr_target, "realised_cr": round(realised, 4),
           "nll": nll / n_scored, "ppl": float(np.exp(nll / n_scored)), "seconds": round(time.perf_counter() - t0, 1),
           "blocks": token_blocks(nll_N)}
    log.info("%-12s CR target %s realised %.3f: ppl %.4f (%.1f s)", label, cr_target, realised, row["ppl"],
             row["seconds"])
    rows.append(row)
  return {"format": FORMAT, "checkpoint": ckpt.directory, "label": rows[0]["label"],
          "data": {"kind": args.data_kind, "paths": args.data_path, "split": "validation", "seq_len": args.seq_len,
                   "batch_size": args.batch_size, "rows": len(batches) * args.batch_size},
          "tokens_scored": n_scored, "tokens_sha256": tokens_digest(batches),
          "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "device": str(jax.devices()[0].device_kind)},
          "command": " ".join(sys.argv), "rows": rows}


def run(args: argparse.Namespace) -> None:
  with profiling.from_args(args, "eval", unit="batch"):
    result = evaluate(args)
  text = json.dumps(result, indent=2)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(f"{'method':<14} {'CR target':>9} {'realised CR':>11} {'ppl':>9}   ({result['tokens_scored']} tokens)")
  for r in result["rows"]:
    target = "-" if r["cr_target"] is None else f"{r['cr_target']:g}"
    print(f"{r['label']:<14} {target:>9} {r['realised_cr']:>11.3f} {r['ppl']:>9.4f}")
