"""SDC-Net in Flax Linen: the released 2-D FlowNetS-style encoder-decoder with a vector or an SDC head.

Inputs: s frames (float, 0..255) and the s-1 backward flows between them (pixels). Time is stacked into channels.
Outputs: per-pixel motion (u, v) in pixels and, for the SDC head, separable kernels kh, kv (N taps each).
The prediction is `displaced_conv(last_frame, uv, kh, kv)` (SDC head) or `warp(last_frame, uv)` (vector head).

Kernel normalisation (the SDC layer itself does not normalise): each 1-D kernel is a softmax over its N logits,
so it is positive and sums to one, and the predicted frame stays inside the range of its inputs. The logits'
bias starts peaked at the centre tap (`center_logit_init`), so an untrained SDC head starts near flow warping
rather than as an N×N box blur; the vector head is the N = 1 special case.

Motion parameterisation (`motion`):
* "direct" (the paper's): the head's first two channels are the motion (u, v) in pixels.
* "residual": the motion is the last backward flow plus the head's (u, v), and the SDC kernels are
  k = δ + g·(softmax(logits) − δ) with a per-pixel gate g = tanh(a) (one extra head channel). The (u, v) and
  gate channels start at exactly zero (zero weights and bias), so the untrained model *is* flow extrapolation:
  warp the last frame by the last flow with a delta kernel, which the SDC op evaluates as plain bilinear warping.
  Copying the last frame, the optimum a direct head drifts to on slow-motion data, is no longer the start.
  The kernels always sum to one; for g ≥ 0 they are positive (a convex combination of δ and a softmax), for
  g < 0 they sharpen (centre tap above one), which counters the blur of bilinear resampling. The gate is a
  smooth function on purpose: a clipped gate with a straight-through gradient was pushed ever further below 0
  (towards sharpening it could not deliver), and that unanswered push grew the features until training
  diverged (activations ×3000 in 50 steps; docs/results.md, "SDC-Net with residual motion").

Normalisation of inputs (as NVIDIA's release): images minus the per-sample channel mean over the input frames,
divided by 255; flows (f - mean) / (3 std) with the reference statistics. Inputs are edge-padded to a multiple
of 64 and outputs cropped back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.displaced_conv import api as sdc_api

# Logical axis names (mapped to mesh axes by the harness's rules table).
ACT = ("activation_batch", "activation_height", "activation_width", "activation_channels")
CONV_KERNEL = ("conv_height", "conv_width", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class SDCNetConfig:
  """Model hyper-parameters (hashable: a static argument)."""
  frames: int = 2  # s: input frames (with s-1 flows)
  head: str = "sdc"  # "sdc" (motion + separable kernels) or "vector" (motion only)
  kernel_size: int = 11  # N: taps per 1-D kernel of the SDC head
  motion: str = "direct"  # "direct" (the paper's) or "residual" (on the last backward flow; starts at extrapolation)
  encoder_widths: tuple[int, ...] = (32, 64, 128, 128, 256, 256, 256, 256, 512, 512)  # conv1..conv6_1
  decoder_widths: tuple[int, ...] = (256, 128, 64, 32, 16, 8)  # deconv5..deconv0
  center_logit_init: float = 4.0  # SDC head: initial logit bias of the centre tap (others 0)
  rgb_max: float = 255.0
  flow_mean: tuple[float, float] = (-0.944, -1.231)  # reference flow statistics (u, v), pixels
  flow_std: tuple[float, float] = (13.77, 7.47)
  dtype: str = "float32"  # compute dtype
  implementation: str | None = None  # SDC op implementation (None | "xla" | "xla_taps" | "pallas")

  def __post_init__(self):
    from sdc_jax.errors import SDCError
    if self.frames < 2:
      raise SDCError(f"model.frames: need at least 2 input frames, got {self.frames}")
    if self.head not in ("sdc", "vector"):
      raise SDCError(f"model.head: expected 'sdc' or 'vector', got {self.head!r}")
    if self.motion not in ("direct", "residual"):
      raise SDCError(f"model.motion: expected 'direct' or 'residual', got {self.motion!r}")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise SDCError(f"model.kernel_size: must be odd and positive, got {self.kernel_size}")
    if len(self.encoder_widths) != 10 or len(self.decoder_widths) != 6:
      raise SDCError("model.encoder_widths/decoder_widths: need 10 encoder and 6 decoder widths "
                     f"(got {len(self.encoder_widths)} and {len(self.decoder_widths)})")

  @property
  def head_channels(self) -> int:
    if self.head == "vector":
      return 2
    return 2 + 2 * self.kernel_size + (1 if self.motion == "residual" else 0)  # + the gate (residual)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SDCNetConfig":
    from sdc_jax.errors import SDCError
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise SDCError(f"model config: unknown key {unknown[0]!r}")
    d = dict(d)
    for k in ("encoder_widths", "decoder_widths", "flow_mean", "flow_std"):
      if k in d:
        d[k] = tuple(d[k])
    return cls(**d)


def _kernel_init():
  return nn.with_logical_partitioning(nn.initializers.kaiming_uniform(), CONV_KERNEL)


def _bias_init(init=nn.initializers.zeros_init()):
  return nn.with_logical_partitioning(init, ("conv_out",))


class _Conv(nn.Module):
  features: int
  kernel: int
  stride: int
  dtype: Any
  act: bool = True

  @nn.compact
  def __call__(self, x):
    p = (self.kernel - 1) // 2  # symmetric padding as the released torch code: exact halving at even sizes
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride), padding=((p, p), (p, p)),
                dtype=self.dtype, kernel_init=_kernel_init(), bias_init=_bias_init())(x)
    if self.act:
      x = nn.leaky_relu(x, 0.1)
    return nn.with_logical_constraint(x, ACT)


class _Deconv(nn.Module):
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    # 4×4 stride-2 transposed conv with torch padding 1 = padding k-1-p = 2 on the dilated input: exact ×2.
    x = nn.ConvTranspose(self.features, (4, 4), (2, 2), padding=((2, 2), (2, 2)), dtype=self.dtype,
                         kernel_init=_kernel_init(), bias_init=_bias_init())(x)
    return nn.with_logical_constraint(nn.leaky_relu(x, 0.1), ACT)


def _head_bias_init(cfg: SDCNetConfig):
  def init(key, shape, dtype=jnp.float32):
    del key
    b = jnp.zeros(shape, dtype)
    if cfg.head == "sdc":
      r = cfg.kernel_size // 2
      b = b.at[2 + r].set(cfg.center_logit_init).at[2 + cfg.kernel_size + r].set(cfg.center_logit_init)
    return b
  return init


def normalize_inputs(cfg: SDCNetConfig, frames_BxSxHxWx3, flows_BxFxHxWx2):
  """The network input: BxHxWx(3s + 2(s-1)) (normalisation described in the module docstring)."""
  b, s, h, w, _ = frames_BxSxHxWx3.shape
  frames = frames_BxSxHxWx3.astype(jnp.float32)
  mean_Bx1x1x1x3 = jnp.mean(frames, axis=(1, 2, 3), keepdims=True)
  frames = (frames - mean_Bx1x1x1x3) / cfg.rgb_max
  flows = (flows_BxFxHxWx2.astype(jnp.float32) - jnp.asarray(cfg.flow_mean)) / (3 * jnp.asarray(cfg.flow_std))
  frames_BxHxWx3S = jnp.moveaxis(frames, 1, 3).reshape(b, h, w, 3 * s)
  flows_BxHxWx2F = jnp.moveaxis(flows, 1, 3).reshape(b, h, w, 2 * (s - 1))
  return jnp.concatenate([frames_BxHxWx3S, flows_BxHxWx2F], axis=-1)


def _head_kernel_init(cfg: SDCNetConfig):
  """Residual motion: the (u, v) and gate channels start at exactly zero (the rest as every other layer)."""
  base = nn.initializers.kaiming_uniform()

  def init(key, shape, dtype=jnp.float32):
    w = base(key, shape, dtype)
    if cfg.motion == "residual":
      w = w.at[..., :2].set(0.0)
      if cfg.head == "sdc":
        w = w.at[..., -1].set(0.0)
    return w
  return nn.with_logical_partitioning(init, CONV_KERNEL)


class SDCNet(nn.Module):
  cfg: SDCNetConfig

  @nn.compact
  def __call__(self, frames_BxSxHxWx3, flows_BxFxHxWx2):
    """Returns dict(pred: BxHxWx3 float in 0..255 scale, uv: BxHxWx2, kh/kv: BxHxWxN or None)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    b, s, h, w, c = frames_BxSxHxWx3.shape
    if s != cfg.frames or c != 3 or flows_BxFxHxWx2.shape != (b, s - 1, h, w, 2):
      raise ValueError(f"SDCNet: expected frames Bx{cfg.frames}xHxWx3 and flows Bx{cfg.frames - 1}xHxWx2, got "
                       f"{tuple(frames_BxSxHxWx3.shape)} and {tuple(flows_BxFxHxWx2.shape)}")
    x = normalize_inputs(cfg, frames_BxSxHxWx3, flows_BxFxHxWx2)
    ph, pw = -h % 64, -w % 64
    x_BxHpxWpxC = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    x_BxHpxWpxC = nn.with_logical_constraint(x_BxHpxWpxC.astype(dt), ACT)
    e = cfg.encoder_widths
    c1 = _Conv(e[0], 7, 2, dt, name="conv1")(x_BxHpxWpxC)
    c2 = _Conv(e[1], 5, 2, dt, name="conv2")(c1)
    c3 = _Conv(e[3], 3, 1, dt, name="conv3_1")(_Conv(e[2], 5, 2, dt, name="conv3")(c2))
    c4 = _Conv(e[5], 3, 1, dt, name="conv4_1")(_Conv(e[4], 3, 2, dt, name="conv4")(c3))
    c5 = _Conv(e[7], 3, 1, dt, name="conv5_1")(_Conv(e[6], 3, 2, dt, name="conv5")(c4))
    c6 = _Conv(e[9], 3, 1, dt, name="conv6_1")(_Conv(e[8], 3, 2, dt, name="conv6")(c5))
    d = cfg.decoder_widths
    y = c6
    for i, skip in enumerate((c5, c4, c3, c2, c1, x_BxHpxWpxC)):
      y = jnp.concatenate([skip, _Deconv(d[i], dt, name=f"deconv{5 - i}")(y)], axis=-1)
    out = nn.Conv(cfg.head_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="head",
                  kernel_init=_head_kernel_init(cfg), bias_init=_bias_init(_head_bias_init(cfg)))(y)
    out_BxHxWxK = out[:, :h, :w].astype(jnp.float32)
    uv_BxHxWx2 = out_BxHxWxK[..., :2]
    if cfg.motion == "residual":
      uv_BxHxWx2 = uv_BxHxWx2 + flows_BxFxHxWx2[:, -1].astype(jnp.float32)
    last_BxHxWx3 = frames_BxSxHxWx3[:, -1].astype(jnp.float32)
    if cfg.head == "vector":
      pred = sdc_api.warp(last_BxHxWx3, uv_BxHxWx2, cfg.implementation)
      kh = kv = None
    else:
      n = cfg.kernel_size
      kh = jax.nn.softmax(out_BxHxWxK[..., 2:2 + n], axis=-1)
      kv = jax.nn.softmax(out_BxHxWxK[..., 2 + n:2 + 2 * n], axis=-1)
      if cfg.motion == "residual":
        g = jnp.tanh(out_BxHxWxK[..., -1:])
        delta = jax.nn.one_hot(n // 2, n, dtype=kh.dtype)
        kh, kv = delta + g * (kh - delta), delta + g * (kv - delta)
      pred = sdc_api.displaced_conv(last_BxHxWx3, uv_BxHxWx2, kh, kv, cfg.implementation)
    return {"pred": nn.with_logical_constraint(pred, ACT), "uv": uv_BxHxWx2, "kh": kh, "kv": kv}


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
