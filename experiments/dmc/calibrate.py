"""`dmc-jax calibrate BASE ADAPTER --target-cr CR --out DIR`: an adapter whose noise-free decisions realise CR.

    dmc-jax calibrate .work/ckpt/smollm2-135m-instruct runs/r21/dms_cr4/adapter --target-cr 4 \
        --out runs/r21/dms_cr4/adapter_cal

The tensors are copied byte for byte; adapter.json gets `dmc.decision_bias` (dmc_jax/calibrate.py), `target_cr`,
and `provenance.calibration`: the bias, the CR it realises on the calibration rows, every iteration, and which
rows — the first `--tokens` of the *training* split in stored order, in rows of `--seq-len` (the held-out split
`dmc-jax eval` scores is not read). An `evaluation` the input carried no longer holds and moves to
`provenance.calibration.evaluation_before`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from experiments.dmc import eval as eval_dmc

log = logging.getLogger("dmc_jax")


def configure(p: argparse.ArgumentParser) -> None:
  from experiments.harness import cli
  p.add_argument("base", help="the base checkpoint the adapter was trained on")
  p.add_argument("adapter", help="adapter directory (dmc or dms decisions)")
  p.add_argument("--target-cr", type=cli.float_range(1.0), required=True, help="CR the decisions should realise")
  p.add_argument("--out", required=True, help="output adapter directory")
  p.add_argument("--force", action="store_true", help="replace --out if it exists (never an input)")
  p.add_argument("--tokens", type=cli.positive_int, default=8192, help="calibration tokens (whole rows)")
  p.add_argument("--seq-len", type=cli.int_range(2), default=1024, help="row length: the length inference sees")
  p.add_argument("--tol", type=cli.float_range(0.0, 1.0), default=0.005, help="relative tolerance on the CR")
  eval_dmc.add_data_arguments(p)


def run(args: argparse.Namespace) -> None:
  import jax

  from dmc_jax import adapter as adapter_lib
  from dmc_jax import calibrate, checkpoint
  from dmc_jax.config import ConfigError
  from dmc_jax.convert import layout
  base = checkpoint.Checkpoint(args.base)
  ad = adapter_lib.load(args.adapter)
  ad.check_base(base)
  if args.seq_len > base.config.max_position_embeddings:
    raise ConfigError(f"--seq-len: {args.seq_len} exceeds the model's {base.config.max_position_embeddings} "
                      f"positions")
  batches = eval_dmc.split_batches(base.tokenizer(), args, "train", args.tokens, batch_size=1)
  cfg = base.config.replace(dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="none")
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), ad.apply(base.load_params()))
  sparams = jax.device_put({"params": layout.stack_layers(params["params"], cfg.n_layers, stack=np.stack)})
  t0 = time.perf_counter()

  def progress(row):
    log.info("calibration %d: decision_bias %+.4f → realised CR %.4f (%.1f s)", row["iteration"],
             row["decision_bias"], row["realised_cr"], time.perf_counter() - t0)

  cal = calibrate.calibrate(cfg, sparams, ad.dmc, batches, args.target_cr, tol=args.tol, progress=progress)
  meta = dict(ad.meta, dmc=cal.dmc.to_dict(), target_cr=args.target_cr)
  record = dict(cal.to_dict(), data={"kind": args.data_kind, "paths": args.data_path, "split": "train",
                                     "seq_len": args.seq_len, "rows": len(batches),
                                     "tokens": int(sum(int((b["segment_ids"] > 0).sum()) for b in batches)),
                                     "tokens_sha256": eval_dmc.tokens_digest(batches)},
                command=" ".join(sys.argv), seconds=round(time.perf_counter() - t0, 1), source=ad.directory)
  if "evaluation" in meta:
    record["evaluation_before"] = meta.pop("evaluation")
  meta["provenance"] = dict(meta.get("provenance") or {}, calibration=record)
  adapter_lib.write_copy(ad, args.out, meta, force=args.force, inputs=(args.adapter, args.base))
  log.info("calibrated: decision_bias %+.4f, realised CR %.4f on %d training-split tokens (target %g) → %s",
           cal.dmc.decision_bias, cal.realised_cr, record["data"]["tokens"], args.target_cr, args.out)
  print(os.path.abspath(args.out))
