"""LoRA's parameter trees: which leaves train, and the adapters merged into their weights.

A LoRA model's parameters are the base's tree with two more leaves beside each targeted weight
`W` (model.py makes them): `W_lora_a` [d_in..., rank] and `W_lora_b` [rank, d_out...], so that the
layer computes x W + scale (x A) B with scale = alpha / rank. A training run keeps the trainable
leaves (the adapters, and a reward or value model's scalar head) in its TrainState and passes the
frozen base beside it; `merge` joins the two for the forward pass.

    trainable, base = split(params)          # nested dicts, the same paths as params
    params = merge(base, trainable)
    plain = merged_weights(params, lora)     # W + scale A B, the adapters gone (an exportable model)
"""

from __future__ import annotations

import numpy as np

from llama_jax.config import LoraConfig

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Trained in full beside the adapters: the scalar head of a reward or value model (tiny, new).
TRAINED_IN_FULL = ("score",)
# A leaf of the merged tree (never of a saved one) carrying the dropout key of one step.
DROPOUT_KEY = "lora_dropout_key"


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_names(weight: str) -> tuple[str, str]:
    return f"{weight}_lora_a", f"{weight}_lora_b"


def _trains(path: tuple[str, ...]) -> bool:
    return is_adapter(path[-1]) or path[0] in TRAINED_IN_FULL


def _partition(tree, keep, path=()):
    """The sub-tree of `tree` (nested dicts) whose leaf paths `keep` accepts; empty dicts dropped."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = _partition(value, keep, (*path, key))
            if sub:
                out[key] = sub
        elif keep((*path, key)):
            out[key] = value
    return out


def _as_dicts(tree):
    """Nested mappings (FrozenDicts, Flax's boxed trees' dicts) as plain dicts, leaves untouched."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {key: _as_dicts(value) for key, value in tree.items()}
    return tree


def split(params) -> tuple[dict, dict]:
    """(trainable, frozen): the adapters (and any scalar head) apart from the base."""
    params = _as_dicts(params)
    return _partition(params, _trains), _partition(params, lambda path: not _trains(path))


def merge(base, trainable) -> dict:
    """The whole tree from its two parts (the inverse of `split`)."""
    out = dict(_as_dicts(base))
    for key, value in _as_dicts(trainable).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _delta(a, b, weight_shape, xp):
    """scale-free A B reshaped to the weight: A [L?, in..., r] and B [L?, r, out...], with the
    layer axis L when the layers are stacked (W then [L, in..., out...])."""
    rank = a.shape[-1]
    stacked = len(weight_shape) == a.ndim + b.ndim - 3  # one layer axis shared by all three
    if stacked:
        layers = a.shape[0]
        product = xp.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
    else:
        product = xp.matmul(a.reshape(-1, rank), b.reshape(rank, -1))
    return product.reshape(weight_shape)


def merged_weights(params, lora: LoraConfig, xp=np) -> dict:
    """`params` with every adapter folded into its weight (W + alpha / rank A B, computed in fp32
    and cast to W's dtype) and the adapter leaves removed: a plain Llama's parameters. `xp` is
    numpy (host arrays) or jax.numpy."""

    def fold(tree):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = fold(value)
            elif not is_adapter(key):
                a_name, b_name = adapter_names(key)
                if a_name in tree:
                    a, b = (xp.asarray(tree[n]).astype(np.float32) for n in (a_name, b_name))
                    delta = lora.scale * _delta(a, b, value.shape, xp)
                    value = (xp.asarray(value).astype(np.float32) + delta).astype(value.dtype)
                out[key] = value
        return out

    return fold(_as_dicts(params))


def with_dropout_key(params, key_data) -> dict:
    """`params` with the step's dropout key beside every Llama in it (the tree's own, or a reward
    model's backbone): model.py draws LoRA's dropout masks from it."""
    params = dict(params)
    if "tok_embeddings" in params:
        params[DROPOUT_KEY] = key_data
    for name, value in params.items():
        if isinstance(value, dict) and name != DROPOUT_KEY:
            params[name] = with_dropout_key(value, key_data) if "tok_embeddings" in value else value
    return params
