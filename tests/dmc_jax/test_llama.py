"""Model properties that need no reference implementation (HF equality is in test_golden_hf.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.config import LlamaConfig
from dmc_jax.convert import layout
from dmc_jax.model.llama import Llama, init_cache, positions_from_segments

CFG = LlamaConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=80, head_dim=12)


def _init(cfg, seed=0, length=8):
  params = nn.unbox(Llama(cfg).init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32)))
  # Random norm scales: the ones default would hide a norm applied to the wrong tensor.
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x * (1 + 0.2 * jax.random.normal(jax.random.key(len(str(p))), x.shape))
      if "scale" in str(p) else x, params)


def _tokens(b, l, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.key(seed), (b, l), 0, vocab)


def test_every_parameter_has_logical_axes():
  for cfg in (CFG, CFG.replace(scan_layers=True)):
    boxed = Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    specs = nn.get_partition_spec(boxed)
    for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.P)):
      assert isinstance(spec, jax.P) and all(a is not None for a in spec), (path, spec)
    flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.P))
    assert len(flat) == len(jax.tree.leaves(nn.unbox(boxed)))


def test_param_shapes_match_conversion_layout():
  flat = layout.flatten(_init(CFG)["params"])
  assert {k: v.shape for k, v in flat.items()} == layout.our_shapes(CFG)
  tied = CFG.replace(tie_embeddings=True)
  assert set(layout.flatten(_init(tied)["params"])) == set(layout.our_shapes(tied))
  assert "lm_head/kernel" not in layout.our_shapes(tied)
  assert sum(v.size for v in flat.values()) == CFG.num_params()


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_layers_compute_the_same_function(remat):
  params = _init(CFG)
  tokens = _tokens(2, 10)
  ref = Llama(CFG).apply(params, tokens)
  scanned_cfg = CFG.replace(scan_layers=True, remat_policy=remat)
  scanned = {"params": layout.stack_layers(params["params"], CFG.n_layers)}
  out = Llama(scanned_cfg).apply(scanned, tokens)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  back = layout.unstack_layers(scanned["params"], CFG.n_layers)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params["params"]))


@pytest.mark.slow  # 17 s: one gradient compile per remat policy
def test_remat_gradients_equal_plain_gradients():
  params = _init(CFG)
  tokens = _tokens(2, 6)
  def loss(p, cfg):
    return jnp.mean(Llama(cfg).apply(p, tokens) ** 2)
  g_plain = jax.grad(loss)(params, CFG)
  g_remat = jax.grad(loss)(params, CFG.replace(remat_policy="full"))
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_packed_documents_equal_separate_runs():
  params = _init(CFG)
  model = Llama(CFG)
  a, b = _tokens(1, 7, seed=2), _tokens(1, 5, seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 7 + [2] * 5])
  out = model.apply(params, packed, segment_ids_BxL=seg)
  np.testing.assert_allclose(out[:, :7], model.apply(params, a), atol=2e-5)
  np.testing.assert_allclose(out[:, 7:], model.apply(params, b), atol=2e-5)
  # Without segment ids the second document would see the first: the test can tell the difference.
  assert not np.allclose(model.apply(params, packed)[:, 7:], model.apply(params, b), atol=1e-3)


def test_positions_restart_at_document_starts():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_cache_prefill_and_decode_equal_parallel_forward():
  params = _init(CFG)
  model = Llama(CFG)
  tokens = _tokens(2, 9)
  ref = model.apply(params, tokens)
  cache = init_cache(CFG, 2, 16)
  # Prefill 5 tokens, then decode the remaining 4 one by one.
  logits, cache = model.apply(params, tokens[:, :5], cache, jnp.zeros(2, jnp.int32),
                              method=Llama.forward_with_cache)
  np.testing.assert_allclose(logits, ref[:, :5], atol=2e-5)
  for t in range(5, 9):
    logits, cache = model.apply(params, tokens[:, t:t + 1], cache, jnp.full(2, t, jnp.int32),
                                method=Llama.forward_with_cache)
    np.testing.assert_allclose(logits[:, 0], ref[:, t], atol=2e-5)


def test_ragged_batch_uses_per_sequence_positions():
  params = _init(CFG)
  model = Llama(CFG)
  short, long = _tokens(1, 3, seed=4), _tokens(1, 6, seed=5)
  batch = jnp.concatenate([jnp.pad(short, ((0, 0), (0, 3))), long])
  cache = init_cache(CFG, 2, 8)
  logits, cache = model.apply(params, batch, cache, jnp.zeros(2, jnp.int32), method=Llama.forward_with_cache)
  np.testing.assert_allclose(logits[0, :3], model.apply(params, short)[0], atol=2e-5)
  nxt = jnp.array([[11], [13]])
  step, _ = model.apply(params, nxt, cache, jnp.array([3, 6]), method=Llama.forward_with_cache)
  np.testing.assert_allclose(step[0, 0], model.apply(params, jnp.concatenate([short, nxt[:1]], 1))[0, -1],
                             atol=2e-5)
  np.testing.assert_allclose(step[1, 0], model.apply(params, jnp.concatenate([long, nxt[1:]], 1))[0, -1],
                             atol=2e-5)


def test_scanned_model_with_cache():
  params = _init(CFG)
  scan_cfg = CFG.replace(scan_layers=True)
  scanned = {"params": layout.stack_layers(params["params"], CFG.n_layers)}
  tokens = _tokens(2, 6)
  ref = Llama(CFG).apply(params, tokens)
  logits, _ = Llama(scan_cfg).apply(scanned, tokens, init_cache(scan_cfg, 2, 8), jnp.zeros(2, jnp.int32),
                                    method=Llama.forward_with_cache)
  np.testing.assert_allclose(logits, ref, atol=2e-5)


@pytest.mark.parametrize("n_kv", [6, 2, 1])  # MHA, GQA 3:1, MQA
def test_grouped_query_attention_equals_repeated_kv_heads(n_kv):
  """GQA with KV heads repeated G times is MHA with those repeated weights."""
  cfg = CFG.replace(n_kv_heads=n_kv)
  params = _init(cfg)
  g = cfg.n_heads // n_kv
  mha = jax.tree.map(lambda x: x, params)
  for i in range(cfg.n_layers):
    attn = mha["params"][f"layers_{i}"]["attn"]
    for name in ("k_proj", "v_proj"):
      attn[name]["kernel"] = jnp.repeat(attn[name]["kernel"], g, axis=1)
  tokens = _tokens(2, 7)
  out = Llama(cfg).apply(params, tokens)
  ref = Llama(cfg.replace(n_kv_heads=cfg.n_heads)).apply(mha, tokens)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_bfloat16_compute_stays_close_to_float32():
  params = _init(CFG)
  tokens = _tokens(2, 8)
  ref = Llama(CFG).apply(params, tokens)
  bf = Llama(CFG.replace(dtype="bfloat16")).apply(params, tokens)
  assert bf.dtype == jnp.float32  # logits stay float32
  rel = float(jnp.linalg.norm(bf - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 3e-2
  bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = Llama(CFG.replace(param_dtype="bfloat16", dtype="bfloat16")).apply(bf_params, tokens)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 5e-2
