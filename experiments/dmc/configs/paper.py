"""The paper's retrofitting recipe (docs/dmc.md §6) for Llama 2/3, on top of `base.base_config`.

No Llama weights ship with the project: set `model.init_from` to a checkpoint converted with `dmc-jax convert`
and `data.paths` (or `data.kind=tfds`) to a corpus. Without `init_from` the preset's shape is initialised at
random (planning, benchmarks). Variant `toy`: the same recipe (target CR, stages, gradient accumulation) on a
random 2-layer body with SmolLM2's tokenizer and the offline corpus, a CPU smoke run of seconds.
"""

from ml_collections import config_dict

from experiments.dmc.configs import base

VARIANTS = (None, "toy")
RAMP_STEPS_PER_CR = 6000  # the reference ramps CR 1 -> 2 over 6k steps of 1024 x 4096 tokens; same rate beyond
STAGE3_STEPS = 2000  # fine-tuning at the target CR


def llama(name: str, preset: str, target_cr: float, variant, path: str, *, micro_rows: int,
          mesh: tuple[int, int, int]) -> config_dict.ConfigDict:
  """`micro_rows`: sequences per microbatch (activations are per microbatch), so grad_accum = 1024 / micro_rows
  and one microbatch row per data-parallel device of `mesh` (data, fsdp, tensor)."""
  from experiments.harness.config import variant_error
  cfg = base.base_config(name, target_cr)
  cfg.model.preset = preset
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = "full"
  t = cfg.train
  t.stage1_steps = 250
  t.ramp_steps = round(RAMP_STEPS_PER_CR * (target_cr - 1))
  t.steps = t.stage1_steps + t.ramp_steps + STAGE3_STEPS
  t.lr = 3e-5
  t.decision_lr = 3e-5  # the paper's one LR; raise it for short runs (docs/dmc.md §6, "small budgets")
  t.warmup_steps = 100  # not stated by the paper: a short linear warmup before the cosine decay
  t.batch_size = 1024
  t.grad_accum = t.batch_size // micro_rows
  t.seq_len = 4096
  t.log_every = 10
  t.ckpt_every = 500
  t.eval_every = 500
  t.eval_batches = 16
  cfg.data.kind = "files"  # set data.paths (or data.kind=tfds + data.tfds_name): the offline corpus is 0.5 M tokens
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  if variant is None:
    return cfg
  if variant == "toy":
    return toy(cfg)
  raise variant_error(path, variant, VARIANTS)


def toy(cfg: config_dict.ConfigDict) -> config_dict.ConfigDict:
  cfg.model.preset = "smollm2-tiny"
  cfg.model.dtype = "float32"  # bf16 steps are slower on a CPU
  cfg.model.tokenizer_from = base.SMOLLM2_CKPT
  t = cfg.train
  t.steps, t.stage1_steps, t.ramp_steps = 8, 2, 4
  t.lr, t.decision_lr, t.warmup_steps = 1e-3, 3e-2, 1
  t.batch_size, t.grad_accum, t.seq_len = 4, 2, 64
  t.log_every, t.ckpt_every, t.eval_every, t.eval_batches = 2, 4, 0, 1
  cfg.data.kind = "stdlib"
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  return cfg
