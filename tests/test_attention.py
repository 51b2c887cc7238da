"""The attention backends agree with the XLA reference: splash (Pallas, run by its interpreter on
CPU) forward and backward, alone and inside the sharded model; the automatic choice; and the
reference itself, split into blocks of queries, against a direct formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.attention import (
    attention,
    causal_block_starts,
    choose_implementation,
    compiling_for,
    splash_attention,
    xla_attention,
)
from llama_jax.config import MeshConfig, ModelConfig
from llama_jax.model import Llama, init_params, param_logical_axes
from llama_jax.sharding import activation_sharding, make_mesh, tree_shardings


def _qkv(batch=2, length=256, heads=4, kv_heads=2, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32) for _ in "kv")
    # Row 0: two documents; row 1: one document then padding (segment 0).
    segments = np.ones((batch, length), np.int32)
    segments[0, 100:] = 2
    segments[1, 200:] = 0
    return q, k, v, jnp.asarray(segments)


def _naive_attention(q, k, v, segments):
    """Head by head, query by query in numpy: softmax over the same document's keys up to the query."""
    q, k, v, segments = (np.asarray(x, np.float64) for x in (q, k, v, segments))
    batch, length, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                keys = [s for s in range(t + 1) if segments[b, s] == segments[b, t]]
                scores = k[b, keys, h // groups] @ q[b, t, h] / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ v[b, keys, h // groups] / weights.sum()
    return out


@pytest.mark.parametrize("length", [200, 256])
def test_blockwise_causal_reference_equals_a_direct_formula(length):
    """The XLA reference splits causal self-attention into blocks of queries (a ragged last block at
    200); forward equals the direct formula and gradients equal those of the unsplit masked matrix."""
    starts = causal_block_starts(length)
    assert starts[1] == 64 and len(starts) == -(-length // 64)
    q, k, v, segments = _qkv(length=length, head_dim=16)
    segments = segments.at[0, 150:].set(3)  # a third document, inside the third block
    out = xla_attention(q, k, v, segments)
    np.testing.assert_allclose(out, _naive_attention(q, k, v, segments), atol=1e-5)

    def loss(q, k, v, **kw):
        return (
            xla_attention(q, k, v, segments, **kw) * jnp.cos(jnp.arange(length))[None, :, None, None]
        ).sum()

    blocked = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    # A zero query offset gives the same causal mask through the unsplit path.
    dense = jax.grad(lambda q, k, v: loss(q, k, v, q_offset=0), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(blocked, dense):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert causal_block_starts(64) == [0] and causal_block_starts(2048)[1] == 256


def test_splash_matches_the_reference_forward_and_backward():
    q, k, v, segments = _qkv()
    out = splash_attention(q, k, v, segments, interpret=True)
    np.testing.assert_allclose(out, xla_attention(q, k, v, segments), atol=1e-5)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) ** 2).sum()

    ours = jax.grad(
        loss(lambda q, k, v: splash_attention(q, k, v, segments, interpret=True)), argnums=(0, 1, 2)
    )(q, k, v)
    reference = jax.grad(loss(lambda q, k, v: xla_attention(q, k, v, segments)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # Without segment ids it is plain causal attention.
    np.testing.assert_allclose(splash_attention(q, k, v, interpret=True), xla_attention(q, k, v), atol=1e-5)


def test_splash_inside_the_sharded_model_matches_xla():
    cfg = ModelConfig(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        ffn_dim=256,
        vocab_size=256,
        max_seq_len=128,
        compute_dtype="float32",
    )
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 256, (4, 128)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 70 + [2] * 58], 4, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(70)) + list(range(58))], 4, axis=0), jnp.int32)
    reference = Llama(cfg.replace(attention="xla")).apply({"params": params}, tokens, positions, segments)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, tree_shardings(params, param_logical_axes(cfg), mesh))
    model = Llama(cfg.replace(attention="splash"))

    @jax.jit
    def logits_and_grad(params):
        def loss(params):
            logits = model.apply({"params": params}, tokens, positions, segments)
            return jnp.mean(logits**2), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    with activation_sharding(mesh):
        (_, logits), grads = logits_and_grad(sharded)
        # The kernel runs per device under shard_map (batch over data x fsdp, heads over tensor).
        assert "shard_map" in str(jax.make_jaxpr(logits_and_grad)(sharded))
    np.testing.assert_allclose(logits, reference, atol=2e-4)
    reference_grads = jax.grad(
        lambda p: jnp.mean(
            Llama(cfg.replace(attention="xla")).apply({"params": p}, tokens, positions, segments) ** 2
        )
    )(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


def test_auto_picks_the_platform_kernel_where_it_applies():
    q, k, _, _ = _qkv(length=256)
    bf16 = q.astype(jnp.bfloat16)
    assert choose_implementation("auto", q, k, platform="tpu") == "splash"
    assert choose_implementation("auto", bf16, k, platform="gpu") == "cudnn"
    assert choose_implementation("auto", q, k, platform="gpu") == "xla"  # cuDNN needs bf16/fp16
    assert choose_implementation("auto", q, k, platform="cpu") == "xla"
    # Decoding against a KV cache, or a length splash cannot tile: the reference.
    assert choose_implementation("splash", q[:, :1], k, q_offset=5) == "xla"
    assert choose_implementation("splash", q[:, :100], k[:, :100]) == "xla"
    with compiling_for("tpu"):
        assert choose_implementation("auto", q, k) == "splash"
    assert choose_implementation("auto", q, k) == "xla"  # this host is a CPU
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
        attention(q, k, k, implementation="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(
            dim=64,
            n_layers=1,
            n_heads=2,
            n_kv_heads=2,
            head_dim=32,
            ffn_dim=64,
            vocab_size=64,
            max_seq_len=64,
            attention="flash",
        )
