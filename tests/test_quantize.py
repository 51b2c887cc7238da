"""Quantization: int8 and fp8 against their formulas, the FP8 recipe's choice of weights, logits
close to the unquantized model's, and generation with --quant."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llama_jax import generate as generate_lib
from llama_jax.model import Llama
from llama_jax.quantize import (
    FP8_ACTIVATION_BOUND,
    QuantizedWeight,
    quantize_fp8,
    quantize_int8,
    quantize_params,
    quantize_rows_fp8,
    unstack_layers,
    weight_bytes,
)

RNG = np.random.default_rng(0)


def _matrix(*shape):
    # Columns of very different magnitudes, so that one scale per column matters.
    return (RNG.standard_normal(shape) * np.exp(RNG.uniform(-4, 2, shape[-1]))).astype(np.float32)


def test_int8_matches_the_formula_and_its_error_bound():
    w = _matrix(96, 40)
    q = quantize_int8(jnp.asarray(w))
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    assert q.value.dtype == jnp.int8 and q.value.shape == w.shape and q.scale.shape == (1, 40)
    np.testing.assert_array_equal(np.asarray(q.value), np.round(w / scale))
    # Rounding to the nearest step: off by at most half a step, and the column max is exact.
    error = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(error <= scale / 2 * (1 + 1e-5))
    assert np.abs(np.asarray(q.value)).max(axis=0).tolist() == [127] * 40


def test_fp8_matches_the_formula_and_its_error_bound():
    w = _matrix(96, 40)
    q = quantize_fp8(jnp.asarray(w))
    scale = np.abs(w).max(axis=0, keepdims=True) / 448
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    assert q.value.dtype == jnp.float8_e4m3fn
    expected = (w / np.asarray(q.scale)).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q.value).view(np.uint8), expected.view(np.uint8))
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal numbers, and an absolute
    # 2^-10 (half the subnormal step 2^-9) below the smallest normal, 2^-6.
    error = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(error <= np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-5))


def test_fp8_activation_rows_are_scaled_up_to_the_bound():
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    x[1, 5] = 5000.0  # an outlier token: its scale stops at 1200 / 448, the outlier saturates
    x_fp8, scale = quantize_rows_fp8(jnp.asarray(x))
    row_max = np.abs(x).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(scale), np.minimum(row_max, FP8_ACTIVATION_BOUND) / 448, rtol=1e-6)
    values = np.asarray(x_fp8).astype(np.float32)
    assert values[1, 5] == 448.0
    assert np.abs(values[[0, 2]]).max(axis=1).tolist() == [448.0, 448.0]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_projection_equals_the_dequantized_matmul(mode):
    # wo [heads, head_dim, dim] reads two input axes and is reshaped to 2-D before its matmul.
    w = _matrix(4, 8, 24)
    q = (quantize_int8 if mode == "int8" else quantize_fp8)(jnp.asarray(w), 2).reshape(-1, 24)
    assert q.value.shape == (32, 24) and q.scale.shape == (1, 24)
    x = jnp.asarray(RNG.standard_normal((2, 5, 32)).astype(np.float32))
    ours = np.asarray(q.project(x, jnp.float32))
    if mode == "int8":
        reference = np.asarray(x) @ np.asarray(q.dequantize())
    else:  # the activations are rounded to fp8 too
        x_fp8, x_scale = quantize_rows_fp8(x.reshape(10, 32))
        x_deq = np.asarray(x_fp8).astype(np.float32) * np.asarray(x_scale)
        reference = (x_deq @ np.asarray(q.dequantize())).reshape(2, 5, 24)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def _is_quantized(leaf, mode):
    return isinstance(leaf, QuantizedWeight) and leaf.mode == mode


def test_fp8_recipe_quantizes_middle_feed_forward_layers_only(small_checkpoint):
    _, _, cfg, params = small_checkpoint
    qcfg, qparams = quantize_params(params, cfg, "fp8")
    assert qcfg == cfg.replace(scan_layers=False)
    for i in range(cfg.n_layers):
        layer = qparams[f"layers_{i}"]
        original = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        middle = 0 < i < cfg.n_layers - 1
        for name in ("w1", "w2", "w3"):
            assert _is_quantized(layer["feed_forward"][name], "fp8") == middle
        untouched = [k for k in layer if k != "feed_forward" or not middle]
        for ours, theirs in zip(
            jax.tree.leaves([layer[k] for k in untouched]),
            jax.tree.leaves([original[k] for k in untouched]),
            strict=True,
        ):
            assert ours.dtype == theirs.dtype == jnp.float32
            np.testing.assert_array_equal(ours, theirs)
    for name in ("tok_embeddings", "norm", "output"):
        assert qparams[name] is params[name]


def test_int8_quantizes_every_layer_matrix(small_checkpoint):
    _, _, cfg, params = small_checkpoint
    _, qparams = quantize_params(params, cfg, "int8")
    for i in range(cfg.n_layers):
        layer = qparams[f"layers_{i}"]
        for module, names in (("attention", "wq wk wv wo"), ("feed_forward", "w1 w2 w3")):
            assert all(_is_quantized(layer[module][n], "int8") for n in names.split())
        assert not isinstance(layer["attention_norm"]["weight"], QuantizedWeight)
    # Scales are fp32 per output channel; the matrices shrink to a quarter plus the scales.
    assert weight_bytes(qparams) < weight_bytes(params)


def test_quantized_logits_stay_close(small_checkpoint):
    _, _, cfg, params = small_checkpoint
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 24)))
    reference = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    # Unstacking alone changes nothing.
    unscanned = cfg.replace(scan_layers=False)
    same = Llama(unscanned).apply({"params": unstack_layers(params, cfg)}, tokens)
    np.testing.assert_allclose(np.asarray(same), reference, rtol=1e-5, atol=1e-5)
    # Stated tolerances (measured on this model: int8 3.1% and KL 3e-4, fp8 5.1% and 8e-4):
    # relative RMS error of the logits <= 5% (int8) / 10% (fp8), mean KL <= 1e-2 nats.
    for mode, tolerance in (("int8", 0.05), ("fp8", 0.10)):
        qcfg, qparams = quantize_params(params, cfg, mode)
        logits = np.asarray(Llama(qcfg).apply({"params": qparams}, tokens))
        error = np.sqrt(np.mean((logits - reference) ** 2) / np.mean(reference**2))
        assert 0 < error <= tolerance, (mode, error)
        log_p, log_q = jax.nn.log_softmax(reference), jax.nn.log_softmax(logits)
        kl = float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)))
        assert kl <= 1e-2, (mode, kl)


def test_int8_model_equals_the_model_with_dequantized_weights(small_checkpoint):
    # Weight-only: dequantizing inside the matmul is exact up to float rounding.
    _, _, cfg, params = small_checkpoint
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 24)))
    qcfg, qparams = quantize_params(params, cfg, "int8")
    dequantized = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, QuantizedWeight) else w,
        qparams,
        is_leaf=lambda w: isinstance(w, QuantizedWeight),
    )
    np.testing.assert_allclose(
        np.asarray(Llama(qcfg).apply({"params": qparams}, tokens)),
        np.asarray(Llama(qcfg).apply({"params": dequantized}, tokens)),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_generate_cli_runs_quantized(small_checkpoint, capsys, mode):
    ckpt, tokenizer_path, _, _ = small_checkpoint
    assert (
        generate_lib.main(
            [
                "--ckpt",
                str(ckpt),
                "--tokenizer",
                tokenizer_path,
                "--prompt",
                "the cat",
                "--max-new-tokens",
                "6",
                "--quant",
                mode,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("the cat") and out.endswith("\n")
