"""Masked next-token cross-entropy, with the LM head applied chunk by chunk.

Position t predicts tokens[t+1]. A prediction counts where `loss_mask[t+1]` is set and t+1 is in
the same document as t (never across a packing boundary, never onto padding). The head and the
softmax run over `chunk` positions at a time under `jax.checkpoint`, so fp32 logits exist for one
chunk only, in the forward and the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model import lm_logits


def next_token_targets(batch):
    """(targets [B, T] int32, weights [B, T] fp32) for the batch's tokens, segments and mask."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32) * same_document
    pad = jnp.zeros_like(weights[:, :1])
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1), \
        jnp.concatenate([weights, pad], axis=1)


def _chunk_size(length: int, chunk: int) -> int:
    """The largest divisor of `length` not above `chunk`."""
    chunk = max(1, min(chunk, length))
    while length % chunk:
        chunk -= 1
    return chunk


def cross_entropy_sum(hidden, head, targets, weights, chunk: int = 512):
    """(sum of weighted token losses, sum of weights). hidden [B, T, D], head [D, V]."""
    batch, length, dim = hidden.shape
    size = _chunk_size(length, chunk)
    n_chunks = length // size

    def split(x):  # [B, T, ...] -> [n_chunks, B, size, ...]
        return jnp.moveaxis(x.reshape(batch, n_chunks, size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h, t, w):
        logits = lm_logits(h, head)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * w)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(weights)))
    return total, jnp.sum(weights)
