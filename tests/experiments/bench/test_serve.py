"""bench --serve's workload and its trace-replay roofline (the stream itself is a benchmark, run by hand)."""

from dmc_jax.presets import preset
from experiments.bench import serve
from experiments.bench.dmc import matmul_params


def test_workload_is_fixed_real_text_with_outputs_in_range():
  a = serve.workload(6, 64, 10, 20, vocab=300, seed=0)
  assert a == serve.workload(6, 64, 10, 20, vocab=300, seed=0)  # the same stream every run
  prompts, outputs = a
  assert all(len(p) == 64 and all(1 <= t < 300 for t in p) for p in prompts)
  assert len({tuple(p) for p in prompts}) == 6  # distinct documents
  assert all(10 <= n <= 20 for n in outputs)
  # Byte-level ids of English text: mostly letters and spaces.
  assert sum(chr(t).isalpha() or t == 32 for p in prompts for t in p) > 0.6 * 6 * 64


def test_roofline_replays_the_trace_step_by_step():
  cfg = preset("smollm2-135m")
  bw, mm, param_bytes, page = 1e10, 1e11, 4 * 135_000_000, 16384
  step = {"slots": 8, "kv_slots": 8 * 90 * 300, "pages": 8 * 90 * 10}
  one = serve.roofline_seconds(cfg, [step], [], param_bytes, page, bw, mm)
  expected = (param_bytes + step["pages"] * page) / bw + (
      2 * matmul_params(cfg) * 8 + 4 * cfg.n_groups * cfg.head_dim * step["kv_slots"]) / mm
  assert abs(one - expected) < 1e-12 * expected
  # Fewer pages (a compressed cache) cost less; a prefill adds its weight read and matmuls.
  small = serve.roofline_seconds(cfg, [dict(step, pages=step["pages"] // 4, kv_slots=step["kv_slots"] // 4)], [],
                                 param_bytes, page, bw, mm)
  assert small < one
  with_prefill = serve.roofline_seconds(cfg, [step], [512], param_bytes, page, bw, mm)
  assert abs(with_prefill - one - (param_bytes / bw + 2 * matmul_params(cfg) * 512 / mm)) < 1e-9


def test_drain_steps_to_idle_and_reports_progress():
  import io
  import types

  reqs = [types.SimpleNamespace(max_tokens=4, tokens=[]) for _ in range(2)]

  class Engine:  # one token to every running request per step
    def idle(self):
      return all(len(r.tokens) == r.max_tokens for r in reqs)

    @property
    def running(self):
      return sum(len(r.tokens) < r.max_tokens for r in reqs)

    def step(self):
      for r in reqs:
        if len(r.tokens) < r.max_tokens:
          r.tokens.append(1)

  ticks = iter(range(100))
  out = io.StringIO()
  serve.drain(Engine(), reqs, "x", every_s=2, clock=lambda: float(next(ticks)), out=out)
  assert all(len(r.tokens) == 4 for r in reqs)
  lines = out.getvalue().splitlines()
  assert lines == ["[bench --serve] x: 4/8 tokens (50%), 2 running, 2 s",
                   "[bench --serve] x: 8/8 tokens (100%), 0 running, 4 s"]
  quiet = io.StringIO()
  for r in reqs:
    r.tokens = []
  serve.drain(Engine(), reqs, "x", every_s=0, out=quiet)
  assert quiet.getvalue() == "" and all(len(r.tokens) == 4 for r in reqs)
