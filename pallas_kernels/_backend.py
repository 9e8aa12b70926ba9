"""What every kernel API shares: implementation choice, interpret-mode resolution, abstract-GPU lowering.

`implementation=None` means the best available: the Pallas (Triton) kernel on a GPU, the Pallas TPU (Mosaic)
kernel on a TPU where an op has one ("tpu"; ops without one run XLA for it), the XLA (jnp reference) path
elsewhere — Pallas on a CPU only runs interpreted, which is a correctness tool, not a fast path. Tests ask for
"pallas" or "tpu" explicitly on the CPU and get the interpreter.
"""

from __future__ import annotations

import os

import jax

IMPLEMENTATIONS = (None, "xla", "pallas", "tpu")
# Set to 1 to run Pallas kernels in interpret mode even on a GPU (debugging: prints, NaN checks, no Triton).
FORCE_INTERPRET_ENV = "DMC_JAX_PALLAS_INTERPRET"


def check_implementation(op: str, implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def platform() -> str:
  return jax.default_backend()


def resolve(op: str, implementation) -> str:
  """None → "pallas" on a GPU, "tpu" on a TPU, "xla" elsewhere; explicit choices pass through (validated)."""
  check_implementation(op, implementation)
  if implementation is None:
    return {"gpu": "pallas", "tpu": "tpu"}.get(platform(), "xla")
  return implementation


def interpret(requested: bool | None = None, target: str = "gpu") -> bool:
  """Interpret unless running on the kernel's `target` platform ("gpu": Triton kernels, "tpu": Mosaic ones)."""
  if requested is not None:
    return requested
  if os.environ.get(FORCE_INTERPRET_ENV, "") not in ("", "0"):
    return True
  return platform() != target


def lower_for_abstract_gpu(fn, *args, device_kind: str = "NVIDIA H100", **kwargs):
  """Runs the real Pallas→Triton lowering of `fn(*args)` against an abstract GPU, on any host.

  This catches what interpret mode accepts but Triton rejects (non-power-of-2 blocks, unsupported ops) without a
  GPU. `fn` must build its kernels with interpret=False; args may be ShapeDtypeStructs. Returns the lowered
  module (jax.stages.Lowered). Does not work for Mosaic GPU kernels.
  """
  from jax._src.mesh import AbstractDevice
  device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn, **kwargs).trace(*args).lower(lowering_platforms=("cuda",))
