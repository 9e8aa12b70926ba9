"""A small task for the harness tests: an MLP fit by Adam on a grain pipeline (the loop is what is tested).

    python tests/data/harness_task.py WORKDIR STEPS [KILL_AT]
KILL_AT: the process SIGKILLs itself right after that step (a crash with checkpoints possibly still in flight).
"""

import os
import signal
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.harness import progress, trainer


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
    return nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "vocab")))(
        jnp.tanh(x))


def make_task():
  model, tx = MLP(), optax.adam(1e-2)
  xs = np.linspace(-2, 2, 64, dtype=np.float32)

  def data():
    ds = grain.MapDataset.source(xs).shuffle(seed=3).repeat(None).map(
        lambda x: {"x": np.array([x, x * x, x ** 3, 1.0], np.float32), "y": np.array([np.sin(2 * x)])}).batch(8)
    return iter(ds.to_iter_dataset())

  def init(rng):
    params = model.init(rng, jnp.zeros((1, 4)))["params"]
    return {"params": params, "opt_state": tx.init(params)}

  def train_step(state, batch, rng):
    noise = 0.01 * jax.random.normal(rng, batch["y"].shape)  # uses the step RNG: resume must reproduce it

    def loss_fn(p):
      return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"] - noise) ** 2)
    loss, g = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(g, state["opt_state"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt}, {"loss": loss}

  return trainer.Task(init=init, train_step=train_step, data=data, describe={"format": "test/1"})


if __name__ == "__main__":
  progress.setup_logging()
  workdir, steps = sys.argv[1], int(sys.argv[2])
  kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None

  def on_step(step, m):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  mesh = tuple(int(x) for x in os.environ.get("HARNESS_MESH", "-1,1,1").split(","))
  res = trainer.train(make_task(), trainer.LoopConfig(steps=steps, log_every=1, ckpt_every=3, keep=2,
                                                      mesh_shape=mesh), workdir, on_step)
  kernel = res.state["params"]["Dense_0"]["kernel"]
  print("devices", len(jax.devices()), "kernel sharding", kernel.sharding.spec, file=sys.stderr)
