"""SDC-Net commands on the shared harness: `train`, `eval`, `predict`, `export` (the `sdc-jax` CLI calls these).

A run directory holds run.json (format, model config, normalisation, data settings, experiment config), Orbax
checkpoints, metrics.jsonl, tb/ and curves.png; eval and predict need only its path.

A model directory (`export`) is the shippable form of a run: the latest checkpoint's parameters as one
safetensors file (float32, keys are the parameter paths joined by "/"; no optimizer state) and a run.json of the
same format with the model config, normalisation and data settings, the checkpoint step, the file's sha256, and
the experiment config without machine-local paths. eval and predict accept it exactly like a run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from experiments.harness import profiling
from sdc_jax.errors import SDCError

if TYPE_CHECKING:  # annotations only; the modules import cv2 and jax
  from sdc_jax.data import DataSettings
  from sdc_jax.model import SDCNetConfig

log = logging.getLogger("dmc_jax")
FORMAT = "sdc-jax-run/1"
ENCODER = (32, 64, 128, 128, 256, 256, 256, 256, 512, 512)
DECODER = (256, 128, 64, 32, 16, 8)


def model_config(cfg) -> "SDCNetConfig":
  from sdc_jax.model import SDCNetConfig
  d = cfg.model.width_div
  if d < 1 or any(w % d for w in ENCODER + DECODER):
    raise SDCError(f"model.width_div: must divide every released width (1, 2, 4 or 8), got {d}")
  return SDCNetConfig(frames=cfg.model.frames, head=cfg.model.head, kernel_size=cfg.model.kernel_size,
                      motion=cfg.model.get("motion", "direct"),
                      encoder_widths=tuple(w // d for w in ENCODER), decoder_widths=tuple(w // d for w in DECODER),
                      center_logit_init=cfg.model.center_logit_init,
                      implementation=cfg.model.get("implementation"))


def data_settings(cfg) -> "DataSettings":
  from sdc_jax.data import DataSettings
  return DataSettings(train_videos=tuple(cfg.data.train_videos), eval_videos=tuple(cfg.data.eval_videos),
                      frames=cfg.model.frames, short_side=cfg.data.short_side, max_frames=cfg.data.max_frames,
                      cut_threshold=cfg.data.cut_threshold, flow=cfg.data.flow, crop=cfg.data.crop,
                      pad_small=cfg.data.pad_small)


def synthetic_options(cfg, settings) -> dict:
  """train_iterator's synthetic camera-motion arguments from cfg.data.synthetic (absent in older configs: off)."""
  from sdc_jax import data
  syn = cfg.data.get("synthetic")
  if syn is None or not syn.prob:
    return {}
  if not 0 <= syn.prob <= 1 or not 0 <= syn.still_prob <= 1:
    raise SDCError(f"data.synthetic.prob/still_prob: must lie in [0, 1], got {syn.prob} and {syn.still_prob}")
  stills = [data.read_still(n, settings.short_side or None) for n in syn.stills]
  return {"synthetic_prob": syn.prob, "flow": settings.flow, "still_prob": syn.still_prob if stills else 0.0,
          "camera": data.CameraMotion(syn.max_shift, syn.max_zoom, syn.max_rotate), "stills": stills}


def default_workdir(cfg) -> str:
  return cfg.workdir or os.path.join("runs", cfg.name)


# -- train --------------------------------------------------------------------------------------------------


def train(cfg, break_lock: bool = False, allow_config_change: bool = False) -> dict:
  import jax

  from experiments.harness.config import validate
  from experiments.sdc.configs.skvideo_sdc import RANGES
  validate(cfg, RANGES, where=cfg.get("name", "config"))
  from experiments.harness import trainer
  from sdc_jax import data
  from sdc_jax import train as sdc_train
  from sdc_jax.model import SDCNet, num_params
  mcfg = model_config(cfg)
  settings = data_settings(cfg)
  workdir = default_workdir(cfg)
  trainer.batch_size_check(cfg.train.batch_size, cfg.mesh.shape)
  t0 = time.perf_counter()
  builder = data.prepare(settings, cfg.data.data_dir)
  train_src = builder.as_data_source("train")
  test_src = builder.as_data_source("test") if settings.eval_videos else None
  prep_s = time.perf_counter() - t0
  log.info("data %s: %d training windows, %d held-out windows (%.1f s)", settings.key(), len(train_src),
           len(test_src) if test_src is not None else 0, prep_s)
  synthetic = synthetic_options(cfg, settings)
  model = SDCNet(mcfg)
  tx = sdc_train.make_optimizer(cfg.train.lr, cfg.train.decay_steps, cfg.train.decay_factor, cfg.train.grad_clip)
  eval_fn = None
  if test_src is not None and len(test_src):
    windows = data.eval_windows(test_src, cfg.data.eval_windows, stride=_stride(len(test_src), cfg.data.eval_windows))
    eval_step = sdc_train.make_eval_step(model)

    def eval_fn(state):
      res = evaluate_windows(eval_step, state["params"], windows)
      return {f"{m}/{k}": v for m, r in res.items() for k, v in r.items() if k in ("ssim_pix", "psnr")}

  task = trainer.Task(
      init=lambda rng: sdc_train.init_state(model, tx, rng, cfg.data.crop, cfg.data.crop),
      train_step=sdc_train.make_train_step(model, tx, tuple(cfg.train.loss_weights)),
      data=lambda: data.train_iterator(train_src, cfg.data.crop, cfg.train.batch_size, cfg.seed,
                                       cfg.data.reverse_prob, **synthetic),
      eval_fn=eval_fn,
      describe={"format": FORMAT, "model": mcfg.to_dict(), "data": dataclasses.asdict(settings),
                "normalisation": {"rgb": "minus per-sample channel mean of the inputs, / rgb_max",
                                  "flow": "(f - flow_mean) / (3 flow_std)", "rgb_max": mcfg.rgb_max,
                                  "flow_mean": mcfg.flow_mean, "flow_std": mcfg.flow_std},
                "experiment": json.loads(cfg.to_json_best_effort())})
  loop = trainer.LoopConfig(steps=cfg.train.steps, seed=cfg.seed, log_every=cfg.train.log_every,
                            ckpt_every=cfg.train.ckpt_every, eval_every=cfg.train.eval_every, keep=cfg.train.keep,
                            mesh_shape=tuple(cfg.mesh.shape), break_lock=break_lock,
                            allow_config_change=allow_config_change)
  res = trainer.train(task, loop, workdir)
  n = num_params(res.state["params"])
  summary = {"workdir": os.path.abspath(workdir), "params": n, "steps": cfg.train.steps,
             "resumed_from": res.start_step, "seconds": round(res.seconds, 1),
             "steps_per_second": round(res.steps_per_second, 3), "data_prep_seconds": round(prep_s, 1),
             "examples_seen": cfg.train.steps * cfg.train.batch_size, "crop": cfg.data.crop,
             "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}"}
  log.info("trained %s: %s", mcfg.head, summary)
  return summary


def _stride(n: int, k: int) -> int:
  return max(1, n // k) if k else 1


def evaluate_windows(eval_step, params, windows: Sequence[dict]) -> dict[str, dict[str, float]]:
  """Mean metrics per method (model, copy_last, flow_extrap) over windows (each evaluated at full size)."""
  import jax
  acc: dict[str, dict[str, list]] = {}
  for w in windows:
    batch = {"frames": w["frames"][None], "flows": w["flows"][None]}
    for method, ms in jax.device_get(eval_step(params, batch)).items():
      for k, v in ms.items():
        acc.setdefault(method, {}).setdefault(k, []).extend(np.asarray(v).tolist())
  return {m: {k: float(np.mean(v)) for k, v in ms.items()} for m, ms in acc.items()}


# -- loading a run ------------------------------------------------------------------------------------------


PARAMS_FILE = "params.safetensors"


def _flatten(tree, prefix=()) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = np.ascontiguousarray(np.asarray(v))
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _sha256(path: str) -> str:
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_run(workdir: str):
  """(SDCNetConfig, DataSettings dict, params, step) of a run directory's latest checkpoint or of a model
  directory written by `export`."""
  from experiments.harness import orbax_ckpt
  from sdc_jax.model import SDCNetConfig
  meta = orbax_ckpt.read_run_json(workdir, FORMAT)
  mcfg = SDCNetConfig.from_dict(meta["model"])
  if meta.get("params_file"):
    from safetensors.numpy import load_file
    path = os.path.join(workdir, meta["params_file"])
    if not os.path.exists(path):
      raise SDCError(f"{path}: missing (the model directory's run.json names it)")
    if meta.get("params_sha256") and _sha256(path) != meta["params_sha256"]:
      raise SDCError(f"{path}: sha256 differs from run.json's (corrupt or replaced parameters)")
    try:
      params = _unflatten(load_file(path))
    except Exception as e:  # safetensors raises its own types for truncated or foreign files
      raise SDCError(f"{path}: cannot read as safetensors ({e})") from None
    return mcfg, meta["data"], params, int(meta["checkpoint_step"])
  step, state = orbax_ckpt.restore_raw(workdir)
  return mcfg, meta["data"], state["params"], step


def export(workdir: str, out: str) -> dict:
  """Writes a self-contained model directory (module docstring) from a run's latest checkpoint."""
  from safetensors.numpy import save_file

  from experiments.harness import orbax_ckpt
  from sdc_jax.model import num_params
  meta = orbax_ckpt.read_run_json(workdir, FORMAT)
  mcfg, settings, params, step = load_run(workdir)
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise SDCError(f"--out: {out} is the run directory itself; name a new folder")
  if os.path.exists(os.path.join(out, "run.json")) or os.path.exists(os.path.join(out, PARAMS_FILE)):
    raise SDCError(f"{out}: already holds a model or run; remove it or choose another --out")
  os.makedirs(out, exist_ok=True)
  flat = {k: v.astype(np.float32) for k, v in _flatten(params).items()}
  path = os.path.join(out, PARAMS_FILE)
  save_file(flat, path, metadata={"format": FORMAT, "checkpoint_step": str(step)})
  experiment = dict(meta.get("experiment") or {})
  experiment.pop("workdir", None)  # machine-local paths do not travel with the model
  if isinstance(experiment.get("data"), dict):
    experiment["data"] = {k: v for k, v in experiment["data"].items() if k != "data_dir"}
  model_meta = {"format": FORMAT, "kind": "model", "model": mcfg.to_dict(), "normalisation": meta["normalisation"],
                "data": settings, "checkpoint_step": int(step), "params_file": PARAMS_FILE,
                "params_sha256": _sha256(path), "params": num_params(params), "experiment": experiment}
  orbax_ckpt.write_run_json(out, model_meta)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  return {"out": os.path.abspath(out), "checkpoint_step": int(step), "params": num_params(params), "bytes": size}


def _clip_frames(video: str, settings: dict, max_frames: int = 0) -> np.ndarray:
  from sdc_jax import data
  return data.read_video(video, max_frames=max_frames or None, short_side=settings.get("short_side") or None)


# -- eval ---------------------------------------------------------------------------------------------------


def evaluate(workdir: str, videos: Sequence[str] = (), steps: int = 3, out: str | None = None,
             max_windows: int = 0, max_frames: int = 0) -> dict:
  """Next-frame and k-step recursive metrics per clip, beside copy-last-frame and flow extrapolation."""
  import jax

  from sdc_jax import data
  from sdc_jax import flow as flow_lib
  from sdc_jax.predict import Predictor
  from sdc_jax.train import eval_step_for
  mcfg, settings, params, ckpt_step = load_run(workdir)
  params = jax.device_put(params)
  videos = list(videos) or list(settings["eval_videos"])
  if not videos:
    raise SDCError(f"{workdir}: the run has no eval_videos; name videos to evaluate")
  estimator = flow_lib.make_estimator(settings["flow"])
  eval_step = eval_step_for(mcfg)
  predictor = Predictor(mcfg, params, estimator)
  out = out or os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  s = mcfg.frames
  results = {"checkpoint_step": ckpt_step, "head": mcfg.head, "clips": {}}
  for video in videos:
    name = data.clip_name(video)
    frames = _clip_frames(video, settings, max_frames)
    if len(frames) < s + 1:
      raise SDCError(f"{data.resolve(video)}: {len(frames)} frame(s), need at least {s + 1}")
    if steps < 0 or len(frames) < s + steps:
      raise SDCError(f"--steps {steps}: {data.resolve(video)} has {len(frames)} frame(s); {steps}-step recursive "
                     f"prediction needs at least {s + steps} ({s} inputs + {steps}) and steps >= 0")
    cuts = data.scene_cuts(frames, settings["cut_threshold"])
    bwd = flow_lib.backward_flows(frames, estimator)  # bwd[t-1] = flow from frame t to t-1
    starts = data.window_starts(len(frames), s + 1, cuts)
    if max_windows:
      starts = starts[::max(1, len(starts) // max_windows)][:max_windows]
    windows = [{"frames": frames[t:t + s + 1], "flows": bwd[t:t + s - 1]} for t in starts]
    nxt = evaluate_windows(eval_step, params, windows)
    # k-step recursive from a few cut-free starting points (model and flow extrapolation use the same estimator)
    rec_starts = data.window_starts(len(frames), s + steps, cuts)
    rec_starts = rec_starts[::max(1, len(rec_starts) // 4)][:4] if steps > 0 else []
    rec = _recursive(predictor, frames, rec_starts, steps) if rec_starts else None
    grid = os.path.join(out, f"{name}.png")
    _grid(predictor, windows, starts, grid, s)
    results["clips"][name] = {"frames": int(len(frames)), "size": list(frames.shape[1:3]), "cuts": cuts,
                              "windows": len(windows), "next_frame": nxt, f"recursive_{steps}": rec, "grid": grid}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _recursive(predictor, frames, starts, steps) -> dict[str, dict[str, float]]:
  from sdc_jax import metrics
  s = predictor.cfg.frames
  acc: dict[str, dict[str, list]] = {}
  for t in starts:
    hist, target = frames[t:t + s], frames[t + s + steps - 1]
    preds = {"model": predictor.rollout(hist, steps)[-1], "copy_last": hist[-1],
             "flow_extrap": predictor.extrapolate_flow(hist, steps)[-1]}
    for m, p in preds.items():
      for k, v in metrics.all_metrics(p.astype(np.float32), target.astype(np.float32)).items():
        acc.setdefault(m, {}).setdefault(k, []).append(float(v[0]))
  return {m: {k: float(np.mean(v)) for k, v in ms.items()} for m, ms in acc.items()}


def _grid(predictor, windows, starts, path, s, rows: int = 3) -> None:
  """Rows of: inputs, prediction, ground truth, |error| ×4 (three windows spread over the clip)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pick = np.linspace(0, len(windows) - 1, min(rows, len(windows))).round().astype(int)
  cols = s + 3
  fig, axes = plt.subplots(len(pick), cols, figsize=(2.6 * cols, 2.2 * len(pick)), squeeze=False)
  for r, i in enumerate(pick):
    w = windows[i]
    pred = predictor.next_frame(w["frames"][:s], w["flows"])
    target = w["frames"][s]
    err = np.clip(np.abs(pred.astype(np.int16) - target).mean(-1) * 4, 0, 255).astype(np.uint8)
    panels = [*w["frames"][:s], pred, target, err]
    titles = [f"input t-{s - 1 - j}" if j < s - 1 else "input t" for j in range(s)] + \
             ["prediction t+1", "ground truth t+1", "|error| ×4"]
    for c, (img, title) in enumerate(zip(panels, titles)):
      ax = axes[r, c]
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
      ax.set_title(f"{title} (frame {starts[i] + min(c, s)})" if c == 0 else title, fontsize=8)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def format_results(results: dict) -> str:
  lines = []
  for clip, r in results["clips"].items():
    for kind in [k for k in r if k == "next_frame" or k.startswith("recursive_")]:
      if not r[kind]:
        continue
      lines.append(f"{clip} ({r['windows']} windows, {r['size'][1]}x{r['size'][0]}) {kind.replace('_', ' ')}:")
      lines.append(f"  {'method':<12} {'SSIM(pix)':>9} {'SSIM(skimage)':>13} {'PSNR':>7} {'L1':>7}")
      for m in ("model", "copy_last", "flow_extrap"):
        v = r[kind][m]
        label = f"sdc-net/{results['head']}" if m == "model" else m
        lines.append(f"  {label:<12} {v['ssim_pix']:>9.4f} {v['ssim_skimage']:>13.4f} {v['psnr']:>7.2f} "
                     f"{v['l1']:>7.2f}")
  return "\n".join(lines)


# -- predict ------------------------------------------------------------------------------------------------


def predict(workdir: str, video: str, out: str, steps: int | None = None, max_frames: int = 0,
            fps: float | None = None) -> dict:
  """With steps: the video followed by K recursively predicted frames. Without: the next-frame prediction for
  every window (frame t+1 predicted from frames ≤ t; the first s frames are copied)."""
  import jax

  from sdc_jax import data
  from sdc_jax import flow as flow_lib
  from sdc_jax.predict import Predictor
  mcfg, settings, params, _ = load_run(workdir)
  estimator = flow_lib.make_estimator(settings["flow"])
  predictor = Predictor(mcfg, jax.device_put(params), estimator)
  frames = _clip_frames(video, settings, max_frames)
  s = mcfg.frames
  if len(frames) < s + (0 if steps else 1):
    raise SDCError(f"{data.resolve(video)}: {len(frames)} frame(s), need at least {s + (0 if steps else 1)}")
  if steps is not None:
    if steps < 1:
      raise SDCError(f"--steps: must be at least 1, got {steps}")
    written = np.concatenate([frames, predictor.rollout(frames, steps, on_step=lambda i: profiling.step(i + 1))])
  else:
    bwd = flow_lib.backward_flows(frames, estimator)
    preds = []
    for t in range(len(frames) - s):
      profiling.step(t + 1)  # --profile: frame t + 1 (docs/profiling.md)
      preds.append(predictor.next_frame(frames[t:t + s], bwd[t:t + s - 1]))
    written = np.concatenate([frames[:s], np.stack(preds)])
  write_mp4(out, written, output_fps(video, fps, out))
  return {"out": os.path.abspath(out), "frames": int(len(written)), "size": list(written.shape[1:3]),
          "predicted": int(steps if steps is not None else len(frames) - s)}


DEFAULT_FPS = 25.0


def output_fps(video: str, fps: float | None, out: str) -> float:
  """`fps` if given (positive), else the input video's rate; a frame folder (or a file without a usable rate) has
  none, so DEFAULT_FPS with a note — OpenCV cannot open a writer at 0 fps."""
  import cv2

  from sdc_jax import data
  if fps is not None:
    if not 0 < fps < float("inf"):
      raise SDCError(f"--fps: expected a positive frame rate, got {fps}")
    return float(fps)
  path = data.resolve(video)
  rate = 0.0
  if os.path.isfile(path):
    cap = cv2.VideoCapture(path)
    rate = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
  if not 0 < rate < 1000:  # NaN and 0 included
    log.warning("%s has no frame rate; writing %s at %g fps (set --fps to choose)", video, out, DEFAULT_FPS)
    return DEFAULT_FPS
  return float(rate)


def write_mp4(path: str, frames_TxHxWx3: np.ndarray, fps: float) -> None:
  import cv2
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  h, w = frames_TxHxWx3.shape[1:3]
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
  if not writer.isOpened():
    raise SDCError(f"{path}: OpenCV cannot open an mp4 writer here")
  try:
    for f in frames_TxHxWx3:
      writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  finally:
    writer.release()
