"""Causal grouped-query attention with document (segment) masking.

One entry point, `attention`, behind which the backends live:
  - `xla`: the reference, everywhere; it materialises fp32 score matrices (for causal
    self-attention, block by block of queries against the keys up to each block's end).
  - `splash`: the TPU Pallas splash-attention kernel (blockwise, causal blocks skipped, segment ids
    and GQA native), under `shard_map` over whatever mesh the caller set.
  - `cudnn`: cuDNN flash attention on NVIDIA GPUs through `jax.nn.dot_product_attention`.
`auto` picks splash on TPU, cuDNN on GPU (bf16/fp16) and XLA otherwise, and XLA wherever a kernel
does not apply (decoding against a KV cache, lengths that are not a multiple of 128 for splash).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import context_parallel
from llama_jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from llama_jax.sharding import logical_to_spec

# What "auto" means on each platform.
BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "cpu": "xla"}
_TARGET_PLATFORM = contextvars.ContextVar("llama_jax_attention_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Code traced inside targets `platform` rather than this host's backend (`aot` compiles for
    TPU on a CPU host): "auto" resolves for it, and Pallas kernels compile rather than interpret."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
    return _TARGET_PLATFORM.get() or jax.default_backend()


def attention_mask(
    q_len: int, kv_len: int, segment_ids=None, kv_segment_ids=None, q_offset=None, q_index=None
):
    """Boolean [batch or 1, q_len, kv_len]: causal, and never across documents.

    Query i sits at key index `q_offset + i` (default: the queries are the last `q_len` keys; with
    a KV cache, the index where they were written), or at `q_index[i]` where that is given (a
    device's queries under context parallelism). Padding (segment 0) attends to padding only, so
    every query keeps at least itself and softmax never sees an empty row.
    """
    if q_index is None:
        q_offset = kv_len - q_len if q_offset is None else q_offset
        q_index = jnp.arange(q_len) + q_offset
    mask = (jnp.arange(kv_len)[None, :] <= q_index[:, None])[None]
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def causal_block_starts(length: int) -> list[int]:
    """Where each block of queries starts when self-attention of `length` tokens is computed block
    by block: blocks of max(64, length / 8) queries, the last one possibly shorter. One block (no
    split) for 64 tokens or fewer."""
    size = max(64, length // 8)
    return list(range(0, length, size))


def xla_attention(q, k, v, segment_ids=None, kv_segment_ids=None, q_offset=None, q_index=None):
    """q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K. Returns [B, T, H, D].

    Causal self-attention (no cache, no context parallelism) runs block by block of queries, each
    against the keys up to its own end: the masked upper triangle is mostly never computed, which
    makes the training step about 10% faster on a CPU (README, "Speed on a CPU") and gives the same
    result, since a masked score's weight is exactly 0.
    """
    self_attention = q_offset is None and q_index is None and q.shape[1] == k.shape[1]
    starts = causal_block_starts(q.shape[1]) if self_attention else [0]
    if len(starts) == 1:
        return _dense_attention(q, k, v, segment_ids, kv_segment_ids, q_offset, q_index)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    outs = []
    for start, end in zip(starts, starts[1:] + [q.shape[1]]):
        outs.append(
            _dense_attention(
                q[:, start:end],
                k[:, :end],
                v[:, :end],
                None if segment_ids is None else segment_ids[:, start:end],
                None if kv_segment_ids is None else kv_segment_ids[:, :end],
                q_offset=start,
            )
        )
    return jnp.concatenate(outs, axis=1)


def _dense_attention(q, k, v, segment_ids=None, kv_segment_ids=None, q_offset=None, q_index=None):
    """Every query against every key, masked: the score matrix [B, K, (H/K)*T, S] in fp32.

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
    scores = scores * (head_dim**-0.5)
    mask = attention_mask(q_len, kv_len, segment_ids, kv_segment_ids, q_offset, q_index)  # [B or 1, T, S]
    mask = jnp.tile(mask, (1, groups, 1))[:, None]  # rows ordered (group, t)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, values)
    out = out.reshape(batch, n_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, n_heads, head_dim)


def _splash_block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def splash_kernel(heads: int, length: int, *, interpret: bool, q_shards: int = 1, q_index=None):
    """The splash kernel of causal self-attention over `length` tokens for `heads` heads. With
    `q_shards` > 1 (context parallelism) its mask info splits into that many query blocks and
    `q_index` gives the sequence index of each query row (the balanced layout)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = _splash_block(length // q_shards)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    causal = masks.CausalMask((length, length), shard_count=q_shards)
    if q_index is not None:  # rows are queries at these indices; columns stay in sequence order
        causal.q_sequence = np.asarray(q_index, np.int32)
    return splash.make_splash_mha(
        masks.MultiHeadMask([causal] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=q_shards,
        interpret=interpret,
    )


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool | None = None):
    """Self-attention (T == S) with the TPU splash kernel; shapes as in `xla_attention`.

    The kernel works on one example of [heads, T, D] and is vmapped over the batch. Pallas calls
    cannot be partitioned by XLA, so with a mesh in context (jax.set_mesh) the kernel runs under
    `shard_map` on each device's block: batch and heads sharded as the logical rules say.
    Off TPU the kernel runs in Pallas' interpreter (slowly; `interpret` defaults to that), which
    is how the tests check it on CPU.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    batch, length, _, head_dim = q.shape
    if length % 128 or k.shape[1] != length:
        raise ValueError(
            f"Splash attention needs self-attention over a multiple of 128 tokens, "
            f"got {length} queries and {k.shape[1]} keys."
        )
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    if interpret is None:
        interpret = target_platform() != "tpu"

    def per_device(q, k, v, segment_ids):
        kernel = splash_kernel(q.shape[2], length, interpret=interpret)
        # [B, T, H, D] -> [B, H, T, D]; the kernel does not scale the scores itself.
        q = (q * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        out = jax.vmap(kernel)(q, k, v, ids)
        return out.transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_device(q, k, v, segment_ids)
    # The same logical rules as the model's activations decide the per-device blocks.
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    k_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
    if q_spec[2] != k_spec[2]:  # KV heads that do not split like the query heads: keep heads whole
        q_spec = k_spec = jax.P(q_spec[0], None, None, None)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(q_spec, k_spec, k_spec, jax.P(q_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


def cudnn_attention(q, k, v, segment_ids=None):
    """Self-attention with cuDNN's fused kernel (NVIDIA GPUs, bf16/fp16): causal, GQA native,
    documents kept apart by a [B, 1, T, S] mask."""
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _xla_local(q, k, v, q_segments, kv_segments, q_index):
    """One device's queries (at sequence indices `q_index`) against every key, with XLA."""
    return xla_attention(q, k, v, q_segments, kv_segments, q_index=q_index)


def _cudnn_local(q, k, v, q_segments, kv_segments, q_index):
    """One device's queries (at sequence indices `q_index`) against every key, with cuDNN."""
    mask = attention_mask(q.shape[1], k.shape[1], q_segments, kv_segments, q_index=q_index)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def context_parallel_attention(q, k, v, segment_ids, chosen: str):
    """Self-attention under context parallelism (see context_parallel.py): q, k, v in the
    balanced layout, split along the sequence; `chosen` the backend each device runs."""
    parts = context_parallel.context_size()
    length = q.shape[1]
    context_parallel.check_length(length, parts)
    kernel = None
    # The kernel's split mask needs whole blocks per device and parts^2 dividing the length.
    if chosen == "splash" and (length // parts) % 128 == 0 and length % parts**2 == 0:
        index = context_parallel.balanced_index(length, parts)
        kernel = splash_kernel(
            q.shape[2], length, interpret=target_platform() != "tpu", q_shards=parts, q_index=index
        )
    local = _cudnn_local if chosen == "cudnn" else _xla_local
    return context_parallel.sharded_attention(q, k, v, segment_ids, local, splash_kernel=kernel)


def choose_implementation(implementation: str, q, k, q_offset=None, platform: str | None = None) -> str:
    """The backend that runs: `implementation`, with "auto" resolved and kernels that do not apply
    (a KV cache, odd lengths, fp32 on cuDNN) replaced by the XLA reference."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}."
        )
    if implementation == "auto":
        implementation = BY_PLATFORM.get(platform or target_platform(), "xla")
    self_attention = q_offset is None and q.shape[1] == k.shape[1]
    if implementation == "splash" and not (self_attention and q.shape[1] % 128 == 0):
        return "xla"
    if implementation == "cudnn" and not (self_attention and q.dtype in (jnp.bfloat16, jnp.float16)):
        return "xla"
    return implementation


def attention(q, k, v, segment_ids=None, kv_segment_ids=None, q_offset=None, *, implementation: str = "auto"):
    """Causal GQA attention; `segment_ids` [B, T] (0 = padding) keep documents apart.

    With a KV cache, k/v/kv_segment_ids are the whole cache and `q_offset` the queries' index."""
    chosen = choose_implementation(implementation, q, k, q_offset)
    if q_offset is None and context_parallel.context_size() > 1:
        return context_parallel_attention(q, k, v, segment_ids, chosen)
    if chosen == "splash":
        return splash_attention(q, k, v, segment_ids)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    return xla_attention(q, k, v, segment_ids, kv_segment_ids, q_offset)
