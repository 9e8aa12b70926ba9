"""Retrofit Llama 2 7B (MHA) to DMC at CR 4 with the paper's recipe: 8 H100s, FSDP, one 4k row per GPU per
microbatch (set model.init_from to a converted checkpoint and data.paths to a corpus; see
experiments/dmc/configs/paper.py)."""

from experiments.dmc.configs import paper


def get_config(variant=None):
  return paper.llama("llama2_7b_cr4", "llama2-7b", 4, variant, __file__, micro_rows=8, mesh=(-1, 8, 1))
