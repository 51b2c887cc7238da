"""Reading Hugging Face checkpoints: config fields of both transformers generations, and errors."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_jax.config import RopeScaling
from llama_jax.convert import ConversionError, config_from_hf, load_hf

SCALED = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def test_released_and_transformers5_configs_agree(hf_model_dir):
    _, path = hf_model_dir(num_key_value_heads=2, rope_parameters=SCALED, tie_word_embeddings=True)
    new_style = json.loads((path / "config.json").read_text())
    # Released checkpoints: rope_theta at the top, rope_scaling with the scaling fields only.
    old_style = {k: v for k, v in new_style.items() if k != "rope_parameters"}
    old_style["rope_theta"] = SCALED["rope_theta"]
    old_style["rope_scaling"] = {k: v for k, v in SCALED.items() if k != "rope_theta"}
    cfg = config_from_hf(new_style)
    assert cfg == config_from_hf(old_style)
    assert cfg.rope_theta == 500000.0 and cfg.tie_embeddings and cfg.n_kv_heads == 2
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    assert cfg.head_dim == 16 and cfg.ffn_dim == 160 and cfg.norm_eps == 1e-6


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConversionError, match="'yarn'"):
        config_from_hf(
            {
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
                "vocab_size": 8,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


def _rewrite(path, change):
    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_shape_mismatch_names_tensor_and_both_shapes(hf_model_dir):
    _, path = hf_model_dir()
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)))
    expected = rf"{name} .* shape \(32, 64\), but config.json implies \(64, 64\)"
    with pytest.raises(ConversionError, match=expected):
        load_hf(path)


def test_missing_tensor_is_named(hf_model_dir):
    _, path = hf_model_dir()
    _rewrite(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"lacks tensor model\.layers\.0\.mlp\.up_proj\.weight"):
        load_hf(path)


def test_unexpected_tensor_is_named(hf_model_dir):
    _, path = hf_model_dir()
    bias = "model.layers.0.self_attn.q_proj.bias"
    _rewrite(path, lambda t: t.__setitem__(bias, np.zeros(64, np.float32)))
    with pytest.raises(ConversionError, match=r"q_proj\.bias"):
        load_hf(path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        load_hf(tmp_path)


def test_unstacked_layers_and_bf16_params(hf_model_dir):
    _, path = hf_model_dir()
    cfg, params = load_hf(path, scan_layers=False, param_dtype="bfloat16")
    assert not cfg.scan_layers and set(params) >= {"layers_0", "layers_1", "output"}
    assert params["layers_1"]["attention"]["wo"].shape == (4, 16, 64)
    assert params["layers_1"]["attention"]["wo"].dtype.name == "bfloat16"
