"""pallas_kernels/dmc_decode: every implementation against an independent float64 oracle and the jnp reference.

The cache is built as the real one is laid out (pages scattered through one pool, a block table and a length per
row) and everything a correct kernel must not use is NaN: unused pages, slots past each row's length in the last
page, and block-table entries past each length are garbage page ids. Reading-then-masking would propagate the NaN.
On the CPU "pallas" runs in interpret mode, whose output buffers start as NaN (checked below), so a block the
kernel fails to write is caught too. "tpu" (the Pallas TPU kernel) runs through the API in Pallas's generic
interpreter and, in its own tests below, in the TPU interpreter (`pltpu.InterpretParams()`: simulated memories
and pipeline copies, NaN-initialised VMEM, out-of-bounds reads raise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _backend
from pallas_kernels.dmc_decode import api, gpu, tpu, xla

IMPLS = ["reference", "xla", "pallas", "tpu"]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def make_case(lengths, g=3, d=32, page_size=8, max_pages=6, dtype=jnp.float32, seed=0, spare_pages=3):
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  r = len(lengths)
  need = -(-lengths // page_size)
  num_pages = int(need.sum()) + spare_pages
  order = rng.permutation(num_pages)  # rows' pages interleaved through the pool, as the bump allocator leaves them
  table = rng.integers(-5, 10 * num_pages, (r, max_pages)).astype(np.int32)  # garbage past each length
  used = np.zeros((num_pages, page_size), bool)
  n = 0
  for i in range(r):
    table[i, :need[i]] = order[n:n + need[i]]
    n += need[i]
    for t in range(lengths[i]):
      used[table[i, t // page_size], t % page_size] = True
  k = rng.standard_normal((num_pages, page_size, d))
  v = rng.standard_normal((num_pages, page_size, d))
  k[~used] = np.nan
  v[~used] = np.nan
  q = rng.standard_normal((r, g, d))
  return q, k, v, table, lengths, dtype


def oracle(q, k, v, table, lengths):
  """Row by row in float64 over exactly the slots in use (zeros for an empty row)."""
  r, g, d = q.shape
  s = k.shape[1]
  out = np.zeros((r, g, d))
  for i in range(r):
    slots = [(table[i, t // s], t % s) for t in range(lengths[i])]
    if not slots:
      continue
    ks = np.stack([k[p, j] for p, j in slots])
    vs = np.stack([v[p, j] for p, j in slots])
    logits = q[i] @ ks.T / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out[i] = (w / w.sum(-1, keepdims=True)) @ vs
  return out


def run(case, implementation, **kwargs):
  q, k, v, table, lengths, dtype = case
  args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(table), jnp.asarray(lengths)]
  if kwargs:  # kernel tiling options go to the Pallas kernel itself
    return gpu.paged_decode_attention(*args, interpret=_backend.interpret(), **kwargs)
  return api.paged_decode_attention(*args, implementation=implementation)


def as64(case):
  q, k, v, table, lengths, dtype = case
  # Compare against inputs rounded to the tested dtype: the tolerance then covers only the kernel's arithmetic.
  rnd = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  return rnd(q), rnd(k), rnd(v), table, lengths


# Lengths 0, 1, a page boundary (S − 1, S, S + 1), full (all M pages), and a partial last page.
LENGTHS = [0, 1, 7, 8, 9, 48, 13, 30]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_oracle(implementation, dtype):
  case = make_case(LENGTHS, dtype=dtype)
  out = np.asarray(run(case, implementation).astype(jnp.float32))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, oracle(*as64(case)), atol=TOL[dtype], rtol=TOL[dtype])
  assert not np.any(out[0]), "a row with no slots attends to nothing: zeros, as in the reference"


@pytest.mark.parametrize("g", [1, 4])
def test_pallas_matches_reference_mha_and_wide_groups(g):
  case = make_case([5, 16, 17, 40], g=g, d=16, page_size=16, max_pages=3, seed=1)
  out = run(case, "pallas")
  ref = run(case, "xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("pages_per_block,k_splits", [(1, 1), (1, 4), (2, 3), (4, 2), (8, 1)])
def test_pallas_tilings_agree(pages_per_block, k_splits):
  """Split-K combination and multi-page blocks: every tiling gives the oracle's answer (splits with no pages
  in use, a last block only partly in use)."""
  case = make_case(LENGTHS, seed=2)
  out = np.asarray(run(case, "pallas", pages_per_block=pages_per_block, k_splits=k_splits))
  np.testing.assert_allclose(out, oracle(*as64(case)), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pages_per_block,rows_per_chunk", [(1, None), (2, 1), (4, 2), (6, 3), (7, None), (2, 4)])
def test_xla_page_blocks_agree(pages_per_block, rows_per_chunk):
  """The fast XLA path's loops over row chunks and page blocks: any block size (one that does not divide the
  table, one wider than it) and any chunk (one that does not divide the rows) gives the oracle's answer, and each
  chunk's loop stops at its longest row (entries past it are garbage)."""
  case = make_case(LENGTHS, seed=4)
  q, k, v, table, lengths, _ = case
  out = xla.paged_decode_attention(*(jnp.asarray(x) for x in (q, k, v, table, lengths)),
                                   pages_per_block=pages_per_block, rows_per_chunk=rows_per_chunk)
  np.testing.assert_allclose(np.asarray(out), oracle(*as64(case)), atol=2e-5, rtol=2e-5)
  short = make_case([3, 9, 0, 16], seed=5)  # the longest row uses 2 of 6 pages: 4 entries never gathered
  q, k, v, table, lengths, _ = short
  out = xla.paged_decode_attention(*(jnp.asarray(x) for x in (q, k, v, table, lengths)), pages_per_block=1)
  np.testing.assert_allclose(np.asarray(out), oracle(*as64(short)), atol=2e-5, rtol=2e-5)


def test_xla_bucketed_matches_oracle():
  """The other XLA design measured: one gather over a static bucket of table entries covering every length."""
  case = make_case(LENGTHS, seed=6)
  q, k, v, table, lengths, _ = case
  out = xla.bucketed(*(jnp.asarray(x) for x in (q, k, v, table, lengths)), max_pages=6)
  np.testing.assert_allclose(np.asarray(out), oracle(*as64(case)), atol=2e-5, rtol=2e-5)


def test_implementation_names_are_defined_once():
  """The names configs and `bench --impl` accept; a known name an op lacks is a clear error, not a fallback."""
  from dmc_jax.config import ATTENTION_IMPLS, LlamaConfig
  from dmc_jax.errors import ConfigError
  assert _backend.IMPLEMENTATIONS == (None, "reference", "xla", "pallas", "tpu", "triton") == ATTENTION_IMPLS
  with pytest.raises(ValueError, match="'triton' is not available"):
    run(make_case([3]), "triton")
  with pytest.raises(ValueError, match="must be one of"):
    run(make_case([3]), "cuda")
  with pytest.raises(ConfigError, match="attention_impl"):
    LlamaConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, attention_impl="fast")


def test_interpret_mode_poisons_outputs():
  """The tests above rely on interpret mode starting every output as NaN: a block never written stays NaN."""
  from jax.experimental import pallas as pl

  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((16,), lambda i: (i,))],
                       out_specs=pl.BlockSpec((16,), lambda i: (i,)),
                       out_shape=jax.ShapeDtypeStruct((32,), jnp.float32), interpret=True)(jnp.ones(32))
  assert np.all(np.asarray(out[:16]) == 1) and np.all(np.isnan(np.asarray(out[16:])))


def test_api_rejects_unknown_implementation():
  case = make_case([3])
  with pytest.raises(ValueError, match="implementation"):
    run(case, "triton")


def test_none_resolves_to_xla_off_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU None means pallas")
  assert _backend.resolve(api.OP, None) == "xla"


@pytest.mark.parametrize("shape,dtype", [((5, 3, 32, 20, 8, 6), jnp.float32),  # the CPU tests' shape
                                         ((4096, 1, 128, 9000, 32, 18), jnp.bfloat16),  # Llama-2-7B rows (MHA)
                                         ((256, 4, 128, 700, 16, 40), jnp.bfloat16)])  # GQA, many pages
def test_lowers_for_abstract_h100(shape, dtype):
  """The real Triton lowering (not the interpreter), which rejects what interpret mode lets through."""
  r, g, d, p, s, m = shape
  args = [jax.ShapeDtypeStruct((r, g, d), dtype), jax.ShapeDtypeStruct((p, s, d), dtype),
          jax.ShapeDtypeStruct((p, s, d), dtype), jax.ShapeDtypeStruct((r, m), jnp.int32),
          jax.ShapeDtypeStruct((r,), jnp.int32)]
  lowered = _backend.lower_for_abstract_gpu(lambda *a: gpu.paged_decode_attention(*a, interpret=False), *args)
  assert "dmc_paged_decode" in lowered.as_text()


def test_rejects_non_power_of_two_head_dim():
  case = make_case([3], d=24)
  with pytest.raises(ValueError, match="head_dim=24"):
    run(case, "pallas", pages_per_block=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_native_gpu_matches_reference(dtype):
  rng = np.random.default_rng(3)
  lengths = np.concatenate([[0, 1, 31, 32, 33, 32 * 24], rng.integers(0, 32 * 24, 250)])
  case = make_case(lengths, g=4, d=128, page_size=32, max_pages=24, dtype=dtype, seed=3)
  out = run(case, "pallas")
  assert jax.default_backend() == "gpu" and not _backend.interpret()
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), oracle(*as64(case)), atol=TOL[dtype],
                             rtol=TOL[dtype])
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(run(case, "xla").astype(jnp.float32)),
                             atol=TOL[dtype], rtol=TOL[dtype])


# -- the Pallas TPU kernel -----------------------------------------------------------------------------------------
# Interpret mode compiles one program per shape and tiling (seconds each on 2 cores): the cases are tiny and few.


def run_tpu(case, interpret=None, **tiling):
  from jax.experimental.pallas import tpu as pltpu
  q, k, v, table, lengths, dtype = case
  args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(table), jnp.asarray(lengths)]
  interpret = pltpu.InterpretParams() if interpret is None else interpret
  return np.asarray(tpu.paged_decode_attention(*args, interpret=interpret, **tiling).astype(jnp.float32))


@pytest.mark.parametrize("rows_per_block,pages_per_block,g,d,dtype", [
    (3, 2, 3, 32, jnp.float32),  # 8 rows padded to 9: blocks holding rows of every length
    (2, 4, 8, 64, jnp.bfloat16),  # M = 6 pages padded to 8: blocks partly past every length; G = 8, SmolLM2's D
    (1, 1, 1, 128, jnp.float32)], ids=["3x2-g3-f32", "2x4-g8-d64-bf16", "1x1-mha-d128-f32"])
def test_tpu_kernel_matches_oracle(rows_per_block, pages_per_block, g, d, dtype):
  """The TPU kernel in the TPU interpreter: NaN-poisoned pool, garbage table entries past the lengths (fetched
  unclipped they would be out-of-bounds reads, on which the interpreter raises), lengths 0 / 1 / page boundary /
  full; tilings, GQA groups 1–8 (Llama-2-7B is MHA), head_dim 128 and 64, float32 and bfloat16."""
  case = make_case(LENGTHS, g=g, d=d, dtype=dtype, seed=2)
  out = run_tpu(case, rows_per_block=rows_per_block, pages_per_block=pages_per_block)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, oracle(*as64(case)), atol=TOL[dtype], rtol=TOL[dtype])
  assert not np.any(out[0])


def test_tpu_rows_split_over_calls():
  """Rows beyond what SMEM holds go to further kernel calls (here forced: 5 rows a call, the last one short)."""
  case = make_case(LENGTHS, seed=4)
  out = run_tpu(case, interpret=True, rows_per_block=1, pages_per_block=2, max_rows_per_call=5)
  np.testing.assert_allclose(out, oracle(*as64(case)), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="does not fit"):
    tpu.rows_per_call(8, 100_000)


@pytest.mark.parametrize("rows_per_block,pages_per_block", [(1, 1), (3, 2), (2, 4)])
def test_tpu_fetches_only_pages_in_use(rows_per_block, pages_per_block):
  """The pipeline copies an operand's block only when its index differs from the previous grid step's (the
  first step always copies). With the forward-filled fetch table, every copy after the first step is a page in
  use at that step, every page in use is what the block table says, and nothing past a length is copied."""
  rb, pb = rows_per_block, pages_per_block
  case = make_case(LENGTHS, seed=2)
  _, k, _, table, lengths, _ = case
  s, num_pages = k.shape[1], k.shape[0]
  r = -(-len(lengths) // rb) * rb
  m = -(-table.shape[1] // pb) * pb
  lengths = np.pad(lengths, (0, r - len(lengths)))
  table = np.pad(table, ((0, r - table.shape[0]), (0, m - table.shape[1])), constant_values=10**6)
  fetch = np.asarray(tpu.fetch_table(jnp.asarray(table), jnp.asarray(lengths), s, num_pages, rb, pb))
  used = np.arange(m)[None, :] < -(-lengths // s)[:, None]
  copies = 0
  for rr in range(rb):
    for j in range(pb):
      prev = None
      for b in range(r // rb):
        for i in range(m // pb):
          row, slot = b * rb + rr, i * pb + j
          idx = fetch[row, slot]
          assert 0 <= idx < num_pages
          if used[row, slot]:
            assert idx == table[row, slot]
          if prev is not None and idx != prev:
            copies += 1
            assert used[row, slot], f"copied page {idx} for row {row} slot {slot}, past its length"
          prev = idx
  assert copies <= used.sum()


def test_tpu_none_resolves_on_a_tpu(monkeypatch):
  """None picks the TPU kernel on a TPU, compiled (not interpreted); the training attention has no TPU kernel."""
  monkeypatch.setattr(_backend, "platform", lambda: "tpu")
  assert _backend.resolve(api.OP, None, api.AVAILABLE) == "tpu"
  from pallas_kernels.dmc_attention import api as attention_api
  assert _backend.resolve(attention_api.OP, None, attention_api.AVAILABLE) == "xla"
  assert _backend.interpret(target="tpu") is False and _backend.interpret() is True


def _decode_shapes(r, g, d, p, s, m, dtype):
  return [jax.ShapeDtypeStruct((r, g, d), dtype), jax.ShapeDtypeStruct((p, s, d), dtype),
          jax.ShapeDtypeStruct((p, s, d), dtype), jax.ShapeDtypeStruct((r, m), jnp.int32),
          jax.ShapeDtypeStruct((r,), jnp.int32)]


@pytest.mark.parametrize("shape,dtype", [
    ((4096, 1, 128, 9000, 32, 18), jnp.bfloat16),  # Llama-2-7B: batch 128 × 32 KV heads (MHA), 576 slots
    ((192, 3, 64, 8000, 16, 128), jnp.float32)],  # SmolLM2-135M: batch 64 × 3 KV heads, G = 3, D = 64, 2048 slots
    ids=["llama2-7b-bf16", "smollm2-f32-page16"])
def test_tpu_lowers_for_tpu(shape, dtype):
  """The real Pallas → Mosaic lowering (block-shape rules, every op lowered to Mosaic), on this host."""
  lowered = tpu.lower_for_tpu(lambda *a: tpu.paged_decode_attention(*a), *_decode_shapes(*shape, dtype))
  text = lowered.as_text()
  assert "tpu_custom_call" in text and "dmc_paged_decode_tpu" in text


def test_tpu_lowering_rejects_an_illegal_block():
  """The same lowering refuses a block whose last two dimensions are neither tile multiples nor the array's
  own (half a page of 8 slots): the lowering test above checks something."""
  from jax.experimental import pallas as pl

  def copy(block_rows):
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...]
    return lambda x: pl.pallas_call(kernel, grid=(4,), in_specs=[pl.BlockSpec((None, block_rows, 64),
                                                                               lambda i: (i, 0, 0))],
                                    out_specs=pl.BlockSpec((None, block_rows, 64), lambda i: (i, 0, 0)),
                                    out_shape=jax.ShapeDtypeStruct((4, block_rows, 64), jnp.float32))(x)

  pool = jax.ShapeDtypeStruct((4, 8, 64), jnp.float32)
  assert "tpu_custom_call" in tpu.lower_for_tpu(copy(8), pool).as_text()
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    tpu.lower_for_tpu(copy(4), pool)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic's own compile and the real DMAs)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("g,d", [(1, 128), (3, 64)], ids=["llama2", "smollm2"])
def test_native_tpu_matches_oracle(g, d, dtype):
  """On a TPU: the compiled kernel at its default tiling, the API's choice for None, against the oracle."""
  rng = np.random.default_rng(3)
  lengths = np.concatenate([[0, 1, 31, 32, 33, 32 * 24], rng.integers(0, 32 * 24, 100)])
  case = make_case(lengths, g=g, d=d, page_size=32, max_pages=24, dtype=dtype, seed=3)
  assert _backend.resolve(api.OP, None) == "tpu" and not _backend.interpret(target="tpu")
  out = np.asarray(run(case, None).astype(jnp.float32))
  np.testing.assert_allclose(out, oracle(*as64(case)), atol=TOL[dtype], rtol=TOL[dtype])
