"""Training: `python -m llama_jax.train [--exp NAME|PATH] [--workdir DIR] [key=value ...]`.

The core is `train_step(state, batch) -> (state, metrics)`, a pure function compiled once with
explicit shardings for the state (from the logical-axis table) and the batch (split over the
data-parallel axes). Everything else here (data, logging, the progress bar) is the shell around it.

Post-training stages (`Experiment.posttrain`) run in the same loop with their own loss: SFT is the
pretraining loss on chat data (the assistant mask as loss mask), the reward model and DPO take
pair batches (`llama_jax.posttrain.steps`); PPO has its own loop (`llama_jax.posttrain.ppo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from llama_jax import distributed
from llama_jax.checkpoint import CheckpointError, TrainCheckpointer
from llama_jax.config import ConfigError, Experiment, apply_overrides, list_experiments, load_experiment
from llama_jax.logs import send_logs_to
from llama_jax.loss import cross_entropy_sum, next_token_targets
from llama_jax.metrics import MetricsWriter, flops_per_token, peak_flops_per_second
from llama_jax.model import Llama, count_params, lm_head
from llama_jax.optim import make_optimizer
from llama_jax.sharding import (
    MeshError,
    activation_sharding,
    batch_sharding,
    check_batch,
    make_mesh,
    tree_shardings,
)

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def stage_of(exp: Experiment) -> str:
    """ "pretrain", or the post-training stage: "sft", "rm", "dpo" or "ppo"."""
    return "pretrain" if exp.posttrain is None else exp.posttrain.stage


def pair_stage(exp: Experiment) -> bool:
    """Whether the stage trains on preference pairs (reward model, DPO)."""
    return stage_of(exp) in ("rm", "dpo")


def uses_frozen_params(exp: Experiment) -> bool:
    """Whether each step also takes frozen parameters (DPO's reference, computed online)."""
    return stage_of(exp) == "dpo" and exp.posttrain.reference_logprobs == "online"


def model_module(exp: Experiment) -> nn.Module:
    """The network the stage trains: Llama, or for a reward model Llama with a scalar head."""
    if stage_of(exp) == "rm":
        from llama_jax.posttrain.heads import ScalarModel

        return ScalarModel(exp.model)
    return Llama(exp.model)


def loss_sum_and_count(params, batch: Batch, exp: Experiment):
    """(summed next-token loss, number of predicted tokens) of one batch."""
    cfg = exp.model
    hidden = Llama(cfg).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True
    )
    targets, weights = next_token_targets(batch)
    return cross_entropy_sum(hidden, lm_head(params, cfg), targets, weights, exp.train.loss_chunk)


def lm_loss(params, batch: Batch, frozen, exp: Experiment):
    del frozen
    loss_sum, count = loss_sum_and_count(params, batch, exp)
    return loss_sum, count, {}


def stage_loss(exp: Experiment) -> Callable:
    """`loss(params, batch, frozen) -> (loss_sum, count, metric_sums)` of the experiment's stage:
    sums over the batch's tokens (or pairs), divided by the count once per step."""
    if pair_stage(exp):
        from llama_jax.posttrain.steps import pair_loss_fn

        return functools.partial(pair_loss_fn(exp), exp=exp)
    return functools.partial(lm_loss, exp=exp)


def count_name(exp: Experiment) -> str:
    return "pairs" if pair_stage(exp) else "target_tokens"


def make_train_step(
    exp: Experiment, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable:
    """A pure `train_step(state, batch[, frozen]) -> (state, metrics)`; jit it with `compile_steps`."""
    loss_fn = stage_loss(exp)

    def loss_and_aux(params, batch, frozen):
        loss_sum, count, metric_sums = loss_fn(params, batch, frozen)
        return loss_sum, (count, metric_sums)

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)
    microbatches = exp.train.microbatches

    def train_step(state: TrainState, batch: Batch, frozen=None):
        if microbatches == 1:
            (loss_sum, (count, sums)), grads = grad_fn(state.params, batch, frozen)
        else:
            # Row i goes to microbatch i % microbatches, so each device's rows spread evenly.
            split = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1),
                batch,
            )

            def accumulate(total, micro):
                return jax.tree.map(jnp.add, total, grad_fn(state.params, micro, frozen)), None

            shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], split), frozen)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            ((loss_sum, (count, sums)), grads), _ = jax.lax.scan(accumulate, zeros, split)
        # Sum over tokens, then one division: the same gradient however the batch is split.
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            count_name(exp): count,
            **{name: value / count for name, value in sums.items()},
        }
        return new_state, metrics

    return train_step


def make_eval_step(exp: Experiment) -> Callable:
    """`eval_step(params, batch[, frozen]) -> (loss_sum, count, metric_sums)`."""
    loss_fn = stage_loss(exp)

    def eval_step(params, batch: Batch, frozen=None):
        return loss_fn(params, batch, frozen)

    return eval_step


def state_shardings(exp: Experiment, optimizer, mesh):
    """Shardings of the whole TrainState, from the parameters' logical axes."""

    def init_boxed(rng):  # parameters still wrapped with their logical axis names
        params = model_module(exp).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    boxed = jax.eval_shape(lambda: init_boxed(jax.random.key(0)))  # traced: no device needed
    logical = nn.get_partition_spec(boxed)
    return tree_shardings(nn.meta.unbox(boxed), logical, mesh)


def _fresh_state(exp: Experiment, optimizer, rng, params=None) -> TrainState:
    if params is None:
        params = nn.meta.unbox(model_module(exp).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_train_state(exp: Experiment, optimizer, mesh, shardings=None):
    """The TrainState as jax.ShapeDtypeStructs carrying their shardings (a restore target)."""
    shardings = shardings or state_shardings(exp, optimizer, mesh)
    shapes = jax.eval_shape(lambda: _fresh_state(exp, optimizer, jax.random.key(0)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def create_train_state(
    exp: Experiment, optimizer, mesh, rng, shardings=None, params=None
) -> tuple[TrainState, Any]:
    """A fresh TrainState, initialised directly into its shardings (never whole on one host); from
    `params` (e.g. a checkpoint's, see posttrain.stages) instead of a random init if given."""
    shardings = shardings or state_shardings(exp, optimizer, mesh)
    with activation_sharding(mesh):
        if params is None:
            state = jax.jit(lambda rng: _fresh_state(exp, optimizer, rng), out_shardings=shardings)(rng)
        else:
            state = jax.jit(
                lambda p: _fresh_state(exp, optimizer, None, p),
                in_shardings=(shardings.params,),
                out_shardings=shardings,
            )(params)
    return state, shardings


@dataclasses.dataclass
class CompiledSteps:
    train_step: Callable
    eval_step: Callable
    state_shardings: Any
    batch_sharding: Any


def compile_steps(exp: Experiment, optimizer, schedule, mesh) -> CompiledSteps:
    """jit-wrapped train and eval steps with explicit in/out shardings. With frozen parameters
    (`uses_frozen_params`) both take them as a last argument, sharded as the trained ones."""
    shardings = state_shardings(exp, optimizer, mesh)
    if pair_stage(exp):
        from llama_jax.posttrain.steps import pair_batch_shardings

        batch = pair_batch_shardings(exp, mesh)
    else:
        batch = batch_sharding(mesh)
    frozen = (shardings.params,) if uses_frozen_params(exp) else ()
    train_step = jax.jit(
        make_train_step(exp, optimizer, schedule),
        in_shardings=(shardings, batch, *frozen),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(exp), in_shardings=(shardings.params, batch, *frozen))
    return CompiledSteps(train_step, eval_step, shardings, batch)


def global_batch(local: dict[str, np.ndarray], sharding) -> Batch:
    """This process's rows of the batch, as global arrays on the mesh (`sharding`: one for every
    array, or a dict of them by key)."""
    return {
        key: jax.make_array_from_process_local_data(
            sharding[key] if isinstance(sharding, dict) else sharding, np.asarray(value)
        )
        for key, value in local.items()
    }


def check_experiment(exp: Experiment, mesh) -> None:
    """Bad configurations stop here, before anything compiles."""
    if exp.train.seq_len > exp.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={exp.train.seq_len} is longer than the model's "
            f"max_seq_len={exp.model.max_seq_len}."
        )
    if exp.train.steps < 1 or exp.train.log_every < 1:
        raise ConfigError("train.steps and train.log_every must be at least 1.")
    check_batch(exp.train.batch_size, exp.train.microbatches, mesh)
    if exp.train.batch_size % jax.process_count():
        raise MeshError(
            f"train.batch_size={exp.train.batch_size} does not split evenly over "
            f"{jax.process_count()} processes."
        )


def sample_text(
    params, cfg, prompt: list[int], n_tokens: int, seed: int = 0, temperature: float = 0.8, top_k: int = 40
) -> list[int]:
    """A short seeded continuation (top-k, temperature), recomputing the whole window for each
    token: enough to show what a run learned; `generate` is the fast path."""
    length = len(prompt) + n_tokens
    buffer = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt, jnp.int32))

    @jax.jit
    def run(buffer, rng):
        def body(i, carry):
            buf, rng = carry
            rng, key = jax.random.split(rng)
            logits = Llama(cfg).apply({"params": params}, buf)[0, i - 1] / temperature
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            token = jax.random.categorical(key, jnp.where(logits < kth, -jnp.inf, logits))
            return buf.at[0, i].set(token.astype(jnp.int32)), rng

        return jax.lax.fori_loop(len(prompt), length, body, (buffer, rng))[0]

    return [int(t) for t in run(buffer, jax.random.key(seed))[0, len(prompt) :]]


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


class _StopRequest:
    """Turns SIGTERM into "finish this step, save, exit" (on pods, JAX's preemption sync point)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        from jax._src import distributed

        # With the distributed runtime up, JAX's own preemption service owns SIGTERM.
        if distributed.global_state.client is None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        from jax.experimental import multihost_utils

        return self.requested or multihost_utils.reached_preemption_sync_point(step)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class StageInputs:
    """What a run needs besides the compiled steps: its data, the parameters to start from if not
    a random init, and the frozen parameters every step takes (DPO's online reference)."""

    data: Any  # data.training.TrainingData
    initial_params: Any = None
    frozen: Any = None


def train(exp: Experiment, workdir: str | Path, *, quiet: bool = False) -> dict:
    """Runs the experiment, resuming from WORKDIR/checkpoints if it can; returns the last logged
    metrics (with `eval_loss` if evaluated, and the final `state`)."""
    from llama_jax.data.training import training_data

    if stage_of(exp) == "ppo":
        from llama_jax.posttrain.ppo import train_ppo

        return train_ppo(exp, workdir, quiet=quiet)
    workdir = Path(workdir)
    mesh = make_mesh(exp.mesh)
    check_experiment(exp, mesh)
    optimizer, schedule = make_optimizer(exp.optim, exp.train.steps)
    steps = compile_steps(exp, optimizer, schedule, mesh)
    if exp.posttrain is None:
        inputs = StageInputs(training_data(exp, quiet=quiet))
    else:
        from llama_jax.posttrain.stages import prepare

        exp, inputs = prepare(exp, steps, mesh, quiet=quiet)
    data = inputs.data
    frozen = () if inputs.frozen is None else (inputs.frozen,)
    speak = not quiet and jax.process_index() == 0  # one process speaks for the job
    say = tqdm.write if speak else (lambda *a: None)
    checkpoints = TrainCheckpointer(workdir, exp.checkpoint)
    experiment_json = json.loads(json.dumps(dataclasses.asdict(exp), default=str))
    # The tokenizer actually used (also one trained and cached for an empty data.tokenizer_path),
    # so that a later stage starting from this run's checkpoint finds it.
    experiment_json["data"]["tokenizer_path"] = data.tokenizer.path
    restored = None
    if exp.checkpoint.resume:
        target = abstract_train_state(exp, optimizer, mesh, steps.state_shardings)
        restored = checkpoints.restore_latest(target, data.train, model=exp.model)
    if restored is None:
        state, _ = create_train_state(
            exp,
            optimizer,
            mesh,
            jax.random.key(exp.train.seed),
            steps.state_shardings,
            params=inputs.initial_params,
        )
    else:
        state, restored_step = restored
        say(f"resumed from {checkpoints.directory / str(restored_step)}")
    start_step = int(state.step)
    if start_step >= exp.train.steps:
        say(
            f"{exp.name}: already trained to step {start_step} (train.steps={exp.train.steps}); "
            f"nothing to do. Use another --workdir to start afresh."
        )
        checkpoints.close()
        return {"state": state}

    tokens_per_step = exp.train.batch_size * exp.train.seq_len * (2 if pair_stage(exp) else 1)
    flops_per_step = flops_per_token(exp.model, exp.train.seq_len) * tokens_per_step
    if frozen:  # the reference's forward pass: a third of a training step's FLOPs
        flops_per_step *= 4 / 3
    peak, peak_source = peak_flops_per_second()
    say(
        f"{exp.name}: {count_params(exp.model) / 1e6:,.1f}M parameters, mesh {dict(mesh.shape)} on "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s), {tokens_per_step:,} tokens/step, "
        f"{exp.train.steps} steps; peak {peak / 1e12:.2f} TFLOP/s ({peak_source}); workdir {workdir}"
    )

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    writer.drop_after(start_step)  # steps after the checkpoint will be logged again
    if jax.process_index() == 0:
        (workdir / "experiment.json").write_text(json.dumps(experiment_json, indent=1))
    bar = tqdm(
        total=exp.train.steps,
        initial=start_step,
        desc=exp.name,
        unit="step",
        disable=not speak or None,
        dynamic_ncols=True,
    )
    last: dict = {}
    window: list = []
    timed_steps, window_start = 0, time.perf_counter()
    every = exp.checkpoint.every_steps
    with activation_sharding(mesh), _StopRequest() as stop:
        for step in range(start_step, exp.train.steps):
            state, metrics = steps.train_step(
                state, global_batch(next(data.train), steps.batch_sharding), *frozen
            )
            window.append(metrics)
            timed_steps += 1
            if step == start_step:  # the first step carries the compile: not timed
                jax.block_until_ready(metrics)
                timed_steps, window_start = 0, time.perf_counter()
            done = step + 1
            if done % exp.train.log_every == 0 or done == exp.train.steps:
                fetched = jax.device_get(window)
                last = {
                    "loss": float(np.mean([m["loss"] for m in fetched])),
                    "grad_norm": float(fetched[-1]["grad_norm"]),
                    "lr": float(fetched[-1]["lr"]),
                }
                # The stage's own metrics (reward accuracy, margins, ...), averaged like the loss.
                last.update(
                    {
                        name: float(np.mean([m[name] for m in fetched]))
                        for name in fetched[-1]
                        if name not in last and name != count_name(exp)
                    }
                )
                if timed_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = timed_steps * tokens_per_step / elapsed
                    last.update(
                        tokens_per_s=tokens_per_s,
                        step_time_s=elapsed / timed_steps,
                        mfu=tokens_per_s * flops_per_step / tokens_per_step / peak,
                    )
                    bar.set_postfix(
                        loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{last['mfu']:.1%}"
                    )
                writer.write(done, last)
                window, timed_steps, window_start = [], 0, time.perf_counter()
            if data.eval is not None and (done % exp.train.eval_every == 0 or done == exp.train.steps):
                # Pairs: the whole held-out split (its iterator ends); text: eval_batches batches.
                n_batches = None if pair_stage(exp) else exp.train.eval_batches
                evaluated = evaluate(steps, state.params, data.eval(), n_batches, frozen)
                last.update(evaluated)
                writer.write(done, evaluated)
                say(
                    f"step {done}: "
                    + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in evaluated.items())
                )
                window_start = time.perf_counter()  # evaluation time is not training throughput
            bar.update()
            if stop.should_stop(done):
                checkpoints.save(done, state, data.train, experiment_json, wait=True)
                say(f"stopping at step {done} on request; saved {checkpoints.directory / str(done)}")
                break
            if (every and done % every == 0) or done == exp.train.steps:
                checkpoints.save(done, state, data.train, experiment_json)
    bar.close()
    checkpoints.close()  # waits for the last write
    writer.close()
    # Every process takes part in sampling (the parameters span them all); one prints.
    if (
        exp.train.sample_tokens
        and data.tokenizer is not None
        and not quiet
        and stage_of(exp) != "rm"
        and int(state.step) == exp.train.steps
    ):
        if exp.posttrain is None:
            prompt = data.tokenizer.encode(data.sample_prompt, bos=True)
        else:  # a chat model: the prompt as a user turn
            prompt = data.tokenizer.encode_chat(
                [{"role": "user", "content": data.sample_prompt}],
                template=data.chat_template,
                add_generation_prompt=True,
            ).ids
        sample = sample_text(state.params, exp.model, prompt, exp.train.sample_tokens, exp.train.seed)
        if exp.posttrain is not None:  # the reply, up to where it ends
            stops = [i for i, token in enumerate(sample) if token in data.tokenizer.stop_ids]
            sample = sample[: stops[0]] if stops else sample
        say(f"sample: {data.sample_prompt}{data.tokenizer.decode(sample)!s}")
    last["state"] = state
    return last


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(list_experiments())
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.train",
        description="Train a Llama model. With no arguments, trains the `tiny` experiment on the "
        "Python standard library's source files (a few minutes on a laptop CPU).",
        epilog=f"experiments: {names}. Overrides: any field, e.g. train.steps=100 "
        "optim.peak_lr=1e-4 mesh.fsdp=8 model.remat=full.",
    )
    parser.add_argument("--exp", default="tiny", help="an experiment name or a path to a .py file")
    parser.add_argument("--workdir", default=None, help="where metrics and checkpoints go (default runs/EXP)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    distributed.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from llama_jax.data.training import DataError

    try:
        distributed.initialize(distributed.ProcessSpec.from_args(args))  # before anything else uses JAX
        exp = apply_overrides(load_experiment(args.exp), args.overrides)
        workdir = Path(args.workdir or Path("runs") / exp.name)
        index = jax.process_index()
        send_logs_to(workdir / ("train.log" if index == 0 else f"train.{index}.log"))
        train(exp, workdir)
    except (ConfigError, MeshError, DataError, CheckpointError, distributed.DistributedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
