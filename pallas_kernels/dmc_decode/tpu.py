"""Paged DMC decode attention as a Pallas TPU (Mosaic) kernel; runs exactly in interpret mode on any host.

A row is one (sequence, layer, KV head) with its own length; its G query heads attend to its slots together.
jax's TPU `paged_attention` takes one length per *sequence*; here every row is its own single-head sequence.

Design (the Pallas TPU pipeline does the DMA; no hand-written copies):

* Grid (row blocks, page blocks): program (b, i) handles rows b·R_b … b·R_b + R_b − 1 and, of each, the
  pages i·P_b … i·P_b + P_b − 1 of its block table. Rows are "parallel" (a megacore TPU splits them across its
  cores); page blocks are "arbitrary" (the online softmax carries across them in VMEM scratch).
* A BlockSpec selects one contiguous block of an array, and a row's pages are scattered through the pool, so
  the pool is passed R_b·P_b times (K and V each), operand (r, j) holding one whole page [S, D] whose index map
  reads `fetch[row, i·P_b + j]` from the scalar-prefetched (SMEM) table.
* No DMA for pages past a row's length: the Pallas TPU pipeline skips the copy when an operand's block index
  equals the previous grid step's. `fetch` is the block table forward-filled in grid order, per operand: an
  entry past its row's length repeats what that operand fetched last (possibly another row's page), so it costs
  no copy. A table that only clamps each row at its own last page would still re-fetch at every row change and
  for the other operands of a block. Garbage ids are clipped into the pool (a DMA out of the pool would fault).
  Compute for a (row, page block) with no slots in use is skipped with pl.when.
* Online softmax across page blocks with float32 m, l, acc in VMEM scratch; the output block stays resident
  across the page axis and is written once, at the last page block (0 for a row with no slots).
* Slots past the length inside a page may hold anything, even NaN (as may whole fetched pages past the length):
  the logits are replaced with jnp.where *before* exp and the V rows are zeroed, so 0·NaN never reaches a sum.

Block shapes: Mosaic requires each block's last two dimensions to be divisible by the TPU tile — (8, 128) for
float32, (16, 128) for bfloat16 — or equal to the array's own. Every block here keeps the array's own trailing
dimensions: a page block is the full page [S, D] of the [P, S, D] pool, the query/output block is [R_b, G, D] of
[R, G, D] (the full G and D). So head_dim 64 (SmolLM2), small pages (S = 8 or 16 in bfloat16) and any group size
are legal without padding; Mosaic pads such tiles to (8|16, 128) inside VMEM (VMEM bytes, not HBM bytes).
Padding head_dim to 128 in HBM instead would double the pool for D = 64 — or copy it every step. The m/l
scratch is kept lane-replicated ([G, 128], as jax's TPU flash and ragged paged attention do) and read back as a
column with a lane reduction, so no unaligned lane slice is needed for any D or S.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LANES = 128
# Tiling defaults, chosen by reasoning (no TPU here to tune on; untuned): a grid step has a fixed overhead, so a
# step should move a few hundred KiB — 128 slots per row (one lane width of logits) × 8 rows is 512 KiB of
# bfloat16 K+V at D = 128.
SLOTS_PER_BLOCK = 128
ROWS_PER_BLOCK = 8
# Scalar-prefetch operands live whole in SMEM, 1 MiB per core up to v6e: keep the tables under half of it.
SMEM_BUDGET_BYTES = 512 * 1024


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def fetch_table(block_table_RxM: jax.Array, lengths_R: jax.Array, page_size: int, num_pages: int,
                rows_per_block: int, pages_per_block: int) -> jax.Array:
  """The page each (row, table slot) operand fetches: the block table where the slot is in use, else (forward
  fill in grid order, per operand) whatever that operand fetched before — so the pipeline issues no copy.

  Input rows/slots must already be padded to multiples of the block sizes. Returns int32 [R, M]."""
  r, m = block_table_RxM.shape
  rb, pb = rows_per_block, pages_per_block
  used = jnp.arange(m)[None, :] < pl.cdiv(lengths_R, page_size)[:, None]
  pages = jnp.clip(block_table_RxM, 0, num_pages - 1)

  def to_operand_major(x):  # [R, M] → [R_b, P_b, steps in grid order (row block, page block)]
    return x.reshape(r // rb, rb, m // pb, pb).transpose(1, 3, 0, 2).reshape(rb, pb, -1)

  used_o, pages_o = to_operand_major(used), to_operand_major(pages)
  steps = jnp.arange(used_o.shape[-1])
  last = lax.cummax(jnp.where(used_o, steps, -1), axis=2)  # the latest step at or before this one in use
  filled = jnp.where(last >= 0, jnp.take_along_axis(pages_o, jnp.maximum(last, 0), axis=2), 0)
  return filled.reshape(rb, pb, r // rb, m // pb).transpose(2, 0, 3, 1).reshape(r, m).astype(jnp.int32)


def _kernel(lengths_ref, fetch_ref, q_ref, *refs, scale: float, page_size: int, rows_per_block: int,
            pages_per_block: int):
  del fetch_ref  # used by the index maps only
  n_kv = rows_per_block * pages_per_block
  k_refs, v_refs = refs[:n_kv], refs[n_kv:2 * n_kv]
  o_ref, m_ref, l_ref, acc_ref = refs[2 * n_kv:]
  b, i = pl.program_id(0), pl.program_id(1)
  block_start = i * pages_per_block * page_size
  _, g, d = q_ref.shape

  @pl.when(i == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  for rr in range(rows_per_block):
    length = lengths_ref[b * rows_per_block + rr]

    @pl.when(block_start < length)
    def _row(rr=rr, length=length):
      q = q_ref[rr]  # [G, D]
      logits, values = [], []
      for j in range(pages_per_block):
        page_start = block_start + j * page_size
        k = k_refs[rr * pages_per_block + j][...]  # [S, D]
        v = v_refs[rr * pages_per_block + j][...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        s_valid = page_start + lax.broadcasted_iota(jnp.int32, (g, page_size), 1) < length
        logits.append(jnp.where(s_valid, s, MASK_VALUE))  # before exp: a masked slot may be NaN
        v_valid = page_start + lax.broadcasted_iota(jnp.int32, (page_size, d), 0) < length
        # 0·NaN would poison p @ v. The select runs in float32, as jax's ragged paged attention does it (v5e's
        # VPU has no bfloat16 arithmetic).
        values.append(jnp.where(v_valid, v.astype(jnp.float32), 0.0).astype(v.dtype))
      m_prev = m_ref[rr].max(axis=1, keepdims=True)  # [G, 1] (lane-replicated in scratch)
      l_prev = l_ref[rr].max(axis=1, keepdims=True)
      m_next = m_prev
      for s in logits:
        m_next = jnp.maximum(m_next, s.max(axis=1, keepdims=True))
      correction = jnp.exp(m_prev - m_next)
      l_next = correction * l_prev
      pv = jnp.zeros((g, d), jnp.float32)
      for s, v in zip(logits, values):
        p = jnp.exp(s - m_next)
        l_next = l_next + p.sum(axis=1, keepdims=True)
        pv = pv + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
      acc_ref[rr] = correction * acc_ref[rr] + pv
      m_ref[rr] = jnp.broadcast_to(m_next, (g, LANES))
      l_ref[rr] = jnp.broadcast_to(l_next, (g, LANES))

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    total = l_ref[...].max(axis=2, keepdims=True)  # [R_b, G, 1] softmax denominators
    # A row with no slots never ran: l = 0 and acc = 0, giving 0 as the reference does.
    o_ref[...] = (acc_ref[...] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


def _positive(name: str, n) -> int:
  if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
    raise ValueError(f"paged_decode_attention (tpu): {name} must be a positive integer, got {n!r}")
  return n


def default_tiling(r: int, m: int, page_size: int) -> tuple[int, int]:
  """(rows per block, pages per block): ROWS_PER_BLOCK rows of SLOTS_PER_BLOCK slots, no more than there are."""
  return max(1, min(r, ROWS_PER_BLOCK)), max(1, min(m, SLOTS_PER_BLOCK // page_size))


def rows_per_call(rows_per_block: int, table_slots: int, smem_bytes: int = SMEM_BUDGET_BYTES) -> int:
  """Most rows one pallas_call takes: its scalar-prefetch operands (fetch table + lengths, int32) live whole in
  SMEM (1 MiB up to v6e); rows beyond that go to further calls. A multiple of `rows_per_block`."""
  blocks = smem_bytes // (4 * (table_slots + 1) * rows_per_block)
  if blocks < 1:
    raise ValueError(f"paged_decode_attention (tpu): a block table of {table_slots} pages per row does not fit "
                     f"{rows_per_block} rows in the {smem_bytes} bytes of SMEM kept for it; use fewer rows per "
                     "block or larger pages")
  return blocks * rows_per_block


def _call(q, k_pages, v_pages, table, lengths, *, scale, rb, pb, interpret):
  """One pallas_call over rows already padded to a multiple of rb and table slots to a multiple of pb."""
  r, g, d = q.shape
  num_pages, page_size, _ = k_pages.shape
  m = table.shape[1]
  fetch = fetch_table(table, lengths, page_size, num_pages, rb, pb)

  def page_spec(rr, j):
    return pl.BlockSpec((None, page_size, d), lambda b, i, lens, fetch: (fetch[b * rb + rr, i * pb + j], 0, 0))

  page_specs = [page_spec(rr, j) for rr in range(rb) for j in range(pb)]
  row_spec = pl.BlockSpec((rb, g, d), lambda b, i, lens, fetch: (b, 0, 0))
  kernel = functools.partial(_kernel, scale=scale, page_size=page_size, rows_per_block=rb, pages_per_block=pb)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(r // rb, m // pb),
          in_specs=[row_spec] + page_specs + page_specs,
          out_specs=row_spec,
          scratch_shapes=[pltpu.VMEM((rb, g, LANES), jnp.float32), pltpu.VMEM((rb, g, LANES), jnp.float32),
                          pltpu.VMEM((rb, g, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((r, g, d), q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="dmc_paged_decode_tpu",
  )(lengths, fetch, q, *([k_pages] * (rb * pb)), *([v_pages] * (rb * pb)))


@functools.partial(jax.jit, static_argnames=("scale", "rows_per_block", "pages_per_block", "max_rows_per_call",
                                             "interpret"))
def paged_decode_attention(q_RxGxD, k_pages_PxSxD, v_pages_PxSxD, block_table_RxM, lengths_R, scale=None, *,
                           rows_per_block: int | None = None, pages_per_block: int | None = None,
                           max_rows_per_call: int | None = None, interpret: bool | pltpu.InterpretParams = False):
  """q: [R, G, D]; pages: [P, S, D]; block_table: [R, M] page ids (anything past a row's length); lengths: [R].
  Returns [R, G, D] in q's dtype. `max_rows_per_call` (default: what SMEM holds, see rows_per_call) splits
  the rows over several kernel calls.

  `interpret` (any host): `pltpu.InterpretParams()` simulates the TPU — its memories, the pipeline's copies
  (skipped when a block index repeats), out-of-bounds reads raise, uninitialised VMEM and outputs are NaN — the
  kernel suite's mode; `True` is Pallas's generic interpreter (the same arithmetic on plain array slices, far
  faster to run: what the model uses off a TPU)."""
  r, g, d = q_RxGxD.shape
  _, page_size, d_k = k_pages_PxSxD.shape
  m = block_table_RxM.shape[1]
  if d_k != d or v_pages_PxSxD.shape != k_pages_PxSxD.shape:
    raise ValueError(f"paged_decode_attention: q head_dim {d} and pages {k_pages_PxSxD.shape}/"
                     f"{v_pages_PxSxD.shape} disagree")
  if block_table_RxM.shape[0] != r or lengths_R.shape != (r,):
    raise ValueError(f"paged_decode_attention: {r} rows of q, block table {block_table_RxM.shape}, lengths "
                     f"{lengths_R.shape}")
  scale = float(d ** -0.5 if scale is None else scale)
  rb_default, pb_default = default_tiling(r, m, page_size)
  rb = _positive("rows_per_block", rb_default if rows_per_block is None else rows_per_block)
  pb = _positive("pages_per_block", pb_default if pages_per_block is None else pages_per_block)
  m_pad = pl.cdiv(m, pb) * pb
  chunk = rows_per_call(rb, m_pad)
  if max_rows_per_call is not None:
    chunk = min(chunk, pl.cdiv(_positive("max_rows_per_call", max_rows_per_call), rb) * rb)
  r_pad = pl.cdiv(r, rb) * rb
  # Padded rows have length 0 (never computed, their pages never fetched); padded table slots lie past every
  # length.
  lengths = jnp.pad(lengths_R.astype(jnp.int32), (0, r_pad - r))
  table = jnp.pad(block_table_RxM.astype(jnp.int32), ((0, r_pad - r), (0, m_pad - m)))
  q = jnp.pad(q_RxGxD, ((0, r_pad - r), (0, 0), (0, 0)))
  outs = [_call(q[c:c + chunk], k_pages_PxSxD, v_pages_PxSxD, table[c:c + chunk], lengths[c:c + chunk],
                scale=scale, rb=rb, pb=pb, interpret=interpret) for c in range(0, r_pad, chunk)]
  return (outs[0] if len(outs) == 1 else jnp.concatenate(outs))[:r]


def lower_for_tpu(fn, *args, **kwargs):
  """The real Pallas → Mosaic lowering of `fn(*args)` for a TPU, on any host (args may be ShapeDtypeStructs).

  This runs the Pallas TPU block-shape rules and the lowering of every op in the kernel to Mosaic, and gives
  the module with its `tpu_custom_call`; Mosaic's own compile (layouts, VMEM, scheduling) runs only on a TPU."""
  return jax.jit(fn, **kwargs).trace(*args).lower(lowering_platforms=("tpu",))
