"""Context parallelism: every activation's sequence split over the mesh axes that the rules give
`length` (by default `context`, `mesh.context` devices), as Llama 3 trains at 128K
(docs/reference.md, "Context parallelism").

The layout is balanced for causal attention: the sequence is cut into 2 x context chunks and
device i holds chunk i and its mirror, chunk 2 x context - 1 - i, so every device has the same
number of (query, key) pairs below the diagonal. `Llama` puts its inputs in this layout on entry
and its output back in order at the end, so data, losses and metrics never see it.

Attention all-gathers the keys and values (only the KV heads, GQA's saving) across the axis,
puts them back in sequence order, and runs the local queries against all of them with the
queries' true indices in the causal mask; segment ids gather the same way, so documents packed
across chunk boundaries stay apart. XLA, cuDNN and the splash kernel each run per device under
`shard_map`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import DEFAULT_RULES
from llama_jax.sharding import MeshError, logical_to_spec


def context_axes(mesh=None, rules=None) -> tuple[str, ...]:
    """The mesh axes (of more than one device) that shard `length` under `rules` (by default the
    rules in effect); () outside a mesh or where the sequence is not split."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return ()
    rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
    # Resolved beside `batch`, as in an activation: an axis the batch took does not split `length`.
    axes = nn.logical_to_mesh_axes(("batch", "length"), rules)[1]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def context_size(mesh=None, rules=None) -> int:
    """How many devices share one sequence (1: no context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return math.prod(mesh.shape[a] for a in context_axes(mesh, rules))


def check_length(length: int, parts: int) -> None:
    if parts > 1 and length % (2 * parts):
        raise ValueError(
            f"A sequence of {length} tokens cannot be cut into the 2 x {parts} equal chunks that "
            f"context parallelism over {parts} devices needs; use a multiple of {2 * parts}."
        )


def check_context_length(seq_len: int, mesh, rules) -> None:
    """A run's train.seq_len that the mesh's context parallelism cannot cut evenly: one sentence."""
    parts = context_size(mesh, rules)
    if parts > 1 and seq_len % (2 * parts):
        raise MeshError(
            f"train.seq_len={seq_len} is not a multiple of 2 x {parts}: context "
            f"parallelism over {parts} devices cuts each sequence into {2 * parts} equal chunks."
        )


def chunk_order(parts: int) -> np.ndarray:
    """The chunks in the balanced layout: [0, 2p-1, 1, 2p-2, ...] (device i: chunks i, 2p-1-i)."""
    return np.stack([np.arange(parts), 2 * parts - 1 - np.arange(parts)], axis=1).reshape(-1)


def balanced_index(length: int, parts: int) -> np.ndarray:
    """The sequence index of each slot of the balanced layout, [length]."""
    chunk = length // (2 * parts)
    return (chunk_order(parts)[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def _reorder_chunks(x, parts: int, order: np.ndarray, axis: int):
    shape = x.shape
    chunked = x.reshape(*shape[:axis], 2 * parts, shape[axis] // (2 * parts), *shape[axis + 1 :])
    return jnp.take(chunked, jnp.asarray(order), axis=axis).reshape(shape)


def balance(x, parts: int, axis: int = 1):
    """`x` in sequence order along `axis` -> the balanced layout."""
    if parts <= 1:
        return x
    check_length(x.shape[axis], parts)
    return _reorder_chunks(x, parts, chunk_order(parts), axis)


def unbalance(x, parts: int, axis: int = 1):
    """The inverse of `balance`: the balanced layout -> sequence order."""
    if parts <= 1:
        return x
    return _reorder_chunks(x, parts, np.argsort(chunk_order(parts)), axis)


def sharded_attention(q, k, v, segment_ids, local_attention, *, splash_kernel=None):
    """Causal attention of q [B, T, H, D] and k, v [B, T, K, D], all in the balanced layout and
    split along T over the context axes of the mesh in scope.

    `local_attention(q, k, v, q_segments, kv_segments, q_index)` computes one device's queries
    against every key in sequence order, `q_index` being the sequence index of each local query.
    With `splash_kernel` (built for the whole sequence with its queries in the balanced layout,
    see attention.splash_context_kernel) the kernel runs instead, its mask info split with the
    queries."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = context_axes(mesh)
    parts = math.prod(mesh.shape[a] for a in axes)
    batch, length = q.shape[:2]
    check_length(length, parts)
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    k_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
    context = axes if len(axes) > 1 else axes[0]
    if q_spec[2] != k_spec[2]:  # KV heads that do not split like the query heads: keep heads whole
        q_spec = k_spec = jax.P(q_spec[0], context, None, None)
    q_spec = jax.P(q_spec[0], context, q_spec[2], None)
    k_spec = jax.P(k_spec[0], context, k_spec[2], None)
    ids_spec = jax.P(q_spec[0], context)
    index = jnp.asarray(balanced_index(length, parts), jnp.int32)

    def gather(x):  # the whole sequence, in sequence order
        return unbalance(jax.lax.all_gather(x, context, axis=1, tiled=True), parts)

    def per_device(q, k, v, segment_ids, index, *kernel):
        k_all, v_all, kv_segments = gather(k), gather(v), gather(segment_ids)
        if kernel:
            return _splash_local(kernel[0], q, k_all, v_all, segment_ids, kv_segments)
        return local_attention(q, k_all, v_all, segment_ids, kv_segments, index)

    specs = [q_spec, k_spec, k_spec, ids_spec, jax.P(context)]
    args = [q, k, v, segment_ids, index]
    if splash_kernel is not None:
        # The kernel's mask info splits with the queries; all heads share one causal mask.
        kernel_sharding = jax.sharding.NamedSharding(mesh, jax.P(None, context))
        specs.append(splash_kernel.manual_sharding_spec(kernel_sharding))
        args.append(splash_kernel)
    return jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(
        *args
    )


def _splash_local(kernel, q, k, v, q_segments, kv_segments):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    head_dim = q.shape[-1]
    q = (q * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    ids = splash.SegmentIds(q=q_segments, kv=kv_segments)
    return jax.vmap(kernel, in_axes=(0, 0, 0, 0))(q, k, v, ids).transpose(0, 2, 1, 3)
