"""LoRA and QLoRA: a fresh adapter (B = 0) leaves the model exactly its base, merged equals
unmerged, training moves the adapters alone (the base is bit-identical, gradients and optimizer
state hold the adapters only), a 2x2x2 mesh trains as one device does, QLoRA's quantized bases, and
bad settings in one sentence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import lora as lora_lib
from llama_jax import lora_training
from llama_jax.config import (
    ConfigError,
    Experiment,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
)
from llama_jax.model import Llama, init_params, lm_head
from llama_jax.optim import make_optimizer
from llama_jax.quantize import NF4_CODE, NF4Weight, QuantizedWeight, quantize_base, quantize_nf4
from llama_jax.sharding import activation_sharding, make_mesh
from llama_jax.stages.pretrain import Pretrain
from llama_jax.steps import global_batch

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
MODEL = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=256,
    max_seq_len=64,
    compute_dtype="float32",
)


def _lora(**kw):
    return LoraConfig(**{"rank": 4, "alpha": 8.0, "targets": ALL, **kw})


def _tokens(batch=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (batch, length)), jnp.int32)


def _random_adapters(params, seed=1, scale=0.05):
    adapters, _ = lora_lib.split(params)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_fresh_adapter_leaves_the_model_exactly_its_base(scan_layers):
    cfg = MODEL.replace(scan_layers=scan_layers)
    params = init_params(cfg.replace(lora=_lora()), jax.random.key(0))
    adapters, base = lora_lib.split(params)
    # A and B on every targeted weight, B zero and A not (else nothing could ever train).
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert len(names) == 2 * (7 * (1 if scan_layers else 2) + 1)
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        zero = not np.asarray(leaf).any()
        assert zero == jax.tree_util.keystr(path).endswith("_lora_b']"), path
    tokens = _tokens()
    plain = Llama(cfg).apply({"params": base}, tokens)
    adapted = Llama(cfg.replace(lora=_lora())).apply({"params": params}, tokens)
    assert np.array_equal(np.asarray(plain), np.asarray(adapted))


@pytest.mark.slow
def test_merged_equals_unmerged_and_switched_off_is_the_base():
    lora = _lora()
    params = init_params(MODEL.replace(lora=lora), jax.random.key(0))
    _, base = lora_lib.split(params)
    trained = lora_lib.merge(base, _random_adapters(params))
    tokens = _tokens()
    unmerged = Llama(MODEL.replace(lora=lora)).apply({"params": trained}, tokens)
    merged = Llama(MODEL).apply({"params": lora_lib.merged_weights(trained, lora)}, tokens)
    base_logits = Llama(MODEL).apply({"params": base}, tokens)
    assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 0.1  # the adapters matter
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=2e-5)
    # The adapted model without its adapters is the base (DPO's reference under LoRA).
    off = Llama(MODEL.replace(lora=lora)).apply({"params": base}, tokens)
    assert np.array_equal(np.asarray(off), np.asarray(base_logits))
    # The chunked loss's head sees the adapter too.
    head = lm_head(trained, MODEL.replace(lora=lora))
    np.testing.assert_allclose(
        np.asarray(head), np.asarray(lora_lib.merged_weights(trained, lora)["output"]), atol=1e-6
    )


@pytest.mark.slow
def test_the_adapter_is_x_a_b_times_alpha_over_rank():
    """One layer's wq against the formula, from the logits' change of a one-layer model."""
    cfg = MODEL.replace(n_layers=1)
    lora = _lora(targets=("wq",), alpha=3.0, rank=2)
    params = init_params(cfg.replace(lora=lora), jax.random.key(0))
    adapters = _random_adapters(params, scale=0.3)
    _, base = lora_lib.split(params)
    a = np.asarray(adapters["layers"]["attention"]["wq_lora_a"][0])
    b = np.asarray(adapters["layers"]["attention"]["wq_lora_b"][0])
    folded = jax.tree.map(lambda x: x, base)
    wq = np.asarray(base["layers"]["attention"]["wq"][0])
    direct = wq + 1.5 * (a @ b.reshape(2, -1)).reshape(wq.shape)  # alpha / rank = 1.5
    folded["layers"]["attention"]["wq"] = jnp.asarray(direct[None])
    tokens = _tokens()
    ours = Llama(cfg.replace(lora=lora)).apply({"params": lora_lib.merge(base, adapters)}, tokens)
    expected = Llama(cfg).apply({"params": folded}, tokens)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=2e-5)


def _batch(rng, batch=8, length=32):
    tokens = rng.integers(1, 256, (batch, length)).astype(np.int32)
    return {
        "tokens": tokens,
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, length), np.int32),
        "loss_mask": np.ones((batch, length), np.float32),
    }


def _train(mesh_cfg, devices, lora, steps=4, microbatches=1):
    exp = Experiment(
        model=MODEL,
        lora=lora,
        mesh=mesh_cfg,
        train=TrainConfig(steps=steps, batch_size=8, seq_len=32, microbatches=microbatches, loss_chunk=16),
        optim=OptimConfig(peak_lr=3e-2, warmup_steps=1),
    )
    mesh = make_mesh(exp.mesh, devices)
    optimizer, schedule = make_optimizer(exp.optim, steps)
    stage = Pretrain()
    module = stage.module(exp)
    base = lora_training.place_base(module, exp, mesh)
    base_before = jax.tree.map(np.array, base)
    compiled = stage.compile(exp, optimizer, schedule, mesh)
    state = stage.create_state(exp, optimizer, mesh, jax.random.key(0))
    losses = []
    with activation_sharding(mesh, exp.mesh.rules):
        for _ in range(steps):
            batch = global_batch(_batch(np.random.default_rng(0)), compiled.batch_sharding)
            state, metrics = compiled.train_step(state, batch, (base, None))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state, base, base_before


@pytest.mark.slow
def test_training_moves_the_adapters_alone():
    lora = _lora(targets=("wq", "wv", "w2"))
    losses, state, base, base_before = _train(MeshConfig(1, 1, 1), jax.devices()[:1], lora)
    assert losses[-1] < losses[0] - 0.05
    # The state (hence gradients, Adam's moments and checkpoints) holds the adapters only.
    for tree in (state.params, state.opt_state[1][0].mu, state.opt_state[1][0].nu):
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        assert names and all(n.endswith(("_lora_a']", "_lora_b']")) for n in names), names
    assert len(jax.tree.leaves(state.params)) == 2 * 3
    assert any(np.asarray(b).any() for b in jax.tree.leaves(state.params))  # B left zero
    # The base the steps read is bit for bit what it was.
    for now, before in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
        assert np.array_equal(np.asarray(now), before)


@pytest.mark.slow  # two meshes trained: after the suite
@pytest.mark.parametrize("microbatches", [1, 2])
def test_lora_on_a_2x2x2_mesh_equals_one_device(microbatches):
    assert len(jax.devices()) == 8
    lora = _lora(targets=("wq", "wk", "wo", "w1", "w2", "output"))
    reference, ref_state, _, _ = _train(MeshConfig(1, 1, 1), jax.devices()[:1], lora)
    losses, state, base, _ = _train(MeshConfig(2, 2, 1, 2), jax.devices(), lora, microbatches=microbatches)
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    # Adam's first steps magnify float reordering a little: 1e-3 of a value, or 2e-5.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-5)
    # The adapters shard with the mesh like their base: A's input side as the weight's.
    wq, a = base["layers"]["attention"]["wq"], state.params["layers"]["attention"]["wq_lora_a"]
    assert tuple(wq.sharding.spec)[:2] == (None, "fsdp") and tuple(a.sharding.spec)[:2] == (None, "fsdp")
    b = state.params["layers"]["attention"]["wq_lora_b"]
    assert "tensor" in tuple(b.sharding.spec)  # B's heads as wq's heads


@pytest.mark.slow
def test_dropout_draws_new_masks_each_step_and_none_in_evaluation():
    lora = _lora(targets=("wq", "w1"), dropout=0.5)
    exp = Experiment(model=MODEL, lora=lora, train=TrainConfig(batch_size=4, seq_len=16, loss_chunk=16))
    loss = lora_training.adapted_loss(Pretrain().loss(exp))
    params = init_params(exp.model, jax.random.key(0))
    adapters = _random_adapters(params, scale=0.5)
    _, base = lora_lib.split(params)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0), 4, 16).items()}
    plain = float(loss(adapters, batch, (base, None))[0])
    first = float(loss(adapters, batch, (base, None), rng=jax.random.key(1))[0])
    again = float(loss(adapters, batch, (base, None), rng=jax.random.key(1))[0])
    other = float(loss(adapters, batch, (base, None), rng=jax.random.key(2))[0])
    assert first == again and first != other and first != plain
    # Without dropout the key changes nothing.
    exp0 = exp.replace(lora=lora.__class__(rank=4, alpha=8.0, targets=("wq", "w1")))
    loss0 = lora_training.adapted_loss(Pretrain().loss(exp0))
    assert float(loss0(adapters, batch, (base, None), rng=jax.random.key(1))[0]) == plain


def test_nf4_code_and_double_quantized_scales():
    # The NormalFloat4 code: 16 sorted values in [-1, 1] with an exact zero, 8 above it, 7 below.
    assert NF4_CODE.shape == (16,) and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert (np.diff(NF4_CODE) > 0).all() and (NF4_CODE == 0).sum() == 1 and (NF4_CODE > 0).sum() == 8
    w = jax.random.normal(jax.random.key(0), (256, 96)) * 0.02
    q = quantize_nf4(w)
    assert q.codes.dtype == jnp.uint4 and q.block_scale.dtype == jnp.int8 and q.block_scale.shape == (4, 96)
    # Every weight is its block's absmax times the nearest code value (up to the scale's int8 step).
    blocks = np.asarray(w).reshape(4, 64, 96)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    direct = NF4_CODE[np.abs(blocks[..., None] / absmax[..., None] - NF4_CODE).argmin(-1)] * absmax
    np.testing.assert_allclose(np.asarray(q.dequantize()).reshape(4, 64, 96), direct, rtol=0.02, atol=1e-4)
    error = np.linalg.norm(np.asarray(q.dequantize()) - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert error < 0.12


@pytest.mark.slow
@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("nf4", 0.3)])
def test_qlora_base_is_quantized_and_computes_as_its_dequantized_weights(mode, tolerance):
    lora = _lora(targets=("wq", "w2"), quantize_base=mode)
    cfg = MODEL.replace(lora=lora)
    params = init_params(cfg, jax.random.key(0))
    adapters, base = lora_lib.split(params)
    adapters = _random_adapters(params)
    qbase = jax.jit(lambda b: quantize_base(b, mode))(base)
    wq = qbase["layers"]["attention"]["wq"]
    assert isinstance(wq, QuantizedWeight if mode == "int8" else NF4Weight)
    assert not isinstance(qbase["tok_embeddings"], (QuantizedWeight, NF4Weight))
    tokens = _tokens()
    quantized = Llama(cfg).apply({"params": lora_lib.merge(qbase, adapters)}, tokens)
    # The same model with the dequantized weights in place: equal up to float rounding (the
    # stacked layers' weights dequantized layer by layer).
    dequantized = jax.tree.map(
        lambda x: jax.vmap(lambda q: q.dequantize())(x) if isinstance(x, (QuantizedWeight, NF4Weight)) else x,
        qbase,
        is_leaf=lambda x: isinstance(x, (QuantizedWeight, NF4Weight)),
    )
    expected = Llama(cfg).apply({"params": lora_lib.merge(dequantized, adapters)}, tokens)
    np.testing.assert_allclose(np.asarray(quantized), np.asarray(expected), atol=1e-4)
    full = Llama(cfg).apply({"params": lora_lib.merge(base, adapters)}, tokens)
    assert float(jnp.max(jnp.abs(quantized - full))) < tolerance * float(jnp.max(jnp.abs(full)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_trains_on_a_sharded_quantized_base(mode):
    lora = _lora(targets=("wq", "wv", "w1", "w2"), quantize_base=mode)
    losses, state, base, base_before = _train(MeshConfig(1, 4, 1, 2), jax.devices(), lora)
    assert losses[-1] < losses[0] - 0.05
    w1 = base["layers"]["feed_forward"]["w1"]
    stored = w1.value if mode == "int8" else w1.codes
    assert stored.dtype == (jnp.int8 if mode == "int8" else jnp.uint4)
    assert "fsdp" in tuple(stored.sharding.spec) and "tensor" in tuple(stored.sharding.spec)
    for now, before in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
        assert np.array_equal(np.asarray(now), before)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["lora.rank=4", "lora.targets=[wq,attention]"], "'attention', which is not a weight LoRA can adapt"),
        (["lora.rank=4", "lora.targets=[]"], "lora.targets is empty"),
        (["lora.rank=300"], "lora.rank=300 is larger than the smaller side of wq (256 x 256)"),
        (["lora.rank=-2"], "lora.rank must be at least 0"),
        (["lora.rank=4", "lora.dropout=1.0"], "lora.dropout must be in [0, 1)"),
        (["lora.rank=4", "lora.quantize_base=int4"], "lora.quantize_base must be one of int8, nf4"),
        (
            ["lora.rank=4", "lora.targets=[output]", "model.tie_embeddings=true"],
            "ties its head to the embeddings",
        ),
    ],
)
def test_bad_lora_settings_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Experiment(), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_resume_with_other_adapters_is_refused_not_taken_for_damage(tmp_path):
    import dataclasses

    from llama_jax.checkpoint import CheckpointError, TrainCheckpointer
    from llama_jax.config import CheckpointConfig

    checkpoints = TrainCheckpointer(tmp_path, CheckpointConfig())
    saved = {"model": dataclasses.asdict(MODEL.replace(lora=_lora(rank=4, targets=("wq", "wv"))))}
    checkpoints._check_model(saved, MODEL.replace(lora=_lora(rank=4, targets=("wv", "wq"), alpha=2.0)))
    for other in (MODEL.replace(lora=_lora(rank=8, targets=("wq", "wv"))), MODEL):
        with pytest.raises(CheckpointError, match="adapters LoRA rank 4 on wq, wv -> "):
            checkpoints._check_model(saved, other)


def test_the_fit_check_counts_a_frozen_base_once_and_the_adapters_state():
    """A QLoRA 8B fits one 16 GiB chip (the compiler's figure is in the README): the lower bound
    must not refuse it, as counting the base's gradients and moments would."""
    from llama_jax.config import load_experiment
    from llama_jax.trainer import minimum_bytes_per_device

    exp = load_experiment("llama3_1_8b_qlora_sft")
    exp = exp.replace(model=exp.model.replace(compute_dtype="bfloat16"))
    mesh = make_mesh(exp.mesh, jax.devices()[:1])
    need = minimum_bytes_per_device(exp, mesh)
    assert 3.5 * 2**30 < need["state"] < 12.9 * 2**30  # 8B: NF4 matrices at least; the compiler's total
    full = minimum_bytes_per_device(exp.replace(lora=LoraConfig()), mesh)
    assert full["state"] > 10 * need["state"]
