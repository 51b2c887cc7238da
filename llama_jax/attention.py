"""Causal grouped-query attention with document (segment) masking.

One entry point, `attention`, behind which the backends live. `xla` is the reference that runs
everywhere; fused TPU/GPU kernels are added beside it and must agree with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla")


def attention_mask(q_len: int, kv_len: int, segment_ids=None, kv_segment_ids=None, q_offset=None):
    """Boolean [batch or 1, q_len, kv_len]: causal, and never across documents.

    Query i sits at key index `q_offset + i` (default: the queries are the last `q_len` keys; with
    a KV cache, the index where they were written). Padding (segment 0) attends to padding only,
    so every query keeps at least itself and softmax never sees an empty row.
    """
    q_offset = kv_len - q_len if q_offset is None else q_offset
    q_index = jnp.arange(q_len)[:, None] + q_offset
    mask = (jnp.arange(kv_len)[None, :] <= q_index)[None]
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def xla_attention(q, k, v, segment_ids=None, kv_segment_ids=None, q_offset=None):
    """q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K. Returns [B, T, H, D].

    Each KV head serves H/K consecutive query heads (the Hugging Face `repeat_kv` order). The
    query heads of a group are stacked as extra rows, [B, K, (H/K)*T, D], so K and V are never
    repeated in memory and each KV head does one large matmul rather than H/K small ones.
    """
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv_heads = k.shape[1], k.shape[2]
    groups = n_heads // n_kv_heads
    rows = q.reshape(batch, q_len, n_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, n_kv_heads, groups * q_len, head_dim)
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # Scores and softmax in fp32 whatever the compute dtype.
    scores = jnp.einsum("bkrd,bksd->bkrs", rows, keys, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    mask = attention_mask(q_len, kv_len, segment_ids, kv_segment_ids, q_offset)  # [B or 1, T, S]
    mask = jnp.tile(mask, (1, groups, 1))[:, None]                      # rows ordered (group, t)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, values)
    out = out.reshape(batch, n_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, n_heads, head_dim)


def attention(q, k, v, segment_ids=None, kv_segment_ids=None, q_offset=None, *,
              implementation: str = "auto"):
    """Causal GQA attention; `segment_ids` [B, T] (0 = padding) keep documents apart.

    With a KV cache, k/v/kv_segment_ids are the whole cache and `q_offset` the queries' index."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation {implementation!r}; "
                         f"choose one of {IMPLEMENTATIONS}.")
    return xla_attention(q, k, v, segment_ids, kv_segment_ids, q_offset)
