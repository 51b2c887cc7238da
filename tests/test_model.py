"""The model on its own: presets, document masking, layer stacking, remat, RoPE, the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama_jax import model as model_lib
from llama_jax.config import ModelConfig, RopeScaling, ffn_dim_for, model_preset
from llama_jax.model import Llama, count_params, init_params, param_logical_axes, rope_frequencies

# docs/reference.md, "Architectures": (dim, layers, heads, kv heads, head_dim, ffn, vocab, seq, theta, eps, tied, params).
REFERENCE = {
    "llama1_7b": (4096, 32, 32, 32, 128, 11008, 32000, 2048, 1e4, 1e-6, False, 6.74e9),
    "llama1_13b": (5120, 40, 40, 40, 128, 13824, 32000, 2048, 1e4, 1e-6, False, 13.02e9),
    "llama1_33b": (6656, 60, 52, 52, 128, 17920, 32000, 2048, 1e4, 1e-6, False, 32.53e9),
    "llama1_65b": (8192, 80, 64, 64, 128, 22016, 32000, 2048, 1e4, 1e-5, False, 65.29e9),
    "llama2_7b": (4096, 32, 32, 32, 128, 11008, 32000, 4096, 1e4, 1e-5, False, 6.74e9),
    "llama2_13b": (5120, 40, 40, 40, 128, 13824, 32000, 4096, 1e4, 1e-5, False, 13.02e9),
    "llama2_70b": (8192, 80, 64, 8, 128, 28672, 32000, 4096, 1e4, 1e-5, False, 68.98e9),
    "llama3_8b": (4096, 32, 32, 8, 128, 14336, 128256, 8192, 5e5, 1e-5, False, 8.03e9),
    "llama3_70b": (8192, 80, 64, 8, 128, 28672, 128256, 8192, 5e5, 1e-5, False, 70.55e9),
    "llama3_1_8b": (4096, 32, 32, 8, 128, 14336, 128256, 131072, 5e5, 1e-5, False, 8.03e9),
    "llama3_1_70b": (8192, 80, 64, 8, 128, 28672, 128256, 131072, 5e5, 1e-5, False, 70.55e9),
    "llama3_1_405b": (16384, 126, 128, 8, 128, 53248, 128256, 131072, 5e5, 1e-5, False, 405.85e9),
    "llama3_2_1b": (2048, 16, 32, 8, 64, 8192, 128256, 131072, 5e5, 1e-5, True, 1.24e9),
    "llama3_2_3b": (3072, 28, 24, 8, 128, 8192, 128256, 131072, 5e5, 1e-5, True, 3.21e9),
}
ROPE_FACTOR = {"llama3_1_8b": 8, "llama3_1_70b": 8, "llama3_1_405b": 8, "llama3_2_1b": 32, "llama3_2_3b": 32}


@pytest.mark.parametrize("name", REFERENCE)
def test_preset_matches_reference(name):
    dim, layers, heads, kv, head_dim, ffn, vocab, seq, theta, eps, tied, params = REFERENCE[name]
    cfg = model_preset(name)
    assert (
        cfg.dim,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.ffn_dim,
        cfg.vocab_size,
        cfg.max_seq_len,
        cfg.rope_theta,
        cfg.norm_eps,
        cfg.tie_embeddings,
    ) == (dim, layers, heads, kv, head_dim, ffn, vocab, seq, theta, eps, tied)
    if name in ROPE_FACTOR:
        assert cfg.rope_scaling == RopeScaling(factor=ROPE_FACTOR[name])
    else:
        assert cfg.rope_scaling is None
    counted = count_params(cfg)
    assert abs(counted - params) / params < 0.005
    assert counted == cfg.num_params()


def test_ffn_rule_examples():
    # The rule itself, on the sizes where each branch of it matters.
    assert ffn_dim_for(4096, 256) == 11008
    assert ffn_dim_for(8192, 4096, 1.3) == 28672
    assert ffn_dim_for(16384, 4096, 1.2) == 53248


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ValueError, match="Did you mean 'llama3_8b'"):
        model_preset("llama3-8b")


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        model_preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="remat must be one of"):
        model_preset("tiny", remat="sometimes")
    with pytest.raises(ValueError, match="scan_unroll"):
        model_preset("tiny", scan_unroll=0)


SMALL = ModelConfig(
    dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=97, max_seq_len=64
)


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, SMALL.vocab_size, size=shape), jnp.int32)


def test_document_masking_equals_separate_runs():
    params = init_params(SMALL, jax.random.key(0))
    apply = jax.jit(Llama(SMALL).apply)
    doc_a, doc_b = _tokens((1, 11), seed=1), _tokens((1, 16), seed=2)
    pad = jnp.zeros((1, 5), jnp.int32)
    packed = jnp.concatenate([doc_a, doc_b, pad], axis=1)
    positions = jnp.concatenate([jnp.arange(11), jnp.arange(16), jnp.arange(5)])[None]
    segment_ids = jnp.asarray([[1] * 11 + [2] * 16 + [0] * 5])
    logits = apply({"params": params}, packed, positions, segment_ids)
    alone_a = apply({"params": params}, doc_a)
    alone_b = apply({"params": params}, doc_b)
    np.testing.assert_allclose(logits[:, :11], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[:, 11:27], alone_b, atol=1e-5)
    # Without segment ids the second document sees the first, so its logits change.
    unmasked = apply({"params": params}, packed, positions)
    assert np.abs(unmasked[:, 11:27] - alone_b).max() > 1e-3
    assert np.isfinite(np.asarray(logits)).all()


def test_scan_and_loop_compute_the_same_function():
    scanned = init_params(SMALL, jax.random.key(0))
    loop_cfg = SMALL.replace(scan_layers=False)
    # The loop's per-layer tree is the scanned tree unstacked along its first axis.
    looped = {k: v for k, v in scanned.items() if k != "layers"}
    for i in range(SMALL.n_layers):
        looped[f"layers_{i}"] = jax.tree.map(lambda x: x[i], scanned["layers"])
    tokens = _tokens((2, 24))
    a = jax.jit(Llama(SMALL).apply)({"params": scanned}, tokens)
    b = jax.jit(Llama(loop_cfg).apply)({"params": looped}, tokens)
    assert jax.tree.structure(init_params(loop_cfg, jax.random.key(0))) == jax.tree.structure(looped)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("unroll", [2, 3])
def test_unrolled_scan_keeps_parameters_function_and_gradients(unroll):
    # 2 of 3 layers per iteration leaves a remainder; 3 unrolls the loop fully.
    cfg = SMALL.replace(scan_unroll=unroll)
    params = init_params(SMALL, jax.random.key(0))
    unrolled_init = init_params(cfg, jax.random.key(0))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(unrolled_init), strict=True):
        np.testing.assert_array_equal(x, y)
    tokens = _tokens((2, 16))

    def loss(p, cfg):
        return jnp.mean(Llama(cfg).apply({"params": p}, tokens) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (a, grads_a), (b, grads_b) = value_and_grad(params, SMALL), value_and_grad(params, cfg)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # The compiled program does change: the unrolled one has fewer loop iterations to run.
    hlo = lambda c: jax.jit(lambda p: loss(p, c)).lower(params).as_text()  # noqa: E731
    assert hlo(SMALL) != hlo(cfg)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_gradients(policy):
    params = init_params(SMALL, jax.random.key(0))
    tokens = _tokens((2, 16))

    def loss(p, cfg):
        return jnp.mean(Llama(cfg).apply({"params": p}, tokens) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = grad(params, SMALL)
    remat = grad(params, SMALL.replace(remat=policy))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_axes():
    axes = param_logical_axes(SMALL)
    specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree.leaves(init_params(SMALL, jax.random.key(0)))
    assert len(specs) == len(shapes)
    for spec, leaf in zip(specs, shapes):
        assert len(spec) == leaf.ndim and all(isinstance(name, str) for name in spec)
    assert tuple(axes["layers"]["attention"]["wk"]) == ("layers", "embed", "kv_heads", "head_dim")


def test_bf16_compute_stays_close_to_fp32():
    params = init_params(SMALL, jax.random.key(0))
    tokens = _tokens((2, 16))
    fp32 = jax.jit(Llama(SMALL.replace(compute_dtype="float32")).apply)({"params": params}, tokens)
    bf16 = jax.jit(Llama(SMALL.replace(compute_dtype="bfloat16")).apply)({"params": params}, tokens)
    assert bf16.dtype == jnp.float32  # logits come out in fp32 whatever the compute dtype
    assert np.abs(np.asarray(fp32) - np.asarray(bf16)).max() < 0.05


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        RopeScaling(factor=8.0, original_max_position_embeddings=8192),
        RopeScaling(factor=32.0, original_max_position_embeddings=8192),
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    if scaling is None:
        rope = {"rope_type": "default", "rope_theta": 500000.0}
    else:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    config = hf_config(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    if scaling is None:  # the plain formula, in fp64
        theirs = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    else:
        theirs = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))[0].numpy()
    ours = rope_frequencies(128, 500000.0, scaling)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_model_cli_prints_shapes_and_count(capsys):
    model_lib.main(["--preset", "llama3_2_1b"])
    out = capsys.readouterr().out
    assert "layers/attention/wq" in out and "(16, 2048, 32, 64)" in out
    assert "parameters: 1,235,814,400 (1.24B)" in out


def test_model_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_lib.main(["--preset", "llama9"])
    assert exit_info.value.code == 2
    assert "Unknown model preset 'llama9'" in capsys.readouterr().err
