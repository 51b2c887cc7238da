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

from llama_jax.config import ModelConfig

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
