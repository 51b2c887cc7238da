"""Context parallelism on 8 simulated devices: the sequence split over `mesh.context` gives the
loss and gradients of one device, with documents packed across the chunk boundaries, whatever
else the mesh shards; splash under it (Pallas interpreter) equals the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as attention_lib
from llama_jax import context_parallel
from llama_jax.config import ConfigError, Experiment, MeshConfig, ModelConfig, TrainConfig, apply_overrides
from llama_jax.model import init_params
from llama_jax.sharding import MeshError, activation_sharding, make_mesh
from llama_jax.trainer import check_training, text_loss

CFG = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=256, max_seq_len=512
)


def packed_batch(rows=4, length=64, seed=0):
    """Documents of random lengths packed end to end (so they cross every chunk boundary), with
    positions restarting at each document and padding at the end of a row."""
    rng = np.random.default_rng(seed)
    segments = np.sort(rng.integers(1, 5, (rows, length)), axis=1).astype(np.int32)
    segments[0, -7:] = 0
    positions = np.zeros_like(segments)
    for t in range(1, length):
        same = segments[:, t] == segments[:, t - 1]
        positions[:, t] = np.where(same, positions[:, t - 1] + 1, 0)
    return {
        "tokens": rng.integers(0, CFG.vocab_size, (rows, length)).astype(np.int32),
        "positions": positions,
        "segment_ids": segments,
        "loss_mask": (segments > 0).astype(np.float32),
    }


def loss_and_grads(mesh_cfg: MeshConfig | None, params, batch, attention="xla"):
    exp = Experiment(model=CFG.replace(attention=attention))
    loss = text_loss(exp)

    def mean_loss(p, b):
        total, count, _ = loss(p, b, None)
        return total / count

    step = jax.jit(jax.value_and_grad(mean_loss))
    if mesh_cfg is None:
        return step(params, batch)
    with activation_sharding(make_mesh(mesh_cfg), mesh_cfg.rules):
        return step(params, batch)


@pytest.fixture(scope="module")
def reference():
    params = init_params(CFG, jax.random.key(0))
    batch = packed_batch()
    return params, batch, loss_and_grads(None, params, batch)


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(context=2, fsdp=1, data=-1),
        MeshConfig(context=4, fsdp=1, data=-1),
        MeshConfig(context=2, fsdp=2, tensor=2),
        MeshConfig(context=4, fsdp=2),
        MeshConfig(context=4, fsdp=1, tensor=2),
    ],
    ids=["c2", "c4", "c2-fsdp2-tp2", "c4-fsdp2", "c4-tp2"],
)
def test_loss_and_gradients_equal_one_device(reference, mesh_cfg, monkeypatch):
    params, batch, (ref_loss, ref_grads) = reference
    calls = []
    sharded = context_parallel.sharded_attention
    monkeypatch.setattr(
        context_parallel, "sharded_attention", lambda *a, **k: calls.append(1) or sharded(*a, **k)
    )
    loss, grads = loss_and_grads(mesh_cfg, params, batch)
    assert calls, "attention did not take the context-parallel path"
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)


def test_a_wrong_layout_would_be_caught(reference, monkeypatch):
    """The parity above depends on the layout: keys put back in the wrong order change the loss."""
    params, batch, (ref_loss, _) = reference
    monkeypatch.setattr(context_parallel, "unbalance", lambda x, parts, axis=1: x)
    loss, _ = loss_and_grads(MeshConfig(context=2, fsdp=1, data=-1), params, batch)
    assert abs(float(loss) - float(ref_loss)) > 1e-3


def test_the_layout_balances_causal_work():
    """Device i holds chunks i and 2c-1-i: every device has the same number of (query, key)
    pairs below the diagonal, and the layout is a permutation that unbalance undoes."""
    for parts in (2, 4, 8):
        length = 16 * parts
        index = context_parallel.balanced_index(length, parts)
        assert sorted(index) == list(range(length))
        work = (index + 1).reshape(parts, -1).sum(axis=1)  # query at index t sees t + 1 keys
        assert len(set(work.tolist())) == 1
        x = jnp.arange(3 * length).reshape(3, length)
        np.testing.assert_array_equal(context_parallel.balance(x, parts)[0], index)
        np.testing.assert_array_equal(
            context_parallel.unbalance(context_parallel.balance(x, parts), parts), x
        )


def test_splash_under_context_parallelism_equals_xla():
    rng = np.random.default_rng(1)
    batch, length, heads, kv_heads, head_dim = 2, 512, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.sort(rng.integers(1, 4, (batch, length)), axis=1), jnp.int32)

    def balanced(q, k, v, implementation):
        parts = context_parallel.context_size()
        args = (context_parallel.balance(x, parts) for x in (q, k, v, segments))
        return context_parallel.unbalance(
            attention_lib.attention(*args, implementation=implementation), parts
        )

    def objective(q, k, v):
        return jnp.sum(balanced(q, k, v, "splash") ** 2)

    want = attention_lib.xla_attention(q, k, v, segments)
    want_grads = jax.grad(lambda *a: jnp.sum(attention_lib.xla_attention(*a, segments) ** 2), (0, 1, 2))(
        q, k, v
    )
    mesh_cfg = MeshConfig(context=2, fsdp=2, tensor=2)
    with activation_sharding(make_mesh(mesh_cfg), mesh_cfg.rules):
        got = jax.jit(lambda *a: balanced(*a, "splash"))(q, k, v)
        grads = jax.jit(jax.grad(objective, (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


def test_sequence_length_must_split_into_two_chunks_per_device():
    exp = Experiment(
        model=CFG, train=TrainConfig(batch_size=8, seq_len=36), mesh=MeshConfig(context=4, fsdp=2)
    )
    with pytest.raises(MeshError, match=r"train.seq_len=36 is not a multiple of 2 x 4"):
        check_training(exp, make_mesh(exp.mesh))
    with pytest.raises(ValueError, match="2 x 4 equal chunks"):
        context_parallel.balance(jnp.zeros((1, 36)), 4)


def test_mesh_context_is_an_override():
    exp = apply_overrides(Experiment(), ["mesh.context=4", "mesh.fsdp=2"])
    mesh = make_mesh(exp.mesh)
    assert dict(mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 2, "context": 4, "tensor": 1}
    assert context_parallel.context_size(mesh, exp.mesh.rules) == 4
    with pytest.raises(ConfigError):
        apply_overrides(Experiment(), ["mesh.context=x"])
    with pytest.raises(MeshError, match="context=3"):
        make_mesh(MeshConfig(context=3, fsdp=1))


def test_a_fresh_state_initialises_under_context_parallelism():
    """A run from scratch creates its parameters on the context-parallel mesh (the init's dummy
    sequence splits into 2 x context chunks), the same parameters as on one device."""
    from llama_jax.optim import make_optimizer
    from llama_jax.stages.pretrain import Pretrain

    exp = Experiment(model=CFG, mesh=MeshConfig(context=4, fsdp=2))
    optimizer, _ = make_optimizer(exp.optim, 10)
    state = Pretrain().create_state(exp, optimizer, make_mesh(exp.mesh), jax.random.key(3))
    single = init_params(CFG, jax.random.key(3))
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("context", [1, 2, 4])
def test_the_cudnn_path_equals_xla(context, monkeypatch):
    """There is no GPU here, so `jax.nn.dot_product_attention`, asked for cuDNN, runs XLA's
    implementation of the same call: what is checked is everything llama_jax puts around the
    kernel (each device's mask of documents and causality at its balanced query indices, GQA),
    forward and gradients, without and with context parallelism."""
    calls = []
    real = jax.nn.dot_product_attention

    def without_cudnn(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", without_cudnn)
    rng = np.random.default_rng(2)
    batch, length, heads, kv_heads, head_dim = 2, 256, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
    segments = np.sort(rng.integers(1, 4, (batch, length)), axis=1).astype(np.int32)
    segments[1, -9:] = 0  # padding
    segments = jnp.asarray(segments)

    def balanced(q, k, v):
        parts = context_parallel.context_size()
        args = (context_parallel.balance(x, parts) for x in (q, k, v, segments))
        out = attention_lib.attention(*args, implementation="cudnn")
        return context_parallel.unbalance(out, parts).astype(jnp.float32)

    def reference(q, k, v):
        return attention_lib.xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segments)

    live = (segments > 0)[:, :, None, None]  # padding queries attend to nothing; their rows differ

    def objective(fn):
        return lambda *a: jnp.sum(jnp.where(live, fn(*a), 0.0) ** 2)

    want = reference(q, k, v)
    want_grads = jax.grad(objective(reference), (0, 1, 2))(q, k, v)
    mesh_cfg = MeshConfig(context=context, fsdp=1, data=-1)
    with activation_sharding(make_mesh(mesh_cfg), mesh_cfg.rules):
        got = jax.jit(balanced)(q, k, v)
        grads = jax.jit(jax.grad(objective(balanced), (0, 1, 2)))(q, k, v)
    assert calls and set(calls) == {"cudnn"}
    np.testing.assert_allclose(np.where(live, got, 0), np.where(live, want, 0), atol=3e-2)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=0.1, rtol=0.05)
