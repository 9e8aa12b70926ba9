"""Paged DMC decode attention on plain XLA, reading only the pages in use: the fast path off GPU.

The reference gathers every row's whole block table (capacity, not length) and softmaxes over all of it. Here the
rows are taken in chunks, and for each chunk a `while_loop` walks the block table `pages_per_block` pages at a
time with an online softmax (flash decoding in jnp); its trip count is the chunk's longest row:
ceil(max(lengths) / (pages_per_block · S)). Nothing past that is gathered, no [R, M·S] logits exist, and one
compiled step serves every length (no recompiles, no host sync). Rows shorter than their chunk's longest gather
some pages they do not use (clipped ids, masked out). The chunk and block sizes keep each gathered block near
`BLOCK_BYTES`: small enough to stay in cache.

`bucketed` is the other design measured (docs: docs/kernels.md): one gather over the first `max_pages` table
entries, a static bucket the caller picks from the rows' maximum (one compiled step per bucket).

Slots past a row's length — in its last page, or in table entries past it (garbage ids) — never reach the sums:
logits are masked with `where`, probabilities forced to 0 and V zeroed there (0 · NaN would poison the sum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30
SLOTS_PER_BLOCK = 64  # slots of a row per loop iteration
# Bytes of K (and as many of V) gathered per iteration: rows are taken in chunks so that a block stays this small.
# On XLA:CPU a gathered block is a fresh buffer; a large one costs page faults and cache misses on every step
# (docs/kernels.md: 256 slots × all 480 rows of the 7B-width batch ran at 3.9 GB/s, 64-slot 2 MiB blocks at ≈10).
BLOCK_BYTES = 2 << 20


def _block(q_RxGxD, k_pages, v_pages, pages_RxN, first_slot, lengths_R, scale):
  """Logits, masked probabilities' inputs and V of one block of pages (ids clipped into the pool)."""
  r, g, d = q_RxGxD.shape
  pages = jnp.clip(pages_RxN, 0, k_pages.shape[0] - 1)
  k = k_pages[pages].reshape(r, -1, d)
  v = v_pages[pages].reshape(r, -1, d)
  valid = (first_slot + jnp.arange(k.shape[1]))[None, :] < lengths_R[:, None]
  s = jnp.einsum("rgd,rsd->rgs", q_RxGxD, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(valid[:, None, :], s, NEG_INF), valid, jnp.where(valid[:, :, None], v, 0)


def _rows_attention(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, table_RxN, lengths_R, scale, ppb):
  """Online softmax over `ppb`-page blocks of these rows' tables; trip count = their longest row."""
  r, g, d = q_RxGxD.shape
  page_size = k_pages_PxSxD.shape[1]
  trips = jnp.minimum(-(-jnp.max(lengths_R, initial=0) // (ppb * page_size)), table_RxN.shape[1] // ppb)

  def body(i, carry):
    o, mx, l = carry
    pages = jax.lax.dynamic_slice_in_dim(table_RxN, i * ppb, ppb, axis=1)
    s, valid, v = _block(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, pages, i * ppb * page_size, lengths_R, scale)
    m_new = jnp.maximum(mx, s.max(axis=-1))
    corr = jnp.exp(mx - m_new)
    p = jnp.where(valid[:, None, :], jnp.exp(s - m_new[..., None]), 0.0)
    o = corr[..., None] * o + jnp.einsum("rgs,rsd->rgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o, m_new, corr * l + p.sum(axis=-1)

  init = (jnp.zeros((r, g, d), jnp.float32), jnp.full((r, g), NEG_INF, jnp.float32), jnp.zeros((r, g), jnp.float32))
  o, _, l = jax.lax.fori_loop(0, trips, body, init)
  return jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "rows_per_chunk"))
def paged_decode_attention(q_RxGxD: jax.Array, k_pages_PxSxD: jax.Array, v_pages_PxSxD: jax.Array,
                           block_table_RxM: jax.Array, lengths_R: jax.Array, scale: float | None = None, *,
                           pages_per_block: int | None = None, rows_per_chunk: int | None = None) -> jax.Array:
  r, g, d = q_RxGxD.shape
  page_size = k_pages_PxSxD.shape[1]
  m = block_table_RxM.shape[1]
  scale = d ** -0.5 if scale is None else scale
  slot_bytes = d * jnp.dtype(k_pages_PxSxD.dtype).itemsize
  ppb = pages_per_block or max(1, min(m, SLOTS_PER_BLOCK // page_size))
  rc = rows_per_chunk or max(1, min(r, BLOCK_BYTES // (ppb * page_size * slot_bytes)))
  n_blocks, n_chunks = -(-m // ppb), -(-r // rc)
  pad_r = n_chunks * rc - r
  table = jnp.pad(block_table_RxM.astype(jnp.int32), ((0, pad_r), (0, n_blocks * ppb - m)), constant_values=-1)
  lengths = jnp.pad(lengths_R.astype(jnp.int32), (0, pad_r))
  q = jnp.pad(q_RxGxD, ((0, pad_r), (0, 0), (0, 0)))
  if n_chunks == 1:
    out = _rows_attention(q, k_pages_PxSxD, v_pages_PxSxD, table, lengths, scale, ppb)
  else:
    def chunk(i, out):
      rows = lambda a: jax.lax.dynamic_slice_in_dim(a, i * rc, rc, axis=0)
      o = _rows_attention(rows(q), k_pages_PxSxD, v_pages_PxSxD, rows(table), rows(lengths), scale, ppb)
      return jax.lax.dynamic_update_slice_in_dim(out, o, i * rc, axis=0)
    out = jax.lax.fori_loop(0, n_chunks, chunk, jnp.zeros(q.shape, jnp.float32))
  return out[:r].astype(q_RxGxD.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "max_pages"))
def bucketed(q_RxGxD: jax.Array, k_pages_PxSxD: jax.Array, v_pages_PxSxD: jax.Array, block_table_RxM: jax.Array,
             lengths_R: jax.Array, scale: float | None = None, *, max_pages: int) -> jax.Array:
  """One gather over table entries [0, max_pages): the caller guarantees every length ≤ max_pages · S."""
  d = q_RxGxD.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  table = block_table_RxM[:, :max_pages].astype(jnp.int32)
  s, valid, v = _block(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, table, 0, lengths_R.astype(jnp.int32), scale)
  p = jnp.where(valid[:, None, :], jax.nn.softmax(s, axis=-1), 0.0)
  out = jnp.einsum("rgs,rsd->rgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q_RxGxD.dtype)
