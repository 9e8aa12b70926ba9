"""HF Llama directory (config.json + model.safetensors or a sharded index) → our tensors."""

from __future__ import annotations

import json
import os

from dmc_jax import tokenizer as tok
from dmc_jax.config import ConfigError, from_hf_config, to_hf_config
from dmc_jax.convert import Converted, layout
from dmc_jax.convert.tensors import ConversionError, read_json, read_sharded


def read_hf_config(src: str) -> dict:
  return read_json(os.path.join(src, "config.json"), "not found (an HF model directory needs config.json)")


def read(src: str) -> Converted:
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: not a directory (expected an HF model directory)")
  hf_cfg = read_hf_config(src)
  cfg_path = os.path.join(src, "config.json")
  try:
    cfg = from_hf_config(hf_cfg, where=cfg_path)
  except ConfigError as e:
    raise ConversionError(str(e)) from None
  if not any(n.startswith("model") and ".safetensors" in n for n in os.listdir(src)):
    bins = [n for n in os.listdir(src) if n.endswith(".bin")]
    hint = f" (found {bins[0]}: PyTorch .bin weights are not read; save with safe_serialization=True)" if bins else ""
    raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json{hint}")
  tensors = layout.hf_to_ours(read_sharded(src, "model"), cfg, where=cfg_path)
  found = tok.from_hf_directory(src, cfg.bos_token_id, cfg.eos_token_ids)
  tokenizer = None
  if found is not None:
    info, path = found
    with open(path, "rb") as f:
      tokenizer = (info, f.read())
  files = sorted(n for n in os.listdir(src) if n.endswith((".json", ".safetensors", ".model")))
  return Converted(cfg, tensors, tokenizer, {"format": "hf", "path": os.path.abspath(src), "files": files,
                                             "hf_config": hf_cfg, "inputs": [os.path.abspath(src)]},
                   chat_template=read_chat_template(src))


def read_chat_template(src: str) -> str | None:
  """`chat_template` of tokenizer_config.json (a string, or transformers' list of named templates: "default"),
  else a `chat_template.jinja` file beside it (newer transformers save it there)."""
  path = os.path.join(src, "tokenizer_config.json")
  if os.path.exists(path):
    cfg = read_json(path, "")
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):
      t = next((d.get("template") for d in t if isinstance(d, dict) and d.get("name") == "default"), None)
    if isinstance(t, str):
      return t
  jinja = os.path.join(src, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  return None


def write(directory: str, cfg, params: dict, tokenizer: tuple | None, max_shard_bytes: int,
          on_tensor=None) -> None:
  """Writes an HF LlamaForCausalLM directory (config.json, safetensors, tokenizer files) into `directory`."""
  from dmc_jax.convert.tensors import write_sharded
  tensors = layout.ours_to_hf(params, cfg, where=directory)
  dtypes = {str(t.dtype) for t in tensors}
  torch_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg, torch_dtype=torch_dtype), f, indent=2)
  write_sharded(directory, "model", tensors, max_shard_bytes, metadata={"format": "pt"}, on_tensor=on_tensor)
  if tokenizer is None:
    return
  info, data = tokenizer
  with open(os.path.join(directory, info.filename), "wb") as f:
    f.write(data)
  tok_cfg = {"bos_token_id": info.bos_token_id,
             "eos_token_id": info.eos_token_ids[0] if info.eos_token_ids else None}
  if info.kind == "sentencepiece":
    tok_cfg.update(tokenizer_class="LlamaTokenizer", add_bos_token=info.add_bos, add_eos_token=info.add_eos)
  else:
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(tok_cfg, f, indent=2)
