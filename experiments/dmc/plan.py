"""`dmc-jax plan`: will a retrofit fit? AOT-compile the real train step on fake CPU devices and count by hand.

The experiment's train step (`dmc_jax.train.make_retrofit_step` with `dmc_run.make_optimizer`) is jitted with
the harness's shardings over a `(data, fsdp, tensor)` mesh of fake CPU devices and lowered on
`jax.ShapeDtypeStruct`s: nothing is allocated, so a 70B model plans on a laptop. It compiles the whole optimizer
step: `batch_size` rows, accumulated over `grad_accum` microbatches in a scan (activations are per microbatch, plus
an f32 gradient accumulator). Printed per device: XLA's `memory_analysis()`
(the CPU compiler's buffer assignment: a GPU compile fuses differently) beside an analytic count:

  state        = 12 P / (fsdp·tensor)        f32 master parameters + Adam mu + nu
  grads        =  4 P / (fsdp·tensor)        f32 gradients
  accumulator  =  4 P / (fsdp·tensor)        f32 gradient sum across microbatches (grad_accum > 1)
  layer weights = P_layer (b + 4) / tensor    one layer's gathered compute-dtype weights + its unreduced f32 grads
  saved        = n_layers · S                activations kept between forward and backward (remat policy)
  working      = 2 · A                       one layer's forward intermediates, recomputed, + their cotangents
  logits       = 3 · 4 T V / tensor          f32 logits, log-softmax and its cotangent

with T = rows·L tokens on a device (rows = microbatch / (data·fsdp)), b bytes of the compute dtype, and one
layer's forward intermediates
  A = rows·(H/t)·L²·(8 + b)                                  attention logits (f32, masked f32) and probabilities
    + T·[(H + 2K)·Dh·2b + 4·K·Dh·(2W + 3) + 3·F·b] / t      q/k/v (+ rotated), windowed f32 sums, MLP
    + T·D·(8 + 2b)                                           norms (f32) and residual outputs
S = T·D·b (remat "full": the scanned layer's input only), A (remat "none"), and for "dots"/"dots_no_batch" the
matmul outputs rows·(H/t)·L²·4 + T·[(2H + 2K)·Dh + 3F]·b/t + T·D·b.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

GiB = 2**30
H100_USABLE_GIB = 0.95 * 79.6  # nvidia-smi's 81559 MiB, XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
V5P_USABLE_GIB = 0.95 * 95e9 / GiB


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  devices: int
  model: str
  n_layers: int
  params: int  # total parameter count
  micro_rows: int  # global rows of one microbatch
  seq_len: int
  compiled: dict[str, int]  # memory_analysis() per device
  param_bytes_per_device: int  # f32 parameter shard bytes from the shardings
  analytic: dict[str, int]
  seconds: dict[str, float]

  @property
  def compiled_peak(self) -> int:
    c = self.compiled
    return c["argument"] + c["output"] - c["alias"] + c["temp"]

  @property
  def analytic_peak(self) -> int:
    return sum(self.analytic.values())

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), compiled_peak=self.compiled_peak, analytic_peak=self.analytic_peak)


def fake_cpu_devices(n: int) -> list:
  """`n` CPU devices; must run before JAX initialises its backends (or with XLA_FLAGS already giving ≥ n)."""
  import jax

  from experiments.harness.mesh import MeshError
  jax.config.update("jax_platforms", "cpu")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # the backend is already up: use what it has
    pass
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise MeshError(f"need {n} fake CPU devices but JAX already started with {len(devices)}; run the plan in a "
                    f"fresh process or set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
  return devices[:n]


def mesh_devices(mesh_cfg, devices: int | None) -> int:
  """Devices to plan on: `devices`, else the mesh's product with data = -1 read as 1 (more data-parallel groups
  change nothing per device)."""
  from experiments.harness import mesh as mesh_lib
  if devices:
    return devices
  data, fsdp, tensor = mesh_lib.mesh_shape(mesh_cfg)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size == -1:
      raise mesh_lib.MeshError(f"mesh.{name}=-1: give every mesh size (--config.mesh.{name}=N) or --devices N")
  return max(data, 1) * fsdp * tensor


def model_config(cfg, n_layers: int | None = None):
  """The experiment's Llama shape (its preset; a converted checkpoint's config when model.init_from is set)."""
  from dmc_jax.config import DMCConfig
  from dmc_jax.presets import preset
  if cfg.model.init_from:
    from dmc_jax import checkpoint
    llama = checkpoint.Checkpoint(cfg.model.init_from).config
  else:
    llama = preset(cfg.model.preset)
  llama = llama.replace(param_dtype="float32", dtype=cfg.model.dtype, scan_layers=True,
                        remat_policy=cfg.model.remat, n_layers=n_layers or llama.n_layers)
  dmc = DMCConfig(decision_channel=cfg.dmc.decision_channel, window=cfg.dmc.window,
                  temperature=cfg.dmc.temperature, offset=cfg.dmc.offset, decisions=cfg.dmc.decisions,
                  method=cfg.dmc.get("method", "dmc"), dms_window=cfg.dmc.get("dms_window", 16),
                  dms_scale=cfg.dmc.get("dms_scale", 100.0))
  return llama, dmc


def micro_rows(cfg) -> int:
  from experiments.harness.config import ExperimentConfigError
  t = cfg.train
  if t.batch_size % t.grad_accum:
    raise ExperimentConfigError(f"train.batch_size {t.batch_size} is not divisible by train.grad_accum {t.grad_accum}")
  return t.batch_size // t.grad_accum


def retrofit_pieces(cfg, llama, dmc):
  """(init, train_step) of the retrofit as `dmc-jax train` runs it: init(rng) -> state with boxed (logically
  named) parameters and optimizer state; train_step(state, batch, rng) -> (state, scalar metrics)."""
  import jax.numpy as jnp

  from dmc_jax.model.llama import Llama
  from experiments.dmc import train as dmc_run
  tx = dmc_run.make_optimizer(cfg, dmc)
  retrofit = dmc_run.make_retrofit_step(cfg, llama, dmc, tx)

  def init(rng):
    model = Llama(llama, dmc, "eval") if dmc.decisions == "adapter" else Llama(llama)  # + decision adapters
    params = model.init(rng, jnp.zeros((1, 8), jnp.int32))  # boxed: the optimizer state inherits the names
    return dmc_run.initial_state(cfg, dmc, tx, params)

  def train_step(state, batch, rng):
    state, m = retrofit(state, batch, rng)
    m.pop("merge_fraction_per_head")
    return state, m
  return init, train_step


def lower(cfg, mesh, llama, dmc):
  """(lowered train step, abstract state with its shardings), sharded as the harness shards them and traced under
  the mesh and the logical rules (so the activation constraints apply)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from experiments.harness import mesh as mesh_lib
  from experiments.harness import trainer
  init, train_step = retrofit_pieces(cfg, llama, dmc)
  micro_rows(cfg)  # validates the split
  rows = cfg.train.batch_size
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
    key = jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))
    boxed = jax.eval_shape(init, key)
    state_sh = mesh_lib.logical_shardings(boxed, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer.strip_boxes(boxed), state_sh)
    batch_sh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    batch = {k: jax.ShapeDtypeStruct((rows, cfg.train.seq_len), jnp.int32, sharding=batch_sh)
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))
    return step.lower(state, batch, rng), state


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (device 0's shard of every leaf)."""
  import jax
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def analytic(llama, shape: dict[str, int], rows: int, seq_len: int, window: int | None, grad_accum: int) -> dict:
  """Per-device bytes by hand (the formulas in this module's docstring)."""
  data, fsdp, t = shape["data"], shape["fsdp"], shape["tensor"]
  p = llama.num_params()
  b = np.dtype(llama.dtype).itemsize if llama.dtype != "bfloat16" else 2
  r = rows / (data * fsdp)
  L, d, f, hd = seq_len, llama.d_model, llama.ffn_dim, llama.head_dim
  h, k, v = llama.n_heads, llama.n_kv_heads, llama.vocab_size
  tok = r * L
  w = window or 1
  layer_params = d * hd * (2 * h + 2 * k) + 3 * d * f + 2 * d
  a = (r * (h / t) * L * L * (8 + b) + tok * ((h + 2 * k) * hd * 2 * b + 4 * k * hd * (2 * w + 3) + 3 * f * b) / t
       + tok * d * (8 + 2 * b))
  dots = r * (h / t) * L * L * 4 + tok * ((2 * h + 2 * k) * hd + 3 * f) * b / t + tok * d * b
  saved = {"full": tok * d * b, "none": a, "dots": dots, "dots_no_batch": dots}[llama.remat_policy]
  grads = 4 * p / (fsdp * t)
  out = {"state": 12 * p / (fsdp * t), "grads": grads, "grad_accumulator": grads if grad_accum > 1 else 0,
         "layer_weights": layer_params * (b + 4) / t,
         "saved_activations": llama.n_layers * saved, "layer_working": 2 * a, "logits": 3 * 4 * tok * v / t}
  return {k_: int(v_) for k_, v_ in out.items()}


def plan(cfg, devices: int | None = None, n_layers: int | None = None) -> Plan:
  """Compiles the experiment's train step for `cfg.mesh` on fake CPU devices; returns both memory counts."""
  from experiments.dmc.train import check_config
  from experiments.harness import mesh as mesh_lib
  check_config(cfg)
  n = mesh_devices(cfg.mesh, devices)
  devs = fake_cpu_devices(n)
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_shape(cfg.mesh), devices=devs)
  rows = micro_rows(cfg)
  if rows % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise mesh_lib.MeshError(f"a microbatch of {rows} rows (train.batch_size / train.grad_accum) does not split "
                             f"over the {mesh.shape['data'] * mesh.shape['fsdp']} data-parallel devices")
  llama, dmc = model_config(cfg, n_layers)
  t0 = time.perf_counter()
  lowered, state = lower(cfg, mesh, llama, dmc)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  shape = dict(mesh.shape)
  return Plan(mesh=shape, devices=n, model=cfg.model.init_from or cfg.model.preset, n_layers=llama.n_layers,
              params=llama.num_params(), micro_rows=rows, seq_len=cfg.train.seq_len,
              compiled={"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                        "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes},
              param_bytes_per_device=shard_bytes(state["params"]),
              analytic=analytic(llama, shape, rows, cfg.train.seq_len, dmc.window, cfg.train.grad_accum),
              seconds={"lower": round(t1 - t0, 1), "compile": round(t2 - t1, 1)})


def report(p: Plan) -> str:
  g = lambda x: f"{x / GiB:8.2f} GiB"
  mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
  lines = [f"plan: {p.model}, {p.n_layers} layers, {p.params / 1e9:.2f} B parameters; mesh {mesh} "
           f"({p.devices} devices); microbatch {p.micro_rows} x {p.seq_len} tokens",
           f"  lowered in {p.seconds['lower']} s, compiled in {p.seconds['compile']} s (fake CPU devices)",
           "per device                       compiled (memory_analysis)    analytic",
           f"  parameters (f32 shard)         {g(p.param_bytes_per_device)}            {g(p.analytic['state'] / 3)}",
           f"  arguments (state + batch)      {g(p.compiled['argument'])}"
           f"            {g(p.analytic['state'])} (state)",
           f"  temporaries                    {g(p.compiled['temp'])}"
           f"            {g(p.analytic_peak - p.analytic['state'])} (the rest)"]
  lines += [f"      {k:26s}                             {g(v)}" for k, v in p.analytic.items() if k != "state"]
  verdict = lambda n: "fits" if fits(n) else "DOES NOT fit"
  lines += [f"  peak (args + out - alias + temp) {g(p.compiled_peak)}          {g(p.analytic_peak)}",
            f"  H100-80GB usable {H100_USABLE_GIB:.1f} GiB: compiled {verdict(p.compiled_peak)}"
            f", analytic {verdict(p.analytic_peak)}; TPU v5p usable {V5P_USABLE_GIB:.1f} "
            f"GiB: analytic {'fits' if fits(p.analytic_peak, V5P_USABLE_GIB) else 'DOES NOT fit'}"]
  return "\n".join(lines)


def fits(nbytes: int, usable_gib: float = H100_USABLE_GIB) -> bool:
  return nbytes <= usable_gib * GiB

