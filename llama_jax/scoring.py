"""Log-likelihoods of token rows under the model: the scoring core of `python -m llama_jax.eval`
and of the lm-evaluation-harness adapter (eval_harness.py).

    loglikelihoods(params, cfg, [(ids, n_scored), ...], seq_len=..., batch_size=8, with_greedy=False)

Rows are scored in batches of a fixed size, sorted by length and padded to a power-of-two length
(at most seq_len), so few shapes are compiled; the head and softmax run chunk by chunk, so the
fp32 logits of a whole batch never exist at once.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.config import ModelConfig
from llama_jax.loss import _chunk_size
from llama_jax.model import Llama, lm_head, lm_logits

# Shortest padded row; shorter rows share its compiled shape.
MIN_PADDED_LENGTH = 16


class EvalError(ValueError):
    """An evaluation that cannot run; the message is one sentence for the user."""


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _score_batch(params, tokens, segment_ids, targets, weights, *, cfg, chunk=512):
    """Per row: the sum of weights * log p(target) [B], and whether every weighted target is the
    model's most likely token [B] (lm-evaluation-harness's `is_greedy`)."""
    hidden = Llama(cfg).apply({"params": params}, tokens, segment_ids=segment_ids, method=Llama.hidden)
    head = lm_head(params, cfg)
    batch, length, _ = hidden.shape
    size = _chunk_size(length, chunk)

    def split(x):  # [B, T, ...] -> [T / size, B, size, ...]
        return jnp.moveaxis(x.reshape(batch, length // size, size, *x.shape[2:]), 1, 0)

    def chunk_scores(xs):
        h, t, w = xs
        logits = lm_logits(h, head)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        log_probs = target_logit - jax.nn.logsumexp(logits, axis=-1)
        # A tie with another token counts as greedy; torch's argmax would pick the lower id.
        greedy = (target_logit >= jnp.max(logits, axis=-1)) | (w == 0)
        return jnp.sum(log_probs * w, axis=-1), jnp.all(greedy, axis=-1)

    sums, greedy = jax.lax.map(chunk_scores, (split(hidden), split(targets), split(weights)))
    return jnp.sum(sums, axis=0), jnp.all(greedy, axis=0)


def _padded_length(length: int, cap: int) -> int:
    return min(cap, max(MIN_PADDED_LENGTH, 1 << (length - 1).bit_length()))


def loglikelihoods(
    params,
    cfg: ModelConfig,
    rows: Sequence[tuple[Sequence[int], int]],
    *,
    seq_len: int,
    batch_size: int = 8,
    progress: bool = False,
    with_greedy: bool = False,
):
    """For each row (ids, n): the summed log-probability of the last n of `ids` given the tokens
    before them. `ids` holds at most seq_len + 1 tokens (seq_len inputs). With `with_greedy`,
    (scores, greedy): greedy[i] says whether each of row i's n tokens is the most likely one."""
    params = jax.device_put(params)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = np.zeros(len(rows), np.float64)
    greedy = np.zeros(len(rows), bool)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        length = _padded_length(max(len(rows[i][0]) - 1 for i in batch), seq_len)
        tokens, segment_ids, targets = (np.zeros((batch_size, length), np.int32) for _ in range(3))
        weights = np.zeros((batch_size, length), np.float32)
        for r, i in enumerate(batch):
            ids, n_scored = rows[i]
            n_inputs = len(ids) - 1
            tokens[r, :n_inputs], targets[r, :n_inputs] = ids[:-1], ids[1:]
            segment_ids[r, :n_inputs] = 1
            weights[r, n_inputs - n_scored : n_inputs] = 1.0
        sums, is_greedy = _score_batch(params, tokens, segment_ids, targets, weights, cfg=cfg)
        scores[batch] = np.asarray(sums)[: len(batch)]
        greedy[batch] = np.asarray(is_greedy)[: len(batch)]
    return (scores, greedy) if with_greedy else scores
