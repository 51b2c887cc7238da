"""Training with LoRA: the state holds the adapters, the frozen base rides beside it.

    trainable = trainable_part(exp)                      # picks the adapters from a params tree
    base = place_base(module, exp, mesh, host_params)    # the frozen base on the mesh (QLoRA: quantized)
    loss = adapted_loss(stage_loss)                      # (adapters, batch, (base, frozen), rng) -> ...

The train step differentiates with respect to its state's params, so gradients, the optimizer state
and checkpoints hold the adapters (and a reward model's scalar head) only; the base is an input of
every step, sharded by the same logical axes as any weight, never updated and never saved.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import lora as lora_lib
from llama_jax.config import Experiment
from llama_jax.quantize import quantize_base, quantized_shardings
from llama_jax.sharding import activation_sharding, tree_shardings
from llama_jax.steps import _init_params

# A stage's frozen input that stands for the base itself (DPO's reference under LoRA): the same
# arrays on the mesh, no second copy.
BASE = "the base with its adapters off"


def enabled(exp: Experiment) -> bool:
    return exp.model.lora is not None


def trainable_part(exp: Experiment) -> Callable[[Any], Any]:
    """params -> what the state trains: everything, or with LoRA the adapters."""
    if not enabled(exp):
        return lambda params: params
    return lambda params: lora_lib.split(params)[0]


def _frozen_part(params):
    return lora_lib.split(params)[1]


def _stored(base, exp: Experiment):
    """The frozen base as it is kept: in the compute dtype (every use casts it there first, so
    this changes no result, and a frozen weight needs no fp32 master copy), quantized if asked."""
    dtype = exp.model.dtype
    base = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, base)
    mode = exp.model.lora.quantize_base
    return quantize_base(base, mode) if mode else base


def base_shardings(module: nn.Module, exp: Experiment, mesh, *, quantized: bool = True):
    """Shardings of the frozen base (quantized as lora.quantize_base says, unless not `quantized`),
    from its logical axes."""
    boxed = jax.eval_shape(lambda: _frozen_part(_init_params(module, jax.random.key(0))))
    shardings = tree_shardings(nn.meta.unbox(boxed), nn.get_partition_spec(boxed), mesh, exp.mesh.rules)
    mode = exp.model.lora.quantize_base
    if not mode or not quantized:
        return shardings
    return quantized_shardings(
        nn.meta.unbox(boxed), nn.get_partition_spec(boxed), shardings, mode, mesh, exp.mesh.rules
    )


def abstract_base(module: nn.Module, exp: Experiment, mesh):
    """The base's shapes and dtypes with their shardings (for ahead-of-time compilation)."""
    shardings = base_shardings(module, exp, mesh)
    shapes = jax.eval_shape(
        lambda: _stored(_frozen_part(nn.meta.unbox(_init_params(module, jax.random.key(0)))), exp)
    )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def place_base(module: nn.Module, exp: Experiment, mesh, host_params=None):
    """The frozen base on the mesh: `host_params` (init_from's, host arrays) or, without them, the
    random initialisation of train.seed; in the compute dtype, and quantized if lora.quantize_base
    says so."""
    # Shardings first: unboxing the logical axes inside the mesh context would constrain them.
    plain = base_shardings(module, exp, mesh, quantized=False)
    stored = base_shardings(module, exp, mesh)
    with activation_sharding(mesh, exp.mesh.rules):
        if host_params is None:
            return jax.jit(
                lambda rng: _stored(_frozen_part(nn.meta.unbox(_init_params(module, rng))), exp),
                out_shardings=stored,
            )(jax.random.key(exp.train.seed))
        base = jax.device_put(_frozen_part(host_params), plain)
        return jax.jit(lambda b: _stored(b, exp), out_shardings=stored, donate_argnums=0)(base)


def fresh_trainable(module: nn.Module, exp: Experiment, rng):
    """The trainable part of a fresh initialisation (traceable: jit or eval_shape it)."""
    return trainable_part(exp)(nn.meta.unbox(_init_params(module, rng)))


def adapted_loss(loss_fn):
    """The stage's loss `loss(params, batch, frozen)` as a loss of the trainable part: its frozen
    argument is (base, the stage's own frozen parameters or None), and `rng` (the step's) draws
    LoRA's dropout masks."""

    def loss(trainable, batch, frozen, rng=None):
        base, inner = frozen
        params = lora_lib.merge(base, trainable)
        if rng is not None:
            params = lora_lib.with_dropout_key(params, jax.random.key_data(rng))
        return loss_fn(params, batch, inner)

    return loss


def trainable_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
