"""Logits of `Llama` equal those of Hugging Face `transformers.LlamaForCausalLM` (fp32, CPU)."""

import jax
import numpy as np
import pytest
from conftest import hf_logits

from llama_jax.convert import load_hf
from llama_jax.model import Llama

TOLERANCE = 1e-4

VARIANTS = {
    # Llama 1/2: multi-head attention, theta 1e4.
    "mha": dict(),
    # Llama 3: grouped-query attention (4 query heads per KV head), theta 5e5.
    "gqa": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # Llama 3.1 RoPE scaling; the test runs past original_max_position_embeddings (32).
    "llama31_rope_scaling": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    # Llama 3.2: tied input and output embeddings.
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim 48 while hidden/heads is 16.
    "head_dim": dict(head_dim=48, num_key_value_heads=2),
}


def _tokens(vocab, batch=2, length=96, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(hf_model_dir, variant):
    model, path = hf_model_dir(**VARIANTS[variant])
    cfg, params = load_hf(path)
    tokens = _tokens(cfg.vocab_size)
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))
    theirs = hf_logits(model, tokens)
    error = np.abs(ours - theirs).max()
    print(f"{variant}: max abs logit error {error:.2e}")
    assert ours.shape == theirs.shape == (2, 96, cfg.vocab_size)
    assert error < TOLERANCE


def test_rope_scaling_changes_logits_beyond_original_context(hf_model_dir):
    """Guards the parity test above: scaling must matter at these positions, or it tests nothing."""
    _, path = hf_model_dir(**VARIANTS["llama31_rope_scaling"])
    cfg, params = load_hf(path)
    tokens = _tokens(cfg.vocab_size)
    scaled = Llama(cfg).apply({"params": params}, tokens)
    plain = Llama(cfg.replace(rope_scaling=None)).apply({"params": params}, tokens)
    assert np.abs(np.asarray(scaled) - np.asarray(plain))[:, 40:].max() > 10 * TOLERANCE


def test_bf16_sharded_checkpoint_loads(hf_model_dir):
    """A bf16 checkpoint split over several safetensors files with an index."""
    import torch

    model, path = hf_model_dir(dtype=torch.bfloat16, max_shard_size="40KB", num_key_value_heads=2)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    cfg, params = load_hf(path)
    assert params["layers"]["attention"]["wq"].dtype == np.float32
    tokens = _tokens(cfg.vocab_size, length=32)
    ours = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    theirs = hf_logits(model.float(), tokens)
    assert np.abs(ours - theirs).max() < TOLERANCE
