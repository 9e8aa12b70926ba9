#!/usr/bin/env python3
"""Tiny Megatron-LM checkpoints in the layout of NVIDIA's released DMC models, and their HF twins.

Run by `make golden` in the reference venv (.venv-ref: CPU torch + transformers); writes tests/golden/megatron/.
What each folder holds is described in tests/golden/README.md ("Megatron-LM checkpoints").

The released files (nvidia/Llama-2-{7B,13B}-DMC-{4x,8x}) are Megatron-core GPTModel checkpoints with the
Transformer-Engine layer spec, saved in Megatron's legacy single-file `torch.save` format. The slicing here is
ported from Megatron-LM's own converters (github.com/NVIDIA/Megatron-LM):

* tools/checkpoint/loader_llama_mistral.py, `set_attn_state` / `set_mlp_state`: the whole (unsplit) fused QKV
  weight is, for each query group g, [the q rows of g's heads | g's k rows | g's v rows]
  (`cat([q.reshape(ng, kv_channels*nh//ng, -1), k.reshape(ng, kv_channels, -1), v.reshape(ng, kv_channels, -1)],
  dim=1)`, with kv_channels, not hidden/heads); the MLP's fc1 is cat([gate, up], dim=0).
* tools/checkpoint/saver_mcore.py (`save_checkpoint`, `MCoreTESetter`): per tensor-parallel rank,
  `torch.chunk(qkv, tp, dim=0)` (whole groups per rank), `linear_proj` and `linear_fc2` chunked on dim 1, for
  SwiGLU gate (W) and up (V) chunked separately and concatenated per rank, the word embedding padded to
  `_vocab_size_with_padding` and chunked on dim 0, `output_layer` chunked on dim 0, norms replicated; TE names
  `linear_qkv.layer_norm_weight` (input RMSNorm) and `linear_fc1.layer_norm_weight` (pre-MLP RMSNorm).
* megatron/training/tokenizer/tokenizer.py `_vocab_size_with_padding`: a multiple of
  make_vocab_size_divisible_by × tensor-parallel size. The saver fills padding rows by repeating the last row;
  here they are random (not zero, all different), so an importer that keeps them, or drops the wrong ones, fails.
* megatron/training/checkpointing.py: `iter_{:07d}/mp_rank_{:02d}/model_optim_rng.pt` (or `release/`),
  `latest_checkpointed_iteration.txt`, and the saved dict {args, checkpoint_version, iteration, model}.
* Transformer Engine's `get_extra_state` (TE 1.x): every TE module's `_extra_state` is an io.BytesIO holding
  `torch.save(state)` (state None without FP8).
* megatron/contrib/dmc (Megatron-LM branch `dmc`): the `--dmc-init-val/--dmc-window-size/--dmc-temp/--dmc-cr`
  arguments stored in `args`.

The checks at the end (each an assert) load every file back with torch, undo the slicing the way Megatron's
tools/checkpoint/loader_mcore.py (concatenate ranks; halve fc1 per rank) and saver_llama_hf.py (q/k/v slices per
group) do, and require the HF twin's tensors bit for bit.
"""
from __future__ import annotations

import argparse
import enum
import io
import json
import os
import pickletools
import platform
import sys
import types
import zipfile

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import dump_json, fresh_dir, logits_of, randomize, random_ids, save_npz  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

VOCAB = 200  # the tokenizer below; padded to 256 (128 × TP 1 or 128 × TP 2)
DIVISIBLE_BY = 128
SEQ = 16

# The twins: (seed, LlamaConfig kwargs, DMC args stored in the Megatron files). The DMC settings are not the
# defaults (5, 12, 0.1), so an importer that ignores them decodes differently; the offsets make some decisions
# merges with these weights (k[d-1] has std ≈ 1.1).
TWINS = {
    "mha_untied": (21, dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                            intermediate_size=64, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                            max_position_embeddings=256),
                   dict(dmc_init_val=0.5, dmc_window_size=4, dmc_temp=0.2, dmc_cr=4.0)),
    # GQA with kv_channels (8) != hidden / heads (4): q_proj is [64, 32].
    "gqa_tied": (22, dict(hidden_size=32, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                          intermediate_size=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-6,
                          max_position_embeddings=512),
                 dict(dmc_init_val=1.0, dmc_window_size=12, dmc_temp=0.1, dmc_cr=8.0)),
}
# name -> (twin, tensor-parallel size, directory layout, iteration)
#   nested:  ROOT/latest_checkpointed_iteration.txt + ROOT/iter_NNNNNNN/mp_rank_TT/model_optim_rng.pt
#   release: ROOT/latest_checkpointed_iteration.txt ("release") + ROOT/release/mp_rank_TT/model_optim_rng.pt
#   flat:    ROOT/latest_checkpointed_iteration.txt + ROOT/mp_rank_TT/model_optim_rng.pt (as the model repos)
CHECKPOINTS = {
    "mcore_mha_untied_tp1": ("mha_untied", 1, "nested", 1500),
    "mcore_mha_untied_tp2": ("mha_untied", 2, "flat", 2000),
    "mcore_gqa_tied_tp1": ("gqa_tied", 1, "release", 3000),
    "mcore_gqa_tied_tp2": ("gqa_tied", 2, "nested", 750),
}


# ------------------------------------------------------------------------- stand-ins for Megatron's pickled types
def install_megatron_enums():
    """A `megatron.core.enums.ModelType` enum, importable under that name, so pickles reference that global (the
    real one: megatron/core/enums.py)."""
    mod = types.ModuleType("megatron.core.enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2
        retro_encoder = 3
        retro_decoder = 4

    ModelType.__module__, ModelType.__qualname__ = mod.__name__, "ModelType"
    mod.ModelType = ModelType
    pkg, core = types.ModuleType("megatron"), types.ModuleType("megatron.core")
    pkg.core, core.enums = core, mod
    sys.modules.update({"megatron": pkg, "megatron.core": core, "megatron.core.enums": mod})
    return ModelType


def vocab_size_with_padding(orig, tp):
    multiple = DIVISIBLE_BY * tp
    return ((orig + multiple - 1) // multiple) * multiple


# ------------------------------------------------------------------------------------------------- tokenizer
def make_tokenizer(path):
    """A word-level tokenizer.json with VOCAB ids: <unk> <s> </s>, then two-syllable words; BOS is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    syll = ["ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "wo", "zu"]
    words = [a + b for a in syll for b in syll][: VOCAB - 3]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(path)
    assert Tokenizer.from_file(path).get_vocab_size() == VOCAB
    return words


# ------------------------------------------------------------------------------------------------- HF twins
def make_twin(out, name, seed, kw):
    """A tiny HF Llama with bf16-representable weights (the Megatron files hold bf16), saved in bf16; golden
    logits from transformers in float32."""
    d = os.path.join(out, f"hf_{name}")
    fresh_dir(d)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager", **kw)
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    ids = random_ids(seed, (1, SEQ), VOCAB)
    logits = logits_of(model, ids)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    model.float()
    save_npz(os.path.join(d, "golden.npz"), input_ids=ids, logits=logits)
    re = LlamaForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    assert np.array_equal(logits_of(re, ids), logits), f"{name}: reloaded twin differs"
    for f in ("generation_config.json",):
        if os.path.exists(os.path.join(d, f)):
            os.remove(os.path.join(d, f))
    return model, ids, logits


# ------------------------------------------------------------------------------------------- Megatron layout
def megatron_full_tensors(model, kv_channels):
    """HF weights -> the unsplit Megatron-core (TE spec) tensors, after loader_llama_mistral.set_attn_state."""
    c = model.config
    nh, ng = c.num_attention_heads, c.num_key_value_heads
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = sd[h + "self_attn.q_proj.weight"].reshape(ng, kv_channels * nh // ng, -1)
        k = sd[h + "self_attn.k_proj.weight"].reshape(ng, kv_channels, -1)
        v = sd[h + "self_attn.v_proj.weight"].reshape(ng, kv_channels, -1)
        full[p + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)
        full[p + "self_attention.linear_qkv.layer_norm_weight"] = sd[h + "input_layernorm.weight"]
        full[p + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        full[p + "mlp.linear_fc1.layer_norm_weight"] = sd[h + "post_attention_layernorm.weight"]
        full[p + "mlp.linear_fc1.weight.W"] = sd[h + "mlp.gate_proj.weight"]  # split per rank below
        full[p + "mlp.linear_fc1.weight.V"] = sd[h + "mlp.up_proj.weight"]
        full[p + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
    full["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        full["output_layer.weight"] = sd["lm_head.weight"]
    return full


def extra_state():
    buf = io.BytesIO()
    torch.save(None, buf)  # TE without FP8: the serialized state is None
    return buf


def rank_state_dicts(full, n_layers, tp, seed):
    """Split as saver_mcore.save_checkpoint does; pad the vocabulary with random rows first."""
    g = torch.Generator().manual_seed(seed + 500)
    pad = vocab_size_with_padding(VOCAB, tp) - VOCAB

    def padded(w):
        return torch.cat([w, (0.5 * torch.randn(pad, w.shape[1], generator=g)).bfloat16().float()])

    def chunk(name, dim):
        return torch.chunk(full[name], tp, dim=dim)

    emb = torch.chunk(padded(full["embedding.word_embeddings.weight"]), tp, dim=0)
    out = torch.chunk(padded(full["output_layer.weight"]), tp, dim=0) if "output_layer.weight" in full else None
    ranks = []
    for r in range(tp):
        sd = {"embedding.word_embeddings.weight": emb[r]}
        for i in range(n_layers):
            p = f"decoder.layers.{i}."
            W = chunk(p + "mlp.linear_fc1.weight.W", 0)[r]
            V = chunk(p + "mlp.linear_fc1.weight.V", 0)[r]
            sd.update({
                p + "self_attention.core_attention._extra_state": extra_state(),
                p + "self_attention.linear_proj.weight": chunk(p + "self_attention.linear_proj.weight", 1)[r],
                p + "self_attention.linear_proj._extra_state": extra_state(),
                p + "self_attention.linear_qkv.layer_norm_weight":
                    full[p + "self_attention.linear_qkv.layer_norm_weight"],
                p + "self_attention.linear_qkv.weight": chunk(p + "self_attention.linear_qkv.weight", 0)[r],
                p + "self_attention.linear_qkv._extra_state": extra_state(),
                p + "mlp.linear_fc1.layer_norm_weight": full[p + "mlp.linear_fc1.layer_norm_weight"],
                p + "mlp.linear_fc1.weight": torch.cat([W, V], dim=0),
                p + "mlp.linear_fc1._extra_state": extra_state(),
                p + "mlp.linear_fc2.weight": chunk(p + "mlp.linear_fc2.weight", 1)[r],
                p + "mlp.linear_fc2._extra_state": extra_state(),
            })
        sd["decoder.final_layernorm.weight"] = full["decoder.final_layernorm.weight"]
        if out is not None:
            sd["output_layer.weight"] = out[r]
        # bf16 parameters, each with its own storage (as a module's state_dict gives them)
        ranks.append({k: (v if isinstance(v, io.BytesIO) else v.to(torch.bfloat16).clone().contiguous())
                      for k, v in sd.items()})
    return ranks


def megatron_args(model, tp, iteration, dmc, ModelType):
    """The argparse.Namespace Megatron saves: the fields an importer reads, plus a few it must ignore."""
    c = model.config
    return argparse.Namespace(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, kv_channels=c.head_dim,
        group_query_attention=c.num_key_value_heads != c.num_attention_heads,
        num_query_groups=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else 1,
        max_position_embeddings=c.max_position_embeddings, seq_length=c.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(c.rope_parameters["rope_theta"]), rotary_percent=1.0,
        rotary_interleaved=False, rotary_seq_len_interpolation_factor=None, use_rope_scaling=False,
        normalization="RMSNorm", norm_epsilon=c.rms_norm_eps, apply_layernorm_1p=False, qk_layernorm=False,
        swiglu=True, add_bias_linear=False, add_qkv_bias=False, num_experts=None,
        untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        make_vocab_size_divisible_by=DIVISIBLE_BY, padded_vocab_size=vocab_size_with_padding(VOCAB, tp),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        params_dtype=torch.bfloat16, bf16=True, fp16=False, main_grads_dtype=torch.float32,
        model_type=ModelType.encoder_or_decoder, transformer_impl="transformer_engine", use_mcore_models=True,
        tokenizer_type="Llama2Tokenizer", iteration=iteration, ckpt_format="torch",
        dmc_finetune=True, dmc_paged_cache_size=40.0, dmc_paged_block_size=256, dmc_is_stage_one=False, **dmc)


def write_checkpoint(d, ranks, args, layout, iteration):
    fresh_dir(d)
    sub = {"nested": f"iter_{iteration:07d}", "release": "release", "flat": ""}[layout]
    with open(os.path.join(d, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release" if layout == "release" else str(iteration))
    files = []
    for r, sd in enumerate(ranks):
        rd = os.path.join(d, sub, f"mp_rank_{r:02d}")
        os.makedirs(rd)
        path = os.path.join(rd, "model_optim_rng.pt")
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": sd,
                    "num_floating_point_operations_so_far": 0}, path)
        files.append(path)
    return files


def pickle_globals(path):
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        data = z.read(pkl)
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
    return found


# --------------------------------------------------------------------------------------------------- checks
def unsplit(files, nh, ng, kv_channels, hidden):
    """Megatron files -> HF tensors, after loader_mcore.py (ranks) and saver_llama_hf.py (q/k/v slices)."""
    shards = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    models = [s["model"] for s in shards]
    cat = lambda k, dim: torch.cat([m[k] for m in models], dim=dim)  # noqa: E731
    hf = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight", 0)[:VOCAB],
          "model.norm.weight": models[0]["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in models[0]:
        hf["lm_head.weight"] = cat("output_layer.weight", 0)[:VOCAB]
    per_group, total = nh // ng, nh + 2 * ng
    q_slice = torch.cat([torch.arange((per_group + 2) * i, (per_group + 2) * i + per_group) for i in range(ng)])
    k_slice = torch.arange(per_group, total, per_group + 2)
    v_slice = torch.arange(per_group + 1, total, per_group + 2)
    n_layers = shards[0]["args"].num_layers
    for i in range(n_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = cat(p + "self_attention.linear_qkv.weight", 0).reshape(total, kv_channels, hidden)
        halves = [torch.chunk(m[p + "mlp.linear_fc1.weight"], 2, dim=0) for m in models]
        hf.update({
            h + "self_attn.q_proj.weight": qkv[q_slice].reshape(-1, hidden),
            h + "self_attn.k_proj.weight": qkv[k_slice].reshape(-1, hidden),
            h + "self_attn.v_proj.weight": qkv[v_slice].reshape(-1, hidden),
            h + "self_attn.o_proj.weight": cat(p + "self_attention.linear_proj.weight", 1),
            h + "mlp.gate_proj.weight": torch.cat([w[0] for w in halves], dim=0),
            h + "mlp.up_proj.weight": torch.cat([w[1] for w in halves], dim=0),
            h + "mlp.down_proj.weight": cat(p + "mlp.linear_fc2.weight", 1),
            h + "input_layernorm.weight": models[0][p + "self_attention.linear_qkv.layer_norm_weight"],
            h + "post_attention_layernorm.weight": models[0][p + "mlp.linear_fc1.layer_norm_weight"],
        })
    return shards, hf


def naive_qkv_logits(model, ids, kv_channels):
    """Sensitivity: the logits if the fused QKV were read as [all q; all k; all v] (no per-group interleave)."""
    c = model.config
    nh, ng = c.num_attention_heads, c.num_key_value_heads
    full = megatron_full_tensors(model, kv_channels)
    bad = LlamaForCausalLM(c).eval()
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(bad.model.layers):
            qkv = full[f"decoder.layers.{i}.self_attention.linear_qkv.weight"]
            q, k, v = torch.split(qkv, [nh * kv_channels, ng * kv_channels, ng * kv_channels])
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
    return logits_of(bad, ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron"))
    out = ap.parse_args().out
    fresh_dir(out)
    ModelType = install_megatron_enums()
    make_tokenizer(os.path.join(out, "tokenizer.json"))

    twins, info = {}, {"generator": "tests/golden/make_megatron.py", "vocab": VOCAB,
                       "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                    "transformers": transformers.__version__, "numpy": np.__version__},
                       "twins": {}, "checkpoints": {}}
    for name, (seed, kw, dmc) in TWINS.items():
        model, ids, logits = make_twin(out, name, seed, kw)
        twins[name] = model
        d_naive = float(np.abs(naive_qkv_logits(model, ids, kw["head_dim"]) - logits).max())
        assert d_naive > 0.5, (name, d_naive)
        info["twins"][f"hf_{name}"] = {"seed": seed, "config": kw, "golden": {"input_ids": list(ids.shape)},
                                       "max_abs_logit_change_if_qkv_not_interleaved": round(d_naive, 3)}
        print(f"[twin] hf_{name}: naive QKV split moves logits by {d_naive:.2f}")

    for name, (twin, tp, layout, iteration) in CHECKPOINTS.items():
        seed, kw, dmc = TWINS[twin]
        model = twins[twin]
        c = model.config
        full = megatron_full_tensors(model, kw["head_dim"])
        ranks = rank_state_dicts(full, c.num_hidden_layers, tp, seed)
        args = megatron_args(model, tp, iteration, dmc, ModelType)
        d = os.path.join(out, name)
        files = write_checkpoint(d, ranks, args, layout, iteration)

        # Checks: the files, read back with torch and unsplit as Megatron's own tools do, are the twin bit for bit;
        # the padding rows are all non-zero; the pickle uses exactly the globals the released files use.
        shards, hf = unsplit(files, c.num_attention_heads, c.num_key_value_heads, kw["head_dim"], c.hidden_size)
        ref = {k: v.bfloat16() for k, v in model.state_dict().items()}
        if c.tie_word_embeddings:
            ref.pop("lm_head.weight", None)
        assert set(hf) == set(ref), sorted(set(hf) ^ set(ref))
        for k in ref:
            assert torch.equal(hf[k], ref[k]), (name, k)
        emb = torch.cat([s["model"]["embedding.word_embeddings.weight"] for s in shards])
        assert emb.shape[0] == args.padded_vocab_size and bool((emb[VOCAB:] != 0).all(dim=1).all())
        assert all(isinstance(v, io.BytesIO) for s in shards for k, v in s["model"].items()
                   if k.endswith("_extra_state"))
        globs = sorted(set().union(*(pickle_globals(f) for f in files)))
        assert globs == sorted({"argparse.Namespace", "megatron.core.enums.ModelType", "_io.BytesIO",
                                "_codecs.encode", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                                "torch.BFloat16Storage", "torch.bfloat16", "torch.float32"}), globs
        rel = [os.path.relpath(f, d) for f in files]
        info["checkpoints"][name] = {
            "twin": f"hf_{twin}", "tensor_parallel": tp, "layout": layout, "iteration": iteration, "files": rel,
            "padded_vocab_size": args.padded_vocab_size, "dmc_args": dmc,
            "expected_dmc": {"decision_channel": "last", "offset": dmc["dmc_init_val"],
                             "temperature": dmc["dmc_temp"], "window": dmc["dmc_window_size"],
                             "epsilon": 2.0 ** -7},
            "expected_target_cr": dmc["dmc_cr"], "pickle_globals": globs,
            "rank0_tensors": {k: list(v.shape) for k, v in shards[0]["model"].items() if torch.is_tensor(v)}}
        print(f"[megatron] {name}: TP {tp}, {layout}, {sum(os.path.getsize(f) for f in files)} bytes")
    dump_json(os.path.join(out, "manifest.json"), info)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"done: {out}, {total} bytes")


if __name__ == "__main__":
    main()
