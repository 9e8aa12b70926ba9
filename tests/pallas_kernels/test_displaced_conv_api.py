"""The SDC op against a direct, independently written formula (numpy float64): per tap, bilinear sampling whose
four corners are each clamped into the image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.displaced_conv import api, reference


def direct_sdc(frame, uv, kh, kv):
  """out(x,y) = sum_ij kv_j kh_i B[I](x+u+i, y+v+j), B bilinear with every corner clamped. float64 loops."""
  frame, uv, kh, kv = (np.asarray(a, np.float64) for a in (frame, uv, kh, kv))
  b, h, w, c = frame.shape
  n = kh.shape[-1]
  r = n // 2
  out = np.zeros_like(frame)
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  bi = np.arange(b)[:, None, None]

  def sample(px, py):  # bilinear, corners clamped
    x0 = np.floor(px)
    y0 = np.floor(py)
    ax = (px - x0)[..., None]
    ay = (py - y0)[..., None]

    def at(yy, xx):
      yy = np.clip(yy, 0, h - 1).astype(int)
      xx = np.clip(xx, 0, w - 1).astype(int)
      return frame[bi, yy, xx]
    return ((1 - ay) * ((1 - ax) * at(y0, x0) + ax * at(y0, x0 + 1))
            + ay * ((1 - ax) * at(y0 + 1, x0) + ax * at(y0 + 1, x0 + 1)))

  for j in range(-r, r + 1):
    for i in range(-r, r + 1):
      k = (kv[..., j + r] * kh[..., i + r])[..., None]
      out += k * sample(xs + uv[..., 0] + i, ys + uv[..., 1] + j)
  return out


def random_inputs(seed, b, h, w, c, n, scale):
  rng = np.random.default_rng(seed)
  frame = rng.uniform(0, 255, (b, h, w, c))
  uv = rng.normal(0, scale, (b, h, w, 2))
  kh = rng.uniform(-0.2, 1, (b, h, w, n))  # unnormalised, signed: the op must not assume anything
  kv = rng.uniform(-0.2, 1, (b, h, w, n))
  return frame, uv, kh, kv


@pytest.mark.parametrize("b, h, w, c, n, scale", [
    (2, 9, 13, 3, 5, 1.5),   # odd sizes, displacements across the border
    (1, 7, 6, 2, 3, 20.0),   # large displacements: most samples fall outside and clamp
    (1, 5, 11, 3, 11, 3.0),  # N larger than the image height
    (1, 8, 8, 1, 1, 2.0),
])
def test_equals_direct_formula_everywhere(b, h, w, c, n, scale):
  args = random_inputs(0, b, h, w, c, n, scale)
  got = np.asarray(reference.displaced_conv(*(jnp.asarray(a, jnp.float32) for a in args)))
  want = direct_sdc(*args)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-3)


def test_borders_exact_integer_displacements():
  # Integer displacements land exactly on pixels: the result is an exact shift with edge replication.
  rng = np.random.default_rng(1)
  frame = rng.uniform(0, 1, (1, 6, 7, 1))
  uv = np.zeros((1, 6, 7, 2))
  uv[..., 0] = 3.0
  uv[..., 1] = -2.0
  one = np.ones((1, 6, 7, 1))
  got = np.asarray(reference.warp(jnp.asarray(frame), jnp.asarray(uv)))
  ys, xs = np.meshgrid(np.arange(6), np.arange(7), indexing="ij")
  want = frame[0, np.clip(ys - 2, 0, 5), np.clip(xs + 3, 0, 6)]
  np.testing.assert_allclose(got[0], want, atol=1e-6)
  np.testing.assert_allclose(direct_sdc(frame, uv, one, one)[0], want, atol=1e-12)


def test_huge_and_infinite_displacements_read_the_edge():
  frame = jnp.arange(20, dtype=jnp.float32).reshape(1, 4, 5, 1)
  uv = jnp.full((1, 4, 5, 2), 1e9).at[0, 0, 0].set(-jnp.inf)
  out = np.asarray(reference.warp(frame, uv))
  assert out[0, 0, 0, 0] == 0.0  # top-left corner
  assert np.all(out.ravel()[1:] == 19.0)  # bottom-right corner


def test_n1_is_flow_warping():
  frame, uv, _, _ = random_inputs(2, 1, 10, 12, 3, 1, 2.0)
  f, u = jnp.asarray(frame, jnp.float32), jnp.asarray(uv, jnp.float32)
  # An independent bilinear warp: jax.scipy map_coordinates (order 1) with edge clamping ('nearest').
  ys, xs = np.meshgrid(np.arange(10), np.arange(12), indexing="ij")
  want = np.stack([jax.scipy.ndimage.map_coordinates(f[0, ..., ch], [ys + u[0, ..., 1], xs + u[0, ..., 0]],
                                                     order=1, mode="nearest") for ch in range(3)], -1)
  np.testing.assert_allclose(np.asarray(api.warp(f, u))[0], want, rtol=1e-5, atol=1e-3)


def test_zero_motion_is_separable_adaptive_convolution():
  frame, _, kh, kv = random_inputs(3, 1, 9, 10, 2, 5, 0.0)
  got = np.asarray(reference.displaced_conv(jnp.asarray(frame), jnp.zeros((1, 9, 10, 2)), jnp.asarray(kh),
                                            jnp.asarray(kv)))
  padded = np.pad(frame, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  want = np.zeros_like(frame)
  for j in range(5):
    for i in range(5):
      want += (kv[..., j] * kh[..., i])[..., None] * padded[:, j:j + 9, i:i + 10]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_gradients_match_finite_differences():
  jax.config.update("jax_enable_x64", True)
  try:
    frame, uv, kh, kv = random_inputs(4, 1, 6, 7, 2, 3, 1.3)
    frame /= 255.0
    args = [jnp.asarray(a, jnp.float64) for a in (frame, uv, kh, kv)]
    weights = jnp.asarray(np.random.default_rng(5).normal(size=frame.shape))

    def f(*a):
      return jnp.sum(weights * reference.displaced_conv(*a))

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(*args)
    rng = np.random.default_rng(6)
    eps = 1e-6
    for which in range(4):
      for _ in range(6):
        idx = tuple(rng.integers(0, s) for s in args[which].shape)
        plus = list(args)
        minus = list(args)
        plus[which] = args[which].at[idx].add(eps)
        minus[which] = args[which].at[idx].add(-eps)
        fd = (f(*plus) - f(*minus)) / (2 * eps)
        np.testing.assert_allclose(float(grads[which][idx]), float(fd), rtol=1e-5, atol=1e-7,
                                   err_msg=f"argument {which} at {idx}")
  finally:
    jax.config.update("jax_enable_x64", False)


def test_api_dispatch_and_errors():
  frame, uv, kh, kv = (jnp.asarray(a, jnp.float32) for a in random_inputs(7, 1, 4, 4, 1, 3, 1.0))
  default = api.resolve(None, frame.shape, 3)
  assert default == ("pallas" if jax.default_backend() == "gpu" else "xla")
  np.testing.assert_array_equal(api.displaced_conv(frame, uv, kh, kv),
                                api.displaced_conv(frame, uv, kh, kv, implementation=default))
  with pytest.raises(ValueError, match="implementation"):
    api.displaced_conv(frame, uv, kh, kv, implementation="cuda")
  with pytest.raises(ValueError, match="uv must be"):
    api.displaced_conv(frame, uv[..., :1], kh, kv)
  with pytest.raises(ValueError, match="odd"):
    api.displaced_conv(frame, uv, kh[..., :2], kv[..., :2])
