"""`dmc-jax report RESULTS.json... --out DIR`: one Markdown table and one plot (perplexity vs realised CR, a line
per method) from `dmc-jax eval` results. Refuses results measured on different held-out tokens."""

from __future__ import annotations

import json
import os

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
    for r in res["rows"]:
      key = (r["label"], r["method"], r["cr_target"], r["realised_cr"])
      if key not in seen:  # the base model's vanilla row repeats in every file
        seen.add(key)
        rows.append(dict(r, checkpoint=res["checkpoint"]))
  return rows, digest


def _base_ppl(rows: list[dict]) -> float | None:
  vanilla = [r for r in rows if r["method"] == "vanilla"]
  return vanilla[0]["ppl"] if vanilla else None


def table(rows: list[dict], digest: dict) -> str:
  base = _base_ppl(rows)
  lines = [f"Held-out perplexity, {digest['tokens_scored']} tokens ({digest['data']['kind']} "
           f"{digest['data']['split']} split, rows of {digest['data']['seq_len']}; digest "
           f"{digest['tokens_sha256']}).", "",
           "| method | CR target | realised CR | perplexity | vs first vanilla row |", "|---|---:|---:|---:|---:|"]
  for r in sorted(rows, key=lambda r: (r["realised_cr"], r["label"])):
    target = "—" if r["cr_target"] is None else f"{r['cr_target']:g}"
    rel = f"{r['ppl'] / base - 1:+.1%}" if base else "—"
    lines.append(f"| {r['label']} | {target} | {r['realised_cr']:.2f} | {r['ppl']:.3f} | {rel} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    ax.plot([r["realised_cr"] for r in rs], [r["ppl"] for r in rs], marker="o", label=label, color=color)
  ax.set_xlabel("realised compression ratio (KV cache)")
  ax.set_ylabel("held-out perplexity")
  ppl = [r["ppl"] for r in rows]
  if max(ppl) > 5 * min(ppl):  # one collapsed method would flatten every other line
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(paths: list[str], out: str) -> tuple[str, str]:
  rows, digest = load(paths)
  os.makedirs(out, exist_ok=True)
  md = os.path.join(out, "report.md")
  with open(md, "w") as f:
    f.write(table(rows, digest))
  return md, plot(rows, os.path.join(out, "ppl_vs_cr.png"))
