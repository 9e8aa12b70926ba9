"""The one mapping between HF LlamaForCausalLM tensors and this project's parameter tree.

Meta and GGUF readers first express their tensors as HF names in HF layout (q/k rows un-interleaved), so every
format shares this mapping and its checks (missing tensor, unexpected tensor, wrong shape).
Our checkpoints store the unscanned tree flattened with '/' (e.g. `layers_3/attn/q_proj/kernel`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from dmc_jax.config import LlamaConfig
from dmc_jax.convert.tensors import ConversionError, LazyTensor

# HF tensors some checkpoints carry that hold no weights of the function (buffers).
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name a checkpoint of `cfg` must have, with its shape ([out, in] for linears)."""
  d, f, hd, v = cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.vocab_size
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (cfg.n_heads * hd, d),
        p + "self_attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
        p + "self_attn.v_proj.weight": (cfg.n_kv_heads * hd, d),
        p + "self_attn.o_proj.weight": (d, cfg.n_heads * hd),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
    })
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


def _ours_name_and_shape(hf_name: str, cfg: LlamaConfig) -> tuple[str, tuple[int, ...]]:
  d, f, hd, v = cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.vocab_size
  fixed = {"model.embed_tokens.weight": ("embed/kernel", (v, d)), "model.norm.weight": ("final_norm/scale", (d,)),
           "lm_head.weight": ("lm_head/kernel", (d, v))}
  if hf_name in fixed:
    return fixed[hf_name]
  parts = hf_name.split(".")  # model.layers.{i}.{module}.{proj}.weight
  i, rest = int(parts[2]), ".".join(parts[3:])
  per_layer = {
      "self_attn.q_proj.weight": ("attn/q_proj/kernel", (d, cfg.n_heads, hd)),
      "self_attn.k_proj.weight": ("attn/k_proj/kernel", (d, cfg.n_kv_heads, hd)),
      "self_attn.v_proj.weight": ("attn/v_proj/kernel", (d, cfg.n_kv_heads, hd)),
      "self_attn.o_proj.weight": ("attn/o_proj/kernel", (cfg.n_heads, hd, d)),
      "mlp.gate_proj.weight": ("mlp/gate/kernel", (d, f)),
      "mlp.up_proj.weight": ("mlp/up/kernel", (d, f)),
      "mlp.down_proj.weight": ("mlp/down/kernel", (f, d)),
      "input_layernorm.weight": ("attn_norm/scale", (d,)),
      "post_attention_layernorm.weight": ("mlp_norm/scale", (d,)),
  }
  name, shape = per_layer[rest]
  return f"layers_{i}/{name}", shape


def check_hf_tensors(tensors: Mapping[str, LazyTensor], cfg: LlamaConfig, where: str) -> dict[str, LazyTensor]:
  """Validates names and shapes against `cfg`; returns the tensors that carry weights (ignored ones dropped)."""
  expected = hf_shapes(cfg)
  kept = {}
  for name, t in tensors.items():
    if name.endswith(IGNORED_HF_SUFFIXES):
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      continue  # transformers ignores it for tied models; some exporters write it anyway
    if name not in expected:
      raise ConversionError(f"{t.source or where}: unexpected tensor {name!r} for the config in {where} "
                            f"({cfg.n_layers} layers, tie_embeddings={cfg.tie_embeddings})")
    if t.dtype.kind in "iub":  # integers and bools (bfloat16/float8 from ml_dtypes are kind "V", and floats)
      raise ConversionError(f"{t.source or where}: tensor {name!r} has dtype {t.dtype}, expected a float dtype "
                            f"(an integer or bool tensor is not a weight)")
    if tuple(t.shape) != expected[name]:
      raise ConversionError(f"{t.source or where}: tensor {name!r} has shape {list(t.shape)}, expected "
                            f"{list(expected[name])} from {where}")
    kept[name] = t
  missing = [n for n in expected if n not in kept]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"{where}: missing tensor {missing[0]!r}{more}")
  return kept


def hf_to_ours(tensors: Mapping[str, LazyTensor], cfg: LlamaConfig, where: str) -> list[LazyTensor]:
  """HF tensors (validated) → our parameter tensors, in a stable order; transposes are lazy."""
  tensors = check_hf_tensors(tensors, cfg, where)
  out = []
  for hf_name in hf_shapes(cfg):
    t = tensors[hf_name]
    name, shape = _ours_name_and_shape(hf_name, cfg)
    if len(shape) == 1 or name == "embed/kernel":
      out.append(t.map(lambda a: a, shape, name))
    else:  # [out, in] -> [in, out], then split heads
      out.append(t.map(lambda a, shape=shape: np.ascontiguousarray(a.T).reshape(shape), shape, name))
  return out


def ours_to_hf(params: Mapping[str, LazyTensor], cfg: LlamaConfig, where: str) -> list[LazyTensor]:
  """Our flattened parameter tensors → HF tensors (exact inverse of `hf_to_ours`)."""
  out = []
  for hf_name, hf_shape in hf_shapes(cfg).items():
    name, shape = _ours_name_and_shape(hf_name, cfg)
    if name not in params:
      raise ConversionError(f"{where}: missing parameter {name!r}")
    t = params[name]
    if tuple(t.shape) != shape:
      raise ConversionError(f"{where}: parameter {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    if len(shape) == 1 or name == "embed/kernel":
      out.append(t.map(lambda a: a, hf_shape, hf_name))
    else:
      out.append(t.map(lambda a, hf_shape=hf_shape: np.ascontiguousarray(a.reshape(hf_shape[::-1]).T),
                       hf_shape, hf_name))
  return out


def our_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  return dict(_ours_name_and_shape(n, cfg) for n in hf_shapes(cfg))


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b/c': x} → {'a': {'b': {'c': x}}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def stack_layers(params: dict, n_layers: int, stack=np.stack) -> dict:
  """Unscanned tree (layers_i) → scanned tree (layers/layer with a leading layer axis).

  `stack=jnp.stack` keeps device arrays on the device."""
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(n_layers)]
  params["layers"] = {"layer": jax.tree.map(lambda *xs: stack(xs), *layers)}
  return params


def unstack_layers(params: dict, n_layers: int) -> dict:
  params = dict(params)
  stacked = params.pop("layers")["layer"]
  for i in range(n_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params
