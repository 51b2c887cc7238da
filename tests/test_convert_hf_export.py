"""Writing Hugging Face directories: HF -> load_hf -> save_hf -> transformers, same logits."""

import json

import numpy as np
import pytest
import transformers
from conftest import hf_logits
from safetensors import safe_open
from test_hf_parity import VARIANTS

from llama_jax.convert import ConversionError, config_from_hf, load_hf, save_hf

TOLERANCE = 1e-4


def _tokens(vocab, length=48):
    return np.random.default_rng(0).integers(0, vocab, size=(2, length), dtype=np.int64)


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama31_rope_scaling"])
def test_round_trip_logits_match(hf_model_dir, tmp_path, variant):
    model, path = hf_model_dir(**VARIANTS[variant])
    cfg, params = load_hf(path)
    out = save_hf(params, cfg, tmp_path / "exported", max_shard_size="60KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens(cfg.vocab_size, length=64)  # past original_max_position_embeddings (32)
    error = np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max()
    print(f"{variant}: max abs logit error after HF -> llama_jax -> HF: {error:.2e}")
    assert error < TOLERANCE
    # transformers reads our config.json back to the same model, and so do we.
    assert config_from_hf(reloaded.config.to_dict(), scan_layers=cfg.scan_layers) == cfg
    assert config_from_hf(json.loads((out / "config.json").read_text())) == cfg
    assert reloaded.config.tie_word_embeddings == cfg.tie_embeddings


def test_released_style_config_and_index(hf_model_dir, tmp_path):
    _, path = hf_model_dir(**VARIANTS["llama31_rope_scaling"])
    cfg, params = load_hf(path, scan_layers=False)
    out = save_hf(params, cfg, tmp_path / "exported", dtype="bfloat16")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 500000.0 and written["torch_dtype"] == "bfloat16"
    assert written["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    assert written["head_dim"] == 8 and written["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    (file,) = set(index["weight_map"].values())
    with safe_open(out / file, framework="np") as handle:
        assert set(handle.keys()) == set(index["weight_map"])
        assert handle.get_slice("lm_head.weight").get_dtype() == "BF16"
        assert handle.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == 2 * cfg.num_params()


def test_refuses_non_empty_destination(hf_model_dir, tmp_path):
    _, path = hf_model_dir()
    cfg, params = load_hf(path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        save_hf(params, cfg, tmp_path / "taken")


def test_params_of_another_shape_are_named(hf_model_dir, tmp_path):
    _, path = hf_model_dir()
    cfg, params = load_hf(path)
    with pytest.raises(
        ConversionError,
        match=r"layers/attention/wk has shape \(2, 64, 4, 16\), "
        r"but the model config implies \(2, 64, 2, 16\)",
    ):
        save_hf(params, cfg.replace(n_kv_heads=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()
