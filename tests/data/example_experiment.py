"""An experiment config used only by the config-loader tests."""

from ml_collections import config_dict


def get_config(variant=None):
  cfg = config_dict.ConfigDict()
  cfg.seed = 0  # PRNG seed
  cfg.model = config_dict.ConfigDict()
  cfg.model.ckpt = config_dict.placeholder(str)  # converted checkpoint directory
  cfg.model.dtype = "float32"  # compute dtype
  cfg.train = config_dict.ConfigDict()
  cfg.train.steps = 1000  # optimizer steps
  cfg.train.lr = 3e-5  # peak learning rate
  if variant is None:
    return cfg
  if variant == "tiny":
    cfg.train.steps = 10
    return cfg
  raise ValueError(f"unknown variant {variant!r}; expected one of [None, 'tiny']")
