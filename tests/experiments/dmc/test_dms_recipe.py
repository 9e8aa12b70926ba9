"""The DMS retrofit recipe variants (docs/dmc.md §10)."""

import pytest

from experiments.dmc.configs import base


def test_retrofit_recipe_variants():
  """distill_adapter for DMS: adapter decisions, base frozen, KL only, no stage 1, the decision LR over 100."""
  for size, steps in (("tiny", 36), ("cpu", 100)):
    cfg = base.smollm2_135m(2.0, f"distill_dms_adapter_{size}", "x.py")
    assert (cfg.dmc.method, cfg.dmc.decisions, cfg.train.trainable, cfg.train.loss) == (
        "dms", "adapter", "decisions", "distill")
    assert cfg.train.stage1_steps == 0 and cfg.train.steps == steps and cfg.train.decision_lr == pytest.approx(3e-5)
