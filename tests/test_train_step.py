"""The train step: its loss against a direct formula, and sharded meshes against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.config import Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from llama_jax.loss import cross_entropy_sum, next_token_targets
from llama_jax.model import Llama, init_params, lm_head
from llama_jax.optim import make_optimizer
from llama_jax.sharding import activation_sharding, make_mesh
from llama_jax.stages.pretrain import Pretrain
from llama_jax.steps import global_batch

MODEL = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=8,
    head_dim=16,
    ffn_dim=128,
    vocab_size=256,
    max_seq_len=64,
    compute_dtype="float32",
)


def _batch(rng, batch=16, length=32, vocab=256):
    """Two documents per row plus padding, with a partial loss mask."""
    cut, pad = length // 3, length - 4
    segments = np.where(np.arange(length) < cut, 1, np.where(np.arange(length) < pad, 2, 0))
    positions = np.where(segments == 1, np.arange(length), np.arange(length) - cut)
    loss_mask = (segments > 0).astype(np.float32)
    loss_mask[:2] = 0.0
    return {
        "tokens": rng.integers(1, vocab, (batch, length)).astype(np.int32),
        "positions": np.tile(positions.astype(np.int32), (batch, 1)),
        "segment_ids": np.tile(segments.astype(np.int32), (batch, 1)),
        "loss_mask": np.tile(loss_mask, (batch, 1)),
    }


def test_loss_matches_direct_formula():
    """Chunked, masked loss = mean over counted positions of -log softmax(logits)[next token]."""
    params = init_params(MODEL, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0), batch=3).items()}
    hidden = Llama(MODEL).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], method=Llama.hidden
    )
    targets, weights = next_token_targets(batch)
    total, count = cross_entropy_sum(hidden, lm_head(params, MODEL), targets, weights, chunk=5)

    logits = np.asarray(
        Llama(MODEL).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]),
        np.float64,
    )
    tokens, segments, mask = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "loss_mask"))
    expected, n = 0.0, 0
    for b in range(3):
        for t in range(31):
            if mask[b, t + 1] and segments[b, t + 1] == segments[b, t] and segments[b, t + 1]:
                row = logits[b, t]
                expected += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, t + 1]]
                n += 1
    assert n == 3 * (32 - 4 - 1 - 1 - 1)  # boundary, padding and masked starts excluded
    assert float(count) == n
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_keep_logits_trades_the_head_matmul_for_memory():
    """train.keep_logits: the same loss and gradients; the backward pass no longer computes the
    head's matmul again (2 T D V FLOPs fewer), and holds every chunk's fp32 logits (T V 4 bytes)."""
    rng = np.random.default_rng(0)
    tokens, dim, vocab = 4 * 64, 64, 512
    hidden = jnp.asarray(rng.normal(size=(4, 64, dim)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(dim, vocab)) / 8, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (4, 64)), jnp.int32)
    weights = jnp.asarray(rng.random((4, 64)), jnp.float32)

    def grad_fn(keep):
        loss = lambda h, w: cross_entropy_sum(h, w, targets, weights, 16, keep_logits=keep)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    (loss, grads), (kept_loss, kept_grads) = (grad_fn(keep)(hidden, head) for keep in (False, True))
    np.testing.assert_allclose(float(kept_loss), float(loss), rtol=1e-6)
    for got, want in zip(kept_grads, grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    compiled = [grad_fn(keep).lower(hidden, head).compile() for keep in (False, True)]
    flops = [c.cost_analysis()["flops"] for c in compiled]
    # XLA counts the loop over chunks' body once: one chunk's matmul (4 rows x 16 positions).
    chunk_matmul = 2 * (4 * 16) * dim * vocab
    assert flops[0] - flops[1] == pytest.approx(chunk_matmul, rel=0.05)
    temps = [c.memory_analysis().temp_size_in_bytes for c in compiled]
    assert temps[1] - temps[0] >= 0.75 * tokens * vocab * 4


def _losses(mesh_cfg, devices, microbatches=1, steps=5):
    exp = Experiment(
        model=MODEL,
        mesh=mesh_cfg,
        train=TrainConfig(steps=steps, batch_size=16, seq_len=32, microbatches=microbatches, loss_chunk=16),
        optim=OptimConfig(peak_lr=1e-2, warmup_steps=2),
    )
    mesh = make_mesh(exp.mesh, devices)
    optimizer, schedule = make_optimizer(exp.optim, steps)
    compiled = Pretrain().compile(exp, optimizer, schedule, mesh)
    state = Pretrain().create_state(exp, optimizer, mesh, jax.random.key(0))
    losses = []
    with activation_sharding(mesh):
        for _ in range(steps):  # one batch, over and over: the loss must fall
            batch = global_batch(_batch(np.random.default_rng(0)), compiled.batch_sharding)
            state, metrics = compiled.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device():
    return _losses(MeshConfig(1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh_cfg,microbatches",
    [
        # data=8 and tensor=8 alone: the meshes below split over both, so these run after the suite.
        pytest.param(MeshConfig(data=8, fsdp=1, tensor=1), 1, marks=pytest.mark.slow),
        (MeshConfig(data=1, fsdp=8, tensor=1), 1),
        pytest.param(MeshConfig(data=1, fsdp=1, tensor=8), 1, marks=pytest.mark.slow),
        # The same mesh with microbatches (next) covers it in the default run.
        pytest.param(MeshConfig(data=2, fsdp=2, tensor=2), 1, marks=pytest.mark.slow),
        (MeshConfig(data=2, fsdp=2, tensor=2), 2),
        # Two "slices" of 4 (one host stands in for them): each sums its microbatches, then the
        # slices add their gradients once (steps.across_slices).
        (MeshConfig(dcn=2, data=1, fsdp=2, tensor=2), 2),
    ],
    ids=["data8", "fsdp8", "tensor8", "2x2x2", "2x2x2-microbatch2", "dcn2-microbatch2"],
)
def test_sharded_training_matches_one_device(single_device, mesh_cfg, microbatches):
    assert len(jax.devices()) == 8
    reference, _ = single_device
    losses, state = _losses(mesh_cfg, jax.devices(), microbatches)
    assert reference[-1] < reference[0]  # it is learning, so the comparison means something
    print(
        f"{mesh_cfg} microbatches={microbatches}: max relative loss difference "
        f"{np.abs(losses / reference - 1).max():.1e}"
    )
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    # The parameters and the Adam moments really are split as the rules table says.
    wq = state.params["layers"]["attention"]["wq"]
    spec = tuple(wq.sharding.spec) + (None,) * (4 - len(wq.sharding.spec))
    expected = (None, "fsdp" if mesh_cfg.fsdp > 1 else None, "tensor" if mesh_cfg.tensor > 1 else None, None)
    assert spec == expected
    mu = state.opt_state[1][0].mu["layers"]["attention"]["wq"]
    assert mu.sharding.is_equivalent_to(wq.sharding, wq.ndim)


def test_weight_decay_skips_norms():
    params = init_params(MODEL, jax.random.key(0))
    optimizer, _ = make_optimizer(OptimConfig(peak_lr=0.1, warmup_steps=0, weight_decay=0.5), 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)
    assert float(jnp.abs(updates["norm"]["weight"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["feed_forward"]["w1"]).max()) > 0.0
    np.testing.assert_allclose(updates["output"], -0.1 * 0.5 * params["output"], rtol=1e-5)
    assert optax.tree.norm(updates) > 0


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_the_fit_check_is_a_lower_bound_of_what_the_compiler_allocates(remat):
    """check_fit refuses a run from the shapes alone; its figure must never exceed what the
    compiled step really needs (or it would refuse runs that fit), and it counts activations."""
    from llama_jax.config import Experiment, TrainConfig
    from llama_jax.optim import make_optimizer
    from llama_jax.sharding import activation_sharding, make_mesh
    from llama_jax.stages.pretrain import Pretrain
    from llama_jax.trainer import minimum_bytes_per_device

    exp = Experiment()
    exp = exp.replace(model=exp.model.replace(remat=remat), train=TrainConfig(batch_size=32, seq_len=128))
    mesh, stage = make_mesh(exp.mesh), Pretrain()
    optimizer, schedule = make_optimizer(exp.optim, exp.train.steps)
    shardings = stage.state_shardings(exp, optimizer, mesh)
    steps = stage.compile(exp, optimizer, schedule, mesh, shardings)
    state = stage.abstract_state(exp, optimizer, mesh, shardings)
    batch = {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=steps.batch_sharding[key])
        for key, (shape, dtype) in stage.batch_shapes(exp, exp.train.batch_size).items()
    }
    with activation_sharding(mesh, exp.mesh.rules):
        memory = steps.train_step.lower(state, batch).compile().memory_analysis()
    compiled = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    need = minimum_bytes_per_device(exp, mesh)
    params = sum(  # one device's share
        np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(state.params)
    )
    # Parameters, gradients and two Adam moments (the replicated norm weights slightly more).
    assert need["state"] <= 4 * params <= 1.01 * need["state"]
    assert 0 < need["activations"] and need["state"] + need["activations"] <= compiled
    double = minimum_bytes_per_device(exp.replace(train=TrainConfig(batch_size=64, seq_len=128)), mesh)
    assert double["activations"] == 2 * need["activations"]
