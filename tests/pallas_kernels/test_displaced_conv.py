"""Every SDC implementation against the reference (itself checked against a direct float64 formula in
test_displaced_conv.py): forward and all four gradients, odd sizes, borders, large and infinite displacements.
"pallas" runs interpreted on the CPU; its real Triton lowering is checked against an abstract H100; tests marked
`gpu` run it natively."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _backend
from pallas_kernels.displaced_conv import api, gpu, reference

IMPLS = ("xla", "xla_taps", "pallas")
COMPARED = IMPLS[1:]  # "xla" is the reference itself


def sdc(impl, interpret=None):
  if impl == "pallas":
    # Small tiles on the CPU so that odd sizes span several tiles, some partial.
    block = gpu.BLOCK_HW if jax.default_backend() == "gpu" else (4, 8)
    return lambda *a: gpu.displaced_conv(*a, block_hw=block, interpret=interpret)
  return lambda *a: api.displaced_conv(*a, implementation=impl)


def random_inputs(seed, b, h, w, c, n, scale):
  rng = np.random.default_rng(seed)
  frame = rng.uniform(0, 1, (b, h, w, c))
  uv = rng.normal(0, scale, (b, h, w, 2))
  kh = rng.uniform(-0.2, 1, (b, h, w, n))
  kv = rng.uniform(-0.2, 1, (b, h, w, n))
  cot = rng.normal(size=(b, h, w, c))
  return [jnp.asarray(a, jnp.float32) for a in (frame, uv, kh, kv, cot)]


@jax.jit
def reference_vjp(frame, uv, kh, kv, cot):
  out, vjp = jax.vjp(reference.displaced_conv, frame, uv, kh, kv)
  return out, vjp(cot)


def check_against_reference(fn, args, rtol=2e-5, atol=2e-5):
  *primals, cot = args

  @jax.jit
  def fwd_bwd(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cot)

  out, grads = fwd_bwd(*primals)
  want_out, want_grads = reference_vjp(*args)
  np.testing.assert_allclose(out, want_out, rtol=rtol, atol=atol, err_msg="forward")
  for name, got, want in zip(("frame", "uv", "kh", "kv"), grads, want_grads):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = float(jnp.abs(want).max()) + 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=f"gradient w.r.t. {name}")


CASES = {
    "odd_sizes_across_borders": (2, 9, 13, 3, 5, 1.5),
    "large_displacements": (1, 7, 6, 2, 3, 20.0),
    "n_larger_than_image": (1, 5, 11, 3, 7, 3.0),
    "warp_n1": (1, 8, 8, 1, 1, 2.0),
}


@pytest.mark.parametrize("impl", COMPARED)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_reference(impl, case):
  check_against_reference(sdc(impl), random_inputs(0, *CASES[case]))


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_and_infinite_displacements_at_borders(impl):
  # Integer shifts are exact shifts with edge replication; +-inf reads the far corner.
  rng = np.random.default_rng(1)
  frame = jnp.asarray(rng.uniform(0, 1, (1, 6, 7, 2)), jnp.float32)
  uv = jnp.zeros((1, 6, 7, 2)).at[..., 0].set(3.0).at[..., 1].set(-2.0)
  uv = uv.at[0, 0, 0].set(jnp.inf).at[0, 5, 6].set(-jnp.inf)
  one = jnp.ones((1, 6, 7, 1))
  out = np.asarray(sdc(impl)(frame, uv, one, one))
  ys, xs = np.meshgrid(np.arange(6), np.arange(7), indexing="ij")
  want = np.asarray(frame)[0, np.clip(ys - 2, 0, 5), np.clip(xs + 3, 0, 6)]
  want[0, 0], want[5, 6] = frame[0, 5, 6], frame[0, 0, 0]
  np.testing.assert_allclose(out[0], want, atol=1e-6)


def test_api_and_model_select_the_pallas_kernel():
  hd = (1, 1080, 1920, 3)
  assert api.resolve("pallas", hd, 11) == "pallas" and api.resolve("xla", hd, 11) == "xla"
  if jax.default_backend() != "gpu":  # None: the window path while its window is small, the tap loop above
    assert api.window_bytes((1, 256, 256, 3), 11) == 113_246_208  # the ≈113 MB of docs/sdc.md §1
    assert api.resolve(None, (8, 128, 128, 3), 11) == "xla" and api.resolve(None, hd, 11) == "xla_taps"
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.resolve("triton", hd, 11)
  # The model's setting reaches the op: only "pallas" traces a pallas_call (values: the op tests above).
  for impl in ("pallas", "xla_taps"):
    model, params, frames, flows = tiny_model(impl, 5, 16, 32)
    jaxpr = str(jax.make_jaxpr(model.apply)(params, frames, flows))
    assert ("pallas_call" in jaxpr) == (impl == "pallas"), impl


def tiny_model(impl, n, h, w):
  from sdc_jax.model import SDCNet, SDCNetConfig
  rng = np.random.default_rng(4)
  frames = jnp.asarray(rng.uniform(0, 255, (1, 2, h, w, 3)), jnp.float32)
  flows = jnp.asarray(rng.normal(0, 2, (1, 1, h, w, 2)), jnp.float32)
  model = SDCNet(SDCNetConfig(encoder_widths=(4, 8, 8, 8, 8, 8, 8, 8, 8, 8), decoder_widths=(8, 8, 8, 8, 4, 4),
                              kernel_size=n, implementation=impl))
  return model, jax.eval_shape(model.init, jax.random.key(0), frames, flows), frames, flows


def abstract(b, h, w, c, n, dtype=jnp.float32):
  s = jax.ShapeDtypeStruct
  return s((b, h, w, c), dtype), s((b, h, w, 2), dtype), s((b, h, w, n), dtype), s((b, h, w, n), dtype)


def fwd_and_grad(block_hw=gpu.BLOCK_HW):
  def fn(frame, uv, kh, kv):
    f = lambda *a: gpu.displaced_conv(*a, block_hw=block_hw, interpret=False)
    out, vjp = jax.vjp(f, frame, uv, kh, kv)
    return out, vjp(out)
  return fn


@pytest.mark.parametrize("shape", [(1, 720, 1280, 3, 11), (2, 37, 53, 3, 5), (1, 16, 16, 1, 1)])
def test_triton_lowering_for_abstract_h100(shape):
  lowered = _backend.lower_for_abstract_gpu(fwd_and_grad(), *abstract(*shape))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel, no fallback


def test_triton_lowering_rejects_what_triton_cannot_run():
  # The check above is real: a tile that is not a power of 2 fails in the lowering, not at run time.
  with pytest.raises(ValueError, match="power of 2"):
    _backend.lower_for_abstract_gpu(fwd_and_grad(block_hw=(6, 32)), *abstract(1, 24, 64, 3, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 67, 131, 3, 11, 4.0), (2, 40, 72, 3, 5, 30.0), (1, 33, 47, 3, 1, 2.0)])
def test_native_pallas_matches_reference(case):
  check_against_reference(sdc("pallas", interpret=False), random_inputs(3, *case), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_native_model_with_pallas_equals_xla():
  preds = []
  for impl in ("pallas", "xla"):
    model, _, frames, flows = tiny_model(impl, 11, 72, 136)
    params = model.init(jax.random.key(0), frames, flows)
    preds.append(jax.jit(model.apply)(params, frames, flows)["pred"])
  np.testing.assert_allclose(preds[0], preds[1], rtol=1e-4, atol=1e-2)
