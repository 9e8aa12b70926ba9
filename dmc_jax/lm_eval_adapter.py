"""lm-evaluation-harness (0.4.x) model for dmc-jax checkpoints: vanilla, DMC, or an eviction policy.

    lm = DMCJaxLM("ckpt/smollm2", method="h2o", cr=2)       # or method="vanilla" | "dmc" | "streaming" | "tova"
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    python -m dmc_jax.lm_eval_adapter --model dmc-jax --model_args ckpt=ckpt/smollm2,method=dmc --tasks ...
    # (lm-eval's own CLI with this module imported, so the "dmc-jax" model name is registered; plain `lm_eval`
    # does not import it)

Log-likelihoods come from the parallel forward of the chosen method (DMC: eval-mode hard decisions; a policy: its
exact eviction simulation), so a continuation is scored against the compressed cache it would decode with.
Sequences are right-padded to a multiple of 64 and batched (`batch_size`); padding after a sequence cannot change
its causal log-probabilities. `generate_until` decodes greedily with the matching cache (vanilla, the paged DMC
cache, or the policy's compact eviction cache).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dmc_jax.config import ConfigError, DMCConfig

METHODS = ("vanilla", "dmc", "streaming", "h2o", "tova")
_BUCKET = 64


@register_model("dmc-jax")
class DMCJaxLM(LM):
  def __init__(self, ckpt: str, method: str = "vanilla", cr: float = 2.0, batch_size: int | str = 8,
               max_length: int | str | None = None, **_ignored):
    super().__init__()
    from dmc_jax.baselines import evict_model
    from dmc_jax.baselines.policies import Policy
    from dmc_jax.convert import layout
    from dmc_jax.model.llama import Llama
    from dmc_jax import checkpoint
    if method not in METHODS:
      raise ConfigError(f"method: unknown {method!r}; expected one of {list(METHODS)}")
    c = checkpoint.Checkpoint(ckpt)
    self.method = method
    self.tokenizer = c.tokenizer()
    self.cfg = c.config.replace(dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
    self.params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), c.load_params()))
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or self.cfg.max_position_embeddings)
    self.dmc = None
    self.policy = None
    scanned = self.cfg.replace(scan_layers=True)
    if method == "dmc":
      if not c.dmc:
        raise ConfigError(f"method=dmc: {c.directory}/checkpoint.json has no DMC settings")
      self.dmc = DMCConfig.from_dict(c.dmc, where=f"{c.directory}/checkpoint.json: dmc")
    elif method != "vanilla":
      self.policy = Policy(method, float(cr))
    if self.policy is not None:
      fparams = evict_model.stack_params(self.cfg, self.params)
      forward = lambda p, t: evict_model.forward(self.cfg, self.policy, p, t)[0]
    else:
      fparams = {"params": layout.stack_layers(self.params["params"], self.cfg.n_layers, stack=jnp.stack)}
      model = Llama(scanned) if self.dmc is None else Llama(scanned, self.dmc, "eval")
      forward = (lambda p, t: model.apply(p, t)) if self.dmc is None else (lambda p, t: model.apply(p, t)[0])

    def score(p, tokens_BxL, targets_BxL):
      logp = jax.nn.log_softmax(forward(p, tokens_BxL).astype(jnp.float32), axis=-1)
      target_logp = jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
      return target_logp, jnp.argmax(logp, axis=-1) == targets_BxL
    self._fparams = fparams
    self._score = jax.jit(score)
    self._generator = None
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
    rows = []
    for ctx, cont in pairs:
      if not cont:
        raise ConfigError("loglikelihood: an empty continuation has no tokens to score")
      full = (ctx + cont)[-(self.max_length + 1):]
      rows.append((full[:-1], full[1:], len(cont)))
    out: list[tuple[float, bool]] = [None] * len(rows)  # type: ignore[list-item]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      width = -(-max(len(rows[i][0]) for i in idx) // _BUCKET) * _BUCKET
      tokens = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros_like(tokens)
      for r, i in enumerate(idx):
        inp, tgt, _ = rows[i]
        tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      logp, greedy = (np.asarray(a) for a in self._score(self._fparams, tokens, targets))
      for r, i in enumerate(idx):
        n_in, n_cont = len(rows[i][0]), rows[i][2]
        sl = slice(n_in - n_cont, n_in)
        out[i] = (float(logp[r, sl].sum(dtype=np.float64)), bool(greedy[r, sl].all()))
    return out

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

  def _get_generator(self):
    if self._generator is None:
      from dmc_jax.generate import DMCOptions, Generator
      if self.policy is not None:
        from dmc_jax.baselines.policy_generate import PolicyGenerator
        self._generator = PolicyGenerator(self.cfg, self.params, self.policy)
      else:
        self._generator = Generator(self.cfg, self.params, dmc=None if self.dmc is None else DMCOptions(self.dmc))
    return self._generator

  def generate_until(self, requests) -> list[str]:
    from dmc_jax.generate import Sampling
    gen = self._get_generator()
    eos = sorted(set(self.cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids))
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
