"""`dmc-jax serve` as a process: it answers, and SIGTERM lets an in-flight stream finish and exits 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_cli_refuses_a_policy_without_its_ratio_in_one_line(tiny_checkpoint, capsys):
  from experiments.cli.dmc import main
  assert main(["serve", tiny_checkpoint, "--cache", "h2o"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "needs its target ratio" in err[0]


@pytest.mark.slow  # a fresh process: JAX start-up and compilation
def test_sigterm_drains_the_stream_and_exits_zero(tiny_checkpoint):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.cli.dmc", "serve", tiny_checkpoint, "--port", str(port),
                           "--max-batch", "2", "--max-len", "128", "--drain-seconds", "120"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 300
    while True:
      assert proc.poll() is None, proc.stdout.read()
      try:
        if httpx.get(url + "/health", timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline
      time.sleep(0.5)
    lines = []
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True}

    def read():
      with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        lines.extend(line for line in r.iter_lines() if line)
    reader = threading.Thread(target=read)
    reader.start()
    while not lines:  # the stream has started (its first chunk arrived)
      assert reader.is_alive() or lines
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=60)
    assert lines[-1] == "data: [DONE]"
    finish = json.loads(lines[-2][6:])["choices"][0]["finish_reason"]
    assert finish in ("length", "stop")  # drained to its end, not cancelled
  finally:
    if proc.poll() is None:
      proc.kill()
