"""SDC-Net with the vector head (flow warping only, NVIDIA's released variant) on the same data and budget as
skvideo_sdc.py: the comparison the SDC head has to win."""

import importlib.util
import os

VARIANTS = (None, "tiny", "demo", "cpu", "shipped")


def get_config(variant=None):
  # Loaded by path (the config loader does not import packages): load the sibling file the same way.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skvideo_sdc.py")
  spec = importlib.util.spec_from_file_location("_skvideo_sdc_base", path)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  cfg = base.get_config(variant)
  cfg.name = "skvideo_vector"
  cfg.model.head = "vector"
  return cfg
