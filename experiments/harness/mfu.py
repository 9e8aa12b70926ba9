"""Model FLOPs and device peaks for the MFU estimate (model FLOPs / step time / peak; remat recompute excluded).

Peaks are dense matmul rates from the vendors' data sheets, by device kind and compute dtype. The CPU entry is
not a data sheet number: it is the float32 2048³ matmul rate measured under XLA on this project's 2-core
machine (JAX_NOTES.md), so a CPU "MFU" reads as "fraction of what XLA's matmul reaches here".
"""

from __future__ import annotations

import jax

# device-kind substring → {compute dtype: peak FLOP/s per device}
PEAKS = (
    ("H100", {"bfloat16": 989e12, "float32": 495e12}),  # SXM, dense; float32 runs as TF32 by default
    ("H200", {"bfloat16": 989e12, "float32": 495e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12 / 2}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12 / 2}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12 / 2}),
    ("cpu", {"bfloat16": 250e9, "float32": 250e9}),  # measured, for a whole 2-core host (see above)
)


def peak_flops(devices=None, dtype: str = "bfloat16") -> float | None:
  """Summed peak over `devices` (default: all), None for an unknown kind (MFU is then not reported)."""
  devices = list(devices if devices is not None else jax.devices())
  kind = devices[0].device_kind if devices[0].platform != "cpu" else "cpu"
  for name, by_dtype in PEAKS:
    if name.lower() in kind.lower():
      if name == "cpu":  # the measured rate is for the host, however many fake devices split it
        return by_dtype.get(dtype)
      return by_dtype.get(dtype, by_dtype["bfloat16"]) * len(devices)
  return None


def llama_train_flops_per_token(cfg, seq_len: int) -> float:
  """6 × matmul parameters (forward + backward; the LM head counts even when tied, the embedding gather does
  not) + causal attention: QKᵀ and PV are 2·2·T·d FLOPs per token forward, halved by the causal mask, ×3."""
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.d_model + (cfg.vocab_size * cfg.d_model
                                                                     if cfg.tie_embeddings else 0)
  attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
  return 6.0 * matmul_params + attention
