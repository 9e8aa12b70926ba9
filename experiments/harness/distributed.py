"""Multi-host training: several processes form one global mesh (`jax.distributed`).

Where the settings come from, first match wins: the `--coordinator/--num-processes/--process-id` flags, the
environment `DMC_JAX_COORDINATOR` (host:port), `DMC_JAX_NUM_PROCESSES`, `DMC_JAX_PROCESS_ID`, or a cluster JAX
detects itself (a SLURM job step with several tasks, Open MPI, a Cloud TPU pod slice). With none of these the run
is single-process and nothing is initialised. Call before anything touches a JAX backend.
"""

from __future__ import annotations

import logging
import os

from experiments.harness.mesh import MeshError

log = logging.getLogger("dmc_jax")

ENV = {"coordinator": "DMC_JAX_COORDINATOR", "num_processes": "DMC_JAX_NUM_PROCESSES",
       "process_id": "DMC_JAX_PROCESS_ID"}


class DistributedError(MeshError):  # a user error: one line, exit status 2
  pass


def _cluster_detected() -> bool:
  """A launcher JAX's cluster detection understands started several processes."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
  """The explicit settings (flags over environment), {} to let JAX detect the cluster, or None: single process."""
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  for key, var in ENV.items():
    if given[key] is None and os.environ.get(var):
      text = os.environ[var]
      try:
        given[key] = text if key == "coordinator" else int(text)
      except ValueError:
        raise DistributedError(f"{var}={text!r}: expected an integer") from None
  if all(v is None for v in given.values()):
    return {} if _cluster_detected() else None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedError(f"multi-host: {', '.join('--' + k.replace('_', '-') for k in missing)} missing "
                           f"(or {', '.join(ENV[k] for k in missing)}); give all three")
  if ":" not in given["coordinator"]:
    raise DistributedError(f"--coordinator {given['coordinator']!r}: expected host:port")
  if not 0 <= given["process_id"] < given["num_processes"]:
    raise DistributedError(f"--process-id {given['process_id']}: expected 0 .. {given['num_processes'] - 1}")
  return given


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the global mesh when multi-host settings exist; returns whether it did."""
  s = settings(coordinator, num_processes, process_id)
  if s is None:
    return False
  import jax
  if s:
    jax.distributed.initialize(s["coordinator"], s["num_processes"], s["process_id"])
  else:
    jax.distributed.initialize()
  log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True
