"""An OpenAI-compatible HTTP server over the engine: a thin FastAPI layer (the optional extra [serve]).

The engine runs in its own thread; each request handler submits to it and reads its tokens from an asyncio queue
the engine's callback fills (`loop.call_soon_threadsafe`). The server turns token ids into text (incrementally,
holding back an incomplete character or a possible start of a stop string), cuts at stop strings (cancelling the
request, which frees its pages), and formats OpenAI responses and server-sent-event chunks. A client that
disconnects mid-stream cancels its request. Errors are OpenAI's error JSON with HTTP 400.

Chat prompts are rendered from the checkpoint's chat template with jinja2 the way transformers'
`apply_chat_template` does (a sandboxed environment, trim_blocks and lstrip_blocks, `raise_exception`,
`add_generation_prompt=True`) and encoded without adding special tokens (the template writes them).

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`, imported inside
`create_app` so that the module imports without the extra) as objects.
"""


import asyncio
import json
import math
import random
import time
import uuid
from typing import Any

from dmc_jax.errors import UserError

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class BadRequest(UserError):
  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
  """The prompt text of `messages` under a chat template, rendered as transformers renders it."""
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
  try:
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                                            eos_token=eos_token)
  except jinja2.exceptions.TemplateError as e:
    raise BadRequest(f"messages: the chat template refused them: {e}", "messages") from None


class TextStream:
  """Token ids → text deltas: decodes the whole output each time and emits what is new and settled (no trailing
  replacement character from a split UTF-8 sequence, no suffix that could begin a stop string)."""

  def __init__(self, tokenizer, stop: list[str], skip_ids):
    self.tok, self.stop, self.skip = tokenizer, stop, frozenset(skip_ids)
    self.ids: list[int] = []
    self.sent = 0
    self.text = ""
    self.stopped = False

  def push(self, token: int) -> str:
    if token not in self.skip:
      self.ids.append(token)
    self.text = self.tok.decode(self.ids)
    for s in self.stop:
      at = self.text.find(s)
      if at >= 0:
        self.text, self.stopped = self.text[:at], True
    if self.stopped:
      return self.flush()
    settled = len(self.text.rstrip("\ufffd"))
    for s in self.stop:  # hold back the longest suffix that is a prefix of a stop string
      for k in range(min(len(s) - 1, settled), 0, -1):
        if self.text[settled - k:settled] == s[:k]:
          settled -= k
          break
    if settled <= self.sent:
      return ""
    delta, self.sent = self.text[self.sent:settled], settled
    return delta

  def flush(self) -> str:
    delta, self.sent = self.text[self.sent:], len(self.text)
    return delta


def _error(message: str, param: str | None = None, status: int = 400):
  from fastapi.responses import JSONResponse
  return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": None}}, status_code=status)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
  v = body.get(name, default)
  if v is None:
    v = default
  ok = isinstance(v, int) if integer else isinstance(v, (int, float))
  if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
    kind = "an integer" if integer else "a number"
    raise BadRequest(f"{name}: expected {kind} in [{lo:g}, {hi:g}], got {v!r}", name)
  return v


def create_app(model, engine, model_name: str, chat_template: str | None = None, drain_seconds: float = 30.0):
  """The FastAPI app serving `model` (a dmc_jax.api.Model) through `engine` (started and stopped by its lifespan)."""
  import contextlib

  from fastapi import FastAPI, Request
  from fastapi.responses import PlainTextResponse, StreamingResponse

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.start()
    yield
    await asyncio.to_thread(engine.stop, drain_seconds)

  app = FastAPI(title="dmc-jax", lifespan=lifespan)
  template = chat_template if chat_template is not None else model.chat_template
  eos = model.eos_ids
  created = int(time.time())

  def tokens_of(text: str, special: bool) -> list[int]:
    return model.encode(text, add_special_tokens=special)

  def common(body: dict) -> dict:
    if body.get("model") not in (None, model_name):
      raise BadRequest(f"model: unknown {body.get('model')!r}; this server serves {model_name!r}", "model")
    if body.get("n", 1) != 1:
      raise BadRequest("n: only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", _DEFAULT_MAX_TOKENS, 1, 2**31 - 1, integer=True)
    stop = body.get("stop") or []
    if isinstance(stop, str):
      stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
      raise BadRequest("stop: expected a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    # Unseeded sampling draws a fresh seed (identical unseeded requests must not sample identical text).
    seed = random.getrandbits(32) if seed is None else _number(body, "seed", 0, 0, 2**32 - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise BadRequest("stream: expected true or false", "stream")
    opts = body.get("stream_options") or {}
    return {"max_tokens": max_tokens, "temperature": float(_number(body, "temperature", 1.0, 0, 2)),
            "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1)), "stop": stop, "seed": seed, "stream": stream,
            "include_usage": bool(isinstance(opts, dict) and opts.get("include_usage"))}

  async def body_of(request: Request) -> dict:
    try:
      body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
      raise BadRequest(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object")
    return body

  async def run(request: Request, prompt_ids: list[int], p: dict, chat: bool):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    on_event = lambda req, kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
    try:
      req = engine.submit(prompt_ids, p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                          seed=p["seed"], on_event=on_event)
    except UserError as e:
      raise BadRequest(str(e), "messages" if chat else "prompt") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    text = TextStream(model.tokenizer, p["stop"], eos)

    async def events():
      """(delta text, finish reason or None) until the request ends; cancels it if the consumer goes away."""
      try:
        while True:
          kind, value = await queue.get()
          if kind == "token":
            delta = text.push(value)
            if text.stopped:
              engine.cancel(req)
              yield delta, "stop"
              return
            if delta:
              yield delta, None
          else:
            reason = "stop" if value == "stop" else "length" if value == "length" else value
            yield text.flush(), reason
            return
      finally:
        if req.finish_reason is None:
          engine.cancel(req)

    def usage():
      n = sum(t not in eos for t in req.tokens)
      return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

    obj = "chat.completion" if chat else "text_completion"
    if not p["stream"]:
      parts, reason = [], None
      async for delta, end in events():
        parts.append(delta)
        reason = end
      out = "".join(parts)
      choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": reason}
                if chat else {"index": 0, "text": out, "logprobs": None, "finish_reason": reason})
      return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice],
              "usage": usage()}

    def chunk(delta: str | None, reason, first: bool = False) -> str:
      if chat:
        d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
        choice = {"index": 0, "delta": d, "finish_reason": reason}
      else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
      return "data: " + json.dumps({"id": rid, "object": obj + ("." + "chunk" if chat else ""),
                                    "created": int(time.time()), "model": model_name, "choices": [choice]}) + "\n\n"

    async def sse():
      if chat:
        yield chunk(None, None, first=True)
      async for delta, reason in events():
        if delta:
          yield chunk(delta, None)
        if reason is not None:
          yield chunk(None, reason)
      if p["include_usage"]:
        yield "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                     "model": model_name, "choices": [], "usage": usage()}) + "\n\n"
      yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")

  @app.exception_handler(BadRequest)
  async def bad_request(request, exc: BadRequest):
    return _error(str(exc), exc.param)

  @app.exception_handler(404)
  async def not_found(request, exc):
    return _error(f"no route {request.method} {request.url.path}", None, 404)

  @app.get("/health")
  async def health():
    return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "dmc-jax"}]}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await body_of(request)
    p = common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
      prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      ids = list(prompt)  # token ids, as OpenAI accepts
      if not all(0 <= t < model.config.vocab_size for t in ids):
        raise BadRequest(f"prompt: token ids must lie in [0, {model.config.vocab_size})", "prompt")
    elif isinstance(prompt, str) and prompt:
      ids = tokens_of(prompt, True)
    else:
      raise BadRequest("prompt: expected a non-empty string (or one string in a list, or a list of token ids)",
                       "prompt")
    return await run(request, ids, p, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await body_of(request)
    p = common(body)
    if template is None:
      raise BadRequest(f"this checkpoint has no chat template ({model.checkpoint.directory}/checkpoint.json: "
                       f"chat_template is null); start the server with --chat-template FILE, or use /v1/completions",
                       "messages")
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)):
      raise BadRequest("messages: expected a non-empty list of {role, content} objects with string content",
                       "messages")
    tok = model.tokenizer
    text = render_chat(template, [{"role": m["role"], "content": m["content"]} for m in messages],
                       _token_text(tok, model.config.bos_token_id), _token_text(tok, (eos or [None])[0]))
    return await run(request, tokens_of(text, False), p, chat=True)

  return app


def _token_text(tokenizer, token_id: Any) -> str:
  if token_id is None:
    return ""
  try:
    return tokenizer.decode([token_id], skip_special_tokens=False)
  except TypeError:
    return tokenizer.decode([token_id])


def serve(model, engine, model_name: str, host: str, port: int, chat_template: str | None = None,
          drain_seconds: float = 30.0) -> int:
  """Runs the server until SIGINT/SIGTERM; in-flight requests get up to `drain_seconds` to finish. Returns 0."""
  import signal

  import uvicorn
  app = create_app(model, engine, model_name, chat_template, drain_seconds)
  config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_seconds)
  # uvicorn drains on SIGTERM and then raises the signal again under the handler that was there before it started
  # (the default one kills the process: status -15). A drained SIGTERM is an orderly exit, so that handler is a
  # no-op and run() returns.
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
  try:
    uvicorn.Server(config).run()
  finally:
    signal.signal(signal.SIGTERM, previous)
  return 0
