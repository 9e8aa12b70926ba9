"""Adapters: what a retrofit trained when it trained only part of the model, as a checkpoint kind of its own.

    ADAPTER/
      adapter.json          format tag; `parts`; method ("dmc" or "dms"); the DMC/DMS settings; the base's
                            parameter digest and dtype; the sha256 of adapter.safetensors; provenance (command,
                            tokens, date)
      adapter.safetensors   the trained tensors, keyed by parameter path (unscanned, '/'-joined)

Parts (`train.trainable` → parts): `decisions` → decision_rows (channel form) or decision_adapter (adapter form);
`decisions+norms` → that + norms; `lora` → the decisions + lora (rank, alpha, targets). Tensor names:

* decision_rows     `<q_proj|k_proj path>/rows` [D, heads]: the kernel's slice at channel ch (replaces it)
* decision_adapter  `layers_i/attn/decision_adapter/kernel` [D, K, 2] (DMS: [D, K, 1]; added to the base)
* norms             `<norm path>/scale` (replaces it)
* lora              `<projection path>/lora_a` [in, r], `/lora_b` [r, out]: kernel += (alpha / r) · A·B

The same tree, nested like the parameters ({"params": {...}}, scanned or not), is what training optimises:
`split` takes it out of a parameter tree, `merge` puts it back (training's forward, export, loading).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
from typing import Any, Mapping

import numpy as np

from dmc_jax.config import DMCConfig
from dmc_jax.convert import layout
from dmc_jax.errors import CheckpointError

FORMAT = "dmc-jax-adapter/1"
ADAPTER_JSON = "adapter.json"
TENSORS = "adapter.safetensors"
TRAINABLE = ("all", "decisions", "decisions+norms", "lora")
PART_KINDS = ("decision_rows", "decision_adapter", "norms", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")
METHODS = ("dmc", "dms")
_IN_AXES = {"o_proj": 2}  # o_proj [H, Dh, D] maps H·Dh inputs; every other target its first axis
_BASE_NDIM = {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 3, "gate": 2, "up": 2, "down": 2}


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Which parts train (and are saved); LoRA's settings when `lora` is one of them."""

  parts: tuple[str, ...]
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

  def __post_init__(self):
    bad = [p for p in self.parts if p not in PART_KINDS]
    if bad or not self.parts:
      raise CheckpointError(f"adapter parts: expected a non-empty subset of {list(PART_KINDS)}, got "
                            f"{list(self.parts)}")
    if "lora" in self.parts:
      if not (isinstance(self.lora_rank, int) and self.lora_rank >= 1) or not self.lora_alpha > 0:
        raise CheckpointError(f"lora: rank >= 1 and alpha > 0 expected, got {self.lora_rank}, {self.lora_alpha}")
      bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
      if bad or not self.lora_targets:
        raise CheckpointError(f"lora targets: expected a non-empty subset of {list(LORA_TARGETS)}, got "
                              f"{list(self.lora_targets)}")

  @classmethod
  def for_trainable(cls, trainable: str, dmc: DMCConfig, lora_rank: int = 8, lora_alpha: float = 16.0,
                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> "AdapterSpec | None":
    """The spec of a `train.trainable` value (None for `all`: no adapter, everything trains)."""
    if trainable not in TRAINABLE:
      raise CheckpointError(f"train.trainable: expected one of {list(TRAINABLE)}, got {trainable!r}")
    if trainable == "all":
      return None
    decisions = "decision_adapter" if dmc.decisions == "adapter" else "decision_rows"
    extra = {"decisions": (), "decisions+norms": ("norms",), "lora": ("lora",)}[trainable]
    return cls((decisions,) + extra, int(lora_rank), float(lora_alpha), tuple(lora_targets))

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def parts_json(self) -> list[dict]:
    return [{"kind": p, "rank": self.lora_rank, "alpha": self.lora_alpha, "targets": list(self.lora_targets)}
            if p == "lora" else {"kind": p} for p in self.parts]

  @classmethod
  def from_parts_json(cls, parts, where: str) -> "AdapterSpec":
    if not isinstance(parts, list) or not all(isinstance(p, dict) and "kind" in p for p in parts):
      raise CheckpointError(f"{where}: parts: expected a list of objects with a 'kind'")
    lora = [p for p in parts if p["kind"] == "lora"]
    kw = {}
    if lora:
      kw = dict(lora_rank=lora[0].get("rank"), lora_alpha=lora[0].get("alpha"),
                lora_targets=tuple(lora[0].get("targets") or ()))
    return cls(tuple(p["kind"] for p in parts), **kw)


# -- the trainable tree -----------------------------------------------------------------------------------------


def _module(path: str) -> tuple[str, str]:
  mod, leaf = path.rsplit("/", 1)
  return mod, leaf


def split(params: Mapping, spec: AdapterSpec, dmc: DMCConfig, rng=None) -> dict:
  """The trainable tree of `params` ({"params": ...}; scanned or not): decision rows sliced out, norms and the
  decision adapter as they are, LoRA factors initialised (A ~ N(0, 1/in), B = 0: the merged model is unchanged)."""
  import jax
  import jax.numpy as jnp
  flat = layout.flatten(params["params"])
  out: dict[str, Any] = {}
  lora_paths = []
  for path, x in flat.items():
    mod, leaf = _module(path)
    name = mod.rsplit("/", 1)[-1]
    if "decision_rows" in spec.parts and leaf == "kernel" and mod.endswith(("attn/q_proj", "attn/k_proj")):
      out[f"{mod}/rows"] = x[..., dmc.channel(x.shape[-1])]
    if "decision_adapter" in spec.parts and name == "decision_adapter":
      out[path] = x
    if "norms" in spec.parts and name.endswith("norm") and leaf == "scale":
      out[path] = x
    if "lora" in spec.parts and leaf == "kernel" and name in spec.lora_targets and (
        mod.endswith(f"attn/{name}") or mod.endswith(f"mlp/{name}")):
      lora_paths.append((mod, x))
  if "decision_adapter" in spec.parts and not any("decision_adapter" in k for k in out):
    raise CheckpointError("adapter part decision_adapter: the parameters have no decision adapter "
                          "(dmc.decisions must be 'adapter')")
  key = jax.random.key(0) if rng is None else rng
  for i, (mod, x) in enumerate(lora_paths):
    name = mod.rsplit("/", 1)[-1]
    lead = x.ndim - _BASE_NDIM[name]
    n_in = _IN_AXES.get(name, 1)
    d_in = math.prod(x.shape[lead:lead + n_in])
    d_out = math.prod(x.shape[lead + n_in:])
    a = jax.random.normal(jax.random.fold_in(key, i), x.shape[:lead] + (d_in, spec.lora_rank), jnp.float32)
    out[f"{mod}/lora_a"] = (a / math.sqrt(d_in)).astype(x.dtype)
    out[f"{mod}/lora_b"] = jnp.zeros(x.shape[:lead] + (spec.lora_rank, d_out), x.dtype)
  return {"params": layout.unflatten(out)}


def merge(frozen: Mapping, trainable: Mapping, spec: AdapterSpec, dmc: DMCConfig) -> dict:
  """The full parameter tree: `frozen` with the trainable parts applied (LoRA deltas first, then the decision rows,
  so the rows are exactly the trained ones). Works traced (training) and on numpy arrays (export, loading)."""
  import jax.numpy as jnp
  flat = dict(layout.flatten(frozen["params"]))
  parts = layout.flatten(trainable["params"])
  for path, a in parts.items():
    mod, leaf = _module(path)
    if leaf != "lora_a":
      continue
    kernel, b = flat[f"{mod}/kernel"], parts[f"{mod}/lora_b"]
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * spec.lora_scale
    flat[f"{mod}/kernel"] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)
  for path, x in parts.items():
    mod, leaf = _module(path)
    if leaf == "rows":
      kernel = flat[f"{mod}/kernel"]
      flat[f"{mod}/kernel"] = jnp.asarray(kernel).at[..., dmc.channel(kernel.shape[-1])].set(x.astype(kernel.dtype))
    elif leaf not in ("lora_a", "lora_b"):
      flat[path] = x
  return {"params": layout.unflatten(flat)}


# -- the adapter directory ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Adapter:
  """An adapter directory, read: its spec, DMC settings, base identity and the (unscanned) trainable tree."""

  directory: str
  spec: AdapterSpec
  method: str
  dmc: DMCConfig
  base_digest: str
  base_param_dtype: str | None
  meta: dict
  tensors: dict[str, np.ndarray]

  def tree(self) -> dict:
    return {"params": layout.unflatten(self.tensors)}

  def check_base(self, base) -> None:
    """Refuses a base checkpoint whose parameter digest is not the one the adapter was trained on."""
    got = base.param_digest
    if got != self.base_digest:
      raise CheckpointError(
          f"adapter {self.directory} was trained on base {self.base_digest} ({self.base_param_dtype}), but "
          f"{base.directory} has {got} ({base.meta.get('param_dtype')}): not the same parameters")

  def apply(self, base_params: Mapping) -> dict:
    """The merged (unscanned, numpy) parameters of `base_params` ({"params": ...}) with this adapter."""
    import jax
    merged = merge(base_params, self.tree(), self.spec, self.dmc)
    return jax.tree.map(np.asarray, merged)


def save(out: str, trainable: Mapping, spec: AdapterSpec, dmc: DMCConfig, *, n_layers: int | None,
         base_digest: str, base_param_dtype: str | None, method: str | None = None, tokens: int | None = None,
         extra: Mapping[str, Any] | None = None, force: bool = True) -> str:
  """Writes ADAPTER/ from a trainable tree (scanned when `n_layers` is given: unstacked to per-layer names)."""
  import jax

  from dmc_jax import checkpoint
  from dmc_jax.convert.tensors import LazyTensor, write_safetensors
  method = dmc.method if method is None else method
  if method not in METHODS or method != dmc.method:
    raise CheckpointError(f"adapter method: expected dmc.method ({dmc.method!r}), got {method!r}")
  tree = jax.device_get(trainable)["params"]
  if n_layers is not None and "layers" in tree:
    tree = layout.unstack_layers(tree, n_layers)
  flat = {k: np.asarray(v) for k, v in sorted(layout.flatten(tree).items())}
  with checkpoint.atomic_directory(out, force) as tmp:
    tensors = [LazyTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()]
    sha = write_safetensors(os.path.join(tmp, TENSORS), tensors, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "parts": spec.parts_json(), "method": method, "dmc": dmc.to_dict(),
            "base": {"param_digest": base_digest, "param_dtype": base_param_dtype},
            "files": {TENSORS: {"sha256": sha, "bytes": os.path.getsize(os.path.join(tmp, TENSORS))}},
            "provenance": {"command": " ".join(sys.argv), "tokens": tokens,
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), **(extra or {})}}
    with open(os.path.join(tmp, ADAPTER_JSON), "w") as f:
      json.dump(meta, f, indent=2, default=str)
      f.write("\n")
  return os.path.abspath(out)


def write_copy(source: Adapter, out: str, meta: Mapping[str, Any], *, force: bool, inputs=()) -> Adapter:
  """OUT/ with `source`'s tensors byte for byte (their sha256 in `meta` still holds) and `meta` as adapter.json,
  written atomically (an existing OUT only with `force`, never one of `inputs`), then read back and verified."""
  from dmc_jax import checkpoint
  with checkpoint.atomic_directory(out, force, inputs=inputs) as tmp:
    shutil.copyfile(os.path.join(source.directory, TENSORS), os.path.join(tmp, TENSORS))
    with open(os.path.join(tmp, ADAPTER_JSON), "w") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")
  return load(out)


def load(directory: str, verify: bool = True) -> Adapter:
  """Reads ADAPTER/ (sha256 of the tensors checked against adapter.json unless verify=False)."""
  from dmc_jax.convert.tensors import ConversionError, read_json, read_safetensors
  directory = os.path.abspath(directory)
  path = os.path.join(directory, ADAPTER_JSON)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: not a directory")
  meta = read_json(path, "missing (not a dmc-jax adapter; `dmc-jax train` writes WORKDIR/adapter)",
                   CheckpointError)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {FORMAT!r}")
  method = meta.get("method")
  if method not in METHODS:
    raise CheckpointError(f"{path}: method {method!r}: this version applies {' and '.join(METHODS)} adapters")
  try:
    spec = AdapterSpec.from_parts_json(meta.get("parts"), path)
    dmc = DMCConfig.from_dict({"method": method, **(meta.get("dmc") or {})}, where=f"{path}: dmc")
    if dmc.method != method:
      raise CheckpointError(f"{path}: method {method!r} but dmc.method {dmc.method!r}")
    base = meta["base"]
    digest = base["param_digest"]
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: malformed ({e})") from None
  tensor_path = os.path.join(directory, TENSORS)
  if not os.path.isfile(tensor_path):
    raise CheckpointError(f"{tensor_path}: missing")
  if verify:
    want = ((meta.get("files") or {}).get(TENSORS) or {}).get("sha256")
    h = hashlib.sha256()
    with open(tensor_path, "rb") as f:
      for block in iter(lambda: f.read(1 << 23), b""):
        h.update(block)
    if h.hexdigest() != want:
      raise CheckpointError(f"{tensor_path}: sha256 mismatch (expected {str(want)[:16]}…, got "
                            f"{h.hexdigest()[:16]}…): the file is corrupted or was changed after writing")
  try:
    tensors = {name: t.checked_load() for name, t in read_safetensors(tensor_path).items()}
  except ConversionError as e:
    raise CheckpointError(str(e)) from None
  return Adapter(directory, spec, method, dmc, digest, base.get("param_dtype"), meta, tensors)


def merge_into_checkpoint(base_dir: str, adapter_dir: str, out: str, force: bool = False,
                          verify: bool = True) -> str:
  """`dmc-jax merge-adapter`: base + adapter as an ordinary checkpoint (the adapter's DMC settings as its
  compression, the base's tokenizer and chat template, the base's parameter dtype)."""
  from dmc_jax import checkpoint
  from dmc_jax.convert import Converted
  from dmc_jax.convert.tensors import LazyTensor
  base = checkpoint.Checkpoint(base_dir, verify=verify)
  ad = load(adapter_dir, verify=verify)
  ad.check_base(base)
  merged = ad.apply(base.load_params())
  dtypes = {k: t.dtype for k, t in base.lazy_tensors().items()}  # the base's dtypes (new tensors keep theirs)
  flat = {k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype))
          for k, v in sorted(layout.flatten(merged["params"]).items())}
  tensors = [LazyTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()]
  converted = Converted(base.config, tensors, base.tokenizer_bytes(),
                        {"format": "dmc-jax merge-adapter", "base": base.directory, "adapter": ad.directory,
                         "base_param_digest": ad.base_digest},
                        chat_template=base.chat_template)
  return checkpoint.write(out, converted, force=force, dmc=ad.dmc.to_dict(),
                          experiment=(base.meta.get("experiment") or None))
