"""pallas_kernels/dmc_attention: every implementation against an independent float64 oracle (forward) and the
jnp reference (forward and gradients w.r.t. q, k, v and the per-key bias).

On the CPU "pallas" runs in interpret mode, whose outputs start as NaN (see test_kernel_dmc_decode), so a tile
the kernel fails to write fails the comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _backend
from pallas_kernels.dmc_attention import api, gpu, reference

IMPLS = ["xla", "pallas"]
SMALL = gpu.Blocks(block_q=16, block_k=16, block_bwd=16)  # several tiles even at the tests' short lengths
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}


def make_case(b=1, l=37, h=4, kv=2, d=16, dtype=jnp.float32, seed=0, bias="relaxed", segments=True):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, l, n, d)) for n in (h, kv, kv))
  if bias == "hard":  # −1e30 where the next token merged (dmc.key_bias_hard)
    key_bias = np.where(rng.random((b, l, kv)) < 0.5, -1e30, 0.0)
  else:  # log(1 − α̃) for α̃ in (0, 0.95)
    key_bias = np.log(rng.uniform(0.05, 1.0, (b, l, kv)))
  seg = np.cumsum(rng.random((b, l)) < 0.15, axis=1).astype(np.int32) if segments else None
  return q, k, v, key_bias, seg, dtype


def oracle(q, k, v, key_bias, seg, window=0):
  """Query by query in float64: keys j < i − window get the bias, nearer ones none, later keys and other documents
  none (window 0: DMC; DMS's w otherwise)."""
  b, l, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      kh = hi // g
      for i in range(l):
        js = [j for j in range(i + 1) if seg is None or seg[bi, j] == seg[bi, i]]
        logits = np.array([q[bi, i, hi] @ k[bi, j, kh] / np.sqrt(d) + (key_bias[bi, j, kh] if i - j > window else 0.0)
                           for j in js])
        w = np.exp(logits - logits.max())
        out[bi, i, hi] = (w / w.sum()) @ v[bi, js, kh]
  return out


def inputs(case):
  q, k, v, key_bias, seg, dtype = case
  return ([jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(key_bias, jnp.float32)],
          None if seg is None else jnp.asarray(seg))


def attention_fn(implementation, seg, window=0):
  if implementation == "pallas":  # small tiles so that the short test sequences span several of them
    return lambda q, k, v, b: gpu.dmc_attention(q, k, v, b, seg, window=window, blocks=SMALL,
                                                interpret=_backend.interpret())
  return lambda q, k, v, b: api.dmc_attention(q, k, v, b, seg, implementation=implementation, window=window)


def rounded64(case):
  q, k, v, key_bias, seg, dtype = case
  rnd = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  return rnd(q), rnd(k), rnd(v), key_bias, seg


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bias", ["relaxed", "hard"])
def test_forward_matches_oracle(implementation, dtype, bias):
  case = make_case(dtype=dtype, bias=bias, seed=1 if bias == "hard" else 0)
  args, seg = inputs(case)
  out = np.asarray(attention_fn(implementation, seg)(*args).astype(jnp.float32))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, oracle(*rounded64(case)), atol=TOL[dtype], rtol=TOL[dtype])


# Lengths: 1, one tile exactly (16), a partial last tile (37); GQA 2:1, MHA, MQA 3:1; with and without segments.
GRAD_CASES = {"gqa_segments_37": dict(l=37), "mha_one_tile": dict(l=16, h=2, kv=2, segments=False),
              "mqa_len1": dict(l=1, h=3, kv=1), "hard_bias": dict(l=20, bias="hard", seed=3)}


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("case_name", list(GRAD_CASES))
def test_gradients_match_reference(implementation, case_name):
  case = make_case(**GRAD_CASES[case_name])
  args, seg = inputs(case)
  out, vjp = jax.vjp(attention_fn(implementation, seg), *args)
  ref_out, ref_vjp = jax.vjp(lambda q, k, v, b: reference.dmc_attention(q, k, v, b, seg), *args)
  do = jnp.asarray(np.random.default_rng(7).standard_normal(out.shape), out.dtype)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-5, rtol=2e-5)
  for name, got, want in zip(("dq", "dk", "dv", "dbias"), vjp(do), ref_vjp(do)):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("window", [1, 20])
def test_windowed_bias_matches_oracle_and_reference(implementation, window):
  """DMS's mask: the bias only beyond the window (20 spans a tile boundary of the 16-wide test tiles)."""
  case = make_case(l=37, bias="relaxed", seed=5, segments=window == 1)  # documents shorter than 20: no pairs
  args, seg = inputs(case)
  fn = attention_fn(implementation, seg, window)
  out, vjp = jax.vjp(fn, *args)
  np.testing.assert_allclose(np.asarray(out), oracle(*rounded64(case), window=window), atol=2e-5, rtol=2e-5)
  ref_out, ref_vjp = jax.vjp(lambda q, k, v, b: reference.dmc_attention(q, k, v, b, seg, window=window), *args)
  do = jnp.asarray(np.random.default_rng(7).standard_normal(out.shape), out.dtype)
  grads = vjp(do)
  for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_vjp(do)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5, err_msg=name)
  # Keys within the window of every query that sees them get no bias gradient: the last `window` keys.
  assert np.all(np.asarray(grads[3])[:, -window:] == 0) and np.any(np.asarray(grads[3]) != 0)


def test_bias_gradient_is_not_trivial():
  """d(bias) must be a real signal (the reference's is nonzero below the last position, zero for a key no later
  query sees) — so the comparison above can fail."""
  args, seg = inputs(make_case(l=20, segments=False))
  grad = jax.grad(lambda b: jnp.sum(attention_fn("pallas", seg)(*args[:3], b) ** 2))(args[3])
  assert np.abs(np.asarray(grad[:, :-1])).min() > 0
  np.testing.assert_array_equal(np.asarray(grad[:, -1]), 0.0)


def test_bf16_gradients_close_to_reference():
  case = make_case(l=37, dtype=jnp.bfloat16)
  args, seg = inputs(case)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  got = jax.grad(loss(attention_fn("pallas", seg)), argnums=(0, 1, 2, 3))(*args)
  want = jax.grad(loss(lambda q, k, v, b: reference.dmc_attention(q, k, v, b, seg)), argnums=(0, 1, 2, 3))(*args)
  for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, want):
    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    assert np.abs(a - b).max() <= 5e-2 * np.abs(b).max(), name


@pytest.mark.parametrize("l,h,kv,d,dtype", [(1024, 32, 32, 128, jnp.bfloat16), (200, 9, 3, 64, jnp.float32)])
def test_lowers_for_abstract_h100(l, h, kv, d, dtype):
  """Forward and backward through the real Triton lowering (default tiles; 200 is padded to a tile multiple)."""
  args = [jax.ShapeDtypeStruct((2, l, h, d), dtype), jax.ShapeDtypeStruct((2, l, kv, d), dtype),
          jax.ShapeDtypeStruct((2, l, kv, d), dtype), jax.ShapeDtypeStruct((2, l, kv), jnp.float32),
          jax.ShapeDtypeStruct((2, l), jnp.int32)]
  loss = lambda *a: jnp.sum(gpu.dmc_attention(*a[:4], a[4]).astype(jnp.float32))
  text = _backend.lower_for_abstract_gpu(jax.grad(loss, argnums=(0, 1, 2, 3)), *args).as_text()
  assert "dmc_attention_fwd" in text and "dmc_attention_bwd" in text


def test_rejects_bad_shapes_and_tiles():
  args, seg = inputs(make_case(l=8))
  with pytest.raises(ValueError, match="key_bias"):
    gpu.dmc_attention(*args[:3], args[3][:, :4], seg, interpret=True)
  with pytest.raises(ValueError, match="block_q=24"):
    gpu.dmc_attention(*args, seg, blocks=gpu.Blocks(block_q=24), interpret=True)
  with pytest.raises(ValueError, match="implementation"):
    api.dmc_attention(*args, seg, implementation="cuda")


def test_model_attention_impl_setting():
  """LlamaConfig.attention_impl reaches the DMC attention: the relaxed (train-mode) forward and its parameter
  gradients agree between the fused kernel and the reference."""
  from dmc_jax.config import DMCConfig, LlamaConfig
  from dmc_jax.model.llama import Llama
  cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32, head_dim=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 16)))
  dmc = DMCConfig(window=4)
  params = jax.jit(Llama(cfg, dmc, "train").init)({"params": jax.random.key(0), "dmc": jax.random.key(1)}, tokens)

  def loss(p, impl):
    logits, aux = Llama(cfg.replace(attention_impl=impl), dmc, "train").apply(p, tokens,
                                                                              rngs={"dmc": jax.random.key(2)})
    return jnp.mean(logits ** 2), aux["alpha"]

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (l_xla, a_xla), g_xla = grad(params, "xla")
  (l_pal, a_pal), g_pal = grad(params, "pallas")
  np.testing.assert_allclose(np.asarray(a_pal), np.asarray(a_xla))
  np.testing.assert_allclose(float(l_pal), float(l_xla), rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_pal), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=str(path))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_native_gpu_matches_reference(dtype):
  case = make_case(b=2, l=700, h=8, kv=2, d=128, dtype=dtype, seed=5)
  args, seg = inputs(case)
  assert jax.default_backend() == "gpu" and not _backend.interpret()
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  fused = lambda q, k, v, b: api.dmc_attention(q, k, v, b, seg, implementation="pallas")
  ref = lambda q, k, v, b: reference.dmc_attention(q, k, v, b, seg)
  tol = 1e-3 if dtype == jnp.float32 else 5e-2  # float32 dots may run as TF32 on the GPU
  out, want = fused(*args).astype(jnp.float32), ref(*args).astype(jnp.float32)
  assert float(jnp.abs(out - want).max()) <= tol * float(jnp.abs(want).max())
  got_g = jax.grad(loss(fused), argnums=(0, 1, 2, 3))(*args)
  want_g = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*args)
  for name, a, b in zip(("dq", "dk", "dv", "dbias"), got_g, want_g):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    assert float(jnp.abs(a - b).max()) <= tol * float(jnp.abs(b).max()), name
