"""Retrofit Llama 2 70B (GQA + DMC) at CR 2 with the paper's recipe. Plan the mesh before renting it:

    dmc-jax plan --config experiments/dmc/llama2_70b_cr2.py --config.mesh.fsdp=N --config.mesh.tensor=M

(README "Planning 70B": the smallest H100-80GB mesh that fits). Set model.init_from and data.paths to run.
"""

from experiments.dmc import paper


def get_config(variant=None):
  return paper.llama("llama2_70b_cr2", "llama2-70b", 2, variant, __file__, micro_rows=64, mesh=(1, -1, 1))
