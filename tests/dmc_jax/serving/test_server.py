"""The OpenAI-compatible server on a free port, exercised with httpx and the official openai client (a tiny random
model with SmolLM2's tokenizer and chat template), and once with the real SmolLM2 (slow)."""

import concurrent.futures
import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from dmc_jax.serving.server import TextStream, create_app, render_chat  # noqa: E402

NAME = "tiny"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Served:
  def __init__(self, model, engine, name=NAME):
    self.model, self.engine = model, engine
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    config = uvicorn.Config(create_app(model, engine, name, drain_seconds=5), host="127.0.0.1", port=self.port,
                            log_level="warning")
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
      time.sleep(0.05)

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=30)
    assert not self.thread.is_alive()


def _metric(text: str, name: str) -> float:
  for line in text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[1])
  raise AssertionError(f"{name} missing from /metrics")


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
  import dmc_jax
  from dmc_jax.serving import Engine, paged_kv
  model = dmc_jax.load(tiny_checkpoint)
  kv = paged_kv(model, "vanilla", max_batch=4, page_size=16, max_len=128)
  s = Served(model, Engine(kv, eos_ids=model.eos_ids))
  # Compile the prefill bucket and the step once, so the tests below time out on hangs, not on compilation.
  httpx.post(s.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=600).raise_for_status()
  yield s
  s.close()
  assert s.engine.pages_in_use == 0


def test_completions_stream_concatenates_to_the_plain_answer(served):
  body = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
  plain = httpx.post(served.url + "/v1/completions", json=body, timeout=120).json()
  text = plain["choices"][0]["text"]
  assert plain["object"] == "text_completion" and plain["usage"]["prompt_tokens"] == len(
      served.model.encode(body["prompt"]))
  assert plain["usage"]["completion_tokens"] == 12 - (plain["choices"][0]["finish_reason"] == "stop")
  # The same text as the library's fixed-batch generation of that prompt.
  assert text == served.model.generate(body["prompt"], 12, cache="vanilla")[0]
  chunks = []
  with httpx.stream("POST", served.url + "/v1/completions", json=dict(body, stream=True), timeout=120) as r:
    lines = [line for line in r.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  for line in lines[:-1]:
    assert line.startswith("data: ")
    chunks.append(json.loads(line[6:]))
  assert "".join(c["choices"][0]["text"] for c in chunks) == text
  assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
  # The official client reads both forms the same way.
  client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
  assert client.completions.create(**body).choices[0].text == text
  streamed = client.completions.create(**body, stream=True)
  assert "".join(c.choices[0].text for c in streamed) == text
  assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_renders_the_template_and_streams(served):
  client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
  messages = [{"role": "user", "content": "Say hello."}]
  out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
  prompt = render_chat(served.model.chat_template, messages)
  assert "<|im_start|>system" in prompt  # SmolLM2's template adds its default system prompt
  assert out.usage.prompt_tokens == len(served.model.encode(prompt, add_special_tokens=False))
  streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
  parts = [c.choices[0].delta.content or "" for c in streamed]
  assert "".join(parts) == out.choices[0].message.content


def test_eight_concurrent_requests_and_bad_requests_leave_it_serving(served):
  url = served.url + "/v1/completions"
  prompts = [f"Request number {i} says" for i in range(8)]
  alone = [httpx.post(url, json={"prompt": p, "max_tokens": 6, "temperature": 0}, timeout=120).json()
           for p in prompts[:2]]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    outs = list(pool.map(lambda p: httpx.post(url, json={"prompt": p, "max_tokens": 6, "temperature": 0},
                                               timeout=300).json(), prompts))
  assert all(len(o["choices"]) == 1 and o["usage"]["completion_tokens"] >= 1 for o in outs)
  assert [o["choices"][0]["text"] for o in outs[:2]] == [a["choices"][0]["text"] for a in alone]
  bad = [({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": "x", "model": "gpt-9"}, "model"),
         ({"prompt": "word " * 400, "max_tokens": 4}, "prompt"), ({"prompt": ""}, "prompt"),
         ({"prompt": "x", "temperature": "hot"}, "temperature")]
  for body, param in bad:
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 400, body
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
  r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
  assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
  with pytest.raises(openai.BadRequestError):
    openai.OpenAI(base_url=served.url + "/v1", api_key="none").completions.create(model=NAME, prompt="x",
                                                                                  max_tokens=-3)
  assert httpx.get(served.url + "/health", timeout=10).json()["status"] == "ok"
  assert httpx.post(url, json={"prompt": "still", "max_tokens": 2}, timeout=60).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(served):
  body = {"prompt": "Tell me a long story", "max_tokens": 100, "temperature": 0, "stream": True}
  with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=120) as r:
    it = r.iter_lines()
    next(line for line in it if line.startswith("data: "))  # the stream is running
  deadline = time.monotonic() + 60
  while True:
    m = httpx.get(served.url + "/metrics", timeout=10).text
    if _metric(m, "dmc_jax_requests_running") == 0 and _metric(m, "dmc_jax_kv_pages_used") == 0:
      break
    assert time.monotonic() < deadline, m
    time.sleep(0.1)
  assert _metric(m, "dmc_jax_generation_tokens_total") < 200  # the 100-token stream stopped early
  assert "dmc_jax_time_to_first_token_seconds_bucket" in m and "dmc_jax_preemptions_total 0" in m


def test_chat_without_a_template_is_a_400_naming_it(served):
  from fastapi.testclient import TestClient

  class NoTemplate:
    chat_template = None
    eos_ids = served.model.eos_ids
    checkpoint = served.model.checkpoint

  client = TestClient(create_app(NoTemplate(), served.engine, NAME))  # no lifespan: the engine is not touched
  r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
  assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
  assert "--chat-template" in r.json()["error"]["message"]


def test_text_stream_holds_back_a_possible_stop_string():
  class Tok:
    def decode(self, ids):
      return "".join(chr(i) for i in ids)

  s = TextStream(Tok(), ["END"], skip_ids=[0])
  out = [s.push(ord(c)) for c in "abEN"]
  assert "".join(out) == "ab"  # "EN" could start "END"
  assert s.push(ord("X")) == "ENX"
  assert s.push(ord("E")) + s.push(ord("N")) + s.push(ord("D")) == "" and s.stopped and s.text == "abENX"


@pytest.mark.slow
def test_real_smollm2_chat_equals_the_generator(smollm2_ckpt):
  import dmc_jax
  from dmc_jax.serving import Engine, paged_kv
  model = dmc_jax.load(smollm2_ckpt)
  s = Served(model, Engine(paged_kv(model, "vanilla", max_batch=2, max_len=256), eos_ids=model.eos_ids))
  try:
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    prompt = render_chat(model.chat_template, messages)
    ids = model.encode(prompt, add_special_tokens=False)
    gen = model.generator(model.resolve_cache("vanilla")).generate([ids], 16, eos_ids=model.eos_ids)
    expected = model.tokenizer.decode([t for t in gen.tokens[0] if t not in model.eos_ids])
    assert out.choices[0].message.content == expected
    assert "Paris" in expected
  finally:
    s.close()
