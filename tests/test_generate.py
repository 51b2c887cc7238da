"""Generation: greedy continuations equal transformers' generate token for token; sampling and
stop tokens behave."""

import jax
import numpy as np
import pytest
import torch
from test_hf_parity import VARIANTS as PARITY_VARIANTS

from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.convert import load_hf
from llama_jax.generate import GenerationError, generate
from llama_jax.model import init_params

# MHA, GQA and Llama 3.1 scaling (original context 32; prompt + 24 new tokens run past it).
VARIANTS = {name: PARITY_VARIANTS[name] for name in ("mha", "gqa", "llama31_rope_scaling")}


def _hf_greedy(model, prompts, new_tokens):
    """transformers' generate on left-padded prompts with an attention mask."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    model.generation_config.eos_token_id = None  # both sides generate exactly new_tokens
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[:, length:].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(hf_model_dir, variant):
    # Large init, so that logits are far from ties and argmax is decisive.
    model, path = hf_model_dir(initializer_range=0.3, **VARIANTS[variant])
    cfg, params = load_hf(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (5, 11, 8)]
    ours = generate(params, cfg, prompts, SamplingConfig(24))
    theirs = _hf_greedy(model, prompts, 24)
    assert ours == theirs


SMALL = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=97,
    max_seq_len=64,
    init_std=0.3,
)


def test_stop_tokens_and_streaming():
    params = init_params(SMALL, jax.random.key(0))
    free = generate(params, SMALL, [[1, 2, 3], [4, 5]], SamplingConfig(12))
    stop = free[0][4]  # a token the first row emits at step 4
    streamed = []
    stopped = generate(
        params,
        SMALL,
        [[1, 2, 3], [4, 5]],
        SamplingConfig(12),
        stop_tokens=[stop],
        on_token=lambda step, tokens: streamed.append((step, tokens.tolist())),
    )
    first_stop = free[0].index(stop)
    assert stopped[0] == free[0][: first_stop + 1]
    assert [s for s, _ in streamed] == list(range(len(streamed)))
    assert [t[0] for _, t in streamed][: first_stop + 1] == stopped[0]


def test_sampling_is_seeded_and_respects_top_k():
    params = init_params(SMALL, jax.random.key(0))
    prompts = [[1, 2, 3]] * 4
    a = generate(params, SMALL, prompts, SamplingConfig(16, temperature=1.0, top_k=5), seed=7)
    b = generate(params, SMALL, prompts, SamplingConfig(16, temperature=1.0, top_k=5), seed=7)
    c = generate(params, SMALL, prompts, SamplingConfig(16, temperature=1.0, top_k=5), seed=8)
    assert a == b and a != c
    assert len({tuple(row) for row in a}) > 1  # rows of the batch sample independently
    # top_k=1 is greedy whatever the temperature; top_p tiny keeps only the most likely token.
    greedy = generate(params, SMALL, prompts[:1], SamplingConfig(16))
    assert (
        generate(params, SMALL, prompts[:1], SamplingConfig(16, temperature=2.0, top_k=1), seed=3) == greedy
    )
    assert (
        generate(params, SMALL, prompts[:1], SamplingConfig(16, temperature=2.0, top_p=1e-6), seed=3)
        == greedy
    )


def test_prompt_longer_than_context_is_refused():
    params = init_params(SMALL, jax.random.key(0))
    with pytest.raises(GenerationError, match="exceed the model's context of 64 tokens"):
        generate(params, SMALL, [[1] * 60], SamplingConfig(10))


def test_sharded_generation_matches_one_device():
    """Under a mesh the cache and activations are sharded by the logical rules; same tokens."""
    from llama_jax.config import MeshConfig
    from llama_jax.sharding import activation_sharding, make_mesh

    params = init_params(SMALL, jax.random.key(0))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    single = generate(params, SMALL, prompts, SamplingConfig(10))
    with activation_sharding(make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices())):
        sharded = generate(params, SMALL, prompts, SamplingConfig(10))
    assert sharded == single
