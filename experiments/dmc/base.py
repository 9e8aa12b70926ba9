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

  cfg.dmc = config_dict.ConfigDict()
  cfg.dmc.decision_channel = "last"  # "last" (NVIDIA's code) or "first" (the paper)
  cfg.dmc.window = 12  # partial-accumulation window W
  cfg.dmc.temperature = 0.1  # Gumbel-sigmoid tau
  cfg.dmc.offset = 5.0  # c in a = k[ch] - c

  cfg.train = config_dict.ConfigDict()
  cfg.train.target_cr = float(target_cr)  # compression ratio reached at the end of stage 2
  cfg.train.steps = 1000  # total optimizer steps (stages 1 + 2 + 3)
  cfg.train.stage1_steps = 50  # stage 1: channel fade-out, then decision-row surgery
  cfg.train.ramp_steps = 700  # stage 2: target CR ramps 1 -> target_cr; the rest is stage 3 at target_cr
  cfg.train.lr = 3e-5  # peak learning rate (warmup then cosine)
  cfg.train.decision_lr = 1e-3  # learning rate of the q/k rows producing channel ch (DMC.md §6: small budgets)
  cfg.train.warmup_steps = 20  # linear warmup
  cfg.train.weight_decay = 0.1  # AdamW weight decay
  cfg.train.clip = 1.0  # global gradient-norm clip
  cfg.train.batch_size = 8  # sequences per step (split over data-parallel devices)
  cfg.train.seq_len = 512  # packed tokens per sequence
  cfg.train.log_every = 10  # metrics interval (steps)
  cfg.train.ckpt_every = 100  # Orbax checkpoint interval (steps)
  cfg.train.eval_every = 0  # validation interval (0: only at the end)
  cfg.train.eval_batches = 4  # validation batches per evaluation
  cfg.train.keep = 2  # Orbax checkpoints kept

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


SMOLLM2_CKPT = ".work/ckpt/smollm2-135m-instruct"  # where `make demo-dmc` converts the bundled GGUF
VARIANTS = (None, "tiny")


def smollm2_135m(target_cr: float, variant, path: str) -> config_dict.ConfigDict:
  """SmolLM2-135M retrofitted at `target_cr`; `tiny` keeps the target CR, tokenizer and data on a toy body."""
  from experiments.harness.config import variant_error
  cfg = base_config(f"smollm2_135m_cr{target_cr:g}", target_cr)
  cfg.model.init_from = SMOLLM2_CKPT
  if variant is None:
    return cfg
  if variant == "tiny":
    cfg = tiny(cfg)
    cfg.model.init_from = None
    cfg.model.tokenizer_from = SMOLLM2_CKPT
    return cfg
  raise variant_error(path, variant, VARIANTS)


def tiny(cfg: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """A laptop-CPU run of the same experiment: toy body, real tokenizer and data, the real target CR."""
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
