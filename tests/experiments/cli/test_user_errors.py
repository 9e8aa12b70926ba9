"""Every user error at the command line is one line on stderr and exit status 2: out-of-range arguments of
generate/eval/plan/train and of sdc-jax, nonsense experiment settings, and run directories that are not ones."""

import os

import pytest
from helpers import ROOT

from dmc_jax import checkpoint
from dmc_jax.convert import gguf as gguf_convert
from experiments.cli import dmc as cli_dmc
from experiments.cli import sdc as cli_sdc

GGUF = os.path.join(ROOT, "tests", "golden", "spm", "tiny_spm.gguf")
TOY = os.path.join(ROOT, "experiments", "dmc", "configs", "smollm2_135m_cr2.py") + ":toy"
SDC = os.path.join(ROOT, "experiments", "sdc", "configs", "skvideo_sdc.py") + ":tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ck") / "tiny")
  checkpoint.write(out, gguf_convert.read(GGUF))
  return out


def one_line(capsys, main, argv, match):
  rc = main([str(a) for a in argv])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "Traceback" not in err, err
  lines = err.splitlines()
  assert len(lines) == 1 and "error:" in lines[0], err
  assert match in lines[0], lines[0]


@pytest.mark.parametrize("args,match", [
    (["--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--top-p", "0"], "--top-p: expected a number in (0.0, 1.0], got 0"),
    (["--top-p", "2"], "--top-p"),
    (["--top-k", "-3"], "--top-k: expected an integer >= 0"),
    (["--dmc", "--page-size", "0"], "--page-size: expected an integer >= 1"),
    (["--dmc", "--page-size", "-2"], "--page-size"),
    (["--dmc-force-cr", "0.5"], "--dmc-force-cr: expected a number >= 1.0"),
    (["--dmc-force-cr", "0"], "--dmc-force-cr"),
    (["--temperature", "nan"], "--temperature: expected a finite number, got 'nan'"),
    (["--kv-budget-mb", "-1"], "--kv-budget-mb: expected a number > 0.0"),
    (["--no-special-tokens", ""], "unrecognized arguments: ''"),
    (["--top-k", "100000"], "top_k: 100000 exceeds the vocabulary of 512 tokens"),
    (["--max-new-tokens", "100000000"], "prompt + 100000000 new tokens exceed the model's"),
])
def test_generate_arguments(ckpt, capsys, args, match):
  one_line(capsys, cli_dmc.main, ["generate", ckpt, "--prompt", "hi", *args], match)


@pytest.mark.parametrize("args,match", [
    (["--seq-len", "100000"], "--seq-len: 100000 exceeds the model's"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--tokens", "-5"], "--tokens: expected an integer >= 0"),
])
def test_eval_arguments(ckpt, capsys, args, match):
  one_line(capsys, cli_dmc.main, ["eval", ckpt, *args], match)


def test_eval_out_is_a_directory(ckpt, capsys, tmp_path):
  one_line(capsys, cli_dmc.main, ["eval", ckpt, "--out", tmp_path], "is a directory")


@pytest.mark.parametrize("override,match", [
    ("--config.train.steps=-1", "train.steps=-1 must be >= 1"),
    ("--config.train.target_cr=0.5", "train.target_cr=0.5 must be >= 1.0"),
    ("--config.train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("--config.train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("--config.train.ckpt_every=0", "train.ckpt_every=0 must be >= 1"),
    ("--config.train.mode=bogus", "train.mode='bogus' must be one of ['dmc', 'vanilla']"),
    ("--config.mesh.fsdp=0", "mesh.fsdp=0 must be >= 1 (or -1)"),
])
def test_nonsense_training_settings(capsys, tmp_path, override, match):
  one_line(capsys, cli_dmc.main, ["train", "--config", TOY, "--workdir", tmp_path / "w", override], match)
  assert not os.path.exists(tmp_path / "w")


def test_plan_mesh_sizes(capsys):
  one_line(capsys, cli_dmc.main, ["plan", "--config", TOY, "--config.mesh.fsdp=0"], "mesh.fsdp=0 must be >= 1")


def test_sdc_arguments_and_run_dirs(capsys, tmp_path):
  one_line(capsys, cli_sdc.main, ["eval", tmp_path, "--steps", "-1"], "--steps: expected an integer >= 0")
  one_line(capsys, cli_sdc.main, ["predict", tmp_path, "v.mp4", "--out", "o.mp4", "--fps", "0"],
           "--fps: expected a number > 0.0")
  one_line(capsys, cli_sdc.main, ["predict", tmp_path, "v.mp4", "--out", "o.mp4", "--fps", "-3"], "--fps")
  f = tmp_path / "file"
  f.write_text("x")
  one_line(capsys, cli_sdc.main, ["eval", f], "not a run directory (a file)")
  one_line(capsys, cli_sdc.main, ["train", "--config", SDC, f"--config.workdir={tmp_path / 'w'}",
                                  "--config.train.batch_size=0"], "train.batch_size=0 must be >= 1")
  one_line(capsys, cli_sdc.main, ["train", "--config", SDC, "--config.data.reverse_prob=2.0"],
           "data.reverse_prob=2.0 must be >= 0 and <= 1")


def test_predict_frame_rate_defaults_for_a_frame_folder(tmp_path, caplog):
  import numpy as np

  from experiments.sdc import run as sdc_run
  frames = tmp_path / "frames"
  frames.mkdir()
  # a frame folder has no rate: 25 fps, and the note says so (it used to fail as "cannot open an mp4 writer")
  assert sdc_run.output_fps(str(frames), None, "o.mp4") == 25.0
  assert "has no frame rate; writing o.mp4 at 25 fps" in caplog.text
  clip = tmp_path / "c.mp4"
  sdc_run.write_mp4(str(clip), np.zeros((3, 32, 32, 3), np.uint8), 10.0)
  assert sdc_run.output_fps(str(clip), None, "o.mp4") == 10.0  # a video keeps its own
  assert sdc_run.output_fps(str(clip), 7.5, "o.mp4") == 7.5
