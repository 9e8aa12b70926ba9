"""Retrofit SmolLM2-135M to DMC at CR 3 (init from `dmc-jax convert --from gguf` of the bundled model)."""

from experiments.dmc.configs import base


def get_config(variant=None):
  return base.smollm2_135m(3, variant, __file__)
