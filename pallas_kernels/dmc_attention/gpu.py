"""Fused causal flash attention with DMC's per-key bias, as Pallas kernels (Triton lowering; interpret anywhere).

logits_ij = ⟨q_i, k_j⟩·scale + bias_j for i − j > window (0 for DMC: every j < i), + 0 nearer the diagonal,
masked for j > i and across segments — the semantics of `reference.py`, without ever forming an L×L tensor in
memory: the bias is read as a vector per key block. Forward: grid (query block, batch, query head), online
softmax, saves the log-sum-exp. Backward (custom VJP): one kernel per (batch, query head, block) computes dK, dV
and d(bias) for key block j (looping over the query blocks at or after it) and dQ for query block j (looping over
the key blocks up to it). d(bias)_j = Σ_{i−j>window} dlogits_ij.
With GQA (G query heads per KV head) dK, dV and d(bias) are produced per query head and summed over the group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_BLOCK = 16  # Triton's smallest dot operand


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of 2). The backward pass uses one size for query and key blocks."""

  block_q: int = 64
  block_k: int = 64
  block_bwd: int = 32
  num_warps: int = 4
  num_stages: int = 2


def _logits(q, k, bias_k, seg_q, seg_k, span_q, span_k, scale, window):
  """Biased, masked logits of one (query block, key block) tile, float32; the bias applies where i − j > window."""
  s = plgpu.dot(q, k.T) * scale
  below = span_q[:, None] - span_k[None, :] > window
  s = s + jnp.where(below, bias_k[None, :], 0.0)
  allowed = (span_q[:, None] >= span_k[None, :]) & (seg_q[:, None] == seg_k[None, :])
  return jnp.where(allowed, s, MASK_VALUE), below


def _fwd_kernel(q_ref, k_ref, v_ref, bias_ref, seg_ref, o_ref, lse_ref, *, scale, window, block_q, block_k):
  i = pl.program_id(0)
  q = q_ref[...]
  span_q = i * block_q + jnp.arange(block_q)
  seg_q = seg_ref[pl.ds(i * block_q, block_q)]

  def body(j, carry):
    o_prev, m_prev, l_prev = carry
    ks = pl.ds(j * block_k, block_k)
    s, _ = _logits(q, k_ref[ks, :], bias_ref[ks], seg_q, seg_ref[ks], span_q, j * block_k + jnp.arange(block_k),
                   scale, window)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    v = v_ref[ks, :]
    o_next = correction[:, None] * o_prev + plgpu.dot(p.astype(v.dtype), v)
    return o_next, m_next, correction * l_prev + p.sum(axis=-1)

  d = q.shape[-1]
  # Every row sees at least its own diagonal, so l > 0 and a fully masked earlier block is wiped by `correction`.
  init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  o, m, l = lax.fori_loop(0, pl.cdiv((i + 1) * block_q, block_k), body, init)
  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _bwd_kernel(q_ref, k_ref, v_ref, bias_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, db_ref,
                *, scale, window, block):
  j = pl.program_id(2)
  n_blocks = q_ref.shape[0] // block
  cur = pl.ds(j * block, block)
  span = j * block + jnp.arange(block)

  # dK, dV, d(bias) of key block j: query blocks j, j+1, ... (causal).
  k, v, bias_k, seg_k = k_ref[cur, :], v_ref[cur, :], bias_ref[cur], seg_ref[cur]

  def dkv_body(i, carry):
    dk, dv, db = carry
    qs = pl.ds(i * block, block)
    q, do = q_ref[qs, :], do_ref[qs, :]
    s, below = _logits(q, k, bias_k, seg_ref[qs], seg_k, i * block + jnp.arange(block), span, scale, window)
    p = jnp.exp(s - lse_ref[qs][:, None])
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    ds = p * (plgpu.dot(do, v.T) - delta_ref[qs][:, None])  # d logits
    dk = dk + plgpu.dot((ds * scale).astype(q.dtype).T, q)
    db = db + jnp.where(below, ds, 0.0).sum(axis=0)
    return dk, dv, db

  d = k.shape[-1]
  zeros = jnp.zeros((block, d), jnp.float32)
  dk, dv, db = lax.fori_loop(j, n_blocks, dkv_body, (zeros, zeros, jnp.zeros((block,), jnp.float32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  db_ref[...] = db

  # dQ of query block j: key blocks 0..j.
  q, do, lse, delta, seg_q = q_ref[cur, :], do_ref[cur, :], lse_ref[cur], delta_ref[cur], seg_ref[cur]

  def dq_body(i, dq):
    ks = pl.ds(i * block, block)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s, _ = _logits(q, k, bias_ref[ks], seg_q, seg_ref[ks], span, i * block + jnp.arange(block), scale, window)
    p = jnp.exp(s - lse[:, None])
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    return dq + plgpu.dot((ds * scale).astype(k.dtype), k)

  dq = lax.fori_loop(0, j + 1, dq_body, zeros)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _check(q, k, v, bias, blocks: Blocks):
  b, l, h, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, l) or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"dmc_attention (pallas): q {q.shape}, k {k.shape}, v {v.shape} are not [B, L, H, D] / "
                     f"[B, L, K, D] with H a multiple of K")
  if bias.shape != k.shape[:3]:
    raise ValueError(f"dmc_attention (pallas): key_bias {bias.shape} must be [B, L, K] = {k.shape[:3]}")
  for name, n in (("head_dim", d), ("block_q", blocks.block_q), ("block_k", blocks.block_k),
                  ("block_bwd", blocks.block_bwd)):
    if n & (n - 1) or n < MIN_BLOCK:
      raise ValueError(f"dmc_attention (pallas): {name}={n} must be a power of 2 ≥ {MIN_BLOCK} (Triton blocks)")


def _fit(blocks: Blocks, l: int) -> tuple[int, int, int, int]:
  """Block sizes no larger than the (power-of-2-rounded) sequence, and the padded length they all divide."""
  cap = max(MIN_BLOCK, pl.next_power_of_2(l))
  bq, bk, bb = min(blocks.block_q, cap), min(blocks.block_k, cap), min(blocks.block_bwd, cap)
  step = max(bq, bk, bb)
  return bq, bk, bb, -(-l // step) * step


def _pad_len(x, lp, axis=1):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, lp - x.shape[axis])
  return jnp.pad(x, pad)


def _forward(q, k, v, bias, seg, scale, window, blocks: Blocks, interpret):
  b, l, h, d = q.shape
  g = h // k.shape[2]
  bq, bk, _, lp = _fit(blocks, l)
  # Padded keys lie after every real query (causally invisible); padded queries are sliced off.
  qp, kp, vp = _pad_len(q, lp), _pad_len(k, lp), _pad_len(v, lp)
  bias_BxKxL = _pad_len(jnp.moveaxis(bias.astype(jnp.float32), 1, 2), lp, axis=2)
  segp = _pad_len(seg, lp)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, window=window, block_q=bq, block_k=bk),
      grid=(lp // bq, b, h),
      in_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, lp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
          pl.BlockSpec((None, lp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
          pl.BlockSpec((None, None, lp), lambda i, bi, hi: (bi, hi // g, 0)),
          pl.BlockSpec((None, lp), lambda i, bi, hi: (bi, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct((b, lp, h, d), q.dtype), jax.ShapeDtypeStruct((b, h, lp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="dmc_attention_fwd",
  )(qp, kp, vp, bias_BxKxL, segp)
  return o[:, :l], lse


def _backward(q, k, v, bias, seg, o, lse, do, scale, window, blocks: Blocks, interpret):
  b, l, h, d = q.shape
  kv = k.shape[2]
  g = h // kv
  _, _, bb, lp = _fit(blocks, l)
  # Padded query rows get do = 0, so they add nothing to dK, dV or d(bias).
  qp, kp, vp, dop = _pad_len(q, lp), _pad_len(k, lp), _pad_len(v, lp), _pad_len(do, lp)
  bias_BxKxL = _pad_len(jnp.moveaxis(bias.astype(jnp.float32), 1, 2), lp, axis=2)
  segp = _pad_len(seg, lp)
  delta_BxHxL = _pad_len(jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32)), lp, axis=2)
  kv_dtype = k.dtype if g == 1 else jnp.float32  # per-query-head partials are summed over the group in float32
  row = lambda bi, hi, j: (bi, 0, hi, 0)
  group = lambda bi, hi, j: (bi, 0, hi // g, 0)
  blk = lambda bi, hi, j: (bi, j, hi, 0)
  dq, dk, dv, db = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, window=window, block=bb),
      grid=(b, h, lp // bb),
      in_specs=[
          pl.BlockSpec((None, lp, None, d), row),  # q
          pl.BlockSpec((None, lp, None, d), group),  # k
          pl.BlockSpec((None, lp, None, d), group),  # v
          pl.BlockSpec((None, None, lp), lambda bi, hi, j: (bi, hi // g, 0)),  # bias
          pl.BlockSpec((None, lp), lambda bi, hi, j: (bi, 0)),  # segment ids
          pl.BlockSpec((None, lp, None, d), row),  # do
          pl.BlockSpec((None, None, lp), lambda bi, hi, j: (bi, hi, 0)),  # lse
          pl.BlockSpec((None, None, lp), lambda bi, hi, j: (bi, hi, 0)),  # delta
      ],
      out_specs=[pl.BlockSpec((None, bb, None, d), blk), pl.BlockSpec((None, bb, None, d), blk),
                 pl.BlockSpec((None, bb, None, d), blk), pl.BlockSpec((None, None, bb), lambda bi, hi, j: (bi, hi, j))],
      out_shape=[jax.ShapeDtypeStruct((b, lp, h, d), q.dtype), jax.ShapeDtypeStruct((b, lp, h, d), kv_dtype),
                 jax.ShapeDtypeStruct((b, lp, h, d), kv_dtype), jax.ShapeDtypeStruct((b, h, lp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="dmc_attention_bwd",
  )(qp, kp, vp, bias_BxKxL, segp, dop, lse, delta_BxHxL)
  dk = dk[:, :l].reshape(b, l, kv, g, d).sum(3).astype(k.dtype)
  dv = dv[:, :l].reshape(b, l, kv, g, d).sum(3).astype(v.dtype)
  db = jnp.moveaxis(db[:, :, :l].reshape(b, kv, g, l).sum(2), 1, 2).astype(bias.dtype)
  return dq[:, :l], dk, dv, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, bias, seg, scale, window, blocks, interpret):
  return _forward(q, k, v, bias, seg, scale, window, blocks, interpret)[0]


def _attention_fwd(q, k, v, bias, seg, scale, window, blocks, interpret):
  o, lse = _forward(q, k, v, bias, seg, scale, window, blocks, interpret)
  return o, (q, k, v, bias, seg, o, lse)


def _attention_bwd(scale, window, blocks, interpret, res, do):
  q, k, v, bias, seg, o, lse = res
  dq, dk, dv, db = _backward(q, k, v, bias, seg, o, lse, do, scale, window, blocks, interpret)
  return dq, dk, dv, db, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dmc_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, segment_ids_BxL=None, scale=None, *,
                  window: int = 0, blocks: Blocks = Blocks(), interpret: bool = False):
  """Differentiable in q, k, v and the bias (not the segment ids). Returns [B, L, H, D] in q's dtype.
  `window`: the bias applies to key j of query i only where i − j > window (0: DMC; DMS's w: docs/dmc.md §10)."""
  _check(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, blocks)
  b, l, _, d = q_BxLxHxD.shape
  scale = float(d ** -0.5 if scale is None else scale)
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
  return _attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, key_bias_BxLxK, seg, scale, int(window), blocks, interpret)
