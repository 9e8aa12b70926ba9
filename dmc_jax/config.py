"""Model hyper-parameters: frozen, hashable dataclasses (usable as static jit arguments).

`LlamaConfig` is the one description of a Llama-family network in this project. Converters build it from
HF `config.json` (transformers v4 and v5 key styles), Meta `params.json` or GGUF metadata; checkpoints store
it with `to_dict`, and `from_dict` refuses keys it does not know.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from dmc_jax.errors import ConfigError
from pallas_kernels._backend import IMPLEMENTATIONS

DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: gradient checks in tests
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# The kernel implementation names, defined once in pallas_kernels._backend (None: the best available).
ATTENTION_IMPLS = IMPLEMENTATIONS


def check_keys(cls, d: Mapping[str, Any], where: str, error: type[Exception] = ConfigError) -> None:
  """Refuses keys of `d` that are not fields of the dataclass `cls` (a typo must not pass silently)."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise error(f"{where}: unknown key(s) {unknown}; expected a subset of {sorted(known)}")


_MISSING = object()


def typed(d: Mapping[str, Any], key: str, kind: str, where: str, default: Any = _MISSING, *,
          minimum: float | None = None, positive: bool = False, error: type[Exception] = ConfigError) -> Any:
  """`d[key]` checked against `kind` ("int", "float", "bool", "str", "ids"): no coercion of 64.5 to 64, "yes" to
  True or "tiny" to a float — one line naming the file and key instead. `None` counts as absent."""
  value = d.get(key, _MISSING) if isinstance(d, Mapping) else _MISSING
  if value is _MISSING or value is None:
    if default is _MISSING:
      raise error(f"{where}: missing key {key!r}" if value is _MISSING else f"{where}: {key} is null, expected {kind}")
    return default
  noun = {'int': 'integer', 'float': 'number', 'bool': 'boolean (true/false)', 'str': 'string',
          'ids': 'token id or list of ids'}[kind]
  bad = error(f"{where}: {key} must be {'a positive ' if positive else 'an ' if kind == 'int' else 'a '}"
              f"{noun}"
              f"{'' if minimum is None else f' >= {minimum}'}, got {value!r:.60}")
  if kind == "bool":
    if not isinstance(value, bool):
      raise bad
    return value
  if kind == "str":
    if not isinstance(value, str):
      raise bad
    return value
  if kind == "ids":
    ids = value if isinstance(value, (list, tuple)) else [value]
    if not all(_is_integral(v) and v >= 0 for v in ids):
      raise bad
    return tuple(int(v) for v in ids)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise bad
  if kind == "int":
    if not _is_integral(value):
      raise bad
    value = int(value)
  else:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
      raise bad
  if (positive and value <= 0) or (minimum is not None and value < minimum):
    raise bad
  return value


def _is_integral(v) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, int):
    return True
  return isinstance(v, float) and v.is_integer()


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 (`llama3`) or linear RoPE frequency scaling."""

  rope_type: str = "llama3"  # "llama3" | "linear"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ConfigError(f"rope_scaling.rope_type: unsupported {self.rope_type!r} (expected 'llama3' or 'linear')")
    if self.factor <= 0:
      raise ConfigError(f"rope_scaling.factor: expected > 0, got {self.factor}")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ConfigError("rope_scaling: expected high_freq_factor > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder (Llama 2/3, SmolLM2, ...)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  head_dim: int | None = None  # None: d_model // n_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  # Per-frequency divisors (head_dim/2 of them) as stored by llama.cpp in GGUF `rope_freqs`; overrides scaling.
  rope_freq_factors: tuple[float, ...] | None = None
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  # Numerics and memory (not part of the function the weights compute).
  param_dtype: str = "float32"
  dtype: str = "float32"  # activations / matmul inputs; softmax, norms and logits stay float32
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str | None = None  # DMC attention and decode kernels (pallas_kernels/dmc_*/api.py)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
      raise ConfigError(f"head_dim: expected a positive integer, got {self.head_dim!r}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_freq_factors is not None:
      object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
      if len(self.rope_freq_factors) != self.head_dim // 2:
        raise ConfigError(f"rope_freq_factors: expected {self.head_dim // 2} values, got "
                          f"{len(self.rope_freq_factors)}")
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
    for name in ("rms_norm_eps", "rope_theta"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"{name}: expected a positive finite number, got {value!r}")
    if (not isinstance(self.max_position_embeddings, int) or isinstance(self.max_position_embeddings, bool)
        or self.max_position_embeddings <= 0):
      raise ConfigError(f"max_position_embeddings: expected a positive integer, got {self.max_position_embeddings!r}")
    if not isinstance(self.tie_embeddings, bool):
      raise ConfigError(f"tie_embeddings: expected true or false, got {self.tie_embeddings!r}")
    # Special ids index the embedding: one outside the vocabulary would read another row (or crash a gather).
    specials = ([] if self.bos_token_id is None else [("bos_token_id", self.bos_token_id)]) + \
        [("eos_token_ids", i) for i in self.eos_token_ids]
    for name, i in specials:
      if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
        raise ConfigError(f"{name}: {i!r} is outside the vocabulary of {self.vocab_size} tokens")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name}: expected one of {DTYPES}, got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy: expected one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl: expected one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

  @property
  def n_groups(self) -> int:
    """Query heads per KV head (1 = MHA, n_heads = MQA)."""
    return self.n_heads // self.n_kv_heads

  def num_params(self) -> int:
    d, f, hd = self.d_model, self.ffn_dim, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.n_layers * layer + d + head

  def kv_bytes_per_token(self, bytes_per_value: int) -> int:
    """Bytes a vanilla KV cache holds per token (all layers, K and V)."""
    return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  # -- serialisation -------------------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["eos_token_ids"] = list(self.eos_token_ids)
    if self.rope_freq_factors is not None:
      out["rope_freq_factors"] = list(self.rope_freq_factors)
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "model config") -> "LlamaConfig":
    check_keys(cls, d, where)
    kwargs = dict(d)
    if kwargs.get("rope_scaling") is not None:
      kwargs["rope_scaling"] = _rope_scaling_from_dict(kwargs["rope_scaling"], where)
    if kwargs.get("eos_token_ids") is not None:
      kwargs["eos_token_ids"] = tuple(kwargs["eos_token_ids"])
    try:
      return cls(**kwargs)
    except TypeError as e:  # missing required fields
      raise ConfigError(f"{where}: {e}") from None


def _rope_scaling_from_dict(d: Mapping[str, Any], where: str) -> RopeScaling:
  check_keys(RopeScaling, d, f"{where}: rope_scaling")
  return RopeScaling(**d)


# -- HF config.json --------------------------------------------------------------------------------------


def _as_tuple_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def rope_from_hf(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from transformers v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) keys."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params:  # v5 per-layer-type form
    params = params["full_attention"]
  scaling = hf.get("rope_scaling")
  theta = hf.get("rope_theta")
  if params is not None:
    if not isinstance(params, Mapping):
      raise ConfigError(f"{where}: rope_parameters must be an object, got {params!r:.60}")
    theta = params.get("rope_theta", theta)
    scaling = params
  theta = typed({"rope_theta": theta}, "rope_theta", "float", where, 10000.0, positive=True)
  if scaling and not isinstance(scaling, Mapping):
    raise ConfigError(f"{where}: rope_scaling must be an object or null, got {scaling!r:.60}")
  if not scaling:
    return theta, None
  try:
    return theta, _rope_scaling_from_hf(scaling, where)
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{where}: rope scaling: {e}") from None


def _rope_scaling_from_hf(scaling: Mapping[str, Any], where: str) -> RopeScaling | None:
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return None
  if rope_type == "llama3":
    try:
      return RopeScaling(
          rope_type="llama3",
          factor=float(scaling["factor"]),
          low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
      raise ConfigError(f"{where}: rope scaling 'llama3' lacks key {e.args[0]!r}") from None
  if rope_type == "linear":
    return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
  raise ConfigError(f"{where}: unsupported rope scaling type {rope_type!r} (expected default, linear or llama3)")


def from_hf_config(hf: Mapping[str, Any], where: str = "config.json") -> LlamaConfig:
  """Builds a LlamaConfig from an HF LlamaForCausalLM `config.json` dict (types and ranges checked)."""
  if not isinstance(hf, Mapping):
    raise ConfigError(f"{where}: expected a JSON object, got a {type(hf).__name__}")
  model_type = hf.get("model_type", "llama")
  if model_type not in ("llama", "mistral"):
    raise ConfigError(f"{where}: model_type {model_type!r} is not a Llama-family model (expected 'llama')")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ConfigError(f"{where}: attention_bias/mlp_bias are not supported (Llama has no biases)")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{where}: hidden_act {act!r} unsupported (expected 'silu')")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in required if k not in hf]
  if missing:
    raise ConfigError(f"{where}: missing key(s) {missing}")
  theta, scaling = rope_from_hf(hf, where)
  pos = lambda key, default=_MISSING: typed(hf, key, "int", where, default, positive=True)
  n_heads = pos("num_attention_heads")
  kwargs = dict(
      vocab_size=pos("vocab_size"),
      d_model=pos("hidden_size"),
      n_layers=pos("num_hidden_layers"),
      n_heads=n_heads,
      n_kv_heads=pos("num_key_value_heads", n_heads),
      ffn_dim=pos("intermediate_size"),
      head_dim=pos("head_dim", None),
      rms_norm_eps=typed(hf, "rms_norm_eps", "float", where, 1e-6, positive=True),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=pos("max_position_embeddings", 4096),
      tie_embeddings=typed(hf, "tie_word_embeddings", "bool", where, False),
      bos_token_id=typed(hf, "bos_token_id", "int", where, None, minimum=0),
      eos_token_ids=typed(hf, "eos_token_id", "ids", where, ()),
  )
  try:
    return LlamaConfig(**kwargs)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


def check_meta_params(params: Any, where: str) -> dict:
  """Meta `params.json` with types and ranges of the keys the converter reads checked; null values dropped (an
  absent or null optional key takes Meta's default)."""
  if not isinstance(params, Mapping):
    raise ConfigError(f"{where}: expected a JSON object, got a {type(params).__name__}")
  for key in ("dim", "n_layers", "n_heads"):
    typed(params, key, "int", where, positive=True)
  for key in ("n_kv_heads", "multiple_of", "max_seq_len"):
    typed(params, key, "int", where, None, positive=True)
  vocab = params.get("vocab_size")
  if vocab is not None and vocab != -1:
    typed(params, "vocab_size", "int", where, positive=True)
  for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
    typed(params, key, "float", where, None, positive=True)
  typed(params, "use_scaled_rope", "bool", where, False)
  return {k: v for k, v in params.items() if v is not None}  # null = absent: Meta's default


def to_hf_config(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """The transformers `config.json` for `cfg` (v4 keys, which v5 also reads)."""
  if cfg.rope_freq_factors is not None:
    raise ConfigError("rope_freq_factors (from a GGUF rope_freqs tensor) have no HF config equivalent")
  scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    scaling = {"rope_type": s.rope_type, "factor": s.factor}
    if s.rope_type == "llama3":
      scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                     original_max_position_embeddings=s.original_max_position_embeddings)
  eos: Any = list(cfg.eos_token_ids)
  if len(eos) == 1:
    eos = eos[0]
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.ffn_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos,
      "torch_dtype": torch_dtype,
  }


@dataclasses.dataclass(frozen=True)
class DMCConfig:
  """Dynamic Memory Compression settings (docs/dmc.md §3–5); stored in a checkpoint's `compression` field."""

  decision_channel: str = "last"  # "last" (d-1, NVIDIA's code) or "first" (0, the paper's Algorithm 1)
  offset: float = 5.0  # c: a = k[ch] - c, omega = sigmoid(mean q[ch] + c) + eps
  temperature: float = 0.1  # tau of the Gumbel-sigmoid relaxation
  window: int | None = 12  # W: a slot averages at most the last W tokens of its run; None = unbounded
  epsilon: float = 2.0 ** -7
  # "channel": a = k[ch] - c, omega from q[ch] (NVIDIA's form; ch is lost to attention). "adapter": a zero-initialised
  # linear map per layer from the attention input to (a + c, omega - c) per KV head; all channels stay attention's.
  decisions: str = "channel"
  # "dmc" merges (above); "dms" evicts with a delay (docs/dmc.md §10): a token stays visible for `dms_window` steps
  # after it arrives, then only if the decision at the next position did not mark it. DMS reads offset, temperature
  # and decisions from the fields above; its decision logit is dms_scale · (q[ch] or the adapter's output) − offset.
  method: str = "dmc"
  # w: 16 because the CR of a row is bounded by about L / w and this project's rows hold 256–1,024 tokens (§10).
  dms_window: int = 16
  dms_scale: float = 100.0
  # b: subtracted from every decision logit (a − b > 0 merges or evicts), beside c, which also sets DMC's ω. 0 in
  # training; `dmc-jax calibrate` sets it after training so that the noise-free decisions of inference realise the
  # target CR (training counts the noisy ones and ends above it: dmc_jax/calibrate.py).
  decision_bias: float = 0.0

  def __post_init__(self):
    if self.method not in ("dmc", "dms"):
      raise ConfigError(f"dmc.method: expected 'dmc' or 'dms', got {self.method!r}")
    if not isinstance(self.dms_window, int) or isinstance(self.dms_window, bool) or self.dms_window < 1:
      raise ConfigError(f"dmc.dms_window: expected a positive integer, got {self.dms_window!r}")
    if self.decisions not in ("channel", "adapter"):
      raise ConfigError(f"dmc.decisions: expected 'channel' or 'adapter', got {self.decisions!r}")
    if self.decision_channel not in ("last", "first"):
      raise ConfigError(f"dmc.decision_channel: expected 'last' or 'first', got {self.decision_channel!r}")
    if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
      raise ConfigError(f"dmc.window: expected a positive integer or None, got {self.window!r}")
    if self.temperature <= 0:
      raise ConfigError(f"dmc.temperature: expected > 0, got {self.temperature}")
    if (isinstance(self.decision_bias, bool) or not isinstance(self.decision_bias, (int, float))
        or not math.isfinite(self.decision_bias)):
      raise ConfigError(f"dmc.decision_bias: expected a finite number, got {self.decision_bias!r}")

  def channel(self, head_dim: int) -> int | None:
    """The repurposed channel of q and k (None in the adapter form: none is repurposed)."""
    if self.decisions == "adapter":
      return None
    return head_dim - 1 if self.decision_channel == "last" else 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "dmc config") -> "DMCConfig":
    check_keys(cls, d, where)
    return cls(**d)
