"""Post-training losses against direct numpy computations on small tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ModelConfig
from llama_jax.loss import token_log_probs
from llama_jax.model import Llama, init_params, lm_head
from llama_jax.posttrain import losses
from llama_jax.scalar_model import ScalarModel, last_token_values, with_backbone

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=96,
    max_seq_len=32,
    compute_dtype="float32",
    init_std=0.1,
)


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _response_mask(rng, batch, length):
    """Each row: a contiguous run of response tokens somewhere inside the row."""
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        start = rng.integers(0, length - 2)
        mask[b, start : rng.integers(start + 1, length + 1)] = 1
    return mask


def test_token_log_probs_match_log_softmax():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 12)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)

    @jax.jit
    def run(params):
        hidden = Llama(CFG).apply({"params": params}, tokens, method=Llama.hidden)
        return (
            token_log_probs(hidden, lm_head(params, CFG), jnp.asarray(targets), chunk=5),
            Llama(CFG).apply({"params": params}, tokens),
        )

    got, logits = (np.asarray(x, np.float64) for x in run(params))
    expected = np.empty((3, 12))
    for b in range(3):
        for t in range(12):
            row = logits[b, t]
            expected[b, t] = row[targets[b, t]] - row.max() - np.log(np.exp(row - row.max()).sum())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    mask = _response_mask(np.random.default_rng(1), 3, 12)
    np.testing.assert_allclose(
        np.asarray(losses.mean_nll(jnp.asarray(got), mask)),
        [-(expected[b] * mask[b]).sum() / mask[b].sum() for b in range(3)],
        rtol=1e-5,
    )


@pytest.mark.parametrize("margin", [0.0, np.array([1.0, 2 / 3, 0.0, 3.0, 1 / 3])])
def test_bradley_terry(margin):
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=5), rng.normal(size=5)
    loss, correct = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected), margin)
    m = np.broadcast_to(margin, (5,))
    expected = [-np.log(1 / (1 + np.exp(-(c - r - mi)))) for c, r, mi in zip(chosen, rejected, m)]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(correct), (chosen > rejected).astype(np.float32))


def test_margin_raises_the_loss_of_a_right_pair():
    base, _ = losses.bradley_terry_loss(jnp.array([1.0]), jnp.array([0.0]))
    with_margin, _ = losses.bradley_terry_loss(jnp.array([1.0]), jnp.array([0.0]), 1.0)
    assert float(with_margin[0]) == pytest.approx(np.log(2)) and float(base[0]) < np.log(2)


@pytest.mark.parametrize("nll_coef", [0.0, 0.2])
def test_dpo(nll_coef):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(size=6) * 5 for _ in range(4))
    nll = rng.uniform(0.5, 3.0, size=6)
    beta = 0.1
    out = losses.dpo_loss(
        *(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta, chosen_nll=jnp.asarray(nll), nll_coef=nll_coef
    )
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    expected = -_log_sigmoid(beta * ((pc - rc) - (pr - rr))) + nll_coef * nll
    np.testing.assert_allclose(np.asarray(out["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["chosen_reward"]), chosen_reward, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["rejected_reward"]), rejected_reward, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["margin"]), margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["accuracy"]), (margin > 0).astype(np.float32))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    grad = jax.grad(lambda pc, pr: losses.dpo_loss(pc, pr, 0.0, 0.0, 0.1)["loss"], argnums=(0, 1))
    g_chosen, g_rejected = grad(jnp.float32(0.0), jnp.float32(0.0))
    assert float(g_chosen) == pytest.approx(-0.05) and float(g_rejected) == pytest.approx(0.05)


def test_kl_penalized_rewards():
    rng = np.random.default_rng(2)
    mask = _response_mask(rng, 4, 9)
    logp, ref = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    scores = rng.normal(size=4)
    rewards, kl = losses.kl_penalized_rewards(*(jnp.asarray(x) for x in (scores, logp, ref, mask)), 0.05)
    expected = np.zeros((4, 9))
    for b in range(4):
        positions = np.flatnonzero(mask[b])
        for t in positions:
            expected[b, t] = -0.05 * (logp[b, t] - ref[b, t])
        expected[b, positions[-1]] += scores[b]
    np.testing.assert_allclose(np.asarray(rewards), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(kl), (logp - ref) * mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    rng = np.random.default_rng(3)
    x, mask = rng.normal(3.0, 2.0, size=(3, 7)), _response_mask(rng, 3, 7)
    values = x[mask > 0]
    expected = (x - values.mean()) / np.sqrt(values.var() + 1e-8) + (0 if shift_mean else values.mean())
    got = np.asarray(losses.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean))
    np.testing.assert_allclose(got[mask > 0], expected[mask > 0], rtol=1e-4)
    assert np.all(got[mask == 0] == 0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    rng = np.random.default_rng(4)
    mask = _response_mask(rng, 5, 10)
    rewards, values = rng.normal(size=(5, 10)) * mask, rng.normal(size=(5, 10))
    advantages, returns = (
        np.asarray(a) for a in losses.gae(*(jnp.asarray(x) for x in (rewards, values, mask)), gamma, lam)
    )
    for b in range(5):
        positions = list(np.flatnonzero(mask[b]))
        v = [values[b, t] for t in positions] + [0.0]  # the value after the last token is 0
        r = [rewards[b, t] for t in positions]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(r))]
        for i, t in enumerate(positions):
            expected = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(r) - i))
            assert advantages[b, t] == pytest.approx(expected, rel=1e-4, abs=1e-5)
            assert returns[b, t] == pytest.approx(expected + values[b, t], rel=1e-4, abs=1e-5)
        off = np.flatnonzero(mask[b] == 0)
        assert np.all(advantages[b, off] == 0) and np.all(returns[b, off] == 0)


def test_ppo_policy_loss():
    rng = np.random.default_rng(5)
    mask = _response_mask(rng, 4, 8)
    old = rng.normal(size=(4, 8))
    new = old + rng.normal(scale=0.4, size=(4, 8))
    adv = rng.normal(size=(4, 8))
    loss, stats = losses.ppo_policy_loss(*(jnp.asarray(x) for x in (new, old, adv, mask)), clip=0.2)
    ratio = np.exp(new - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    on = mask > 0
    assert float(loss) == pytest.approx(per_token[on].mean(), rel=1e-5)
    clipped = -adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio
    assert float(stats["clip_fraction"]) == pytest.approx(clipped[on].mean(), rel=1e-5)
    assert 0 < float(stats["clip_fraction"]) < 1
    assert float(stats["approx_kl"]) == pytest.approx((0.5 * (new - old) ** 2)[on].mean(), rel=1e-5)


def test_ppo_value_loss():
    rng = np.random.default_rng(6)
    mask = _response_mask(rng, 4, 8)
    old, returns = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    new = old + rng.normal(scale=0.5, size=(4, 8))
    got = float(losses.ppo_value_loss(*(jnp.asarray(x) for x in (new, old, returns, mask)), clip=0.2))
    clipped = old + np.clip(new - old, -0.2, 0.2)
    per_token = 0.5 * np.maximum((new - returns) ** 2, (clipped - returns) ** 2)
    assert got == pytest.approx(per_token[mask > 0].mean(), rel=1e-5)


def _unboxed_init(rng):
    import flax.linen as nn

    return nn.meta.unbox(ScalarModel(CFG).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def test_scalar_model_is_a_linear_head_on_the_llama_backbone():
    llama_params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(7))
    model = ScalarModel(CFG)
    fresh = jax.jit(_unboxed_init)(jax.random.key(8))
    assert set(fresh) == {"backbone", "score"} and "output" not in fresh["backbone"]
    params = with_backbone(fresh, llama_params)
    rng = np.random.default_rng(9)
    params["score"] = {
        "kernel": jnp.asarray(rng.normal(size=(CFG.dim, 1)), jnp.float32),
        "bias": jnp.asarray([0.3], jnp.float32),
    }
    tokens = rng.integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
    segments = np.ones((2, 10), np.int32)
    segments[1, 6:] = 0  # right padding
    positions = np.tile(np.arange(10, dtype=np.int32), (2, 1))
    values = np.asarray(jax.jit(model.apply)({"params": params}, tokens, positions, segments))
    hidden = np.asarray(
        jax.jit(lambda p: Llama(CFG).apply({"params": p}, tokens, positions, segments, method=Llama.hidden))(
            llama_params
        )
    )
    expected = hidden @ np.asarray(params["score"]["kernel"])[:, 0] + 0.3
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4)
    scores = np.asarray(last_token_values(jnp.asarray(values), jnp.asarray(segments)))
    np.testing.assert_allclose(scores, [values[0, 9], values[1, 5]])


def test_with_backbone_refuses_another_shape():
    fresh = jax.eval_shape(lambda: _unboxed_init(jax.random.key(0)))
    bad = {"tok_embeddings": np.zeros((CFG.vocab_size, CFG.dim))}
    with pytest.raises(ValueError, match="does not match"):
        with_backbone(fresh, bad)


def test_grpo_advantages_and_loss_match_a_direct_computation():
    """GRPO (DeepSeekMath): advantages are scores normalised within each prompt's group; the loss
    is the clipped surrogate plus kl_coef x the k3 KL estimate, per token, averaged over each
    response's tokens and then over responses."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12)
    got = np.asarray(losses.group_advantages(jnp.asarray(scores), 4))
    for g in range(3):
        group = scores[4 * g : 4 * g + 4]
        np.testing.assert_allclose(got[4 * g : 4 * g + 4], (group - group.mean()) / group.std(), rtol=1e-4)
    assert np.all(np.asarray(losses.group_advantages(jnp.ones(8), 4)) == 0)  # nothing to learn

    log_probs, old, ref = (rng.normal(size=(3, 6)) * 0.3 - 1 for _ in range(3))
    mask = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]], np.float32)
    advantages = np.array([1.5, -0.7, 0.2])
    loss, stats = losses.grpo_loss(
        *(jnp.asarray(x) for x in (log_probs, old, ref, advantages, mask)), clip=0.2, kl_coef=0.04
    )
    expected = []
    for b in range(3):
        terms = []
        for t in np.flatnonzero(mask[b]):
            ratio = np.exp(log_probs[b, t] - old[b, t])
            surrogate = -min(ratio * advantages[b], np.clip(ratio, 0.8, 1.2) * advantages[b])
            kl = np.exp(ref[b, t] - log_probs[b, t]) - (ref[b, t] - log_probs[b, t]) - 1
            terms.append(surrogate + 0.04 * kl)
        expected.append(np.mean(terms))
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
    assert 0 < float(stats["kl"]) and 0 <= float(stats["clip_fraction"]) <= 1
