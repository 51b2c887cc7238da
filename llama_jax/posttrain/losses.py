"""The post-training objectives as pure functions of arrays (docs/reference.md, "Post-training").

Per-token arrays are [B, T] with a float `mask` [B, T] (1 on the tokens that count); per-sequence
arrays are [B]. Functions that return one value per example leave the reduction to the caller, so
a training step can sum over microbatches and divide once.

    SFT            masked next-token NLL: `llama_jax.loss.cross_entropy_sum` with the assistant mask
    (per-token log-probs, the input of the others, come from `llama_jax.loss.token_log_probs`)
    reward model   bradley_terry_loss   -log sigmoid(r_chosen - r_rejected - margin)
    DPO            dpo_loss             -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))
                                        + nll_coef * (per-token NLL of the chosen response)
    PPO            kl_penalized_rewards, whiten, gae, ppo_policy_loss, ppo_value_loss
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.loss import next_token


def masked_sum(x, mask):
    """Sum over the last axis of x where mask is set: [B, T] -> [B]."""
    return jnp.sum(x * mask, axis=-1)


def masked_mean(x, mask):
    """Mean of x over all the entries where mask is set (0 if none)."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mean_nll(log_probs, mask):
    """Per-sequence NLL normalised per token: -sum(log p * mask) / sum(mask), [B]."""
    return -masked_sum(log_probs, mask) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def bradley_terry_loss(chosen, rejected, margin=0.0):
    """Llama 2's reward-model loss per pair, -log sigmoid(r_c - r_r - m) (m = 0: Llama 3), and
    whether the pair is ranked right (r_c > r_r) as 0/1. All [B]."""
    difference = chosen - rejected
    return -jax.nn.log_sigmoid(difference - margin), (difference > 0).astype(jnp.float32)


def dpo_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    beta: float,
    *,
    chosen_nll=None,
    nll_coef: float = 0.0,
) -> dict:
    """DPO per pair, from sequence log-probabilities [B] (sums over the response tokens).

    The implicit rewards are beta * (log pi - log ref); the loss is -log sigmoid(reward margin),
    plus, as in Llama 3, `nll_coef` times `chosen_nll` (the chosen response's NLL per token under
    the policy, see `mean_nll`). Returns per-pair loss, chosen_reward, rejected_reward, margin and
    accuracy (1 where the chosen reward is the larger)."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -jax.nn.log_sigmoid(margin)
    if nll_coef:
        loss = loss + nll_coef * chosen_nll
    return {
        "loss": loss,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "margin": margin,
        "accuracy": (margin > 0).astype(jnp.float32),
    }


# --- PPO (Llama 2) ------------------------------------------------------------------------------


def last_index(mask):
    """Index of the last set entry of each row of mask [B, T] (0 for an empty row), [B]."""
    length = mask.shape[-1]
    return length - 1 - jnp.argmax(jnp.flip(mask > 0, axis=-1), axis=-1)


def kl_penalized_rewards(scores, log_probs, ref_log_probs, mask, kl_coef: float):
    """Per-token rewards [B, T]: -kl_coef * (log pi - log ref) on every response token, and the
    sequence's score [B] added on its last response token. Returns (rewards, kl) with kl the
    per-token estimate log pi - log ref of the sampled tokens (0 off the mask)."""
    kl = (log_probs - ref_log_probs) * mask
    last = jax.nn.one_hot(last_index(mask), mask.shape[-1], dtype=jnp.float32) * mask
    return -kl_coef * kl + scores[:, None] * last, kl


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the entries where mask is set; with shift_mean=False the mean is
    added back (only the scale changes). Entries off the mask become 0."""
    mean = masked_mean(x, mask)
    variance = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens [B, T] (each row's response a
    contiguous run of the mask; the value after its last token is 0). Returns (advantages,
    returns), both 0 off the mask:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
        returns_t = A_t + V_t."""
    values = values * mask
    next_mask = next_token(mask)
    next_values = next_token(values) * next_mask
    deltas = rewards + gamma * next_values - values

    def step(following, xs):
        delta, continues = xs
        advantage = delta + gamma * lam * continues * following
        return advantage, advantage

    _, advantages = jax.lax.scan(
        step, jnp.zeros(rewards.shape[0], rewards.dtype), (deltas.T, next_mask.T), reverse=True
    )
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip: float = 0.2):
    """The clipped surrogate objective as a loss, averaged over the masked tokens:
    mean(max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))), ratio = pi / pi_old.
    Returns (loss, {"clip_fraction", "approx_kl"})."""
    log_ratio = log_probs - old_log_probs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
    }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """0.5 * mean(max((V - R)^2, (V_clipped - R)^2)) over the masked tokens, with V_clipped the
    new value kept within `clip` of the value at rollout time."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns)), mask)


def group_advantages(scores, group_size: int, eps: float = 1e-6):
    """GRPO's advantages [N] of scores [N] sampled `group_size` to a prompt (consecutive): each
    score less its group's mean, over its group's standard deviation (0 where a group's scores
    are all equal: nothing to learn from it)."""
    groups = scores.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    return (centred / (groups.std(axis=1, keepdims=True) + eps)).reshape(-1)


def grpo_loss(log_probs, old_log_probs, ref_log_probs, advantages, mask, clip: float, kl_coef: float):
    """GRPO's objective as a loss (DeepSeekMath, 2402.03300): per response token the clipped
    surrogate of the sequence's advantage [B], plus kl_coef x the KL to the reference by the
    unbiased estimator exp(ref - pi) - (ref - pi) - 1; averaged over each response's tokens, then
    over the responses. Returns (loss, {"clip_fraction", "kl"})."""
    ratio = jnp.exp(log_probs - old_log_probs)
    a = advantages[:, None]
    surrogate = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    to_ref = ref_log_probs - log_probs
    kl = jnp.exp(to_ref) - to_ref - 1.0
    per_token = surrogate + kl_coef * kl
    tokens = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    responses = jnp.maximum(jnp.sum(jnp.sum(mask, axis=-1) > 0), 1.0)
    loss = jnp.sum(jnp.sum(per_token * mask, axis=-1) / tokens) / responses
    stats = {
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), mask),
        "kl": masked_mean(kl, mask),
    }
    return loss, stats
