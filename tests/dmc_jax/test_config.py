import numpy as np
import pytest

from dmc_jax.config import ConfigError, LlamaConfig, RopeScaling, from_hf_config, to_hf_config
from dmc_jax.model import rope

HF_V4 = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0, "max_position_embeddings": 131072, "bos_token_id": 128000,
         "eos_token_id": [128001, 128008, 128009],
         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def test_reads_transformers_v4_and_v5_rope_keys_alike():
  v4 = from_hf_config(HF_V4)
  v5_dict = {k: v for k, v in HF_V4.items() if k not in ("rope_theta", "rope_scaling")}
  v5_dict["rope_parameters"] = dict(HF_V4["rope_scaling"], rope_theta=500000.0)
  v5 = from_hf_config(v5_dict)
  assert v4 == v5
  assert v4.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  assert v4.rope_theta == 500000.0 and v4.eos_token_ids == (128001, 128008, 128009)
  assert v4.n_groups == 4 and v4.head_dim == 128
  # The legacy "type" key and v5's default rope type.
  legacy = dict(HF_V4, rope_scaling=dict(HF_V4["rope_scaling"], type="llama3"))
  legacy["rope_scaling"].pop("rope_type")
  assert from_hf_config(legacy) == v4
  plain = from_hf_config(dict(v5_dict, rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
  assert plain.rope_scaling is None and plain.rope_theta == 1e4


def test_hf_config_round_trip():
  cfg = from_hf_config(HF_V4)
  assert from_hf_config(to_hf_config(cfg)) == cfg
  explicit = LlamaConfig(vocab_size=10, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, head_dim=32)
  assert from_hf_config(to_hf_config(explicit)).head_dim == 32


def test_from_dict_round_trip_and_unknown_keys():
  cfg = from_hf_config(HF_V4)
  assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_layer'\]"):
    LlamaConfig.from_dict(dict(cfg.to_dict(), n_layer=3))
  with pytest.raises(ConfigError, match=r"rope_scaling: unknown key\(s\) \[.bogus.\]"):
    LlamaConfig.from_dict(dict(cfg.to_dict(), rope_scaling={"factor": 2.0, "bogus": 1}))


@pytest.mark.parametrize("change, message", [
    ({"n_heads": 6, "n_kv_heads": 4}, "multiple of n_kv_heads"),
    ({"d_model": 30, "n_heads": 4, "n_kv_heads": 4}, "set head_dim"),
    ({"head_dim": 7}, "must be even"),
    ({"dtype": "int8"}, "dtype"),
    ({"remat_policy": "some"}, "remat_policy"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_invalid_configs_are_rejected(change, message):
  base = dict(vocab_size=10, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)
  with pytest.raises(ConfigError, match=message):
    LlamaConfig(**dict(base, **change))


def test_unsupported_hf_configs_are_rejected():
  with pytest.raises(ConfigError, match="unsupported rope scaling type 'yarn'"):
    from_hf_config(dict(HF_V4, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ConfigError, match="not a Llama-family model"):
    from_hf_config(dict(HF_V4, model_type="gpt2"))
  with pytest.raises(ConfigError, match=r"missing key\(s\) \['intermediate_size'\]"):
    from_hf_config({k: v for k, v in HF_V4.items() if k != "intermediate_size"})


def test_llama3_scaling_matches_the_published_formula():
  cfg = from_hf_config(HF_V4)
  inv = rope.inverse_frequencies(cfg)
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  wavelen = 2 * np.pi / base
  assert np.allclose(inv[wavelen < 8192 / 4], base[wavelen < 8192 / 4], rtol=1e-6)  # high frequencies kept
  assert np.allclose(inv[wavelen > 8192], base[wavelen > 8192] / 8, rtol=1e-6)  # low frequencies / factor
  mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
  assert mid.any() and np.all(inv[mid] < base[mid]) and np.all(inv[mid] > base[mid] / 8)


def test_meta_permutation_inverts_the_hf_permute():
  """transformers' convert script maps Meta→HF with view/transpose; our permutation is the same map."""
  n_heads, hd, d = 3, 8, 5
  meta = np.random.default_rng(0).standard_normal((n_heads * hd, d))
  hf = meta.reshape(n_heads, hd // 2, 2, d).transpose(0, 2, 1, 3).reshape(n_heads * hd, d)
  np.testing.assert_array_equal(meta[rope.meta_to_hf_permutation(n_heads, hd)], hf)
  perm = rope.meta_to_hf_permutation(1, hd)
  assert perm[0] == 0 and perm[hd - 1] == hd - 1  # DMC's decision channels are fixed points
