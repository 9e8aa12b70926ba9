"""lm-evaluation-harness (0.4.x) model for dmc-jax checkpoints: vanilla, DMC, or an eviction policy.

    lm = DMCJaxLM("ckpt/smollm2", method="h2o", cr=2)       # or method="vanilla" | "dmc" | "streaming" | "tova"
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    python -m dmc_jax.lm_eval_adapter --model dmc-jax --model_args ckpt=ckpt/smollm2,method=dmc --tasks ...
    # (lm-eval's own CLI with this module imported, so the "dmc-jax" model name is registered; plain `lm_eval`
    # does not import it)

Log-likelihoods come from the parallel forward of the chosen method (DMC: eval-mode hard decisions; a policy: its
exact eviction simulation), so a continuation is scored against the compressed cache it would decode with.
Scoring is `dmc_jax.Model.score` (rows right-padded to a multiple of 64, batched by `batch_size`).
`generate_until` decodes greedily with the matching cache (vanilla, the paged DMC cache, or the policy's compact
eviction cache).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
  from lm_eval.api.model import LM
except ImportError as e:  # an optional extra: say which, in one line
  raise ImportError("dmc_jax.lm_eval_adapter needs the optional extra [eval]: pip install 'dmc-jax[eval]'") from e
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dmc_jax.config import ConfigError

METHODS = ("vanilla", "dmc", "streaming", "h2o", "tova")


@register_model("dmc-jax")
class DMCJaxLM(LM):
  def __init__(self, ckpt: str, method: str = "vanilla", cr: float = 2.0, batch_size: int | str = 8,
               max_length: int | str | None = None, **_ignored):
    super().__init__()
    import dmc_jax
    if method not in METHODS:
      raise ConfigError(f"method: unknown {method!r}; expected one of {list(METHODS)}")
    self.model = dmc_jax.load(ckpt)
    self.method = method
    self.cache = dict(cache=method, cr=float(cr) if method in dmc_jax.api.POLICIES else None)
    if method == "dmc" and self.model.dmc_config() is None:
      raise ConfigError(f"method=dmc: {self.model.checkpoint.directory}/checkpoint.json has no DMC settings")
    self.tokenizer = self.model.tokenizer
    self.cfg = self.model.config
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or self.cfg.max_position_embeddings)
    bos, eos = self.cfg.bos_token_id, self.tokenizer.eos_token_ids
    self.prefix_token_id = bos if bos is not None else eos[0]

  # -- log-likelihoods ---------------------------------------------------------------------------------------

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as the whole string tokenises (trailing context spaces move over)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = self.tokenizer.encode(context + continuation)
    ctx = self.tokenizer.encode(context) if context else []
    if not ctx:
      ctx, whole = [self.prefix_token_id], [self.prefix_token_id] + whole
    return ctx, whole[len(ctx):]

  def score_sequences(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding reproduces it) per (context, cont) ids."""
    rows, conts = [], []
    for ctx, cont in pairs:
      if not cont:
        raise ConfigError("loglikelihood: an empty continuation has no tokens to score")
      full = (ctx + cont)[-(self.max_length + 1):]
      rows.append((full[:-1], full[1:]))
      conts.append(len(cont))
    scored = self.model.score(rows, batch_size=self.batch_size, **self.cache)
    return [(float(lp[-n:].sum(dtype=np.float64)), bool(greedy[-n:].all())) for (lp, greedy), n in zip(scored, conts)]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self.score_sequences([self._encode_pair(*req.args) for req in requests])

  def loglikelihood_rolling(self, requests) -> list[float]:
    results = []
    for req in requests:
      (text,) = req.args[:1]
      ids = self.tokenizer.encode(text, add_special_tokens=False)
      windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
          ids, self.prefix_token_id, self.max_length, context_len=1)]
      results.append(sum(lp for lp, _ in self.score_sequences([(list(c), list(t)) for c, t in windows])))
    return results

  # -- generation --------------------------------------------------------------------------------------------

  def generate_until(self, requests) -> list[str]:
    from dmc_jax.generate import Sampling
    gen = self.model.generator(self.model.resolve_cache(**self.cache))
    eos = self.model.eos_ids
    out = []
    for req in requests:
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get("max_gen_toks", 256))
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
      prompt = self.tokenizer.encode(context)[-max(self.max_length - max_new, 1):] or [self.prefix_token_id]
      res = gen.generate([prompt], max_new, Sampling(temperature=temperature), eos_ids=eos)
      text = self.tokenizer.decode([t for t in res.tokens[0] if t not in eos])
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out

  @property
  def tokenizer_name(self) -> str:
    return "dmc-jax"

  def apply_chat_template(self, chat_history: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    raise ConfigError("dmc-jax lm-eval model: chat templates are not supported")


def main() -> None:
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  main()
