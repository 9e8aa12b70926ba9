"""dmc-jax: Dynamic Memory Compression for Llama-family models in JAX/Flax.

    import dmc_jax
    model = dmc_jax.load("ckpt/smollm2")
    model.generate(["The capital of France is"], max_new_tokens=8)
    dmc_jax.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt/smollm2", source="gguf")

See `dmc_jax.api` for the cache-selection contract (`cache=`, `cr=`, `dmc_force_cr=`).
"""

from __future__ import annotations

import importlib

from dmc_jax import errors
from dmc_jax.errors import (
  ArgumentError,
  CachePoolExhausted,
  CheckpointError,
  ConfigError,
  ConversionError,
  DataError,
  TokenizerError,
  UserError,
)

# Re-exported names, imported on first use so that `import dmc_jax` stays cheap (jax and flax load with the model).
_LAZY = {
    "load": "dmc_jax.api", "Model": "dmc_jax.api", "Completion": "dmc_jax.api", "CacheChoice": "dmc_jax.api",
    "CACHES": "dmc_jax.api", "resolve_cache": "dmc_jax.api",
    "convert": "dmc_jax.convert",
    "Checkpoint": "dmc_jax.checkpoint",
    "LlamaConfig": "dmc_jax.config", "DMCConfig": "dmc_jax.config", "RopeScaling": "dmc_jax.config",
    "Llama": "dmc_jax.model.llama",
    "Generator": "dmc_jax.generate", "Sampling": "dmc_jax.generate", "DMCOptions": "dmc_jax.generate",
    "GenerationResult": "dmc_jax.generate",
    "Tokenizer": "dmc_jax.tokenizer",
}

__all__ = sorted(_LAZY) + ["errors", "ArgumentError", "CachePoolExhausted", "CheckpointError", "ConfigError",
                           "ConversionError", "DataError", "TokenizerError", "UserError"]


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    # `convert` is both the subpackage and (callable) the function; return the callable package.
    value = module if name == "convert" else getattr(module, name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'dmc_jax' has no attribute {name!r}")


def __dir__():
  return __all__
