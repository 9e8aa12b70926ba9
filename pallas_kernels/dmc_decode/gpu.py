"""Paged DMC decode attention as a Pallas kernel (Triton lowering on GPU; interpret mode anywhere).

Split-K flash decoding over the per-row ragged cache: the grid is (row, split); a row is one (sequence, layer, KV
head) with its own length, and its G query heads are packed into one block (padded to ≥ 16 rows, the smallest
Triton dot). Split s owns a fixed range of the row's block table and walks it `pages_per_block` pages at a time,
stopping at the row's last page in use: pages past a row's length are never read. Slots past the length inside
the last page are masked out of the logits *and* zeroed in V (they may hold anything, even NaN). The splits are
combined with their running max and sum outside the kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_BLOCK_ROWS = 16  # Triton's smallest dot operand
TARGET_PROGRAMS = 1024  # enough (row, split) programs to fill a GPU's SMs several times over


def _kernel(lengths_ref, table_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, l_ref, m_ref, *, scale: float,
            pages_per_block: int, pages_per_split: int):
  split = pl.program_id(1)
  num_pages, page_size, head_dim = k_pages_ref.shape
  block_k = pages_per_block * page_size
  length = lengths_ref[0]
  first_page = split * pages_per_split
  end_page = jnp.minimum(pl.cdiv(length, page_size), first_page + pages_per_split)
  q = q_ref[...]  # [Gp, D]
  g = q.shape[0]

  def body(i, carry):
    o_prev, m_prev, l_prev = carry
    pages = table_ref[pl.ds(i * pages_per_block, pages_per_block)]
    # −1 (no page) and stale ids must not address memory outside the pool; such slots are masked below.
    pages = jnp.clip(pages, 0, num_pages - 1)
    k = k_pages_ref[pages].reshape(block_k, head_dim)
    v = v_pages_ref[pages].reshape(block_k, head_dim)
    slot = (first_page + i * pages_per_block) * page_size + jnp.arange(block_k)
    valid = slot < length
    s = plgpu.dot(q, k.T) * scale  # [Gp, block_k] float32
    s = jnp.where(valid[None, :], s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # 0·NaN would poison the sum
    o_next = correction[:, None] * o_prev + plgpu.dot(p.astype(v.dtype), v)
    return o_next, m_next, correction * l_prev + p.sum(axis=-1)

  init = (jnp.zeros((g, head_dim), jnp.float32), jnp.full((g,), MASK_VALUE, jnp.float32),
          jnp.zeros((g,), jnp.float32))
  n_blocks = jnp.maximum(pl.cdiv(end_page - first_page, pages_per_block), 0)
  o, m, l = lax.fori_loop(0, n_blocks, body, init)
  o_ref[...] = o
  l_ref[...] = l
  m_ref[...] = m


def choose_splits(rows: int, blocks_per_row: int) -> int:
  """Split the key axis only when there are too few rows to occupy the GPU (decode at small batch)."""
  return max(1, min(blocks_per_row, math.ceil(TARGET_PROGRAMS / max(rows, 1))))


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "k_splits", "num_warps", "num_stages",
                                             "interpret"))
def paged_decode_attention(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, block_table_RxM, lengths_R, scale=None, *,
                           pages_per_block: int | None = None, k_splits: int | None = None, num_warps: int = 4,
                           num_stages: int = 2, interpret: bool = False):
  r, g, d = q_RxGxD.shape
  num_pages, page_size, d_k = k_pages_PxSxD.shape
  m = block_table_RxM.shape[1]
  if d_k != d or v_pages_PxSxD.shape != k_pages_PxSxD.shape:
    raise ValueError(f"paged_decode_attention: q head_dim {d} and pages {k_pages_PxSxD.shape}/"
                     f"{v_pages_PxSxD.shape} disagree")
  for name, n in (("page_size", page_size), ("head_dim", d)):
    if n & (n - 1):
      raise ValueError(f"paged_decode_attention (pallas): {name}={n} must be a power of 2 (Triton blocks)")
  scale = d ** -0.5 if scale is None else scale
  if pages_per_block is None:  # ≈64 slots per step: enough work per iteration, little waste in the last one
    pages_per_block = max(1, min(64 // page_size, pl.next_power_of_2(m)))
  blocks_per_row = pl.cdiv(m, pages_per_block)
  splits = choose_splits(r, blocks_per_row) if k_splits is None else k_splits
  pages_per_split = pages_per_block * pl.cdiv(blocks_per_row, splits)
  table = jnp.pad(block_table_RxM.astype(jnp.int32), ((0, 0), (0, splits * pages_per_split - m)),
                  constant_values=-1)
  g_pad = max(MIN_BLOCK_ROWS, pl.next_power_of_2(g))
  q = jnp.pad(q_RxGxD, ((0, 0), (0, g_pad - g), (0, 0)))
  kernel = functools.partial(_kernel, scale=float(scale), pages_per_block=pages_per_block,
                             pages_per_split=pages_per_split)
  o, l, mx = pl.pallas_call(
      kernel,
      grid=(r, splits),
      in_specs=[
          pl.BlockSpec((1,), lambda i, s: (i,)),  # lengths
          pl.BlockSpec((None, pages_per_split), lambda i, s: (i, s)),  # this split's part of the block table
          pl.BlockSpec((None, g_pad, d), lambda i, s: (i, 0, 0)),  # the row's query group
          pl.BlockSpec((num_pages, page_size, d), lambda i, s: (0, 0, 0)),  # the whole pool, gathered by page
          pl.BlockSpec((num_pages, page_size, d), lambda i, s: (0, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, g_pad, d), lambda i, s: (i, s, 0, 0)),
          pl.BlockSpec((None, None, g_pad), lambda i, s: (i, s, 0)),
          pl.BlockSpec((None, None, g_pad), lambda i, s: (i, s, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((r, splits, g_pad, d), jnp.float32),
                 jax.ShapeDtypeStruct((r, splits, g_pad), jnp.float32),
                 jax.ShapeDtypeStruct((r, splits, g_pad), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="dmc_paged_decode",
  )(lengths_R.astype(jnp.int32), table, q, k_pages_PxSxD, v_pages_PxSxD)
  # Combine the splits (flash decoding's second stage); a row with no slots gets 0, as in the reference.
  m_all = mx.max(axis=1, keepdims=True)
  w = jnp.exp(mx - m_all)
  l_all = (l * w).sum(axis=1)
  o_all = (o * w[..., None]).sum(axis=1)
  out = jnp.where(l_all[..., None] > 0, o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None], 0.0)
  return out[:, :g].astype(q_RxGxD.dtype)
