"""Small-budget retrofit mechanisms: distillation from the frozen original, trainable subsets (decision rows, the
decision adapter, norms, LoRA) with optimizer state for them only, and adapters as a checkpoint kind."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import word_level_tokenizer, write_checkpoint

import dmc_jax
from dmc_jax import adapter as adapter_lib
from dmc_jax import checkpoint, train
from dmc_jax.config import DMCConfig, LlamaConfig
from dmc_jax.convert import layout
from dmc_jax.errors import CheckpointError
from dmc_jax.model.llama import Llama

# SmolLM2's vocabulary size: the checkpoints carry its tokenizer (whose ids must fit the embedding).
CFG = LlamaConfig(vocab_size=49152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
CHANNEL = DMCConfig(window=4)
ADAPTER = DMCConfig(window=4, decisions="adapter")


def _batch(seed=0, b=2, l=16):
  tokens = jax.random.randint(jax.random.key(seed), (b, l + 1), 0, CFG.vocab_size)
  seg = jnp.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4])[:b]
  mask = (seg > 0) & jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros((b, 1), bool)], axis=1)
  return {"tokens": tokens[:, :l], "targets": tokens[:, 1:], "segment_ids": seg, "loss_mask": mask.astype(jnp.int32)}


def _params(dmc=None, seed=0):
  model = Llama(CFG) if dmc is None else Llama(CFG, dmc, "eval")
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))


def _flat(tree):
  return {k: np.asarray(v) for k, v in layout.flatten(tree["params"]).items()}


@pytest.mark.parametrize("direction, temperature", [("forward", 1.0), ("reverse", 2.0)])
def test_distill_equals_a_direct_kl(direction, temperature):
  teacher = _params()
  student = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), teacher)
  batch = _batch()
  spec = train.LossSpec("distill", direction=direction, temperature=temperature, chunk=5)  # 16 = 3·5 + 1: padding
  kl, ce = train.distill_loss(CFG, None, "off", spec)(student, teacher, batch)
  args = (batch["tokens"], None, batch["segment_ids"])
  ls, lt = Llama(CFG).apply(student, *args), Llama(CFG).apply(teacher, *args)
  ps, pt = jax.nn.log_softmax(ls / temperature), jax.nn.log_softmax(lt / temperature)
  per = jnp.sum(jnp.exp(pt) * (pt - ps), -1) if direction == "forward" else jnp.sum(jnp.exp(ps) * (ps - pt), -1)
  m = batch["loss_mask"]
  want = float(jnp.sum(per * m) / jnp.sum(m)) * temperature ** 2
  assert want > 1e-3  # a real difference to measure
  np.testing.assert_allclose(kl, want, rtol=1e-5)
  np.testing.assert_allclose(ce, train.lm_loss(ls, batch["targets"], m), rtol=1e-5)


def test_distill_vanishes_for_the_adapter_form_at_init():
  """Frozen base + zero-initialised decision adapter: the student is the teacher (eval: hard, noiseless)."""
  params = _params(ADAPTER)
  base = {"params": {k: v for k, v in params["params"].items()}}  # the adapter weights are ignored by the teacher
  batch = _batch()
  kl_eval, _ = train.distill_loss(CFG, ADAPTER, "eval")(params, base, batch)
  assert abs(float(kl_eval)) < 1e-7, float(kl_eval)
  kl_train, _ = train.distill_loss(CFG, ADAPTER, "train")(params, base, batch, jax.random.key(4))
  assert 0 <= float(kl_train) <= 1e-3, float(kl_train)


def _run(dmc, trainable, loss, stage1_steps, grad_accum, steps=3):
  params = _params(dmc)
  spec = adapter_lib.AdapterSpec.for_trainable(trainable, dmc, lora_rank=2, lora_alpha=4.0,
                                               lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "down"))
  tx = optax.chain(optax.adamw(1e-2), train.scale_decision_rows(10.0, dmc))
  state = train.init_state(params, tx, dmc, spec, loss)
  step = jax.jit(train.make_retrofit_step(CFG, dmc, tx, stage1_steps, 1, 2.0, grad_accum=grad_accum,
                                          cr_weight=5.0, loss=loss, adapter_spec=spec))
  for i in range(steps):
    state, metrics = step(state, _batch(i), jax.random.key(i))
  return params, spec, state, metrics


@pytest.fixture(scope="module")
def lora_run():
  """Channel form, trainable=lora (+ the decision rows), distill+lm, stage 1 then surgery, 2 microbatches."""
  return _run(CHANNEL, "lora", train.LossSpec("distill+lm", chunk=8), stage1_steps=1, grad_accum=2)


def test_lora_trains_only_its_parts_and_holds_state_only_for_them(lora_run):
  params, spec, state, metrics = lora_run
  assert np.isfinite(float(metrics["loss"])) and float(metrics["distill_loss"]) > 0
  assert spec.parts == ("decision_rows", "lora")
  base, frozen = _flat(params), _flat(state["frozen"])
  assert all(np.array_equal(base[k], frozen[k]) for k in base)  # the frozen base is bit-identical
  merged = _flat(adapter_lib.merge(state["frozen"], state["params"], spec, CHANNEL))
  changed = {k for k in base if not np.array_equal(base[k], merged[k])}
  targets = {f"layers_{i}/{m}/kernel" for i in range(CFG.n_layers)
             for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/down")}
  assert changed == targets  # norms, embeddings, gate/up untouched
  trained = _flat(state["params"])
  assert set(trained) == ({k.replace("/kernel", "/lora_a") for k in targets} |
                          {k.replace("/kernel", "/lora_b") for k in targets} |
                          {f"layers_{i}/attn/{p}_proj/rows" for i in range(CFG.n_layers) for p in "qk"})
  # The rows are the trained ones (the LoRA delta does not leak into channel ch), zeroed by the surgery and then
  # moved by the CR loss.
  for i in range(CFG.n_layers):
    np.testing.assert_array_equal(merged[f"layers_{i}/attn/k_proj/kernel"][..., -1],
                                  trained[f"layers_{i}/attn/k_proj/rows"])
  assert np.any(trained["layers_0/attn/k_proj/rows"] != 0)
  # Optimizer state: Adam's two moments for exactly the trainable leaves, nothing the size of the base.
  shapes = sorted(v.shape for v in trained.values())
  moments = sorted(np.shape(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
  assert moments == sorted(shapes * 2)


def test_decisions_and_norms_split():
  params = _params()
  spec = adapter_lib.AdapterSpec.for_trainable("decisions+norms", CHANNEL)
  parts = _flat(adapter_lib.split(params, spec, CHANNEL))
  norms = {k for k in _flat(params) if k.endswith("norm/scale")}
  assert norms <= set(parts) and len(parts) == len(norms) + 2 * CFG.n_layers
  merged = _flat(adapter_lib.merge(params, {"params": layout.unflatten(parts)}, spec, CHANNEL))
  assert all(np.array_equal(v, merged[k]) for k, v in _flat(params).items())  # split then merge is the identity


def test_adapter_form_decisions_train_alone():
  params, spec, state, _ = _run(ADAPTER, "decisions", train.LossSpec("distill", chunk=8), stage1_steps=0,
                                grad_accum=1, steps=2)
  assert spec.parts == ("decision_adapter",)
  trained = _flat(state["params"])
  assert set(trained) == {f"layers_{i}/attn/decision_adapter/kernel" for i in range(CFG.n_layers)}
  assert any(np.any(v != 0) for v in trained.values())
  base = _flat(params)
  assert all(np.array_equal(base[k], v) for k, v in _flat(state["frozen"]).items())


def _base_checkpoint(path, params, tok):
  del tok  # the model's 67-token vocabulary needs a tokenizer of its own size
  return write_checkpoint(path, CFG, params, tokenizer=word_level_tokenizer(CFG.vocab_size))


def test_adapter_save_load_refuse_and_merge(lora_run, tmp_path, tiny_checkpoint):
  params, spec, state, _ = lora_run
  base_dir = _base_checkpoint(tmp_path / "base", params, tiny_checkpoint)
  base = checkpoint.Checkpoint(base_dir)
  out = adapter_lib.save(str(tmp_path / "adapter"), state["params"], spec, CHANNEL, n_layers=None,
                         base_digest=base.param_digest, base_param_dtype="float32", tokens=96)
  meta = adapter_lib.load(out).meta
  assert meta["parts"][1] == {"kind": "lora", "rank": 2, "alpha": 4.0,
                              "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "down"]}
  assert meta["method"] == "dmc" and meta["provenance"]["tokens"] == 96
  in_memory = adapter_lib.merge(state["frozen"], state["params"], spec, CHANNEL)
  tokens = _batch()["tokens"]
  want = Llama(CFG, CHANNEL, "eval").apply(in_memory, tokens)[0]
  model = dmc_jax.load(base_dir, adapter=out)
  assert model.method == "dmc" and model.dmc_config() == CHANNEL
  np.testing.assert_array_equal(Llama(CFG, CHANNEL, "eval").apply(model.params, tokens)[0], want)
  # Another base (one weight changed) is refused, in one line naming both digests.
  other = jax.tree.map(lambda x: x, params)
  other["params"]["final_norm"]["scale"] = other["params"]["final_norm"]["scale"] * 1.01
  other_dir = _base_checkpoint(tmp_path / "other", other, tiny_checkpoint)
  with pytest.raises(CheckpointError) as e:
    dmc_jax.load(other_dir, adapter=out)
  msg = str(e.value)
  assert "\n" not in msg and base.param_digest in msg and checkpoint.Checkpoint(other_dir).param_digest in msg
  # A tampered tensor file fails its sha256.
  import shutil
  bad = shutil.copytree(out, tmp_path / "bad")
  with open(bad / adapter_lib.TENSORS, "r+b") as f:
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 1]))
  with pytest.raises(CheckpointError, match="sha256 mismatch"):
    adapter_lib.load(str(bad))
  # merge-adapter: an ordinary DMC checkpoint with the same logits.
  full = adapter_lib.merge_into_checkpoint(base_dir, out, str(tmp_path / "full"))
  merged = checkpoint.Checkpoint(full)
  assert merged.method == "dmc"
  np.testing.assert_array_equal(Llama(CFG, CHANNEL, "eval").apply(merged.load_params(), tokens)[0], want)


def test_adapter_form_adapter_merges_into_a_checkpoint(tmp_path, tiny_checkpoint):
  """The adapter form's merged checkpoint carries the decision adapters (and loads them back)."""
  base_params = _params()
  params = _params(ADAPTER)
  spec = adapter_lib.AdapterSpec.for_trainable("decisions", ADAPTER)
  parts = adapter_lib.split(params, spec, ADAPTER)
  parts = jax.tree.map(lambda x: x + 0.1, parts)  # "trained"
  base_dir = _base_checkpoint(tmp_path / "base", base_params, tiny_checkpoint)
  out = adapter_lib.save(str(tmp_path / "adapter"), parts, spec, ADAPTER, n_layers=None,
                         base_digest=checkpoint.Checkpoint(base_dir).param_digest, base_param_dtype="float32")
  tokens = _batch()["tokens"]
  want = Llama(CFG, ADAPTER, "eval").apply(adapter_lib.merge(base_params, parts, spec, ADAPTER), tokens)[0]
  got = Llama(CFG, ADAPTER, "eval").apply(dmc_jax.load(base_dir, adapter=out).params, tokens)[0]
  np.testing.assert_array_equal(got, want)
  full = checkpoint.Checkpoint(adapter_lib.merge_into_checkpoint(base_dir, out, str(tmp_path / "full")))
  assert full.dmc["decisions"] == "adapter"
  np.testing.assert_array_equal(Llama(CFG, ADAPTER, "eval").apply(full.load_params(), tokens)[0], want)
