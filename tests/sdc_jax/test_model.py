import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdc_jax.errors import SDCError
from sdc_jax.model import SDCNet, SDCNetConfig, normalize_inputs, num_params


def abstract_params(cfg, h=64, w=64):
  s = cfg.frames
  return jax.eval_shape(lambda k: SDCNet(cfg).init(k, jnp.zeros((1, s, h, w, 3)), jnp.zeros((1, s - 1, h, w, 2))),
                        jax.random.key(0))["params"]


def test_released_widths_have_9_7m_parameters():
  vec = num_params(abstract_params(SDCNetConfig(head="vector")))
  sdc = num_params(abstract_params(SDCNetConfig(head="sdc", kernel_size=11)))
  assert vec == 9_690_490  # ≈9.7 M, the released vector model
  assert sdc - vec == (24 - 2) * (3 * 3 * 16 + 1)  # only the head grows: 2 + 2N channels (head input 8 + 8)
  assert abstract_params(SDCNetConfig(frames=3))["conv1"]["Conv_0"]["kernel"].value.shape == (7, 7, 13, 32)


def test_logical_axis_names_on_parameters():
  p = abstract_params(SDCNetConfig(head="vector"))
  k = p["deconv3"]["ConvTranspose_0"]["kernel"]
  assert isinstance(k, nn.Partitioned) and k.names == ("conv_height", "conv_width", "conv_in", "conv_out")


TINY = SDCNetConfig(encoder_widths=(4, 8, 8, 8, 8, 8, 8, 8, 8, 8), decoder_widths=(8, 8, 8, 8, 4, 4), kernel_size=5)


def test_forward_shapes_odd_sizes_and_kernel_normalisation():
  model = SDCNet(TINY)
  frames = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 2, 37, 50, 3)), jnp.float32)
  flows = jnp.zeros((2, 1, 37, 50, 2))
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), frames, flows)
  out = jax.jit(model.apply)(params, frames, flows)
  assert out["pred"].shape == (2, 37, 50, 3) and out["uv"].shape == (2, 37, 50, 2)
  np.testing.assert_allclose(np.asarray(out["kh"]).sum(-1), 1.0, atol=1e-5)  # softmax per 1-D kernel
  assert float(out["kh"].min()) > 0
  # the untrained centre tap dominates (starts near flow warping, not an N×N box blur)
  assert float(jnp.mean(out["kh"][..., 2])) > 0.5
  # convex combination of input pixels: the prediction stays in the input range
  assert float(out["pred"].min()) >= float(frames[:, 1].min()) - 1e-3
  assert float(out["pred"].max()) <= float(frames[:, 1].max()) + 1e-3


def test_vector_head_with_zero_motion_copies_the_last_frame():
  cfg = dataclasses.replace(TINY, head="vector")
  model = SDCNet(cfg)
  frames = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (1, 2, 16, 16, 3)), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), frames, jnp.zeros((1, 1, 16, 16, 2)))
  zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
  np.testing.assert_allclose(jax.jit(model.apply)(zero, frames, jnp.zeros((1, 1, 16, 16, 2)))["pred"], frames[:, 1],
                             atol=1e-4)


def test_input_normalisation():
  cfg = SDCNetConfig()
  frames = jnp.full((1, 2, 2, 2, 3), 100.0).at[:, 1].set(200.0)
  flows = jnp.full((1, 1, 2, 2, 2), 13.77 * 3 - 0.944)
  x = normalize_inputs(cfg, frames, flows)
  np.testing.assert_allclose(x[0, 0, 0, :6], [-50 / 255] * 3 + [50 / 255] * 3, atol=1e-6)
  assert float(x[0, 0, 0, 6]) == pytest.approx(1.0, abs=1e-5)


def test_config_errors_and_roundtrip():
  with pytest.raises(SDCError, match="odd"):
    SDCNetConfig(kernel_size=4)
  with pytest.raises(SDCError, match="model.head"):
    SDCNetConfig(head="kernel")
  with pytest.raises(SDCError, match="unknown key 'bogus'"):
    SDCNetConfig.from_dict({"bogus": 1})
  assert SDCNetConfig.from_dict(TINY.to_dict()) == TINY
  with pytest.raises(ValueError, match="expected frames"):
    SDCNet(TINY).init(jax.random.key(0), jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1, 1, 8, 8, 2)))
