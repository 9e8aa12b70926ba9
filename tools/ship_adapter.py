"""Copies a trained adapter into models/ with what was measured of it: the target CR, and the held-out perplexity
and realised CR of its `dmc-jax eval --out` JSON (the compressed row and the reference's vanilla row).

    python tools/ship_adapter.py runs/r21/dms_cr2/adapter docs/retrofit/eval_dms_cr2.json --target-cr 2 \
        --out models/smollm2-135m-instruct/dms-adapter-cr2

The tensors are copied byte for byte (their sha256 in adapter.json still holds); adapter.json gains `target_cr`
and `evaluation`. The output is written atomically; an existing one is replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import sys

from dmc_jax import adapter as adapter_lib
from dmc_jax.errors import UserError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("adapter")
  p.add_argument("eval_json")
  p.add_argument("--target-cr", type=float, required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--force", action="store_true")
  a = p.parse_args(argv)
  try:
    ad = adapter_lib.load(a.adapter)  # verifies the tensors' sha256
    with open(a.eval_json) as f:
      ev = json.load(f)
    rows = ev.get("rows") or []
    learned = [r for r in rows if r.get("method") == ad.method]
    vanilla = [r for r in rows if r.get("method") == "vanilla"]
    if len(learned) != 1 or len(vanilla) != 1:
      raise UserError(f"{a.eval_json}: expected one {ad.method!r} row and one vanilla row, got "
                      f"{[r.get('method') for r in rows]}")
    meta = dict(ad.meta, target_cr=a.target_cr, evaluation={
        "perplexity": round(learned[0]["ppl"], 4), "realised_cr": learned[0]["realised_cr"],
        "vanilla_perplexity": round(vanilla[0]["ppl"], 4), "tokens_scored": ev["tokens_scored"],
        "tokens_sha256": ev["tokens_sha256"], "data": ev["data"], "command": ev["command"],
        "machine": ev["machine"]})
    adapter_lib.write_copy(ad, a.out, meta, force=a.force, inputs=(a.adapter, a.eval_json))
  except (UserError, OSError, KeyError, json.JSONDecodeError) as e:
    print(f"ship_adapter: {e}", file=sys.stderr)
    return 2
  print(a.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
