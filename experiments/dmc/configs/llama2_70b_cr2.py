"""Retrofit Llama 2 70B (GQA + DMC) at CR 2 with the paper's recipe. Plan the mesh before renting it:

    dmc-jax plan --config experiments/dmc/configs/llama2_70b_cr2.py --config.mesh.fsdp=N --config.mesh.tensor=M

The default mesh is the smallest H100-80GB mesh that fits (README "Planning 70B"): 32 GPUs as fsdp 4 x tensor 8
(tensor parallelism inside each 8-GPU node), one 4k row per fsdp group per microbatch. Set model.init_from and
data.paths to run.
"""

from experiments.dmc.configs import paper


def get_config(variant=None):
  return paper.llama("llama2_70b_cr2", "llama2-70b", 2, variant, __file__, micro_rows=4, mesh=(-1, 4, 8))
