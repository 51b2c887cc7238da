"""Masked next-token cross-entropy, with the LM head applied chunk by chunk.

Position t predicts tokens[t+1]. A prediction counts where `loss_mask[t+1]` is set and t+1 is in
the same document as t (never across a packing boundary, never onto padding). The head and the
softmax run over `chunk` positions at a time under `jax.checkpoint`, so fp32 logits exist for one
chunk only, in the forward and the backward pass, at the price of the head's matmul computed again
in the backward pass. Where the memory is there (`train.keep_logits`, chosen per recipe by
`python -m llama_jax.aot`), the chunks keep their fp32 logits for the backward pass instead: a
third fewer head FLOPs for tokens x vocab x 4 bytes per device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model import lm_logits


def next_token(x):
    """x[:, t + 1] at position t (the target of the prediction made there), 0 at the end. The
    one next-token shift: targets, their masks and per-token log-probs all line up through it."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def next_token_targets(batch):
    """(targets [B, T] int32, weights [B, T] fp32) for the batch's tokens, segments and mask."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    # Token t is a target where it is in the loss mask and in the same document as token t - 1.
    continues = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    continues = jnp.pad(continues, ((0, 0), (1, 0)))
    weights = next_token(batch["loss_mask"].astype(jnp.float32) * continues)
    return next_token(tokens), weights


def _chunk_size(length: int, chunk: int) -> int:
    """The largest divisor of `length` not above `chunk`."""
    chunk = max(1, min(chunk, length))
    while length % chunk:
        chunk -= 1
    return chunk


def token_log_probs(
    hidden, head, targets, chunk: int = 512, *, keep_logits: bool = False, unroll: bool = False
):
    """log p(targets[b, t]) under the logits at position t, [B, T] fp32, from hidden [B, T, D] and
    the head [D, V]. The training loss, evaluation and every post-training objective use this.
    `keep_logits` saves each chunk's logits for the backward pass instead of recomputing them;
    `unroll` unrolls the loop over chunks (for XLA's cost analysis, which counts a loop body once)."""
    batch, length, _ = hidden.shape
    size = _chunk_size(length, chunk)
    n_chunks = length // size

    def split(x):  # [B, T, ...] -> [n_chunks, B, size, ...]
        return jnp.moveaxis(x.reshape(batch, n_chunks, size, *x.shape[2:]), 1, 0)

    kept = jax.checkpoint_policies.save_only_these_names("lm_logits") if keep_logits else None

    @functools.partial(jax.checkpoint, policy=kept)
    def chunk_log_probs(h, t):
        logits = checkpoint_name(lm_logits(h, head), "lm_logits")
        # A masked sum, not a gather: with the vocabulary split over devices each sums its part (the
        # SPMD partitioner of XLA's CPU backend fails on this gather inside a multi-slice step).
        target_logit = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == t[..., None], logits, 0.0), axis=-1)
        return target_logit - jax.nn.logsumexp(logits, axis=-1)

    _, out = jax.lax.scan(
        lambda carry, xs: (carry, chunk_log_probs(*xs)),
        None,
        (split(hidden), split(targets)),
        unroll=n_chunks if unroll else 1,
    )
    return jnp.moveaxis(out, 0, 1).reshape(batch, length)


def cross_entropy_sum(hidden, head, targets, weights, chunk: int = 512, **options):
    """(sum of weighted token losses, sum of weights). hidden [B, T, D], head [D, V]; `options`
    as for `token_log_probs`."""
    return -jnp.sum(token_log_probs(hidden, head, targets, chunk, **options) * weights), jnp.sum(weights)
