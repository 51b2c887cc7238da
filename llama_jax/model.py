"""The Llama transformer as pure Flax Linen modules.

    tokens -> tok_embeddings -> n_layers x Block -> norm -> output (or tied embeddings) -> logits
    Block:  h = x + Attention(RMSNorm(x));  out = h + FeedForward(RMSNorm(h))

Parameter names follow Meta's checkpoints (`layers/attention/wq`, `layers/feed_forward/w1`, ...).
Every parameter and main activation carries logical axis names; `sharding.py` maps them to the
mesh, so nothing here knows about devices. RoPE uses the rotate-half layout of Hugging Face
checkpoints (Meta's interleaved q/k weights are permuted on conversion).

Run `python -m llama_jax.model --preset llama3_1_405b` to print a preset's shapes and size.
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.attention import attention
from llama_jax.config import PRESETS, ModelConfig, RopeScaling, model_preset
from llama_jax.context_parallel import balance, context_size, unbalance
from llama_jax.lora import DROPOUT_KEY, adapter_names
from llama_jax.quantize import QUANTIZED

# Logical axes of the activations (parameters name theirs where they are declared).
ACTIVATION = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "head_dim")
KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
CACHE = ("layers", "batch", "kv_heads", "length", "head_dim")  # KVCache keys and values


@flax.struct.dataclass
class KVCache:
    """The decoder's key/value cache, preallocated for `max_len` positions of every layer.

    keys, values  [n_layers, batch, n_kv_heads, max_len, head_dim]: each head's keys contiguous,
                  the layout the attention's matmuls read (no transposed copy of the cache per step)
    segment_ids   [batch, max_len]: the segment id of every slot (0: empty or padding)
    index         []: the next slot to write; every row writes at the same index

    `wraps` (the server's slots, serving.py): a ring of one-token steps. The index goes back to 0
    after the last slot, and a query sees every slot of its row whatever their order (its segment
    ids alone say which are its own), so rows that started at different times share one index.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    wraps: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = cfg.dtype if dtype is None else dtype
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @staticmethod
    def logical_axes() -> KVCache:
        """The cache's logical axis names, field by field (for shardings)."""
        P = jax.sharding.PartitionSpec
        return KVCache(keys=P(*CACHE), values=P(*CACHE), segment_ids=P("batch", "length"), index=P())

    def constrained(self) -> KVCache:
        """The cache's arrays constrained to their logical axes (sharded as the rules say)."""
        axes = self.logical_axes()
        return self.replace(
            keys=nn.with_logical_constraint(self.keys, tuple(axes.keys)),
            values=nn.with_logical_constraint(self.values, tuple(axes.values)),
            segment_ids=nn.with_logical_constraint(self.segment_ids, tuple(axes.segment_ids)),
        )

    def with_segments(self, segment_ids) -> KVCache:
        """The slots from `index` on marked with the new chunk's segment ids."""
        return self.replace(
            segment_ids=jax.lax.dynamic_update_slice(
                self.segment_ids, segment_ids.astype(jnp.int32), (0, self.index)
            )
        )

    def write(self, layer, k, v) -> KVCache:
        """k, v [B, T, K, D] written at (`layer`, index) of the first B rows: only the new slice,
        in place inside the decode loop, never a copy of the whole cache."""
        at = (layer, 0, 0, self.index, 0)

        def slice_of(x, cache):  # [B, T, K, D] -> [1, B, K, T, D]
            return x.transpose(0, 2, 1, 3)[None].astype(cache.dtype)

        return self.replace(
            keys=jax.lax.dynamic_update_slice(self.keys, slice_of(k, self.keys), at),
            values=jax.lax.dynamic_update_slice(self.values, slice_of(v, self.values), at),
        )

    def layer(self, layer, dtype, rows: int | None = None):
        """(keys, values) of one layer, [B, max_len, K, D] in `dtype`; with `rows`, of the first
        `rows` rows only (the server's decode step over its busy slots)."""
        rows = self.keys.shape[1] if rows is None else rows
        size = (1, rows, *self.keys.shape[2:])
        # Transposed back to the attention's [B, S, K, D]: it transposes to [B, K, S, D] again,
        # and XLA folds the two away.
        return tuple(
            jax.lax.dynamic_slice(c, (layer, 0, 0, 0, 0), size)[0].astype(dtype).transpose(0, 2, 1, 3)
            for c in (self.keys, self.values)
        )

    def advanced(self, length: int) -> KVCache:
        if self.wraps:
            return self.replace(index=(self.index + length) % self.max_len)
        return self.replace(index=self.index + length)

    def query_offset(self, length: int):
        """Where the first of `length` new queries sits for the causal mask: its own slot, or in a
        ring the last slot, so that every slot precedes it."""
        if self.wraps:
            if length != 1:
                raise ValueError("A wrapping KV cache takes one token per step.")
            return self.max_len - 1
        return self.index

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _project(x, w, dtype):
    """x [B, T, d_in] times w [d_in, ...out] as one 2-D matmul ([B*T, d_in] @ [d_in, prod(out)]),
    which XLA's CPU backend differentiates much faster than the 3-D einsum."""
    if isinstance(w, QUANTIZED):  # see quantize.py: it dequantizes inside its own matmul
        return w.project(x, dtype)
    batch, length, d_in = x.shape
    out = x.reshape(batch * length, d_in) @ w.astype(dtype).reshape(d_in, -1)
    return out.reshape(batch, length, *w.shape[1:])


def _weight(module: nn.Module, name: str, shape, axes, init):
    """The parameter `name`, as the layer computes with it: in the compute dtype and gathered
    (see `gathered`)."""
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(module.cfg.param_dtype))
    if isinstance(w, QUANTIZED):
        return w
    return gathered(w, axes, module.cfg.dtype)


def gathered(w, axes, dtype):
    """`w` cast to `dtype`, then made whole along its "embed" axis, the one FSDP shards (tensor
    parallel axes stay split): the gather is an all-gather of the compute dtype, not of the fp32
    parameter. Its gradient goes back sharded as the parameter is, so that the partial sums of
    the data-parallel devices are reduce-scattered, each device receiving only its own shard."""
    if "embed" not in axes:
        return w.astype(dtype)
    whole = tuple(None if axis == "embed" else axis for axis in axes)

    @jax.custom_vjp
    def gather(w):
        return nn.with_logical_constraint(w.astype(dtype), whole)

    def forward(w):
        return gather(w), None

    def backward(_, grad):
        return (nn.with_logical_constraint(grad, axes).astype(w.dtype),)

    gather.defvjp(forward, backward)
    return gather(w)


# Each adapted weight folds its own constant into the layer's dropout key.
_DROPOUT_STREAMS = {name: i for i, name in enumerate(("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"))}


def _adapters(module: nn.Module, name: str, in_shape, in_axes, out_shape, out_axes):
    """(A [in..., rank], B [rank, out...]) of weight `name` if the model's LoRA adapts it, else None.
    A tree without them (the base alone) runs the layer unadapted: that is how DPO's reference is
    the policy with its adapters switched off."""
    lora = module.cfg.lora
    a_name, b_name = adapter_names(name)
    if lora is None or name not in lora.targets:
        return None
    if not (module.is_initializing() or module.has_variable("params", a_name)):
        return None
    dtype = jnp.dtype(module.cfg.param_dtype)
    # The LoRA paper's start: A Gaussian (std 1/rank), B zero, so that A B = 0 and the adapted
    # model begins equal to its base.
    a_init = nn.initializers.normal(1.0 / lora.rank)
    a = module.param(
        a_name, nn.with_logical_partitioning(a_init, (*in_axes, "lora_rank")), (*in_shape, lora.rank), dtype
    )
    b = module.param(
        b_name,
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *out_axes)),
        (lora.rank, *out_shape),
        dtype,
    )
    return a, b


def _adapted(module: nn.Module, name: str, x, w, adapters, dropout_key):
    """x W, plus (alpha / rank) dropout(x) A B when the weight has adapters."""
    dtype = module.cfg.dtype
    out = _project(x, w, dtype)
    if adapters is None:
        return out
    lora = module.cfg.lora
    a, b = adapters
    if dropout_key is not None and lora.dropout > 0:
        key = jax.random.fold_in(dropout_key, _DROPOUT_STREAMS[name])
        keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    low = _project(x, a.reshape(x.shape[-1], lora.rank), dtype)
    return out + (lora.scale * _project(low, b, dtype)).astype(out.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], with Llama 3.1 scaling (docs/reference.md, "RoPE scaling") if given."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    original = scaling.original_max_position_embeddings
    low_freq_wavelength = original / scaling.low_freq_factor
    high_freq_wavelength = original / scaling.high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (original / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_band, interpolated, scaled).astype(np.float32)


def rotary_tables(positions, cfg: ModelConfig):
    """cos and sin [batch, length, head_dim] for integer `positions` [batch, length]."""
    inv_freq = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE on x [batch, length, heads, head_dim], in fp32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        weight = _weight(self, "weight", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return normed.astype(x.dtype) * weight.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache: KVCache | None = None, layer=None, dropout_key=None):
        """Self-attention of x [B, T, dim]; returns (out, cache). With a KV cache, this layer's new
        keys and values are written at (`layer`, cache.index) and the queries attend to the
        layer's whole cache (the slots' segment ids mask what is empty or another document).
        `dropout_key`: LoRA dropout's key for this layer (None: no dropout)."""
        cfg, dtype = self.cfg, self.cfg.dtype
        init = nn.initializers.normal(cfg.init_std)
        wq = _weight(self, "wq", (cfg.dim, cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), init)
        wk = _weight(
            self, "wk", (cfg.dim, cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), init
        )
        wv = _weight(
            self, "wv", (cfg.dim, cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), init
        )
        wo = _weight(self, "wo", (cfg.n_heads, cfg.head_dim, cfg.dim), ("heads", "head_dim", "embed"), init)
        q_out, kv_out = (cfg.n_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.head_dim)
        adapters = {
            "wq": _adapters(self, "wq", (cfg.dim,), ("embed",), q_out, ("heads", "head_dim")),
            "wk": _adapters(self, "wk", (cfg.dim,), ("embed",), kv_out, ("kv_heads", "head_dim")),
            "wv": _adapters(self, "wv", (cfg.dim,), ("embed",), kv_out, ("kv_heads", "head_dim")),
            "wo": _adapters(self, "wo", q_out, ("heads", "head_dim"), (cfg.dim,), ("embed",)),
        }

        def project(name, inputs, w):
            return _adapted(self, name, inputs, w, adapters[name], dropout_key)

        q = nn.with_logical_constraint(project("wq", x, wq), HEADS)
        k = nn.with_logical_constraint(project("wk", x, wk), KV_HEADS)
        v = nn.with_logical_constraint(project("wv", x, wv), KV_HEADS)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, segment_ids, implementation=cfg.attention)
        else:
            rows = q.shape[0]  # fewer than the cache's when the server decodes its busy slots only
            cache = cache.write(layer, k, v)
            k_layer, v_layer = cache.layer(layer, dtype, rows)
            out = attention(
                q,
                k_layer,
                v_layer,
                segment_ids,
                cache.segment_ids[:rows],
                q_offset=cache.query_offset(q.shape[1]),
                implementation=cfg.attention,
            )
        out = nn.with_logical_constraint(out, HEADS)
        batch, length = out.shape[:2]
        return project("wo", out.reshape(batch, length, -1), wo.reshape(-1, cfg.dim)), cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, dropout_key=None):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.init_std)
        w1 = _weight(self, "w1", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), init)
        w3 = _weight(self, "w3", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), init)
        w2 = _weight(self, "w2", (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), init)

        def project(name, inputs, w, sides):
            (d_in, in_axis), (d_out, out_axis) = sides
            adapters = _adapters(self, name, (d_in,), (in_axis,), (d_out,), (out_axis,))
            return _adapted(self, name, inputs, w, adapters, dropout_key)

        up_sides = ((cfg.dim, "embed"), (cfg.ffn_dim, "mlp"))
        gate, up = project("w1", x, w1, up_sides), project("w3", x, w3, up_sides)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return project("w2", hidden, w2, ((cfg.ffn_dim, "mlp"), (cfg.dim, "embed")))


class Block(nn.Module):
    """One pre-norm transformer layer on the carry (x, KV cache or None), as nn.scan wants it:
    returns (carry, None). `layer` is this layer's index into the cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, segment_ids, dropout_key, layer):
        x, cache = carry
        if dropout_key is not None:  # each layer draws its own LoRA dropout masks
            dropout_key = jax.random.fold_in(dropout_key, layer)
        attended, cache = Attention(self.cfg, name="attention")(
            RMSNorm(self.cfg, name="attention_norm")(x), cos, sin, segment_ids, cache, layer, dropout_key
        )
        h = nn.with_logical_constraint(x + attended, ACTIVATION)
        normed = RMSNorm(self.cfg, name="ffn_norm")(h)
        out = h + FeedForward(self.cfg, name="feed_forward")(normed, dropout_key)
        return (nn.with_logical_constraint(out, ACTIVATION), cache), None


class Llama(nn.Module):
    """The language model, with three entry points:

        Llama(cfg).apply({"params": p}, tokens, positions, segment_ids)      -> logits [B, T, vocab]
        ....apply(..., method=Llama.hidden)                                  -> hidden [B, T, dim]
        ....apply({"params": p}, tokens, cache, positions, segment_ids,
                  method=Llama.decode)                                       -> (logits, cache)

    `positions` default to 0..T-1 (after the cache's filled slots when decoding). `segment_ids`
    (0 = padding) number the documents packed in a row; attention never crosses from one to
    another. Logits are fp32. `hidden` gives the final normed hidden states, for losses that apply
    the head chunk by chunk (see `lm_head` and loss.py); `decode` writes the chunk's keys and
    values into a `KVCache` and returns it with the logits.
    """

    cfg: ModelConfig

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self._forward(tokens, positions, segment_ids, None, with_head=True)

    def hidden(self, tokens, positions=None, segment_ids=None):
        return self._forward(tokens, positions, segment_ids, None, with_head=False)

    def decode(self, tokens, cache: KVCache, positions=None, segment_ids=None):
        return self._forward(tokens, positions, segment_ids, cache, with_head=True)

    @nn.compact
    def _forward(self, tokens, positions, segment_ids, cache: KVCache | None, *, with_head: bool):
        cfg = self.cfg
        batch, length = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        # Context parallelism (context_parallel.py): the sequence in its balanced layout from here
        # to the final norm, back in order after it.
        parts = context_size() if cache is None else 1
        if parts > 1:
            tokens, positions = balance(tokens, parts), balance(positions, parts)
            segment_ids = None if segment_ids is None else balance(segment_ids, parts)
        embeddings = _weight(
            self,
            "tok_embeddings",
            (cfg.vocab_size, cfg.dim),
            ("vocab", "embed"),
            nn.initializers.normal(cfg.init_std),
        )
        # Gather the table's FSDP shards first (as for any weight) so the lookup stays local.
        table = nn.with_logical_constraint(embeddings, ("vocab", None))
        x = nn.with_logical_constraint(jnp.take(table, tokens, axis=0).astype(cfg.dtype), ACTIVATION)
        cos, sin = rotary_tables(positions, cfg)
        # LoRA dropout's key for this step, if the training step put one in (lora.with_dropout_key).
        dropout_key = None
        if cfg.lora is not None and self.has_variable("params", DROPOUT_KEY):
            dropout_key = jax.random.wrap_key_data(self.get_variable("params", DROPOUT_KEY))

        if cache is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((batch, length), jnp.int32)
            cache = cache.constrained().with_segments(segment_ids)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        layers = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4 + (0,),
                length=cfg.n_layers,
                unroll=min(cfg.scan_unroll, cfg.n_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, cache), _ = stack(cfg, name="layers")((x, cache), cos, sin, segment_ids, dropout_key, layers)
        else:
            for i in range(cfg.n_layers):
                (x, cache), _ = block(cfg, name=f"layers_{i}")(
                    (x, cache), cos, sin, segment_ids, dropout_key, layers[i]
                )

        x = nn.with_logical_constraint(unbalance(RMSNorm(cfg, name="norm")(x), parts), ACTIVATION)
        if not with_head:
            return x
        if cfg.tie_embeddings:
            head = embeddings.T
        else:
            head = _weight(
                self,
                "output",
                (cfg.dim, cfg.vocab_size),
                ("embed", "vocab"),
                nn.initializers.normal(cfg.init_std),
            )
            adapters = _adapters(self, "output", (cfg.dim,), ("embed",), (cfg.vocab_size,), ("vocab",))
            if adapters is not None:
                head = adapted_head(head, *adapters, cfg.lora)
        logits = nn.with_logical_constraint(lm_logits(x, head), ("batch", "length", "vocab"))
        return logits if cache is None else (logits, cache.advanced(length))


def lm_logits(hidden, head):
    """fp32 logits from hidden [..., dim] and the head [dim, vocab], in the hidden's dtype."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # 2-D: see _project
    logits = jnp.dot(flat, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return logits.reshape(*hidden.shape[:-1], head.shape[-1])


def adapted_head(head, a, b, lora):
    """The head with its LoRA adapter folded in (W + alpha / rank A B): the loss applies the head
    chunk by chunk, so it takes the head as one matrix (LoRA dropout does not reach the head)."""
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)) * lora.scale
    return (head.astype(jnp.float32) + delta).astype(head.dtype)


def lm_head(params, cfg: ModelConfig):
    """The [dim, vocab] output projection: `output` (with its LoRA adapter, if it has one), or the
    transposed embeddings if tied."""
    if cfg.tie_embeddings:
        return params["tok_embeddings"].T
    a, b = adapter_names("output")
    if cfg.lora is not None and a in params:
        return adapted_head(params["output"], params[a], params[b], cfg.lora)
    return params["output"]


def _init_variables(cfg: ModelConfig, rng):
    return Llama(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))


def init_params(cfg: ModelConfig, rng):
    """Randomly initialised parameters (plain arrays) of `Llama(cfg)`."""
    return nn.meta.unbox(_init_variables(cfg, rng)["params"])


def abstract_params(cfg: ModelConfig):
    """Shapes and dtypes of the parameters, with their logical axes, computed without memory."""
    return jax.eval_shape(lambda rng: _init_variables(cfg, rng), jax.random.key(0))["params"]


def param_logical_axes(cfg: ModelConfig):
    """A tree of PartitionSpecs of logical axis names, matching `init_params`' tree."""
    return nn.get_partition_spec(abstract_params(cfg))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, counted from the abstract tree (no memory needed)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(abstract_params(cfg))))


def describe(cfg: ModelConfig) -> str:
    """The shape tree and parameter count, as `python -m llama_jax.model` prints them."""
    boxed = abstract_params(cfg)
    shapes = nn.meta.unbox(boxed)
    axes = nn.get_partition_spec(boxed)
    lines = []
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(shapes),
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
    ):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        lines.append(f"  {name:<32} {str(tuple(leaf.shape)):<28} {leaf.dtype}  {tuple(spec)}")
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    lines.append(f"parameters: {total:,} ({total / 1e9:.2f}B)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.model",
        description="Print a Llama preset's parameter shapes, logical axes and parameter count.",
    )
    parser.add_argument("--preset", default="llama3_8b", help=f"one of: {', '.join(PRESETS)}")
    args = parser.parse_args(argv)
    try:
        cfg = model_preset(args.preset)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.preset}: {cfg}")
    print(describe(cfg))


if __name__ == "__main__":
    main()
