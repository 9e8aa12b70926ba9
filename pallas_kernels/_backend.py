"""What every kernel API shares: implementation names and choice, interpret-mode resolution, abstract-GPU lowering.

The implementation names, defined here once (configs and `dmc-jax bench --impl` validate against them):

* "reference" — the simple jnp oracle (tests compare everything against it);
* "xla"       — the fast path on plain XLA (an op without one runs its reference);
* "pallas"    — the Pallas kernel (Triton lowering on a GPU; interpreted elsewhere);
* "tpu"       — a Pallas kernel for TPUs (Mosaic), where an op has one;
* "triton"    — a kernel written in Triton itself, where an op has one;
* None        — the best available: "pallas" on a GPU, "tpu" on a TPU where the op has it, else "xla". Pallas on a
  CPU only runs interpreted, which is a correctness tool, not a fast path: tests ask for "pallas" explicitly.
"""

from __future__ import annotations

import os

import jax

IMPLEMENTATIONS = (None, "reference", "xla", "pallas", "tpu", "triton")
# Set to 1 to run Pallas kernels in interpret mode even on a GPU (debugging: prints, NaN checks, no Triton).
FORCE_INTERPRET_ENV = "DMC_JAX_PALLAS_INTERPRET"


def check_implementation(op: str, implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def platform() -> str:
  return jax.default_backend()


def resolve(op: str, implementation, available=("reference", "xla", "pallas")) -> str:
  """None → the best of `available` on this platform ("pallas" on a GPU, "tpu" on a TPU, else "xla"); an explicit
  name passes through if the op has it. `available`: the names this op implements (a known name it lacks is a
  clear error, not a silent fallback)."""
  check_implementation(op, implementation)
  if implementation is None:
    best = {"gpu": "pallas", "tpu": "tpu"}.get(platform(), "xla")
    return best if best in available else "xla"
  if implementation not in available:
    raise ValueError(f"{op}: implementation {implementation!r} is not available for this op (it has "
                     f"{', '.join(available)})")
  return implementation


def for_op(implementation, available) -> str | None:
  """A model-wide choice (`LlamaConfig.attention_impl`) as one op sees it: a name the op lacks means its best
  available (e.g. "tpu" picks the TPU decode kernel; the training attention has none and runs its default)."""
  check_implementation("attention_impl", implementation)
  return implementation if implementation in available else None


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
