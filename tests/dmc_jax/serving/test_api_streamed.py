"""`Model.generate(..., max_batch=N)`: offline continuous batching through the engine gives the fixed batch's text."""

import pytest

from dmc_jax.errors import ArgumentError


def test_generate_through_the_engine_equals_the_fixed_batch(tiny_checkpoint):
  import dmc_jax
  model = dmc_jax.load(tiny_checkpoint)
  prompts = ["The capital of France is", "Gravity", "One two three four five six"]
  fixed = model.generate(prompts, 5, cache="vanilla", stop_at_eos=False)
  out = model.complete(prompts, 5, cache="vanilla", stop_at_eos=False, max_batch=2)
  assert out.texts == fixed
  assert out.result["finish_reasons"] == ["length"] * 3 and out.result["tokens_generated"] == 15
  with pytest.raises(ArgumentError, match="max_batch"):
    model.generate(prompts, 5, max_batch=0)
  # An eviction policy streams through the engine too, with the fixed-batch policy generator's text.
  fixed = model.generate(prompts, 5, cache="h2o", cr=2, stop_at_eos=False)
  assert model.generate(prompts, 5, cache="h2o", cr=2, stop_at_eos=False, max_batch=2) == fixed
