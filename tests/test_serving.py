"""The continuous-batching engine (llama_jax.serving) against generate() and direct formulas."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import MeshConfig, ModelConfig, SamplingConfig
from llama_jax.generate import generate
from llama_jax.model import init_params, param_logical_axes
from llama_jax.serving import Engine, QueueFull, Request, RequestError, sample_rows
from llama_jax.sharding import make_mesh, tree_shardings

CFG = ModelConfig(
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


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def run_all(engine, requests, timeout=120):
    """Submit (prompt, max_tokens, kwargs) requests; returns [(tokens, finish reason)]."""
    results = [None] * len(requests)
    finished = threading.Semaphore(0)
    made = []
    for i, (prompt, max_tokens, kwargs) in enumerate(requests):
        tokens = []

        def on_finish(reason, i=i, tokens=tokens):
            results[i] = (tokens, reason)
            finished.release()

        made.append(Request(prompt, max_tokens, on_token=tokens.append, on_finish=on_finish, **kwargs))
    engine.submit(*made)
    for _ in made:
        assert finished.acquire(timeout=timeout)
    return results


@pytest.mark.slow  # the server tests check the same through HTTP in the default run
def test_requests_joining_and_leaving_get_what_generate_gives(params):
    """More requests than slots, of mixed lengths, through a cache so short that its ring wraps
    many times: every greedy answer equals generate()'s for that prompt alone."""
    engine = Engine(params, CFG, slots=3, max_len=48, queue_size=32, buckets=(8, 16))
    engine.start()
    try:
        rng = np.random.default_rng(0)
        lengths = [3, 17, 9, 30, 1, 12, 5, 25, 7, 2, 16, 11]
        budgets = [20, 6, 30, 15, 32, 3, 25, 10, 12, 32, 8, 18]
        requests = [(rng.integers(1, 97, n).tolist(), m, {}) for n, m in zip(lengths, budgets)]
        results = run_all(engine, requests)
        for (prompt, max_tokens, _), (tokens, reason) in zip(requests, results):
            # (one shape for every reference: prompts padded to 32, then cut to the budget)
            alone = generate(params, CFG, [prompt], SamplingConfig(32), prompt_bucket=32)[0]
            assert tokens == alone[:max_tokens]
            assert reason == "length"
        assert engine.steps > 48  # the ring went round
    finally:
        engine.stop()


@pytest.mark.slow
def test_stop_tokens_end_a_request_and_free_its_slot(params):
    prompt = [5, 6, 7]
    free = generate(params, CFG, [prompt], SamplingConfig(12))[0]
    stop = free[4]
    engine = Engine(params, CFG, slots=1, max_len=32, queue_size=4, buckets=(8,))
    engine.start()
    try:
        # One slot: the second request runs only once the first has stopped.
        (first, reason), (second, _) = run_all(engine, [(prompt, 12, {"stop_ids": (stop,)}), ([9, 9], 5, {})])
        assert reason == "stop" and first == free[: free.index(stop)]
        assert second == generate(params, CFG, [[9, 9]], SamplingConfig(5))[0]
    finally:
        engine.stop()


@pytest.mark.slow
def test_sharded_slots_match_one_device(params):
    """Slots split over data=2 and heads over tensor=2 (4 simulated devices)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    placed = jax.device_put(params, tree_shardings(params, param_logical_axes(CFG), mesh))
    engine = Engine(placed, CFG, slots=4, max_len=40, queue_size=8, buckets=(16,), mesh=mesh)
    assert engine._cache.keys.sharding.spec[1] == "data"  # slots split over data
    assert "tensor" in tuple(engine._cache.keys.sharding.spec)  # kv heads over tensor
    engine.start()
    try:
        rng = np.random.default_rng(3)
        requests = [(rng.integers(1, 97, n).tolist(), 10, {}) for n in (4, 13, 7, 2, 9)]
        for (prompt, _, _), (tokens, _) in zip(requests, run_all(engine, requests)):
            assert tokens == generate(params, CFG, [prompt], SamplingConfig(10), prompt_bucket=16)[0]
    finally:
        engine.stop()


@pytest.mark.slow
def test_sampled_tokens_depend_on_the_seed_not_on_the_neighbours(params):
    engine = Engine(params, CFG, slots=4, max_len=40, queue_size=8, buckets=(16,))
    engine.start()
    try:
        sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 7}
        alone = run_all(engine, [([1, 2, 3], 20, sampled)])[0][0]
        crowd = run_all(
            engine,
            [([4, 4], 20, {"temperature": 0.8, "seed": 1}), ([1, 2, 3], 20, sampled), ([8], 20, {})],
        )
        assert crowd[1][0] == alone
        other_seed = run_all(engine, [([1, 2, 3], 20, dict(sampled, seed=8))])[0][0]
        assert other_seed != alone
    finally:
        engine.stop()


def test_queue_bound_and_cancel(params):
    engine = Engine(params, CFG, slots=2, max_len=32, queue_size=1, buckets=(8,))
    finished = []
    requests = [Request([1, 2], 5, on_finish=finished.append) for _ in range(3)]
    engine.submit(*requests)  # two for the (free) slots, one queued; the engine is not running
    with pytest.raises(QueueFull):
        engine.submit(Request([1], 5))
    engine.cancel(requests[2])
    assert finished == ["cancelled"] and engine.load()["waiting"] == 2
    engine.submit(Request([3], 5))  # room again


def test_requests_that_can_never_run_are_refused(params):
    engine = Engine(params, CFG, slots=2, max_len=32, queue_size=1, buckets=(8,))
    for request, words in [
        (Request([], 4), "empty"),
        (Request([1] * 30, 4), "exceed"),
        (Request([1, 2], 0), "max_tokens"),
        (Request([1, 500], 4), "vocabulary"),
    ]:
        with pytest.raises(RequestError, match=words):
            engine.submit(request)
    assert engine.load()["waiting"] == 0
    # A cache of 0 tokens is refused, not read as "the model's whole context".
    with pytest.raises(RequestError, match="cache length"):
        Engine(params, CFG, slots=2, max_len=0, queue_size=1, buckets=(8,))


def test_sample_rows_settings_per_row():
    """Row by row against direct formulas: temperature 0 is argmax, top_k=1 and a tiny top_p
    leave only the argmax, top-k never samples outside the k best, and sampled frequencies at
    temperature 1 follow softmax(logits)."""
    logits = jnp.array(np.random.default_rng(0).normal(size=(5, 10)) * 2, jnp.float32)
    best = np.argmax(np.asarray(logits), axis=-1)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    temps = jnp.array([0.0, 1.0, 1.0, 1.0, 1.0])
    top_k = jnp.array([0, 1, 0, 3, 0])
    top_p = jnp.array([1.0, 1.0, 1e-4, 1.0, 1.0])
    draws = np.stack(
        [
            np.asarray(sample_rows(logits, jax.random.split(jax.random.key(i), 5), temps, top_k, top_p))
            for i in range(400)
        ]
    )
    assert (
        (draws[:, 0] == best[0]).all() and (draws[:, 1] == best[1]).all() and (draws[:, 2] == best[2]).all()
    )
    assert np.isin(draws[:, 3], top3[3]).all() and len(set(draws[:, 3])) == 3
    expected = np.asarray(jax.nn.softmax(logits[4]))
    observed = np.bincount(draws[:, 4], minlength=10) / len(draws)
    assert np.abs(observed - expected).max() < 0.08
