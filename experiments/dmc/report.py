"""`dmc-jax report RESULTS.json... --out DIR`: one Markdown table and one plot (perplexity vs realised CR, a line
per method) from `dmc-jax eval` results. Refuses results measured on different held-out tokens.

Every compressed row is compared with a reference row by a paired block bootstrap of the mean NLL difference
(blocks of 128 consecutive scored tokens, resampled together for both rows, 10,000 resamples, 95% percentile
interval): by default the reference is the vanilla row of the same `dmc-jax eval` file (the same weights without
compression), `--pair LABEL=REFERENCE` names another (a distillation-only method against the original model, or
a learned method against a policy: `LABEL@CR` names one CR of a policy's rows).
"""

from __future__ import annotations

import json
import os

import numpy as np

from dmc_jax.config import ConfigError
from experiments.dmc import eval as eval_dmc


def load(paths: list[str]) -> tuple[list[dict], dict]:
  rows, seen, digest = [], set(), None
  for path in paths:
    with open(path) as f:
      try:
        res = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    if res.get("format") != eval_dmc.FORMAT:
      raise ConfigError(f"{path}: format {res.get('format')!r}, expected {eval_dmc.FORMAT!r} (`dmc-jax eval --out`)")
    if digest is None:
      digest = {"tokens_sha256": res["tokens_sha256"], "tokens_scored": res["tokens_scored"], "data": res["data"],
                "machine": res["machine"]}
    elif res["tokens_sha256"] != digest["tokens_sha256"]:
      raise ConfigError(f"{path}: evaluated on other tokens (digest {res['tokens_sha256']}, the first file's "
                        f"{digest['tokens_sha256']}): rerun `dmc-jax eval` with the same data, --seq-len and --tokens")
    source = res["rows"][0]["label"].removesuffix(", vanilla attention")
    many = len(paths) > 1
    for r in res["rows"]:
      label = r["label"]
      if r["method"] == "dmc":  # eval names it "DMC"; the file's --label says which retrofit it is
        label = source
      elif r["method"] not in ("vanilla", "gqa") and many:
        label = f"{label} on {source}"
      key = (label, r["method"], r["cr_target"], r["realised_cr"])
      if key not in seen:  # the base model's vanilla row repeats in every file
        seen.add(key)
        rows.append(dict(r, label=label, checkpoint=res["checkpoint"], reference=res["rows"][0]["label"]))
  return rows, digest


def paired_bootstrap(row: dict, ref: dict, resamples: int = 10_000, seed: int = 0) -> dict | None:
  """Mean NLL difference row − ref over the same tokens, with the 95% percentile interval of a bootstrap that
  resamples blocks of consecutive tokens (both rows' blocks together, so the pairing removes the tokens' own
  difficulty). None for results written before eval kept blocks."""
  a, b = row.get("blocks"), ref.get("blocks")
  if not a or not b:
    return None
  if a["counts"] != b["counts"]:
    raise ConfigError(f"{row['label']} and {ref['label']}: blocks of other tokens (rerun `dmc-jax eval`)")
  diff = np.asarray(a["nll_sums"]) - np.asarray(b["nll_sums"])
  counts = np.asarray(a["counts"], np.float64)
  idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
  means = diff[idx].sum(1) / counts[idx].sum(1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"reference": ref["label"], "mean": float(diff.sum() / counts.sum()), "lo": float(lo), "hi": float(hi),
          "blocks": int(len(diff))}


def compare(rows: list[dict], pairs: dict[str, str] | None = None) -> None:
  """Adds `vs_reference` (paired_bootstrap) to every row that is not its own reference."""
  pairs = pairs or {}
  by_label: dict[str, list[dict]] = {}
  for r in rows:  # a policy's label repeats over its CRs: "LABEL@CR" names one of them
    by_label.setdefault(r["label"], []).append(r)
    if r["cr_target"] is not None:
      by_label.setdefault(f"{r['label']}@{r['cr_target']:g}", []).append(r)
  for name in list(pairs) + list(pairs.values()):
    if name not in by_label:
      raise ConfigError(f"--pair: no row labelled {name!r} (labels: {', '.join(sorted(by_label))})")
    if len(by_label[name]) > 1 and name in pairs.values():
      raise ConfigError(f"--pair: {name!r} names {len(by_label[name])} rows; add @CR (e.g. {name}@2)")
  for r in rows:
    name = pairs.get(f"{r['label']}@{r['cr_target']:g}" if r["cr_target"] is not None else None,
                     pairs.get(r["label"], r["reference"]))
    ref = by_label.get(name, [None])[0]
    if ref is not None and ref is not r:
      r["vs_reference"] = paired_bootstrap(r, ref)


def _base_ppl(rows: list[dict]) -> float | None:
  vanilla = [r for r in rows if r["method"] == "vanilla"]
  return vanilla[0]["ppl"] if vanilla else None


def table(rows: list[dict], digest: dict) -> str:
  base = _base_ppl(rows)
  lines = [f"Held-out perplexity, {digest['tokens_scored']} tokens ({digest['data']['kind']} "
           f"{digest['data']['split']} split, rows of {digest['data']['seq_len']}; digest "
           f"{digest['tokens_sha256']}).", "",
           "| method | CR target | realised CR | perplexity | vs first vanilla row | reference | ΔNLL vs reference "
           "[95% CI] |", "|---|---:|---:|---:|---:|---|---|"]
  for r in sorted(rows, key=lambda r: (r["realised_cr"], r["label"])):
    target = "—" if r["cr_target"] is None else f"{r['cr_target']:g}"
    rel = f"{r['ppl'] / base - 1:+.1%}" if base else "—"
    v = r.get("vs_reference")
    ref, delta = ("—", "—") if v is None else (v["reference"], f"{v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
    lines.append(f"| {r['label']} | {target} | {r['realised_cr']:.2f} | {r['ppl']:.3f} | {rel} | {ref} | {delta} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(10, 4.6))
  lines: dict[str, list[dict]] = {}
  for r in rows:
    lines.setdefault(r["label"], []).append(r)
  base = [r for r in rows if r["method"] == "vanilla"][:1]
  colors = plt.get_cmap("tab10").colors  # one colour per label: matplotlib's separate scatter/plot cycles collide
  for i, (label, rs) in enumerate(sorted(lines.items())):
    color = colors[i % len(colors)]
    if rs[0]["method"] in ("vanilla",) and len(rs) == 1:
      ax.scatter([rs[0]["realised_cr"]], [rs[0]["ppl"]], marker="*", s=120, label=label, zorder=3, color=color)
      continue
    if rs[0]["method"] in ("streaming", "h2o", "tova"):
      rs = base + rs  # a policy at CR 1 is the vanilla model
    rs = sorted(rs, key=lambda r: r["realised_cr"])
    # Error bars: the reference's perplexity times exp(the paired interval of the NLL difference).
    err = np.array([[r["ppl"] - r["ppl"] * np.exp(r["vs_reference"]["lo"] - r["vs_reference"]["mean"]),
                     r["ppl"] * np.exp(r["vs_reference"]["hi"] - r["vs_reference"]["mean"]) - r["ppl"]]
                    if r.get("vs_reference") else [0.0, 0.0] for r in rs]).T
    ax.errorbar([r["realised_cr"] for r in rs], [r["ppl"] for r in rs], yerr=err, marker="o", capsize=3,
                label=label, color=color)
  ax.set_xlabel("realised compression ratio (KV cache)")
  ax.set_ylabel("held-out perplexity")
  ppl = [r["ppl"] for r in rows]
  if max(ppl) > 5 * min(ppl):  # one collapsed method would flatten every other line
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it hid points
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(paths: list[str], out: str, pairs: dict[str, str] | None = None) -> tuple[str, str]:
  rows, digest = load(paths)
  compare(rows, pairs)
  os.makedirs(out, exist_ok=True)
  md = os.path.join(out, "report.md")
  with open(md, "w") as f:
    f.write(table(rows, digest))
  return md, plot(rows, os.path.join(out, "ppl_vs_cr.png"))
