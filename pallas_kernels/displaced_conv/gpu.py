"""Fused Pallas (Triton) SDC: forward and backward kernels with a custom VJP. Nothing of size (N+1)² per pixel is
ever written to memory.

Design, and why it lowers for Triton:
* One program per TH×TW tile of output pixels of one image (grid (B, Hp/TH, Wp/TW)); every per-pixel quantity is
  a (TH, TW) register tensor, TH and TW powers of 2 (Triton's tensor sizes must be).
* Displacements are unbounded, so no fixed halo covers a tile's sources. Each tap loads its TH×TW source samples
  directly from the frame in global memory at computed, clamped indices (a pointer-gather load). Neighbouring
  pixels and neighbouring taps read the same lines, so the source tile + halo is served from L1/L2; the window
  exists only one tap at a time, in registers. (Triton cannot gather from a shared-memory tile with
  data-dependent indices; a staged halo would need a displacement bound and a second path for everything else.)
* Window rows are a fori_loop (small Triton program, small interpreted jaxpr); columns are unrolled so their
  weights and column offsets stay in registers across rows.
* All arrays are passed flat and indexed with int32 offsets computed here (sizes are checked). Outputs are
  written to tile-padded buffers (Hp, Wp multiples of the tile), so no store needs a mask: lanes past the image
  compute on clamped pixels and are sliced off.
* Backward, per pixel: s_ab = Σ_c g_c I_c(tap a, b) gives the gradients of the (N+1)-tap weights, folded back into
  kh, kv and (u, v) in the kernel. The frame gradient is a scatter-add (`jax.ref.addupdate`, a float32 atomic add
  in Triton): summation order, hence the last bits, can vary between GPU runs; interpret mode is sequential.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _backend
from pallas_kernels.displaced_conv import reference

BLOCK_HW = (8, 32)  # output tile: 256 pixels, rows of 32 for coalesced row segments
NUM_WARPS = 4


def _tile_geometry(h, w, th, tw):
  """This program's pixels as (TH, TW) tensors: image index, clamped coordinates and flat index (for loads), flat
  index into the tile-padded outputs (for stores), and `valid` (inside the image)."""
  hp, wp = -(-h // th) * th, -(-w // tw) * tw
  img = pl.program_id(0)
  ys = pl.program_id(1) * th + lax.broadcasted_iota(jnp.int32, (th, tw), 0)
  xs = pl.program_id(2) * tw + lax.broadcasted_iota(jnp.int32, (th, tw), 1)
  yc, xc = jnp.minimum(ys, h - 1), jnp.minimum(xs, w - 1)
  pix = (img * h + yc) * w + xc
  pix_pad = (img * hp + ys) * wp + xs
  valid = (ys < h) & (xs < w)
  return img, yc, xc, pix, pix_pad, valid


def _axis(coord, disp, size, n, dtype):
  """Sample position along one axis, clipped as in the reference (beyond N+1 outside only the edge is read);
  returns (fraction, integer base = floor - r, inside-the-clip mask for the gradient)."""
  lo, hi = -(n + 1), size + n
  pos = coord.astype(dtype) + disp
  inside = (pos >= lo) & (pos <= hi)
  pos = jnp.clip(pos, lo, hi)
  fl = jnp.floor(pos)
  return pos - fl, fl.astype(jnp.int32) - (n - 1) // 2, inside


def _load_taps(k_ref, pix, n, dtype):
  return [k_ref[pix * n + i].astype(dtype) for i in range(n)]


def _interp(k_taps, frac):
  """(N+1)-tap weights w_a = (1 - f) k_a + f k_{a-1}, with k_{-1} = k_N = 0."""
  n = len(k_taps)
  return ([(1 - frac) * k_taps[0]] + [(1 - frac) * k_taps[a] + frac * k_taps[a - 1] for a in range(1, n)]
          + [frac * k_taps[n - 1]])


def _row_kv(kv_ref, pix, b, n, dtype):
  """kv_b and kv_{b-1} for a traced window row b in [0, N] (zero outside the kernel)."""
  kv_b = kv_ref[pix * n + jnp.minimum(b, n - 1)].astype(dtype) * jnp.asarray(b < n, dtype)
  kv_bm1 = kv_ref[pix * n + jnp.maximum(b - 1, 0)].astype(dtype) * jnp.asarray(b > 0, dtype)
  return kv_b, kv_bm1


def _prologue(uv_ref, kh_ref, pix, yc, xc, n, h, w, dtype):
  alpha, base_x, inside_x = _axis(xc, uv_ref[pix * 2].astype(dtype), w, n, dtype)
  beta, base_y, inside_y = _axis(yc, uv_ref[pix * 2 + 1].astype(dtype), h, n, dtype)
  kh = _load_taps(kh_ref, pix, n, dtype)
  cols = [jnp.clip(base_x + a, 0, w - 1) for a in range(n + 1)]
  return alpha, beta, base_y, inside_x, inside_y, kh, cols


def _fwd_kernel(frame_ref, uv_ref, kh_ref, kv_ref, out_ref, *, n, h, w, c, th, tw, dtype):
  img, yc, xc, pix, pix_pad, _ = _tile_geometry(h, w, th, tw)
  alpha, beta, base_y, _, _, kh, cols = _prologue(uv_ref, kh_ref, pix, yc, xc, n, h, w, dtype)
  wh = _interp(kh, alpha)

  def row(b, acc):
    kv_b, kv_bm1 = _row_kv(kv_ref, pix, b, n, dtype)
    wv = (1 - beta) * kv_b + beta * kv_bm1
    row_base = (img * h + jnp.clip(base_y + b, 0, h - 1)) * w
    racc = [jnp.zeros((th, tw), dtype)] * c
    for a in range(n + 1):
      off = (row_base + cols[a]) * c
      racc = [racc[ch] + wh[a] * frame_ref[off + ch].astype(dtype) for ch in range(c)]
    return tuple(acc[ch] + wv * racc[ch] for ch in range(c))

  acc = lax.fori_loop(0, n + 1, row, tuple(jnp.zeros((th, tw), dtype) for _ in range(c)))
  for ch in range(c):
    out_ref[pix_pad * c + ch] = acc[ch].astype(out_ref.dtype)


def _bwd_kernel(frame_ref, uv_ref, kh_ref, kv_ref, g_ref, dframe_in_ref, dframe_ref, duv_ref, dkh_ref, dkv_ref, *,
                n, h, w, c, th, tw, dtype):
  del dframe_in_ref  # aliased to dframe_ref: the zero-initialised scatter-add target
  img, yc, xc, pix, pix_pad, valid = _tile_geometry(h, w, th, tw)
  alpha, beta, base_y, inside_x, inside_y, kh, cols = _prologue(uv_ref, kh_ref, pix, yc, xc, n, h, w, dtype)
  wh = _interp(kh, alpha)
  # Lanes past the image carry a zero cotangent, so their (clamped) scatter-adds add nothing.
  g = [g_ref[pix * c + ch].astype(dtype) * valid.astype(dtype) for ch in range(c)]

  def row(b, carry):
    dwh, pending, dbeta = carry
    kv_b, kv_bm1 = _row_kv(kv_ref, pix, b, n, dtype)
    wv = (1 - beta) * kv_b + beta * kv_bm1
    gw = [wv * g[ch] for ch in range(c)]
    row_base = (img * h + jnp.clip(base_y + b, 0, h - 1)) * w
    dwv = jnp.zeros((th, tw), dtype)
    new_dwh = []
    for a in range(n + 1):
      off = (row_base + cols[a]) * c
      s = sum(g[ch] * frame_ref[off + ch].astype(dtype) for ch in range(c))
      new_dwh.append(dwh[a] + wv * s)
      dwv = dwv + wh[a] * s
      for ch in range(c):
        jax.ref.addupdate(dframe_ref, off + ch, (wh[a] * gw[ch]).astype(dframe_ref.dtype))
    # dkv_j = (1 - beta) dwv_j + beta dwv_{j+1}: row b completes slot b - 1 and starts slot b.
    if not (isinstance(b, int) and b == 0):
      dkv_ref[pix_pad * n + b - 1] = (pending + beta * dwv).astype(dkv_ref.dtype)
    return tuple(new_dwh), (1 - beta) * dwv, dbeta + dwv * (kv_bm1 - kv_b)

  zeros = jnp.zeros((th, tw), dtype)
  carry = row(0, (tuple([zeros] * (n + 1)), zeros, zeros))  # peeled: row 0 has no slot -1 to complete
  dwh, _, dbeta = lax.fori_loop(1, n + 1, row, carry)
  dalpha = zeros
  for i in range(n):
    dkh_ref[pix_pad * n + i] = ((1 - alpha) * dwh[i] + alpha * dwh[i + 1]).astype(dkh_ref.dtype)
    dalpha = dalpha + kh[i] * (dwh[i + 1] - dwh[i])  # d/dalpha of w_a = (1-alpha) k_a + alpha k_{a-1}
  duv_ref[pix_pad * 2] = (dalpha * inside_x.astype(dtype)).astype(duv_ref.dtype)
  duv_ref[pix_pad * 2 + 1] = (dbeta * inside_y.astype(dtype)).astype(duv_ref.dtype)


def _compute_dtype(*arrays):
  return jnp.result_type(*(a.dtype for a in arrays), jnp.float32)


def _static(frame, kh, block_hw):
  b, h, w, c = frame.shape
  n = kh.shape[-1]
  th, tw = block_hw
  hp, wp = -(-h // th) * th, -(-w // tw) * tw
  if b * hp * wp * max(c, n, 2) >= 2 ** 31:
    raise ValueError(f"displaced_conv (pallas): {b}x{hp}x{wp} pixels x {max(c, n)} exceed int32 offsets; "
                     "split the batch")
  return b, h, w, c, n, th, tw, hp, wp


def _call(kernel, grid, out_shape, interpret, name, **kwargs):
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
                        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1), **kwargs)


def _forward(frame, uv, kh, kv, block_hw, interpret):
  b, h, w, c, n, th, tw, hp, wp = _static(frame, kh, block_hw)
  dtype = _compute_dtype(frame, uv, kh, kv)
  kernel = functools.partial(_fwd_kernel, n=n, h=h, w=w, c=c, th=th, tw=tw, dtype=dtype)
  out = _call(kernel, (b, hp // th, wp // tw), jax.ShapeDtypeStruct((b * hp * wp * c,), dtype), interpret,
              "sdc_fwd")(frame.reshape(-1), uv.reshape(-1), kh.reshape(-1), kv.reshape(-1))
  return out.reshape(b, hp, wp, c)[:, :h, :w]


def _backward(frame, uv, kh, kv, g, block_hw, interpret):
  b, h, w, c, n, th, tw, hp, wp = _static(frame, kh, block_hw)
  dtype = _compute_dtype(frame, uv, kh, kv)
  kernel = functools.partial(_bwd_kernel, n=n, h=h, w=w, c=c, th=th, tw=tw, dtype=dtype)
  # Atomic adds need 32-bit floats at least; the frame gradient is accumulated in the compute dtype.
  out_shape = (jax.ShapeDtypeStruct((b * h * w * c,), dtype), jax.ShapeDtypeStruct((b * hp * wp * 2,), dtype),
               jax.ShapeDtypeStruct((b * hp * wp * n,), dtype), jax.ShapeDtypeStruct((b * hp * wp * n,), dtype))
  dframe, duv, dkh, dkv = _call(kernel, (b, hp // th, wp // tw), out_shape, interpret, "sdc_bwd",
                                input_output_aliases={5: 0})(
      frame.reshape(-1), uv.reshape(-1), kh.reshape(-1), kv.reshape(-1), g.reshape(-1),
      jnp.zeros((b * h * w * c,), dtype))
  crop = lambda x, k: x.reshape(b, hp, wp, k)[:, :h, :w]
  return (dframe.reshape(b, h, w, c).astype(frame.dtype), crop(duv, 2).astype(uv.dtype),
          crop(dkh, n).astype(kh.dtype), crop(dkv, n).astype(kv.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sdc(frame, uv, kh, kv, block_hw, interpret):
  return _forward(frame, uv, kh, kv, block_hw, interpret)


def _sdc_fwd(frame, uv, kh, kv, block_hw, interpret):
  return _forward(frame, uv, kh, kv, block_hw, interpret), (frame, uv, kh, kv)


def _sdc_bwd(block_hw, interpret, residuals, g):
  return _backward(*residuals, g, block_hw, interpret)


_sdc.defvjp(_sdc_fwd, _sdc_bwd)


def displaced_conv(frame_BxHxWxC: jax.Array, uv_BxHxWx2: jax.Array, kh_BxHxWxN: jax.Array, kv_BxHxWxN: jax.Array,
                   *, block_hw: tuple[int, int] = BLOCK_HW, interpret: bool | None = None) -> jax.Array:
  """The SDC of reference.py as fused Pallas kernels (forward and backward); same definition and border rule."""
  reference.check_shapes(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN)
  return _sdc(frame_BxHxWxC, uv_BxHxWx2, kh_BxHxWxN, kv_BxHxWxN, tuple(block_hw), _backend.interpret(interpret))
