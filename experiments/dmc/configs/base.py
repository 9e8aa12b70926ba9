"""Fields shared by every DMC retrofitting experiment (each experiment file sets its model and target CR)."""

from ml_collections import config_dict


def base_config(name: str, target_cr: float) -> config_dict.ConfigDict:
  cfg = config_dict.ConfigDict()
  cfg.name = name  # run name (default workdir runs/<name>)
  cfg.workdir = config_dict.placeholder(str)  # run directory: Orbax checkpoints, metrics, plots, the DMC checkpoint
  cfg.seed = 0  # PRNG seed (init, Gumbel noise, data order)

  cfg.model = config_dict.ConfigDict()
  cfg.model.init_from = config_dict.placeholder(str)  # converted checkpoint to retrofit (None: random preset)
  cfg.model.preset = "smollm2-135m"  # shape for random init (planning, benchmarks) when init_from is None
  cfg.model.tokenizer_from = config_dict.placeholder(str)  # checkpoint whose tokenizer to use (default init_from)
  cfg.model.dtype = "float32"  # compute dtype (float32 on CPU, where bf16 steps are slower; bfloat16 on GPU)
  cfg.model.remat = "full"  # remat policy: none | full | dots | dots_no_batch
  cfg.model.attention_impl = "auto"  # DMC attention: auto (Pallas on GPU, XLA elsewhere) | xla | pallas

  cfg.dmc = config_dict.ConfigDict()
  cfg.dmc.decision_channel = "last"  # "last" (NVIDIA's code) or "first" (the paper)
  cfg.dmc.window = 12  # partial-accumulation window W
  cfg.dmc.temperature = 0.1  # Gumbel-sigmoid tau
  cfg.dmc.offset = 5.0  # c in a = k[ch] - c
  cfg.dmc.decisions = "channel"  # channel (repurposed q/k channel ch) | adapter (zero-initialised decision adapter)
  cfg.dmc.method = "dmc"  # dmc (merge) | dms (delayed eviction, docs/dmc.md §10)
  cfg.dmc.dms_window = 16  # DMS: w, steps a token stays visible whatever its decision (CR ≲ seq_len / w)
  cfg.dmc.dms_scale = 100.0  # DMS: decision logit = scale · (q[ch] or adapter output) − offset

  cfg.train = config_dict.ConfigDict()
  cfg.train.mode = "dmc"  # dmc | vanilla (the continued-training baseline: same LR, data and tokens, no DMC)
  cfg.train.target_cr = float(target_cr)  # compression ratio reached at the end of stage 2
  cfg.train.steps = 1000  # total optimizer steps (stages 1 + 2 + 3)
  cfg.train.stage1_steps = 50  # stage 1: channel fade-out, then decision-row surgery
  cfg.train.ramp_steps = 700  # stage 2: target CR ramps 1 -> target_cr; the rest is stage 3 at target_cr
  cfg.train.lr = 3e-5  # peak learning rate (warmup then cosine)
  cfg.train.decision_lr = 1e-3  # learning rate of the q/k rows producing channel ch (docs/dmc.md §6: small budgets)
  cfg.train.cr_weight = 1.0  # weight of the CR loss (paper: 1; short runs need more, see dmc_jax/train.py)
  cfg.train.cr_loss = "one_sided"  # one_sided (paper: compressing past the target is free) | two_sided (held at it)
  cfg.train.warmup_steps = 20  # linear warmup
  cfg.train.weight_decay = 0.1  # AdamW weight decay
  cfg.train.clip = 1.0  # global gradient-norm clip
  cfg.train.batch_size = 8  # sequences per optimizer step (split over data-parallel devices)
  cfg.train.grad_accum = 1  # microbatches per optimizer step (activations of batch_size/grad_accum rows at a time)
  cfg.train.seq_len = 512  # packed tokens per sequence
  cfg.train.log_every = 10  # metrics interval (steps)
  cfg.train.ckpt_every = 100  # Orbax checkpoint interval (steps)
  cfg.train.eval_every = 0  # validation interval (0: only at the end)
  cfg.train.eval_batches = 4  # validation batches per evaluation
  cfg.train.keep = 2  # Orbax checkpoints kept
  cfg.train.peak_tflops = 0.0  # all devices' peak TFLOP/s for the MFU estimate (0: from the device kind)
  cfg.train.eval_baseline = True  # also evaluate the unretrofitted init_from model on the same validation tokens
  cfg.train.loss = "lm"  # lm (cross entropy) | distill (KL to the original, DMC off) | distill+lm
  cfg.train.distill_direction = "forward"  # forward KL(teacher || student) | reverse KL(student || teacher)
  cfg.train.distill_temperature = 1.0  # softens both distributions (the KL is scaled by T^2)
  cfg.train.distill_weight = 1.0  # weight of the KL term in distill+lm
  cfg.train.distill_chunk = 128  # tokens per block of vocabulary-sized logits (loss memory ~5*B*chunk*V floats)
  cfg.train.trainable = "all"  # all | decisions | decisions+norms | lora (the decisions too); != all writes an adapter
  cfg.train.lora_rank = 8  # LoRA rank r
  cfg.train.lora_alpha = 16.0  # LoRA alpha (delta scaled by alpha / r)
  cfg.train.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # projections with LoRA (+ gate, up, down)

  cfg.data = config_dict.ConfigDict()
  cfg.data.kind = "stdlib"  # stdlib (offline English corpus) | files | tfds
  cfg.data.paths = ()  # files: .txt/.jsonl files or folders
  cfg.data.tfds_name = ""  # tfds: catalog name or prepared dataset directory
  cfg.data.text_key = "text"  # JSONL field / TFDS feature with the text
  cfg.data.data_dir = ".work/text_data"  # where prepared TFDS datasets live

  cfg.mesh = config_dict.ConfigDict()
  cfg.mesh.data = -1  # data-parallel size (-1: the devices the other two axes leave)
  cfg.mesh.fsdp = 1  # parameter/optimizer-state sharding size (the batch is split over data x fsdp)
  cfg.mesh.tensor = 1  # tensor-parallel size (heads, MLP, vocabulary)
  return cfg


def _ranges():
  from experiments.harness.config import OneOf, Range
  pos_int, nonneg_int, pos = Range(1, integer=True), Range(0, integer=True), Range(0, lo_open=True)
  return {
      "seed": nonneg_int,
      "model.dtype": OneOf("float32", "bfloat16", "float16"),
      "model.remat": OneOf("none", "full", "dots", "dots_no_batch"),
      "model.attention_impl": OneOf("auto", "xla", "pallas"),
      "dmc.decision_channel": OneOf("last", "first"),
      "dmc.window": Range(1, integer=True, optional=True),
      "dmc.temperature": pos,
      "dmc.offset": Range(),
      "dmc.decisions": OneOf("channel", "adapter"),
      "dmc.method": OneOf("dmc", "dms"),
      "dmc.dms_window": pos_int,
      "dmc.dms_scale": pos,
      "train.mode": OneOf("dmc", "vanilla"),
      "train.target_cr": Range(1.0),
      "train.steps": pos_int,
      "train.stage1_steps": nonneg_int,
      "train.ramp_steps": nonneg_int,
      "train.lr": pos,
      "train.decision_lr": pos,
      "train.cr_weight": Range(0),
      "train.cr_loss": OneOf("one_sided", "two_sided"),
      "train.warmup_steps": nonneg_int,
      "train.weight_decay": Range(0),
      "train.clip": pos,
      "train.batch_size": pos_int,
      "train.grad_accum": pos_int,
      "train.seq_len": Range(2, integer=True),
      "train.log_every": pos_int,
      "train.ckpt_every": pos_int,
      "train.eval_every": nonneg_int,
      "train.eval_batches": pos_int,
      "train.keep": pos_int,
      "train.peak_tflops": Range(0),
      "data.kind": OneOf("stdlib", "files", "tfds"),
      "mesh.data": Range(1, integer=True, allowed=(-1,)),
      "mesh.fsdp": Range(1, integer=True, allowed=(-1,)),
      "mesh.tensor": Range(1, integer=True, allowed=(-1,)),
      "batch/grad_accum": lambda c: (None if c.train.batch_size % c.train.grad_accum == 0 else
                                     f"train.batch_size={c.train.batch_size} is not a multiple of "
                                     f"train.grad_accum={c.train.grad_accum}"),
  }


RANGES = _ranges()  # every field's allowed values, checked by `dmc-jax train` and `dmc-jax plan`


SMOLLM2_CKPT = ".work/ckpt/smollm2-135m-instruct"  # where `make demo-dmc` converts the bundled GGUF
SIZES = ("tiny", "cpu", "toy")
# Small-budget retrofit recipes (docs/dmc.md, "adapter form and distillation"); each also as RECIPE_<size>.
RECIPES = ("distill_dms_adapter", "distill_adapter", "distill_lora", "distill_all")  # longest prefix first
VARIANTS = (None,) + SIZES + RECIPES + tuple(f"{r}_{s}" for r in RECIPES for s in SIZES)


def smollm2_135m(target_cr: float, variant, path: str) -> config_dict.ConfigDict:
  """SmolLM2-135M retrofitted at `target_cr`. Variants keep the target CR:

  tiny  the real model, a few minutes of a 2-core CPU (`make demo-dmc`): enough steps for the decisions to reach
        the target, not enough to recover quality
  cpu   the real model, ≈0.1 M tokens (about 17 minutes of a quiet 2-core CPU): the README's CPU-budget retrofit
  toy   a random 2-layer body with the real tokenizer and data (tests of the harness itself)
  """
  from experiments.harness.config import variant_error
  if variant is not None and variant not in VARIANTS:
    raise variant_error(path, variant, VARIANTS)
  recipe = next((r for r in RECIPES if variant is not None and variant.startswith(r)), None)
  if recipe is not None:
    size = variant[len(recipe) + 1:] or None
    cfg = smollm2_135m(target_cr, size, path)
    cfg.name = f"{cfg.name}_{recipe}"
    return retrofit_recipe(cfg, recipe)
  cfg = base_config(f"smollm2_135m_cr{target_cr:g}", target_cr)
  cfg.model.init_from = SMOLLM2_CKPT
  if variant is None:
    return cfg
  if variant == "tiny":
    return small_budget(cfg, steps=36, batch_size=2, seq_len=256, stage1_steps=4, ramp_steps=20, lr=3e-4,
                        decision_lr=5e-2, cr_weight=5.0)
  if variant == "cpu":
    return small_budget(cfg, steps=100, batch_size=4, seq_len=256, stage1_steps=6, ramp_steps=60, lr=1e-4,
                        decision_lr=2e-2, cr_weight=10.0)
  if variant == "toy":
    cfg = toy(cfg)
    cfg.model.init_from = None
    cfg.model.tokenizer_from = SMOLLM2_CKPT
    return cfg
  raise variant_error(path, variant, VARIANTS)


def retrofit_recipe(cfg, recipe: str):
  """The small-budget recipes, on top of a size's steps and batch:

  distill_adapter  decisions from a zero-initialised decision adapter (the model is the original at step 0), only
                   the adapter trains (base frozen, no stage 1), KL to the original as the only token loss
  distill_lora     the same plus rank-8 LoRA on the attention projections
  distill_all      the channel form, everything trains, cross entropy + KL to the original (the teacher keeps
                   the original decision rows the stage-1 surgery takes from the student)
  distill_dms_adapter  distill_adapter for DMS (docs/dmc.md §10): eviction decisions from a zero-initialised
                   adapter, only it trains, KL to the original
  """
  t = cfg.train
  if recipe == "distill_dms_adapter":
    cfg.dmc.method = "dms"
    retrofit_recipe(cfg, "distill_adapter")
    # The DMS logit is dms_scale (100) · x·W − offset: the LR that moves it by O(1) a step is 1/100 of DMC's.
    t.decision_lr = min(t.decision_lr, 3e-3) / cfg.dmc.dms_scale
    return cfg
  if recipe in ("distill_adapter", "distill_lora"):
    cfg.dmc.decisions = "adapter"
    t.trainable = "decisions" if recipe == "distill_adapter" else "lora"
    t.loss = "distill"
    t.ramp_steps += t.stage1_steps  # no stage 1 to spend: the ramp starts at step 0
    t.stage1_steps = 0
    # The size's decision LR unchanged: after the stage-1 surgery the channel form's decision is the same
    # zero-initialised linear map of the same attention input (its zeroed q/k rows). At 3e-3 the adapter's
    # relaxed CR reached 1.014 of a target 2 in the 36 `tiny` steps; at 3e-2 it trailed the ramp by a few steps
    # (1.22 at a target of 1.35 after 10).
    if recipe == "distill_lora":
      # LoRA's B starts at zero; at the sizes' full-model LRs (1e-4 for `cpu`) 100 steps barely move it.
      t.lr = 1e-3
  elif recipe == "distill_all":
    t.loss = "distill+lm"
  return cfg


def small_budget(cfg, steps: int, batch_size: int, seq_len: int, stage1_steps: int, ramp_steps: int, lr: float,
                 decision_lr: float, cr_weight: float):
  """A run of a few hundred steps at most: docs/dmc.md §6 — the decision rows need a large LR to reach the target in
  time, and the rest of the model a larger LR than the paper's 3e-5 to adapt at all (the vanilla baseline gets
  the same). The CR loss weight is raised so that its consistent push on the decision rows is not drowned by the
  LM gradient's noise within so few steps (dmc_jax/train.py)."""
  cfg.train.steps = steps
  cfg.train.batch_size = batch_size
  cfg.train.seq_len = seq_len
  cfg.train.stage1_steps = stage1_steps
  cfg.train.ramp_steps = ramp_steps
  cfg.train.lr = lr
  cfg.train.decision_lr = decision_lr
  cfg.train.cr_weight = cr_weight
  cfg.train.warmup_steps = max(2, steps // 20)
  cfg.train.log_every = max(2, steps // 20)
  cfg.train.ckpt_every = max(10, steps // 4)
  cfg.train.eval_every = max(10, steps // 4)
  cfg.train.eval_batches = 8
  return cfg


def toy(cfg: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """A test-sized run of the same experiment: toy body, real tokenizer and data, the real target CR."""
  cfg.model.preset = "smollm2-tiny"
  cfg.train.steps = 8
  cfg.train.stage1_steps = 2
  cfg.train.ramp_steps = 4
  cfg.train.lr = 1e-3
  cfg.train.decision_lr = 3e-2
  cfg.train.warmup_steps = 1
  cfg.train.batch_size = 2
  cfg.train.seq_len = 64
  cfg.train.log_every = 2
  cfg.train.ckpt_every = 4
  cfg.train.eval_batches = 1
  return cfg
