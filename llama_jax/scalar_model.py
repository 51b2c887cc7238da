"""The Llama backbone with a scalar head: a reward model (one score per sequence, read at its last
token) or a value model (one value per token).

Parameters: {"backbone": <the Llama tree without `output`>, "score": {"kernel": [dim, 1], "bias": [1]}},
so a converted or trained Llama checkpoint's parameters load into the backbone as they are
(`from_llama`, `with_backbone`). The head starts at zero: a fresh reward model scores every sequence 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.model import Llama


class ScalarModel(nn.Module):
    """`ScalarModel(cfg).apply({"params": p}, tokens, positions, segment_ids) -> [B, T]` fp32: the
    head applied to the backbone's final normed hidden state at every position."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        hidden = Llama(self.cfg, name="backbone").hidden(tokens, positions, segment_ids)
        dtype = jnp.dtype(self.cfg.param_dtype)
        head = nn.Dense(
            1,
            dtype=jnp.float32,
            param_dtype=dtype,
            name="score",
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        )
        return head(hidden.astype(jnp.float32))[..., 0]


def last_token_values(values, segment_ids):
    """values [B, T] at each row's last non-padding position (segment id != 0), [B]."""
    length = segment_ids.shape[-1]
    last = length - 1 - jnp.argmax(jnp.flip(segment_ids != 0, axis=-1), axis=-1)
    return jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0]


def with_backbone(params, llama_params):
    """`params` of a ScalarModel with its backbone replaced by a Llama's parameters (whose LM head,
    `output`, the scalar model does not use)."""
    backbone = _backbone(llama_params)
    expected = jax.tree.structure(params["backbone"])
    if jax.tree.structure(backbone) != expected:
        raise ValueError("The checkpoint's parameter tree does not match the model's backbone.")
    return {**params, "backbone": backbone}


def from_llama(llama_params, cfg: ModelConfig):
    """ScalarModel parameters from a Llama's (host arrays): its backbone and a zero head, so that
    the new reward or value model scores every sequence 0. The one Llama-to-reward-model builder."""
    dtype = np.dtype(cfg.param_dtype)
    return {
        "backbone": _backbone(llama_params),
        "score": {"kernel": np.zeros((cfg.dim, 1), dtype), "bias": np.zeros((1,), dtype)},
    }


def _backbone(llama_params):
    return {k: v for k, v in llama_params.items() if k != "output"}
