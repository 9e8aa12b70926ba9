"""Published Llama-family shapes, for random-weight planning and benchmarks (real weights come from `convert`)."""

from __future__ import annotations

from dmc_jax.config import LlamaConfig, RopeScaling

PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                rope_theta=100000.0, max_position_embeddings=8192, tie_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,)),
    # SmolLM2's vocabulary (and tokenizer) on a toy body: CPU tests and `tiny` experiment variants.
    "smollm2-tiny": LlamaConfig(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                rope_theta=100000.0, max_position_embeddings=8192, tie_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,)),
    "llama2-7b": LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             ffn_dim=11008, max_position_embeddings=4096),
    "llama2-13b": LlamaConfig(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                              ffn_dim=13824, max_position_embeddings=4096),
    "llama2-70b": LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              ffn_dim=28672, max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             ffn_dim=14336, rope_theta=500000.0, max_position_embeddings=8192,
                             bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama3.1-8b": LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                               ffn_dim=14336, rope_theta=500000.0, rope_scaling=RopeScaling(),
                               max_position_embeddings=131072, bos_token_id=128000,
                               eos_token_ids=(128001, 128008, 128009)),
}


def preset(name: str, **changes) -> LlamaConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**changes)
