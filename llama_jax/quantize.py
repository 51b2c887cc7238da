"""Weight quantization for inference: weight-only int8, and Llama 3's FP8 feed-forward recipe.

    cfg, qparams = quantize_params(params, cfg, "int8" | "fp8")
    Llama(cfg).apply({"params": qparams}, tokens)   # as generate() and eval use them

int8: every attention and feed-forward matrix of every layer is stored as int8 with a symmetric
scale per output channel (max |w| / 127). The matmul converts the int8 weight to the compute dtype
and multiplies the product by the scales (a channel's scale factors out of its dot products).
Embeddings, the output head and the norms keep their dtype.

fp8 (the recipe of Meta's FP8 Llama 3 inference): only the feed-forward matrices w1, w3 and w2,
and not in the first or the last layer (those stay as they are, like all of attention). Weights
are float8_e4m3fn with a scale per output channel (max |w| / 448); activations are quantized on
the fly, one scale per row (token): min(max |x|, 1200) / 448, the bound keeping one huge
activation from coarsening the rest of its row (it saturates instead). The fp8 x fp8 dot
accumulates in fp32 and is rescaled by both scales.

A quantized weight is a `QuantizedWeight` pytree standing where the array stood; `model._project`
hands the matmul to it. Flax's `self.param` accepts it in `apply`: its shape check compares only
the first leaf, `value`, which has the original shape. Quantized params use the unscanned layout
(`layers_{i}`), since the first and last layers differ from the rest.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.sharding import logical_to_spec

MODES = ("int8", "fp8")
INT8_MAX = 127.0
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
# Llama 3's upper bound on an activation row's max |x| before it becomes the fp8 scale.
FP8_ACTIVATION_BOUND = 1200.0
# Keeps an all-zero channel or row from dividing by zero.
_MIN_SCALE_BASE = 1e-12

# Where each weight's input axes end: wo [heads, head_dim, dim] reads two axes, the rest one.
_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1}


@flax.struct.dataclass
class QuantizedWeight:
    """A quantized [d_in..., out...] matrix: `value` (int8 or float8_e4m3fn, the original shape)
    times `scale` (fp32; 1 on the input axes, the weight's size on the output axes)."""

    value: jax.Array
    scale: jax.Array
    mode: str = flax.struct.field(pytree_node=False)

    @property
    def shape(self):
        return self.value.shape

    def reshape(self, *shape) -> "QuantizedWeight":
        """Reshapes the value; the scale follows on the trailing (output) axes it covers."""
        value = self.value.reshape(*shape)
        out_axes = len(value.shape)
        while math.prod(value.shape[out_axes:]) < self.scale.size:
            out_axes -= 1
        if math.prod(value.shape[out_axes:]) != self.scale.size:
            raise ValueError(
                f"Reshaping a quantized {self.value.shape} weight to {value.shape} "
                "would split its output channels."
            )
        scale = self.scale.reshape((1,) * out_axes + value.shape[out_axes:])
        return QuantizedWeight(value, scale, self.mode)

    def dequantize(self, dtype=jnp.float32):
        return (self.value.astype(jnp.float32) * self.scale).astype(dtype)

    def project(self, x, dtype):
        """x [B, T, d_in] times this weight, as `model._project` does for a plain array."""
        batch, length, d_in = x.shape
        flat = x.reshape(batch * length, d_in)
        weight = self.value.reshape(d_in, -1)
        scale = self.scale.reshape(1, -1)
        if self.mode == "int8":
            out = jnp.dot(flat, weight.astype(dtype), preferred_element_type=jnp.float32) * scale
        else:
            x_fp8, x_scale = quantize_rows_fp8(flat)
            out = jax.lax.dot(x_fp8, weight, preferred_element_type=jnp.float32) * x_scale * scale
        return out.astype(dtype).reshape(batch, length, *self.value.shape[1:])


NF4_BLOCK = 64  # weights per NF4 absmax block, along the input side (the QLoRA paper's size)


def _nf4_code() -> np.ndarray:
    """The 16 NormalFloat4 values (the QLoRA paper, section 3): quantiles of N(0, 1) with 8 levels
    for the positive half and 7 for the negative, an exact zero, scaled into [-1, 1]. The outer
    quantiles are taken at 1 - delta with delta = (1/30 + 1/32) / 2, so that none is infinite."""
    from scipy.stats import norm

    top = 1 - 0.5 * (1 / 30 + 1 / 32)
    positive = norm.ppf(np.linspace(top, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(top, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, negative, [0.0]]))
    return (values / np.abs(values).max()).astype(np.float32)


NF4_CODE = _nf4_code()


@flax.struct.dataclass
class NF4Weight:
    """A [d_in..., out...] matrix in 4-bit NormalFloat: `codes` (uint4, the weight's shape) index
    NF4_CODE, times an absmax per block of NF4_BLOCK inputs of each output channel. The absmaxes
    are themselves quantized (the paper's double quantization): int8 `block_scale` [blocks, out...]
    with an fp32 `scale_step` and `scale_mean` per output channel, so a block's absmax is
    block_scale * scale_step + scale_mean (about 0.13 bits per weight instead of 0.5)."""

    codes: jax.Array
    block_scale: jax.Array
    scale_step: jax.Array
    scale_mean: jax.Array

    @property
    def shape(self):
        return self.codes.shape

    def reshape(self, *shape) -> "NF4Weight":
        """Only to [d_in, d_out...] where d_in is the product of the input axes (wo's flattening)."""
        codes = self.codes.reshape(*shape)
        out = codes.shape[1:]
        blocks = codes.shape[0] // NF4_BLOCK
        return NF4Weight(
            codes,
            self.block_scale.reshape(blocks, *out),
            self.scale_step.reshape(1, *out),
            self.scale_mean.reshape(1, *out),
        )

    def dequantize(self, dtype=jnp.float32):
        d_in = self.block_scale.shape[0] * NF4_BLOCK
        out_shape = self.codes.shape[len(self.codes.shape) - (self.block_scale.ndim - 1) :]
        codes = self.codes.reshape(d_in // NF4_BLOCK, NF4_BLOCK, -1)
        absmax = self.block_scale.astype(jnp.float32) * self.scale_step + self.scale_mean
        values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)] * absmax.reshape(-1, 1, codes.shape[-1])
        return values.reshape(*self.codes.shape[: len(self.codes.shape) - len(out_shape)], *out_shape).astype(
            dtype
        )

    def project(self, x, dtype):
        """x [B, T, d_in] times this weight, dequantized in the compute dtype inside the matmul."""
        batch, length, d_in = x.shape
        weight = self.dequantize(dtype).reshape(d_in, -1)
        out = jnp.dot(x.reshape(batch * length, d_in), weight, preferred_element_type=jnp.float32)
        return out.astype(dtype).reshape(
            batch, length, *self.codes.shape[len(self.codes.shape) - (self.block_scale.ndim - 1) :]
        )


def quantize_nf4(w, input_axes: int = 1) -> NF4Weight:
    """NF4 with double-quantized block absmaxes; the input side must be a multiple of NF4_BLOCK."""
    out_shape = w.shape[input_axes:]
    d_in = math.prod(w.shape[:input_axes])
    if d_in % NF4_BLOCK:
        raise ValueError(
            f"NF4 needs the input side of every matrix to be a multiple of {NF4_BLOCK}, not {d_in}."
        )
    blocks = w.astype(jnp.float32).reshape(d_in // NF4_BLOCK, NF4_BLOCK, -1)
    absmax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=1), _MIN_SCALE_BASE)  # [blocks, out]
    code = jnp.asarray(NF4_CODE)
    codes = jnp.argmin(jnp.abs((blocks / absmax[:, None])[..., None] - code), axis=-1)
    mean = jnp.mean(absmax, axis=0, keepdims=True)
    step = jnp.maximum(jnp.max(jnp.abs(absmax - mean), axis=0, keepdims=True), _MIN_SCALE_BASE) / INT8_MAX
    block_scale = jnp.clip(jnp.round((absmax - mean) / step), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return NF4Weight(
        codes.reshape(w.shape).astype(jnp.uint4),
        block_scale.reshape(d_in // NF4_BLOCK, *out_shape),
        step.reshape(1, *out_shape),
        mean.reshape(1, *out_shape),
    )


# The stored forms `model._project` hands its matmul to.
QUANTIZED = (QuantizedWeight, NF4Weight)


def _channel_max(w, input_axes: int):
    """max |w| over the input axes, kept as size-1 axes: one value per output channel."""
    return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(range(input_axes)), keepdims=True)


def quantize_int8(w, input_axes: int = 1) -> QuantizedWeight:
    """Symmetric per-output-channel int8: round(w / scale) with scale = max |w| / 127."""
    scale = jnp.maximum(_channel_max(w, input_axes), _MIN_SCALE_BASE) / INT8_MAX
    value = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -INT8_MAX, INT8_MAX)
    return QuantizedWeight(value.astype(jnp.int8), scale, "int8")


def quantize_fp8(w, input_axes: int = 1) -> QuantizedWeight:
    """Per-output-channel e4m3: w / scale rounded to fp8, with scale = max |w| / 448."""
    scale = jnp.maximum(_channel_max(w, input_axes), _MIN_SCALE_BASE) / FP8_MAX
    value = jnp.clip(w.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX)
    return QuantizedWeight(value.astype(FP8_DTYPE), scale, "fp8")


def quantize_rows_fp8(x, bound: float = FP8_ACTIVATION_BOUND):
    """Dynamic row-wise fp8 of activations x [N, d]: (x_fp8 [N, d], scale [N, 1] fp32) with
    scale = clip(max |row|, tiny, bound) / 448; entries beyond the bound saturate at +-448."""
    row_max = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.clip(row_max, _MIN_SCALE_BASE, bound) / FP8_MAX
    x_fp8 = jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return x_fp8, scale


def quantized_weight_names(mode: str, layer: int, n_layers: int) -> list[tuple[str, str]]:
    """(module, weight) pairs of layer `layer` that `mode` quantizes."""
    if mode == "int8":
        return [("attention", n) for n in ("wq", "wk", "wv", "wo")] + [
            ("feed_forward", n) for n in ("w1", "w3", "w2")
        ]
    if layer in (0, n_layers - 1):
        return []  # Llama 3's FP8 recipe keeps the first and last layers in full precision
    return [("feed_forward", n) for n in ("w1", "w3", "w2")]


def unstack_layers(params, cfg: ModelConfig) -> dict:
    """The params in the unscanned layout: `layers` [n_layers, ...] becomes `layers_{i}`."""
    if not cfg.scan_layers:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out


def quantize_params(params, cfg: ModelConfig, mode: str) -> tuple[ModelConfig, dict]:
    """(cfg with scan_layers=False, params with the weights `mode` covers quantized); `params`
    itself is left as it was."""
    if mode not in MODES:
        raise ValueError(f"Unknown quantization {mode!r}; choose one of {', '.join(MODES)}.")
    quantize = quantize_int8 if mode == "int8" else quantize_fp8
    qparams = unstack_layers(params, cfg)
    for i in range(cfg.n_layers):
        layer = {module: dict(weights) for module, weights in qparams[f"layers_{i}"].items()}
        for module, name in quantized_weight_names(mode, i, cfg.n_layers):
            layer[module][name] = quantize(jnp.asarray(layer[module][name]), _INPUT_AXES[name])
        qparams[f"layers_{i}"] = layer
    return cfg.replace(scan_layers=False), qparams


def weight_bytes(params) -> int:
    """Bytes of every array in the tree (quantized weights count their values and scales)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))


# --- QLoRA: the frozen base of a LoRA run, stored quantized --------------------------------------


def _quantize_stacked(w, input_axes: int, stacked: bool, mode: str):
    """`w` quantized per output channel; with `stacked`, axis 0 counts layers (its own scales),
    so that nn.scan slices value and scale alike."""
    quantize = quantize_int8 if mode == "int8" else quantize_nf4
    return jax.vmap(lambda layer: quantize(layer, input_axes))(w) if stacked else quantize(w, input_axes)


def _map_base_weights(tree, fn, path=(), stacked=False):
    """`tree` with fn(path, leaf, input_axes, stacked) at every attention and feed-forward matrix
    (`stacked`: under `layers`, the scanned layout's leading layer axis)."""
    out = {}
    for key, value in tree.items():
        here = (*path, key)
        if isinstance(value, dict):
            out[key] = _map_base_weights(value, fn, here, stacked or key == "layers")
        elif path and path[-1] in ("attention", "feed_forward") and key in _INPUT_AXES:
            out[key] = fn(here, value, _INPUT_AXES[key], stacked)
        else:
            out[key] = value
    return out


def quantize_base(base, mode: str):
    """The base's attention and feed-forward matrices quantized for QLoRA (`mode` int8 or nf4), in
    either layer layout; embeddings, the head and the norms keep their dtype."""
    return _map_base_weights(
        dict(base), lambda _, w, axes, stacked: _quantize_stacked(w, axes, stacked, mode)
    )


def _quantized_layout(shape, spec, input_axes: int, stacked: bool, mode: str):
    """(shapes, logical specs) of each array of a quantized matrix of `shape` with logical `spec`,
    as the QuantizedWeight or NF4Weight it becomes (the layer axis first, if `stacked`)."""
    lead = 1 if stacked else 0
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    head, inputs, outputs = shape[:lead], shape[lead : lead + input_axes], shape[lead + input_axes :]
    head_spec, out_spec = spec[:lead], spec[lead + input_axes :]
    P = jax.sharding.PartitionSpec
    if mode == "int8":
        scale = (*head, *(1,) * input_axes, *outputs)
        return QuantizedWeight(tuple(shape), scale, "int8"), QuantizedWeight(P(*spec), P(*spec), "int8")
    blocks = (*head, math.prod(inputs) // NF4_BLOCK, *outputs)
    channel = (*head, 1, *outputs)
    per_block = P(*head_spec, None, *out_spec)
    return (
        NF4Weight(tuple(shape), blocks, channel, channel),
        NF4Weight(P(*spec), per_block, per_block, per_block),
    )


def quantized_shardings(shapes, logical_specs, shardings, mode: str, mesh, rules):
    """`shardings` of a base tree with each quantized matrix's sharding split over its arrays: the
    stored values as the weight, scales with the weight's output axes (the input side whole)."""

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    def split(path, _, input_axes, stacked):
        layout, specs = _quantized_layout(
            at(shapes, path).shape, at(logical_specs, path), input_axes, stacked, mode
        )
        return jax.tree.map(
            lambda shape, spec: jax.sharding.NamedSharding(mesh, logical_to_spec(spec, shape, mesh, rules)),
            layout,
            specs,
            is_leaf=lambda x: isinstance(x, (tuple, jax.sharding.PartitionSpec)),
        )

    return _map_base_weights(dict(shardings), split)
