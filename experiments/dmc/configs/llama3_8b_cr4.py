"""Retrofit Llama 3 8B (GQA, 8 KV heads) to DMC at CR 4 with the paper's recipe: 8 H100s, FSDP, one 4k row per
GPU per microbatch (set model.init_from to a converted checkpoint and data.paths to a corpus; see
experiments/dmc/configs/paper.py)."""

from experiments.dmc.configs import paper


def get_config(variant=None):
  return paper.llama("llama3_8b_cr4", "llama3-8b", 4, variant, __file__, micro_rows=8, mesh=(-1, 8, 1))
