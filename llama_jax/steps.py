"""The pure functions of a training run: the TrainState, one optimizer step and one evaluation
step, compiled once with explicit shardings, and the global batches they take.

    loss(params, batch, frozen) -> (loss_sum, count, metric_sums)    # a stage's objective
    train_step(state, batch[, frozen]) -> (state, metrics)           # make_train_step(loss, ...)

Losses are sums over the batch's tokens (or pairs); the step adds them up over microbatches and
divides by the count once, so the gradient is the same however the batch is split. `frozen` are
parameters every step reads but never trains (DPO's online reference).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from llama_jax.context_parallel import context_size
from llama_jax.sharding import activation_sharding, tree_shardings

Batch = dict[str, jax.Array]
NONFINITE = "nonfinite"  # a step's metric: 1 where its loss or gradient was not finite (not applied)
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
    count_name: str = "target_tokens",
    dropout_seed: int | None = None,
) -> Callable:
    """A pure `train_step(state, batch, frozen=None) -> (state, metrics)`: gradients of `loss_fn`
    summed over `microbatches` slices of the batch, one optimizer update. With `dropout_seed`, the
    loss also takes `rng=`, a key of its own for every step and microbatch (LoRA's dropout)."""

    def loss_and_aux(params, batch, frozen, rng):
        extra = {} if rng is None else {"rng": rng}
        loss_sum, count, metric_sums = loss_fn(params, batch, frozen, **extra)
        return loss_sum, (count, metric_sums)

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

    def train_step(state: TrainState, batch: Batch, frozen=None):
        def rng(micro):
            if dropout_seed is None:
                return None
            return jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state.step), micro)

        def accumulated(params, batch, frozen, first=0):
            """(loss_sum, (count, sums)), grads of the batch, summed over its microbatches
            (numbered from `first`, for their dropout keys)."""
            if microbatches == 1:
                return grad_fn(params, batch, frozen, rng(first))
            # Row i goes to microbatch i % microbatches, so each device's rows spread evenly.
            split = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1),
                batch,
            )

            def accumulate(total, micro):
                index, rows = micro
                return jax.tree.map(jnp.add, total, grad_fn(params, rows, frozen, rng(first + index))), None

            shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split), frozen, rng(0))
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), split))
            return total

        if microbatches > 1 and jax.sharding.get_abstract_mesh().shape.get("dcn", 1) > 1:
            accumulated = across_slices(accumulated, microbatches)
        (loss_sum, (count, sums)), grads = accumulated(state.params, batch, frozen)
        # Sum over tokens, then one division: the same gradient however the batch is split.
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient is never applied: the step keeps the state it had (the
        # loop then stops or skips, see train.on_nonfinite).
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        )
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            count_name: count,
            NONFINITE: 1.0 - finite.astype(jnp.float32),
            **{name: value / count for name, value in sums.items()},
        }
        return new_state, metrics

    return train_step


def across_slices(accumulated: Callable, microbatches: int) -> Callable:
    """`accumulated(params, batch, frozen, first)` run by each slice of a multi-slice mesh on its own rows
    (the `dcn` axis), its sums added across slices once, after the microbatches: otherwise XLA
    reduces each microbatch's gradients over the data-center network, microbatches times a step.
    Inside, the logical rules leave `dcn` out (it is manual there)."""
    rules = tuple(
        (
            name,
            tuple(a for a in axes if a != "dcn")
            if isinstance(axes, tuple)
            else (None if axes == "dcn" else axes),
        )
        for name, axes in (nn.get_logical_axis_rules() or ())
    )

    def per_slice(params, batch, frozen):
        with nn.logical_axis_rules(rules):  # each slice's microbatches have dropout keys of their own
            out = accumulated(params, batch, frozen, jax.lax.axis_index("dcn") * microbatches)
        return jax.lax.psum(out, "dcn")

    def run(params, batch, frozen):
        rows = jax.tree.map(lambda x: P("dcn", *(None,) * (x.ndim - 1)), batch)
        whole = lambda tree: jax.tree.map(lambda _: P(), tree)  # noqa: E731
        return jax.shard_map(
            per_slice,
            in_specs=(whole(params), rows, whole(frozen)),
            out_specs=P(),
            axis_names={"dcn"},
            check_vma=False,
        )(params, batch, frozen)

    return run


def _init_params(module: nn.Module, rng):
    """Parameters still wrapped with their logical axis names. The dummy sequence splits into the
    2 x context chunks that context parallelism needs (the parameters do not depend on it)."""
    return module.init(rng, jnp.zeros((1, 2 * context_size()), jnp.int32))["params"]


def _identity(params):
    return params


def _fresh_state(module: nn.Module, optimizer, rng, params=None, trainable=_identity) -> TrainState:
    """`trainable` picks what the state trains from the module's parameters (LoRA: the adapters)."""
    if params is None:
        params = trainable(nn.meta.unbox(_init_params(module, rng)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def state_shardings(module: nn.Module, optimizer, mesh, rules, trainable=_identity) -> TrainState:
    """Shardings of the whole TrainState of `module`, from its parameters' logical axes."""

    def init_boxed(rng):
        params = trainable(_init_params(module, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    boxed = jax.eval_shape(lambda: init_boxed(jax.random.key(0)))  # traced: no device needed
    return tree_shardings(nn.meta.unbox(boxed), nn.get_partition_spec(boxed), mesh, rules)


def abstract_state(init: Callable[[], Any], shardings):
    """The state `init()` makes, as jax.ShapeDtypeStructs carrying their shardings (a restore
    target); `init` is traced, never run."""
    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_train_state(module: nn.Module, optimizer, shardings, trainable=_identity) -> TrainState:
    return abstract_state(
        lambda: _fresh_state(module, optimizer, jax.random.key(0), trainable=trainable), shardings
    )


def create_train_state(
    module: nn.Module, optimizer, mesh, rules, rng, shardings, params=None, trainable=_identity
) -> TrainState:
    """A fresh TrainState, initialised directly into its shardings (never whole on one host); from
    host `params` (e.g. a checkpoint's) instead of a random init if given."""
    with activation_sharding(mesh, rules):
        if params is None:
            return jax.jit(
                lambda rng: _fresh_state(module, optimizer, rng, trainable=trainable), out_shardings=shardings
            )(rng)
        return jax.jit(
            lambda p: _fresh_state(module, optimizer, None, p),
            in_shardings=(shardings.params,),
            out_shardings=shardings,
        )(params)


@dataclasses.dataclass
class CompiledSteps:
    """jit-wrapped train and eval steps and the shardings they were compiled for."""

    train_step: Callable  # (state, batch[, frozen]) -> (state, metrics)
    eval_step: Callable  # (params, batch[, frozen]) -> (loss_sum, count, metric_sums)
    state_shardings: Any
    batch_sharding: Any  # one NamedSharding for every array, or a dict of them by key


def compile_steps(
    loss_fn: LossFn,
    optimizer,
    schedule,
    state_shardings: TrainState,
    batch_sharding,
    *,
    microbatches: int = 1,
    count_name: str = "target_tokens",
    frozen: Any = False,
    dropout_seed: int | None = None,
) -> CompiledSteps:
    """Train and eval steps of `loss_fn` with explicit in/out shardings. With `frozen`, both take
    frozen parameters as a last argument: True shards them as the trained ones, a tree of
    shardings as it says."""
    if frozen is True:
        frozen = state_shardings.params
    frozen_shardings = () if frozen is False or frozen is None else (frozen,)
    train_step = jax.jit(
        make_train_step(loss_fn, optimizer, schedule, microbatches, count_name, dropout_seed),
        in_shardings=(state_shardings, batch_sharding, *frozen_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        lambda params, batch, frozen=None: loss_fn(params, batch, frozen),
        in_shardings=(state_shardings.params, batch_sharding, *frozen_shardings),
    )
    return CompiledSteps(train_step, eval_step, state_shardings, batch_sharding)


def global_batch(local: dict[str, np.ndarray], sharding) -> Batch:
    """This process's rows of the batch, as global arrays on the mesh (`sharding`: one for every
    array, or a dict of them by key)."""
    return {
        key: jax.make_array_from_process_local_data(
            sharding[key] if isinstance(sharding, dict) else sharding, np.asarray(value)
        )
        for key, value in local.items()
    }


def evaluate(steps: CompiledSteps, params, batches, n_batches: int | None, frozen=()) -> dict[str, float]:
    """{"eval_loss": ..., "eval_METRIC": ...} over `n_batches` batches (None: all of them)."""
    total, count, sums = 0.0, 0.0, {}
    for _, local in zip(range(n_batches) if n_batches is not None else iter(int, 1), batches):
        loss_sum, n, metric_sums = steps.eval_step(params, global_batch(local, steps.batch_sharding), *frozen)
        total, count = total + float(loss_sum), count + float(n)
        for name, value in metric_sums.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    count = max(count, 1.0)
    return {"eval_loss": total / count, **{f"eval_{name}": value / count for name, value in sums.items()}}
