"""Retrofit SmolLM2-135M to DMC at CR 3 (init from `dmc-jax convert --from gguf` of the bundled model)."""

from experiments.dmc import base
from experiments.harness.config import variant_error

VARIANTS = (None, "tiny")


def get_config(variant=None):
  cfg = base.base_config("smollm2_135m_cr3", target_cr=3)
  cfg.model.init_from = ".work/ckpt/smollm2-135m-instruct"
  if variant is None:
    return cfg
  if variant == "tiny":
    cfg = base.tiny(cfg)
    cfg.model.init_from = None
    cfg.model.tokenizer_from = ".work/ckpt/smollm2-135m-instruct"
    return cfg
  raise variant_error(__file__, variant, VARIANTS)
