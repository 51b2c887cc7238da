"""Reading Meta checkpoints: a random HF model written in Meta's layout (interleaved q/k, two
model-parallel shards) loads with `load_meta` to the HF model's logits."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import hf_logits

from llama_jax.config import RopeScaling
from llama_jax.convert import ConversionError, load_meta
from llama_jax.model import Llama

TOLERANCE = 1e-4

# Meta name -> (Hugging Face name, model-parallel split axis or None for replicated), per layer.
LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}

# hidden 64 -> Meta's FFN rule gives 192 with multiple_of 32, and 224 with multiplier 1.3.
MODELS = {
    "mha": (dict(intermediate_size=192), dict(multiple_of=32)),
    "gqa": (
        dict(
            intermediate_size=224,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        dict(multiple_of=32, ffn_dim_multiplier=1.3),
    ),
}


def to_interleaved(weight, n_heads):
    """Inverse of Hugging Face's conversion permutation: rotate-half rows -> Meta's pairs."""
    rows, columns = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def meta_tensors(model):
    """Meta's name -> (tensor, split axis) for a transformers LlamaForCausalLM."""
    config, hf = model.config, model.state_dict()
    tensors = {
        "tok_embeddings.weight": (hf["model.embed_tokens.weight"], 1),
        "norm.weight": (hf["model.norm.weight"], None),
    }
    if not config.tie_word_embeddings:
        tensors["output.weight"] = (hf["lm_head.weight"], 0)
    for i in range(config.num_hidden_layers):
        for meta, (name, axis) in LAYER.items():
            tensor = hf[f"model.layers.{i}.{name}"]
            if meta == "attention.wq.weight":
                tensor = to_interleaved(tensor, config.num_attention_heads)
            elif meta == "attention.wk.weight":
                tensor = to_interleaved(tensor, config.num_key_value_heads)
            tensors[f"layers.{i}.{meta}"] = (tensor, axis)
    return tensors


def write_meta(model, path, params_json, n_shards=2, drop=()):
    path.mkdir()
    shards = [{} for _ in range(n_shards)]
    for name, (tensor, axis) in meta_tensors(model).items():
        if name in drop:
            continue
        for rank in range(n_shards):
            piece = tensor if axis is None else tensor.chunk(n_shards, dim=axis)[rank]
            shards[rank][name] = piece.clone()
    for rank, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    config = model.config
    meta_params = dict(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_parameters["rope_theta"],
        **params_json,
    )
    (path / "params.json").write_text(json.dumps(meta_params))
    return path


@pytest.mark.parametrize("variant", MODELS)
def test_two_shards_load_to_hf_logits(hf_model_dir, tmp_path, variant):
    hf_overrides, params_json = MODELS[variant]
    model, _ = hf_model_dir(**hf_overrides)
    path = write_meta(model, tmp_path / "meta", params_json)
    cfg, params = load_meta(path)
    assert (cfg.ffn_dim, cfg.n_kv_heads) == (
        hf_overrides["intermediate_size"],
        model.config.num_key_value_heads,
    )
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48), dtype=np.int32)
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))
    error = np.abs(ours - hf_logits(model, tokens)).max()
    print(f"{variant}: max abs logit error Meta (2 shards) -> llama_jax vs HF: {error:.2e}")
    assert error < TOLERANCE


def test_interleaved_layout_is_metas_rope():
    """Guards the writer above: with Meta's complex-pair RoPE on the interleaved weights and
    rotate-half RoPE on the original ones, attention scores agree."""
    n_heads, head_dim, dim, length = 2, 8, 16, 5
    rng = np.random.default_rng(0)
    wq, wk = (torch.tensor(rng.normal(size=(n_heads * head_dim, dim)), dtype=torch.float64) for _ in range(2))
    x = torch.tensor(rng.normal(size=(length, dim)), dtype=torch.float64)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # [T, head_dim/2]

    def meta_rope(w):  # llama/model.py: consecutive pairs are complex numbers
        pairs = (x @ w.T).view(length, n_heads, head_dim // 2, 2)
        rotated = (
            torch.view_as_complex(pairs.contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None]
        )
        return torch.view_as_real(rotated).reshape(length, n_heads, head_dim)

    def rotate_half_rope(w):  # transformers: the first and second halves are paired
        h = (x @ w.T).view(length, n_heads, head_dim)
        cos, sin = (f(torch.cat([angles, angles], -1))[:, None] for f in (torch.cos, torch.sin))
        return h * cos + torch.cat([-h[..., head_dim // 2 :], h[..., : head_dim // 2]], -1) * sin

    meta_scores = torch.einsum(
        "qhd,khd->hqk", meta_rope(to_interleaved(wq, n_heads)), meta_rope(to_interleaved(wk, n_heads))
    )
    hf_scores = torch.einsum("qhd,khd->hqk", rotate_half_rope(wq), rotate_half_rope(wk))
    assert torch.allclose(meta_scores, hf_scores, atol=1e-10)


def test_params_json_details(hf_model_dir, tmp_path):
    """LLaMA 1's vocab_size -1, tied embeddings (no output.weight), Llama 3.1 scaled RoPE."""
    model, _ = hf_model_dir(intermediate_size=192, tie_word_embeddings=True)
    path = write_meta(model, tmp_path / "meta", dict(multiple_of=32, use_scaled_rope=True))
    meta_params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**meta_params, "vocab_size": -1}))
    cfg, params = load_meta(path)
    assert cfg.vocab_size == 128 and cfg.tie_embeddings and "output" not in params
    assert cfg.rope_scaling == RopeScaling(factor=8.0) and cfg.max_seq_len == 131072
    cfg, _ = load_meta(path, rope_scaling_factor=32.0, max_seq_len=1024)
    assert cfg.rope_scaling.factor == 32.0 and cfg.max_seq_len == 1024
    explicit = dict(
        rope_type="llama3",
        factor=16.0,
        low_freq_factor=2.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=4096,
    )
    (path / "params.json").write_text(json.dumps({**meta_params, "rope_scaling": explicit}))
    assert load_meta(path)[0].rope_scaling == RopeScaling(16.0, 2.0, 4.0, 4096)


def test_missing_shard_and_tensor_are_named(hf_model_dir, tmp_path):
    model, _ = hf_model_dir(intermediate_size=192)
    path = write_meta(model, tmp_path / "four", dict(multiple_of=32), n_shards=4)
    (path / "consolidated.01.pth").unlink()
    with pytest.raises(ConversionError, match=r"lacks consolidated\.01\.pth, one of the 4"):
        load_meta(path)
    (path / "consolidated.02.pth").unlink()
    (path / "consolidated.03.pth").unlink()  # the last one: only the shapes can tell
    (path / "consolidated.01.pth").write_bytes((path / "consolidated.00.pth").read_bytes())
    with pytest.raises(
        ConversionError,
        match=r"tok_embeddings\.weight has shape \(128, 32\) "
        r"across 2 shards \(is a shard missing\?\)",
    ):
        load_meta(path)
    path = write_meta(
        model, tmp_path / "dropped", dict(multiple_of=32), drop=("layers.1.feed_forward.w3.weight",)
    )
    with pytest.raises(
        ConversionError,
        match=r"consolidated\.00\.pth lacks tensor "
        r"layers\.1\.feed_forward\.w3\.weight",
    ):
        load_meta(path)


def test_params_json_of_another_shape(hf_model_dir, tmp_path):
    model, _ = hf_model_dir(intermediate_size=192)
    path = write_meta(model, tmp_path / "meta", dict(multiple_of=64))  # ffn 192 -> 192, fine
    write_meta(model, tmp_path / "wide", dict(multiple_of=256))  # ffn 192 -> 256
    with pytest.raises(
        ConversionError,
        match=r"layers\.0\.feed_forward\.w1\.weight has shape "
        r"\(192, 64\), but params\.json implies \(256, 64\)",
    ):
        load_meta(tmp_path / "wide")
    assert load_meta(path)[0].ffn_dim == 192
