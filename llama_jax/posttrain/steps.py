"""The loss of one batch for the reward-model and DPO stages, in the form `steps.py`'s step wants:
`loss(params, batch, frozen) -> (loss_sum, count, metric_sums)`; the step sums them over
microbatches and divides by `count` (the number of pairs) once.

A pair batch (see data.pad_pair) holds, for side in (chosen, rejected), `{side}_tokens`,
`{side}_segment_ids` (1 on the sequence, 0 on padding), `{side}_loss_mask` and
`{side}_response_mask` [B, T], `margin` and `weight` [B] (0 for filler pairs, which count for
nothing); with precomputed reference log-probs also `reference_chosen` and `reference_rejected`
[B]. Both sides go through the model as one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from llama_jax.loss import next_token, token_log_probs
from llama_jax.model import Llama, lm_head
from llama_jax.posttrain.losses import bradley_terry_loss, dpo_loss, masked_sum, mean_nll
from llama_jax.scalar_model import ScalarModel, last_token_values
from llama_jax.sharding import batch_sharding

SIDE_KEYS = ("tokens", "segment_ids", "loss_mask", "response_mask")
REFERENCE_KEYS = ("reference_chosen", "reference_rejected")


def pair_batch_shapes(exp, batch_size: int) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """{key: (shape, dtype)} of a pair batch of `batch_size` pairs for this experiment."""
    length = exp.train.seq_len
    shapes = {}
    for side in ("chosen", "rejected"):
        for key in SIDE_KEYS:
            dtype = jnp.int32 if key in ("tokens", "segment_ids") else jnp.float32
            shapes[f"{side}_{key}"] = ((batch_size, length), dtype)
    shapes["margin"] = ((batch_size,), jnp.float32)
    shapes["weight"] = ((batch_size,), jnp.float32)
    if exp.posttrain.stage == "dpo" and exp.posttrain.reference_logprobs == "precompute":
        shapes.update({key: ((batch_size,), jnp.float32) for key in REFERENCE_KEYS})
    return shapes


def pair_batch_shardings(exp, mesh) -> dict[str, NamedSharding]:
    """Every array of a pair batch split along its rows as the rules shard `batch`."""
    return {
        key: batch_sharding(mesh, exp.mesh.rules, len(shape))
        for key, (shape, _) in pair_batch_shapes(exp, 1).items()
    }


def _both(batch, key):
    return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)


def next_token_log_probs(params, cfg, tokens, segment_ids, chunk: int):
    """log p(tokens[:, t + 1]) at every position t, [B, T] (garbage where the target is padding:
    weigh with `next_token(mask)`)."""
    hidden = Llama(cfg).apply({"params": params}, tokens, None, segment_ids, method=Llama.hidden)
    return token_log_probs(hidden, lm_head(params, cfg), next_token(tokens), chunk)


def response_log_probs(params, cfg, batch, chunk: int):
    """(chosen, rejected) sums of log p over each response's DPO mask, [B] each."""
    log_probs = next_token_log_probs(params, cfg, _both(batch, "tokens"), _both(batch, "segment_ids"), chunk)
    sums = masked_sum(log_probs, next_token(_both(batch, "response_mask")))
    n = batch["margin"].shape[0]
    return sums[:n], sums[n:]


def reward_model_loss(params, batch, frozen, exp):
    """Bradley-Terry on the scores at each sequence's last token, with the pair's margin if
    `posttrain.use_margin` (Llama 2)."""
    del frozen
    segment_ids = _both(batch, "segment_ids")
    values = ScalarModel(exp.model).apply({"params": params}, _both(batch, "tokens"), None, segment_ids)
    scores = last_token_values(values, segment_ids)
    n = batch["margin"].shape[0]
    chosen, rejected = scores[:n], scores[n:]
    margin = batch["margin"] if exp.posttrain.use_margin else 0.0
    losses, correct = bradley_terry_loss(chosen, rejected, margin)
    weight = batch["weight"]
    return (
        jnp.sum(losses * weight),
        jnp.sum(weight),
        {
            "accuracy": jnp.sum(correct * weight),
            "chosen_score": jnp.sum(chosen * weight),
            "rejected_score": jnp.sum(rejected * weight),
        },
    )


def dpo_batch_loss(params, batch, frozen, exp):
    """DPO against the reference's log-probs: precomputed in the batch, or computed here from the
    frozen reference parameters (`frozen`)."""
    cfg, settings, chunk = exp.model, exp.posttrain, exp.train.loss_chunk
    n = batch["margin"].shape[0]
    log_probs = next_token_log_probs(params, cfg, _both(batch, "tokens"), _both(batch, "segment_ids"), chunk)
    sums = masked_sum(log_probs, next_token(_both(batch, "response_mask")))
    if frozen is None:
        reference_chosen, reference_rejected = batch["reference_chosen"], batch["reference_rejected"]
    else:
        reference_chosen, reference_rejected = jax.lax.stop_gradient(
            response_log_probs(frozen, cfg, batch, chunk)
        )
    chosen_nll = mean_nll(log_probs[:n], next_token(batch["chosen_loss_mask"]))
    out = dpo_loss(
        sums[:n],
        sums[n:],
        reference_chosen,
        reference_rejected,
        settings.beta,
        chosen_nll=chosen_nll,
        nll_coef=settings.nll_coef,
    )
    weight = batch["weight"]
    metrics = {
        k: jnp.sum(out[k] * weight) for k in ("accuracy", "margin", "chosen_reward", "rejected_reward")
    }
    metrics["chosen_nll"] = jnp.sum(chosen_nll * weight)
    return jnp.sum(out["loss"] * weight), jnp.sum(weight), metrics
