"""Shared helpers: small random Hugging Face Llama models written to disk as references."""

import os

# Tests run on the CPU. Eight simulated devices let the sharding tests build real meshes; they
# must be requested before JAX starts, hence here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The AOT tests load libtpu in this process and again in subprocesses (the notebook's kernel);
# without a TPU there is nothing to guard, so libtpu's one-process lockfile is waived.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import numpy as np
import pytest
import torch  # noqa: E402  (the test extra pins both)
import transformers  # noqa: E402


def hf_config(**overrides):
    """A small LlamaConfig; keyword arguments override the defaults."""
    fields = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


@pytest.fixture
def hf_model_dir(tmp_path):
    """Factory: build a random HF Llama, save it, return (torch model, directory)."""

    def make(seed=0, dtype=None, max_shard_size=None, **overrides):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(hf_config(**overrides)).eval()
        # Random norm weights, so that a swapped or missing norm cannot go unnoticed.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        path = tmp_path / f"hf_{seed}"
        if dtype is not None:
            model = model.to(dtype)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return model, path

    return make


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A 4-layer random llama_jax params checkpoint and a SentencePiece tokenizer that fits it:
    (checkpoint dir, tokenizer path, cfg, params)."""
    import jax

    from llama_jax.checkpoint import save_params
    from llama_jax.config import ModelConfig
    from llama_jax.data.synthetic import write_sentencepiece_model
    from llama_jax.model import init_params

    cfg = ModelConfig(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        vocab_size=320,
        max_seq_len=64,
        init_std=0.1,
    )
    root = tmp_path_factory.mktemp("small_checkpoint")
    params = init_params(cfg, jax.random.key(0))
    save_params(root / "ckpt", params, cfg)
    return root / "ckpt", write_sentencepiece_model(str(root / "tok"), vocab_size=320), cfg, params
