"""The one training loop, and the protocol of the stages it runs.

    Trainer(exp, workdir, get_stage(exp.stage_name)).run() -> last logged metrics and the state

A stage (pretraining, SFT, reward model, DPO, PPO, or one defined in an experiment file) is a
small `Stage` object found by name in a registry (`register_stage`). It says what the run trains
(its model, loss, batches and their shardings, its data, tokens per step) and hands the loop a
`Run`: the state to start from, one step, evaluation and the end-of-run sample. The loop owns
everything else, the same for every stage: resume, the step loop, the metrics window and MFU, the
evaluation cadence, checkpoints, SIGTERM and preemption, the sample. It never imports a stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax import lora as lora_lib
from llama_jax import lora_training, phases
from llama_jax import steps as steps_lib
from llama_jax.averaging import AveragingError, write_average
from llama_jax.checkpoint import TrainCheckpointer, data_record
from llama_jax.config import ConfigError, Experiment
from llama_jax.context_parallel import check_context_length, context_size
from llama_jax.convert.peft import save_peft
from llama_jax.data.training import TrainingData, training_data
from llama_jax.generate import generate
from llama_jax.goodput import Goodput, StepTrace
from llama_jax.init_from import source_params, with_source
from llama_jax.loss import cross_entropy_sum, next_token_targets
from llama_jax.metrics import MetricsWriter, flops_per_token, peak_flops_per_second, repair_event_files
from llama_jax.model import Llama, count_params, lm_head
from llama_jax.optim import make_optimizer
from llama_jax.run_lock import RunLock, RunLockError
from llama_jax.sharding import (
    MeshError,
    activation_sharding,
    batch_sharding,
    check_batch,
    device_memory_bytes,
    make_mesh,
)
from llama_jax.steps import NONFINITE


@dataclasses.dataclass
class StageInputs:
    """What a run needs besides its compiled steps: its data, the parameters to start from if not
    a random init, and the frozen parameters every step takes (DPO's online reference)."""

    data: TrainingData
    initial_params: Any = None
    frozen: Any = None


@dataclasses.dataclass
class Run:
    """A stage ready to train: what the loop drives."""

    exp: Experiment  # as the stage resolved it (e.g. with its tokenizer path)
    abstract_state: Any  # the state's shapes and shardings: the restore target
    init_state: Callable[[], Any]  # a fresh state, on the mesh
    step: Callable[[Any, int], tuple[Any, dict]]  # (state, step index) -> (state, metrics)
    data_iterator: Any = None  # saved with each checkpoint (a Grain iterator), or None
    evaluate: Callable[[Any], dict[str, float]] | None = None  # state -> {"eval_...": value}
    sample: Callable[[Any], str] | None = None  # state -> the text printed at the end
    tokens_per_step: int = 0
    flops_per_step: float = 0.0  # 0: no throughput or MFU
    tokenizer_path: str | None = None  # recorded in experiment.json for later stages
    summary: str = ""  # the line printed at the start ("": parameters, mesh, tokens per step)
    progress: Callable[[dict], dict] | None = None  # logged metrics -> progress-bar fields
    data_seconds: Callable[[], float] | None = None  # the time spent fetching batches so far


class Stage:
    """One kind of training run. Subclass it, decorate with `@register_stage("name")` and set
    `Experiment(stage="name")`; override what differs from pretraining (by default: Llama, next-
    token text batches, the experiment's data). A stage whose step is not one optimizer update
    of a loss (PPO) overrides `start` and returns its own `Run`."""

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "step"  # what one step of the loop is called
    count_name: ClassVar[str] = "target_tokens"  # what a step's loss is averaged over (not logged)
    latest_metrics: ClassVar[tuple[str, ...]] = ("grad_norm", "lr")  # logged as of the last step

    def module(self, exp: Experiment) -> nn.Module:
        """The network the stage trains."""
        return Llama(exp.model)

    def loss(self, exp: Experiment) -> steps_lib.LossFn:
        """`loss(params, batch, frozen) -> (loss_sum, count, metric_sums)`, sums over the batch."""
        raise NotImplementedError(f"The {self.name} stage defines no loss.")

    def batch_shapes(self, exp: Experiment, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{key: (shape, dtype)} of a batch of `batch_size` rows."""
        shape = (batch_size, exp.train.seq_len)
        return {
            "tokens": (shape, jnp.int32),
            "positions": (shape, jnp.int32),
            "segment_ids": (shape, jnp.int32),
            "loss_mask": (shape, jnp.float32),
        }

    def batch_shardings(self, exp: Experiment, mesh) -> dict:
        """Every array of a batch split along its rows as the rules shard `batch`."""
        return {
            key: batch_sharding(mesh, exp.mesh.rules, len(shape))
            for key, (shape, _) in self.batch_shapes(exp, 1).items()
        }

    def tokens_per_step(self, exp: Experiment) -> int:
        return exp.train.batch_size * exp.train.seq_len

    def check(self, exp: Experiment, mesh) -> None:
        """Bad configurations stop here, before anything compiles."""
        check_training(exp, mesh)

    def prepare(self, exp: Experiment, mesh, param_shardings, quiet: bool) -> tuple[Experiment, StageInputs]:
        """(exp as resolved, the run's inputs): by default the experiment's text data, and
        init_from's parameters if it names a starting point."""
        data = training_data(exp, quiet=quiet)
        initial = (
            source_params(exp.init_from, exp.model, progress=False if quiet else None)
            if exp.init_from
            else None
        )
        return exp, StageInputs(data, initial_params=initial)

    def eval_batches(self, exp: Experiment) -> int | None:
        """Batches per evaluation (None: the whole held-out iterator)."""
        return exp.train.eval_batches

    def sample_prompt(self, exp: Experiment, data: TrainingData) -> list[int] | None:
        """Token ids of the end-of-run sample's prompt (None: no sample)."""
        return data.tokenizer.encode(data.sample_prompt, bos=True)

    # --- the state and the compiled steps (also what aot.py and the tests build on) ---------

    # With LoRA (exp.lora.rank > 0) the state trains the adapters only: the frozen base is every
    # step's first frozen input (lora_training.py).

    def state_shardings(self, exp: Experiment, optimizer, mesh) -> steps_lib.TrainState:
        return steps_lib.state_shardings(
            self.module(exp), optimizer, mesh, exp.mesh.rules, lora_training.trainable_part(exp)
        )

    def abstract_state(self, exp: Experiment, optimizer, mesh, shardings=None) -> steps_lib.TrainState:
        shardings = shardings or self.state_shardings(exp, optimizer, mesh)
        return steps_lib.abstract_train_state(
            self.module(exp), optimizer, shardings, lora_training.trainable_part(exp)
        )

    def create_state(self, exp, optimizer, mesh, rng, shardings=None, params=None) -> steps_lib.TrainState:
        """A fresh state; from host `params` (init_from's) if given, but never with LoRA, whose
        state starts from fresh adapters (the parameters go to the base)."""
        shardings = shardings or self.state_shardings(exp, optimizer, mesh)
        if lora_training.enabled(exp):
            params = None
        return steps_lib.create_train_state(
            self.module(exp),
            optimizer,
            mesh,
            exp.mesh.rules,
            rng,
            shardings,
            params,
            lora_training.trainable_part(exp),
        )

    def compile(
        self, exp, optimizer, schedule, mesh, shardings=None, frozen=False
    ) -> steps_lib.CompiledSteps:
        """The jitted train and eval steps of the stage's loss, with explicit shardings (with LoRA,
        `frozen` is the shardings of (base, the stage's frozen parameters or None))."""
        loss, dropout_seed = self.loss(exp), None
        if lora_training.enabled(exp):
            loss = lora_training.adapted_loss(loss)
            if exp.lora.dropout > 0:
                dropout_seed = exp.train.seed
            if frozen is False or frozen is None:
                frozen = (lora_training.base_shardings(self.module(exp), exp, mesh), None)
        return steps_lib.compile_steps(
            loss,
            optimizer,
            schedule,
            shardings or self.state_shardings(exp, optimizer, mesh),
            self.batch_shardings(exp, mesh),
            microbatches=exp.train.microbatches,
            count_name=self.count_name,
            frozen=frozen,
            dropout_seed=dropout_seed,
        )

    def start(self, exp: Experiment, mesh, quiet: bool = False) -> Run:
        """The run of a loss-based stage: one jitted optimizer step per batch of its data."""
        optimizer, schedule = make_optimizer(exp.optim, phases.total_steps(exp), phases.lr_segments(exp))
        shardings = self.state_shardings(exp, optimizer, mesh)
        exp, inputs = self.prepare(exp, mesh, shardings.params, quiet)
        frozen = () if inputs.frozen is None else (inputs.frozen,)
        has_reference = bool(frozen)
        params_of = lambda state: state.params  # noqa: E731 - the model's whole tree, for sampling
        if lora_training.enabled(exp):
            module = self.module(exp)
            base = lora_training.place_base(module, exp, mesh, inputs.initial_params)
            inputs.initial_params = None  # the host copy is on the mesh now: let it go
            inner = frozen[0] if frozen else None
            if inner is lora_training.BASE:  # DPO's reference: the base with its adapters off
                inner = base
            inner_shardings = None if inner is None else jax.tree.map(lambda x: x.sharding, inner)
            frozen_shardings = (lora_training.base_shardings(module, exp, mesh), inner_shardings)
            frozen = ((base, inner),)
            compiled = self.compile(exp, optimizer, schedule, mesh, shardings, frozen=frozen_shardings)
            params_of = lambda state: lora_lib.merge(base, state.params)  # noqa: E731
        else:
            compiled = self.compile(exp, optimizer, schedule, mesh, shardings, frozen=bool(frozen))
        data = inputs.data
        fetching = [0.0]  # seconds spent in the data pipeline (goodput's data waits)

        def step(state, index):
            began = time.perf_counter()
            batch = steps_lib.global_batch(next(data.train), compiled.batch_sharding)
            fetching[0] += time.perf_counter() - began
            return compiled.train_step(state, batch, *frozen)

        def evaluate(state):
            batches = data.eval()
            return steps_lib.evaluate(compiled, state.params, batches, self.eval_batches(exp), frozen)

        flops = flops_per_token(exp.model, exp.train.seq_len) * self.tokens_per_step(exp)
        return Run(
            exp=exp,
            abstract_state=self.abstract_state(exp, optimizer, mesh, shardings),
            init_state=lambda: self.create_state(
                exp, optimizer, mesh, jax.random.key(exp.train.seed), shardings, inputs.initial_params
            ),
            step=step,
            data_iterator=data.train,
            evaluate=evaluate if data.eval is not None else None,
            sample=self._sampler(exp, data, params_of),
            tokens_per_step=self.tokens_per_step(exp),
            # A frozen reference's forward pass adds a third of a training step's FLOPs.
            flops_per_step=flops * (4 / 3 if has_reference else 1),
            tokenizer_path=data.tokenizer.path if data.tokenizer is not None else None,
            data_seconds=lambda: fetching[0],
        )

    def _sampler(self, exp: Experiment, data: TrainingData, params_of=None) -> Callable[[Any], str] | None:
        """The end-of-run sample; `params_of(state)` gives the whole model (default: state.params)."""
        params_of = params_of or (lambda state: state.params)
        if not exp.train.sample_tokens or data.tokenizer is None:
            return None
        prompt = self.sample_prompt(exp, data)
        if prompt is None:
            return None
        chat = data.chat_template is not None  # a chat model stops at the end of its reply

        def sample(state) -> str:
            stops = data.tokenizer.stop_ids if chat else ()
            ids = generate(
                params_of(state),
                exp.model,
                [prompt],
                exp.train.sampling,
                stop_tokens=stops,
                seed=exp.train.seed,
            )
            reply = [t for t in ids[0] if t not in set(stops)]
            return f"{data.sample_prompt}{data.tokenizer.decode(reply)!s}"

        return sample


def text_loss(exp: Experiment) -> steps_lib.LossFn:
    """The next-token loss of a text batch, the LM head applied chunk by chunk (see loss.py)."""
    cfg = exp.model

    def loss(params, batch, frozen):
        del frozen
        hidden = Llama(cfg).apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], method=Llama.hidden
        )
        targets, weights = next_token_targets(batch)
        loss_sum, count = cross_entropy_sum(
            hidden,
            lm_head(params, cfg),
            targets,
            weights,
            exp.train.loss_chunk,
            keep_logits=exp.train.keep_logits,
            # An unrolled model is unrolled throughout (the AOT estimate compiles it so).
            unroll=not cfg.scan_layers,
        )
        return loss_sum, count, {}

    return loss


def check_training(exp: Experiment, mesh) -> None:
    """The checks every loss-based stage shares: lengths, step counts, the batch on the mesh."""
    if exp.train.seq_len > exp.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={exp.train.seq_len} is longer than the model's max_seq_len={exp.model.max_seq_len}."
        )
    check_batch(exp.train.batch_size, exp.train.microbatches, mesh)
    check_context_length(exp.train.seq_len, mesh, exp.mesh.rules)
    if exp.train.batch_size % jax.process_count():
        raise MeshError(
            f"train.batch_size={exp.train.batch_size} does not split evenly over "
            f"{jax.process_count()} processes."
        )


def minimum_bytes_per_device(exp: Experiment, mesh) -> dict[str, float]:
    """A lower bound, from the shapes alone, on what one device holds during a training step:
    {"state": parameters, gradients and Adam's two moments; "activations": what the backward
    pass keeps (at least every layer's input, whatever the remat policy) and one chunk of
    logits}. The compiler needs more (workspace, the layer being recomputed); `python -m
    llama_jax.aot` measures that. A lower bound never refuses a run that would fit."""
    cfg = exp.model
    # The parameters split over the mesh axes of `embed` (FSDP; with context parallelism also the
    # context axis) and over tensor parallelism.
    rules = dict(exp.mesh.rules)
    embed_axes = rules.get("embed") or ()
    embed_axes = {embed_axes} if isinstance(embed_axes, str) else set(embed_axes)
    shards = math.prod(mesh.shape[axis] for axis in embed_axes | {"tensor"} if axis in mesh.shape)
    state = count_params(cfg) * 4 * jnp.dtype(cfg.param_dtype).itemsize / shards
    if cfg.lora is not None:
        # The adapters with their gradients and moments, and the frozen base once: in the compute
        # dtype, or for QLoRA at least its quantized bytes (NF4's 4 bits; the rest stays wider).
        base = count_params(cfg.replace(lora=None))
        per_weight = {"nf4": 0.5, "int8": 1.0}.get(cfg.lora.quantize_base, jnp.dtype(cfg.dtype).itemsize)
        adapters = (count_params(cfg) - base) * 4 * jnp.dtype(cfg.param_dtype).itemsize
        state = (base * per_weight + adapters) / shards
    # The batch axis is split over the mesh axes its rule names (by default data and fsdp).
    batch_axes = dict(exp.mesh.rules).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    batch_split = math.prod(mesh.shape[axis] for axis in batch_axes if axis in mesh.shape)
    rows = max(exp.train.batch_size // exp.train.microbatches // batch_split, 1)
    tokens = rows * exp.train.seq_len // context_size(mesh, exp.mesh.rules)
    compute = jnp.dtype(cfg.dtype).itemsize
    per_layer = cfg.dim  # the layer's input, kept by every policy
    if cfg.remat != "full":  # the MLP's two up-projections are matmul outputs: kept unless recomputed
        per_layer += 2 * cfg.ffn_dim
    activations = cfg.n_layers * tokens * per_layer * compute
    if exp.train.keep_logits:  # every position's fp32 logits, the vocabulary split as its rule says
        vocab_axes = rules.get("vocab") or ()
        vocab_axes = (vocab_axes,) if isinstance(vocab_axes, str) else tuple(vocab_axes)
        vocab_split = math.prod(mesh.shape[axis] for axis in vocab_axes if axis in mesh.shape)
        activations += tokens * cfg.vocab_size * 4 / vocab_split
    else:
        activations += rows * min(exp.train.loss_chunk, exp.train.seq_len) * cfg.vocab_size * 4  # fp32
    return {"state": state, "activations": activations}


def check_fit(exp: Experiment, mesh) -> None:
    """A run that cannot fit its devices stops here, from the shapes (no memory used), instead of
    trying to allocate its parameters and optimizer state."""
    have = device_memory_bytes()
    need = minimum_bytes_per_device(exp, mesh)
    total = sum(need.values())
    if have is not None and total > have:
        devices = jax.local_devices()
        raise MeshError(
            f"{exp.name} needs at least {total / 2**30:,.1f} GiB per device ({need['state'] / 2**30:,.1f} GiB "
            f"of parameters, gradients and optimizer state, {need['activations'] / 2**30:,.1f} GiB of "
            f"activations), and each of the {len(devices)} {devices[0].platform} device(s) here has "
            f"{have / 2**30:,.1f} GiB; the experiment targets {exp.target}: check a fit there with "
            f"`python -m llama_jax.aot --exp={exp.name}`."
        )


def check_workdir(workdir: Path) -> None:
    """An unwritable workdir (or checkpoint directory) is found now, before anything compiles,
    not at the first save."""
    workdir = Path(workdir)
    for directory in (workdir, workdir / "checkpoints"):
        if directory.name == "checkpoints" and not directory.exists():
            continue
        probe = directory / f".write-test-{jax.process_index()}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"Cannot write to {directory} ({err.strerror or err}).") from None


# --- the registry ---------------------------------------------------------------------------

_STAGES: dict[str, type[Stage]] = {}


def register_stage(name: str):
    """Class decorator: the stage that `Experiment(stage=name)` (or posttrain.stage) runs. A later
    registration of the same name replaces the earlier one (an experiment file loaded again)."""

    def register(cls: type[Stage]) -> type[Stage]:
        cls.name = name
        _STAGES[name] = cls
        return cls

    return register


def get_stage(name: str) -> Stage:
    if name not in _STAGES:
        known = ", ".join(sorted(_STAGES)) or "none"
        raise ConfigError(f"Unknown stage {name!r}; the registered stages are {known}.")
    return _STAGES[name]()


def registered_stages() -> list[str]:
    return sorted(_STAGES)


# --- the loop -------------------------------------------------------------------------------


class StopRequest:
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


class Trainer:
    """Runs one experiment with one stage, resuming from WORKDIR/checkpoints if it can."""

    def __init__(self, exp: Experiment, workdir: str | Path, stage: Stage, *, quiet: bool = False):
        self.exp, self.workdir, self.stage, self.quiet = exp, Path(workdir), stage, quiet
        self.speak = not quiet and jax.process_index() == 0  # one process speaks for the job
        self.stopped = False  # a stop was requested (SIGTERM, preemption): no further phase starts
        self.say = tqdm.write if self.speak else (lambda *a: None)

    def run(self) -> dict:
        """Trains to train.steps (phase after phase, if the experiment has phases); returns the
        last logged metrics (with the evaluation's, if any) and the final `state`."""
        exp = self.exp = with_source(self.exp)  # init_from's architecture and tokenizer, if any
        phases.check_phases(exp)
        ends = [end for _, end in phases.bounds(exp)]
        meshes = [make_mesh(self._phase(index).mesh) for index in range(len(ends))]
        for index, mesh in enumerate(meshes):  # every phase is checked before the first one trains
            self.stage.check(self._phase(index), mesh)
            check_fit(self._phase(index), mesh)
        check_workdir(self.workdir)
        if exp.optim.warmup_steps > exp.train.steps:
            self.say(
                f"warning: optim.warmup_steps={exp.optim.warmup_steps} is longer than the run "
                f"(train.steps={exp.train.steps}): the learning rate never reaches optim.peak_lr."
            )
        lock = self._hold_workdir()
        try:
            if not exp.phases:
                return self._run(exp, meshes[0])
            done = TrainCheckpointer.newest_step(self.workdir) if exp.checkpoint.resume else None
            last: dict = {}
            for index, end in enumerate(ends):
                if done is not None and done >= end and index < len(ends) - 1:
                    self._average_phase(index)  # trained in an earlier run (averaged, unless cut short)
                    continue
                last = {}  # the previous phase's state leaves the devices before this one starts
                last = self._run(self._phase(index), meshes[index], phase=index)
                if self.stopped or int(last["state"].step) < end:
                    break  # stopped on request
                self._average_phase(index)
            return last
        finally:
            lock.release()

    def _phase(self, index: int) -> Experiment:
        """The experiment phase `index` trains (the whole experiment without phases). A later phase
        starts from the checkpoint at its first step, never from init_from."""
        if not self.exp.phases:
            return self.exp
        exp = phases.phase_experiment(self.exp, index)
        return exp if index == 0 else exp.replace(init_from="")

    def _average_phase(self, index: int) -> None:
        """Polyak averaging at the end of a phase that asks for it (Phase.average_last)."""
        count = self.exp.phases[index].average_last
        out = self.workdir / "averaged" / phases.name(self.exp, index)
        if not count or jax.process_index() != 0 or out.exists():
            return
        directory = self.workdir / "checkpoints"
        saved = [s for s in phases.checkpoint_steps(self.exp, index) if (directory / str(s)).is_dir()]
        if len(saved) < count:
            raise AveragingError(
                f"Phase {phases.name(self.exp, index)!r} should average its last {count} checkpoints, "
                f"but {directory} holds {len(saved)} of them."
            )
        sources = [directory / str(s) for s in saved[-count:]]
        write_average(sources, out, progress=False if self.quiet else None)  # all or nothing
        self.say(f"averaged {', '.join(p.name for p in sources)} into {out}")

    def _hold_workdir(self) -> RunLock:
        """The workdir's lock, taken by process 0 for the whole job. Every process learns whether
        it was taken, so that none goes on to wait in a collective for a process 0 that stopped."""
        lock, refusal = RunLock(self.workdir, enabled=jax.process_index() == 0, say=self.say), None
        try:
            lock.acquire()
        except RunLockError as err:
            refusal = err
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            taken = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is None)))
            if not taken and refusal is None:
                refusal = RunLockError(
                    f"The workdir {self.workdir} is in use by another run (process 0 found it locked)."
                )
        if refusal is not None:
            lock.release()
            raise refusal
        return lock

    def _run(self, exp: Experiment, mesh, phase: int | None = None) -> dict:
        goodput = Goodput()
        run = self.stage.start(exp, mesh, quiet=self.quiet)
        exp, unit = run.exp, self.stage.unit
        checkpoints = TrainCheckpointer(self.workdir, exp.checkpoint)
        record = json.loads(json.dumps(dataclasses.asdict(exp), default=str))
        if run.tokenizer_path is not None:  # the tokenizer used, so that a later stage finds it
            record["data"]["tokenizer_path"] = run.tokenizer_path
        first = phases.bounds(self.exp)[phase][0] if phase is not None else 0
        state = self._restore_or_start(run, checkpoints, data_record(record), first)
        run.init_state = run.abstract_state = None  # frees the host copy of a starting checkpoint
        start = int(state.step)
        if start >= exp.train.steps:
            self.say(
                f"{exp.name}: already trained to {unit} {start} (train.steps={exp.train.steps}); "
                f"nothing to do. Use another --workdir to start afresh."
            )
            checkpoints.close()
            return {"state": state}
        label = exp.name if phase is None else f"{exp.name} {phases.name(exp, phase)}"
        self.say(f"{label}: {run.summary or self._summary(run, mesh, state)}; workdir {self.workdir}")
        if jax.process_index() == 0:
            for path, cut in repair_event_files(self.workdir):
                self.say(f"cut {cut} torn byte(s) from the end of {path} (left by an earlier fault)")
        writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0, start=start)
        torn = writer.drop_after(start)  # steps after the checkpoint will be logged again
        if torn:
            self.say(f"dropped {torn} unreadable line(s) of {writer.path} (a row torn by an earlier fault)")
        if jax.process_index() == 0:
            (self.workdir / "experiment.json").write_text(json.dumps(record, indent=1))
        try:
            with activation_sharding(mesh, exp.mesh.rules), StopRequest() as stop:
                state, last = self._loop(run, state, start, checkpoints, writer, record, stop, goodput)
        finally:
            checkpoints.close()  # waits for the last write, also when the loop ends on an error
            writer.close()
        # A language model's adapters go out in PEFT's layout (a reward model's, with their scalar
        # head, stay in its checkpoints).
        if lora_training.enabled(exp) and int(state.step) == exp.train.steps and "score" not in state.params:
            self._export_adapters(exp, state)
        # Every process takes part in sampling (the parameters span them all); one prints.
        if run.sample is not None and not self.quiet and int(state.step) == exp.train.steps:
            self.say(f"sample: {run.sample(state)}")
        last["state"] = state
        return last

    def _export_adapters(self, exp: Experiment, state) -> None:
        """A finished LoRA run's adapters in Hugging Face PEFT's layout, WORKDIR/adapter (loads
        with peft onto the transformers model of the base; `python -m llama_jax.convert
        --merge-lora` folds them into it)."""
        from jax.experimental import multihost_utils

        out = self.workdir / "adapter"
        adapters = multihost_utils.process_allgather(state.params, tiled=True)  # every process takes part
        if jax.process_index() != 0 or out.exists():
            return
        save_peft(adapters, exp.model, exp.lora, out, base=exp.init_from)
        self.say(f"adapters in PEFT's layout: {out}")

    def _restore_or_start(self, run: Run, checkpoints: TrainCheckpointer, data: dict | None, first: int = 0):
        """The newest checkpoint's state, or a fresh one. A phase that starts at step `first` > 0
        takes the checkpoint at that step with its own data from the beginning."""
        if run.exp.checkpoint.resume or first:
            restored = checkpoints.restore_latest(
                run.abstract_state,
                run.data_iterator,
                model=run.exp.model,
                data_record=data,
                fresh_data_at=first or None,
            )
            if restored is not None and restored[1] >= first:
                state, step = restored
                self.say(f"resumed from {checkpoints.directory / str(step)}")
                return state
            if first:
                raise ConfigError(
                    f"Phase {phases.name(self.exp, phases.phase_at(self.exp, first))!r} starts from the "
                    f"checkpoint at step {first}, and {checkpoints.directory} has none at or after it."
                )
        return run.init_state()

    def _summary(self, run: Run, mesh, state) -> str:
        exp, devices = run.exp, jax.devices()
        peak, peak_source = peak_flops_per_second()
        trained = ""
        if lora_training.enabled(exp):
            n = lora_training.trainable_count(state.params)
            trained = (
                f" ({n / 1e6:,.2f}M trained: LoRA rank {exp.lora.rank} on {', '.join(exp.lora.targets)})"
            )
        return (
            f"{count_params(exp.model.replace(lora=None)) / 1e6:,.1f}M parameters{trained}, mesh {dict(mesh.shape)} on "
            f"{len(devices)} {devices[0].platform} device(s), {run.tokens_per_step:,} tokens/step, "
            f"{exp.train.steps} steps; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})"
        )

    def _loop(self, run: Run, state, start: int, checkpoints, writer, record, stop, goodput: Goodput):
        exp = run.exp
        goodput.add("startup", time.perf_counter() - goodput.started)
        trace = StepTrace(exp.train.profile_range, self.workdir, self.say)
        try:
            return self._steps(run, state, start, checkpoints, writer, record, stop, goodput, trace)
        finally:
            trace.stop()  # a run that ended early or on an error

    def _steps(self, run: Run, state, start, checkpoints, writer, record, stop, goodput, trace):
        exp = run.exp
        fetched = run.data_seconds or (lambda: 0.0)
        bar = tqdm(
            total=exp.train.steps,
            initial=start,
            desc=exp.name,
            unit=self.stage.unit,
            disable=not self.speak or None,
            dynamic_ncols=True,
        )
        last: dict = {}
        window = Window(self.stage, run)
        guard = DivergenceGuard(exp.train, self.say)
        every = exp.checkpoint.every_steps
        for step in range(start, exp.train.steps):
            trace.before(step)
            began, data_before = time.perf_counter(), fetched()
            state, metrics = run.step(state, step)
            window.add(metrics, step, first=step == start)
            if step == start:  # the first step compiles (its batch counts as a data wait)
                goodput.add("compile", time.perf_counter() - began - (fetched() - data_before))
            done = step + 1
            trace.after(done, state)
            if done % exp.train.log_every == 0 or done == exp.train.steps:
                last = window.flush()
                goodput.lost["data"] = fetched()
                last.update(goodput.report())
                writer.write(done, last)
                bar.set_postfix(**window.progress(last), good=f"{last['goodput']:.0%}")
                guard.check(window.flags, last)
            if run.evaluate is not None and (done % exp.train.eval_every == 0 or done == exp.train.steps):
                with goodput.losing("eval"):
                    evaluated = run.evaluate(state)
                last.update(evaluated)
                writer.write(done, evaluated)
                summary = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in evaluated.items())
                self.say(f"{self.stage.unit} {done}: {summary}")
                window.restart_clock()  # evaluation time is not training throughput
            bar.update()
            if stop.should_stop(done):
                self.stopped = True
                checkpoints.save(done, state, run.data_iterator, record, wait=True)
                self.say(
                    f"stopping at {self.stage.unit} {done} on request; saved {checkpoints.directory / str(done)}"
                )
                break
            if (every and done % every == 0) or done == exp.train.steps:
                with goodput.losing("checkpoint"):
                    checkpoints.save(done, state, run.data_iterator, record)
        trace.stop(state)
        bar.close()
        return state, last


class DivergenceError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message is one sentence."""


class DivergenceGuard:
    """What the loop does with steps whose loss or gradient was not finite (the step itself never
    applies them, see steps.make_train_step): `train.on_nonfinite=stop` ends the run at the first;
    `skip` goes on and ends it after `train.max_skipped` in a row. Checked at every log line."""

    def __init__(self, cfg, say):
        self.cfg, self.say, self.in_a_row = cfg, say, 0

    def check(self, flags: list[tuple[int, bool]], last: dict) -> None:
        """`flags`: (step, whether its update was dropped) for the steps of one log window."""
        skipped = [step for step, bad in flags if bad]
        for step, bad in flags:
            self.in_a_row = self.in_a_row + 1 if bad else 0
            if bad and self.cfg.on_nonfinite == "stop":
                raise DivergenceError(
                    f"The loss or gradient norm of step {step} is not finite (lr {last.get('lr', 0.0):.3g}); "
                    "its update was not applied and the run stops. Resume from the last checkpoint "
                    "with a lower optim.peak_lr, or set train.on_nonfinite=skip."
                )
            if self.in_a_row >= self.cfg.max_skipped:
                raise DivergenceError(
                    f"{self.in_a_row} steps in a row, to step {step}, had a non-finite loss or gradient "
                    f"(train.max_skipped={self.cfg.max_skipped}); the run stops. Resume from the last "
                    "checkpoint with a lower optim.peak_lr."
                )
        if skipped:
            self.say(
                f"skipped the updates of steps {', '.join(map(str, skipped))}: non-finite loss or gradient"
            )


class Window:
    """The metrics of the steps since the last log line: averaged (the stage's `latest_metrics`
    as of the last step), with throughput and MFU from the steps timed in it."""

    def __init__(self, stage: Stage, run: Run):
        self.stage, self.run = stage, run
        self.peak = peak_flops_per_second()[0] if run.flops_per_step else 0.0
        self.metrics: list = []
        self.steps: list[int] = []  # the step number each entry of `metrics` ends at
        self.flags: list[tuple[int, bool]] = []  # after a flush: (step, update dropped) for each
        self.timed_steps, self.started = 0, time.perf_counter()

    def add(self, metrics, step: int, first: bool) -> None:
        self.metrics.append(metrics)
        self.steps.append(step + 1)
        self.timed_steps += 1
        if first:  # the first step carries the compile: not timed
            jax.block_until_ready(metrics)
            self.restart_clock()

    def restart_clock(self) -> None:
        self.timed_steps, self.started = 0, time.perf_counter()

    def flush(self) -> dict:
        fetched = jax.device_get(self.metrics)
        latest, skip = self.stage.latest_metrics, self.stage.count_name
        names = [n for n in ("loss", "grad_norm", "lr") if n in fetched[-1]]
        names += [n for n in self.metrics[-1] if n not in names and n not in (skip, NONFINITE)]
        self.flags = [(s, bool(m.get(NONFINITE, 0.0))) for s, m in zip(self.steps, fetched)]
        last = {
            name: float(fetched[-1][name]) if name in latest else float(np.mean([m[name] for m in fetched]))
            for name in names
        }
        if self.timed_steps and self.run.flops_per_step:
            elapsed = time.perf_counter() - self.started
            tokens_per_s = self.timed_steps * self.run.tokens_per_step / elapsed
            last.update(
                tokens_per_s=tokens_per_s,
                step_time_s=elapsed / self.timed_steps,
                mfu=tokens_per_s * self.run.flops_per_step / self.run.tokens_per_step / self.peak,
            )
        self.metrics, self.steps = [], []
        self.restart_clock()
        return last

    def progress(self, last: dict) -> dict:
        if self.run.progress is not None:
            return self.run.progress(last)
        if "mfu" not in last:
            return {"loss": f"{last['loss']:.3f}"} if "loss" in last else {}
        return {
            "loss": f"{last['loss']:.3f}",
            "tok_s": f"{last['tokens_per_s']:,.0f}",
            "mfu": f"{last['mfu']:.1%}",
        }
