"""A tiny Llama + DMC retrofit (GQA, 2 scanned layers) on synthetic packed rows, for the mesh tests.

    python tests/data/dmc_mesh_task.py meshes D,F,T [D,F,T ...]   # per mesh: losses of 3 steps, shardings, HLO
    python tests/data/dmc_mesh_task.py train WORKDIR D,F,T [--coordinator H:P --num-processes N --process-id I]

`meshes` compiles the real train step (experiments.dmc.plan.lower: the harness's shardings) on the first D·F·T
devices and runs it; `train` runs the harness loop (trainer.train), possibly as one of several processes.
Both print one JSON line on stdout. The tests pass XLA flags that halve compile times (same flags for every mesh).
"""

import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "dmc", "configs", "llama2_70b_cr2.py") + ":toy"
ROWS, SEQ, VOCAB, FFN = 8, 16, 256, 96
STEPS = 3


def experiment():
  from experiments.harness import config
  return config.load(CONFIG, [f"--config.train.batch_size={ROWS}", f"--config.train.seq_len={SEQ}",
                              "--config.train.grad_accum=1", "--config.train.stage1_steps=1",
                              "--config.train.ramp_steps=1", f"--config.train.steps={STEPS}",
                              "--config.train.lr=1e-3", "--config.train.decision_lr=1e-2",
                              "--config.train.warmup_steps=1"])


def models():
  from dmc_jax.config import DMCConfig, LlamaConfig
  llama = LlamaConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=FFN,
                      scan_layers=True, remat_policy="none")
  return llama, DMCConfig(window=2, offset=0.0)


def batch(step):
  """Two packed documents per row, split at a random point (segment ids, restarting positions, loss mask)."""
  from dmc_jax import text_data
  rng = np.random.default_rng(step)
  rows = []
  for _ in range(ROWS):
    cut = int(rng.integers(2, SEQ - 2))
    seg = np.where(np.arange(SEQ) < cut, 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(SEQ), np.arange(SEQ) - cut).astype(np.int32)
    rows.append(text_data.lm_row({"tokens": rng.integers(0, VOCAB, SEQ, dtype=np.int32),
                                  "tokens_segment_ids": seg, "tokens_positions": pos}))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Data:
  def __init__(self):
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.step += 1
    return batch(self.step)

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])


def hlo_shapes(text):
  return set(re.findall(r"\b(?:f32|bf16)\[([\d,]*)\]", text))


def run_meshes(shapes):
  import flax.linen as nn
  import jax

  from experiments.dmc import plan
  from experiments.harness import mesh as mesh_lib
  cfg, (llama, dmc) = experiment(), models()
  init, _ = plan.retrofit_pieces(cfg, llama, dmc)
  key = jax.random.key(cfg.seed, impl="rbg")
  initial = jax.device_get(jax.jit(lambda k: nn.unbox(init(k)))(key))  # host copy: each mesh gets its own
  out = {}
  for shape in shapes:
    n = int(np.prod(shape))
    mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:n])
    lowered, abstract = plan.lower(cfg, mesh, llama, dmc)
    compiled = lowered.compile()
    state = jax.device_put(initial, jax.tree.map(lambda a: a.sharding, abstract))
    params = state["params"]["params"]
    layer = params["layers"]["layer"]
    specs = {name: str(x.sharding.spec) for name, x in [("embed", params["embed"]["kernel"]),
                                                         ("q_proj", layer["attn"]["q_proj"]["kernel"]),
                                                         ("k_proj", layer["attn"]["k_proj"]["kernel"]),
                                                         ("gate", layer["mlp"]["gate"]["kernel"]),
                                                         ("mu_gate", state["opt_state"][1][0].mu["params"]["layers"]
                                                          ["layer"]["mlp"]["gate"]["kernel"])]}
    shard_shapes = {"q_proj": list(layer["attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape),
                    "lm_head": list(params["lm_head"]["kernel"].addressable_shards[0].data.shape)}
    losses = []
    batch_sh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    for step in range(1, STEPS + 1):
      rng = jax.device_put(jax.random.fold_in(jax.random.split(key)[1], step), rep)
      state, m = compiled(state, jax.device_put(batch(step), batch_sh), rng)
      losses.append(float(m["loss"]))
    out[",".join(map(str, shape))] = {"losses": losses, "specs": specs, "shard_shapes": shard_shapes,
                                      "hlo_shapes": sorted(hlo_shapes(compiled.as_text()))}
  return out


def run_train(workdir, shape, coordinator=None, num_processes=None, process_id=None):
  from experiments.harness import distributed
  distributed.initialize(coordinator, num_processes, process_id)
  import jax

  from experiments.dmc import plan
  from experiments.harness import progress, trainer
  progress.setup_logging()
  cfg, (llama, dmc) = experiment(), models()
  init, train_step = plan.retrofit_pieces(cfg, llama, dmc)
  task = trainer.Task(init=init, train_step=train_step, data=Data, describe={"format": "test/1"})
  res = trainer.train(task, trainer.LoopConfig(steps=STEPS, log_every=1, ckpt_every=2, async_ckpt=False,
                                               mesh_shape=shape), workdir)
  return {"process": jax.process_index(), "devices": jax.device_count(),
          "losses": [r["train/loss"] for r in res.history if "train/loss" in r]}


if __name__ == "__main__":
  mode = sys.argv[1]
  parse = lambda s: tuple(int(x) for x in s.split(","))
  if mode == "meshes":
    print(json.dumps(run_meshes([parse(s) for s in sys.argv[2:]])))
  else:
    rest = sys.argv[4:]
    flags = dict(zip(rest[::2], rest[1::2]))
    print(json.dumps(run_train(sys.argv[2], parse(sys.argv[3]), flags.get("--coordinator"),
                               int(flags["--num-processes"]) if "--num-processes" in flags else None,
                               int(flags["--process-id"]) if "--process-id" in flags else None)))
