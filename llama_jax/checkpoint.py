"""Checkpoints on Orbax.

`TrainCheckpointer`: the training run's checkpoints in WORKDIR/checkpoints/STEP, each holding the
TrainState (parameters, optimizer state, step), the data iterator's position and the experiment.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when
complete), old ones are deleted only after a newer one is complete, and on restore a damaged
checkpoint is reported, moved aside and skipped for the one before it. Restoring with the current
run's shardings reshards onto any mesh.

`save_params` / `load_params`: a parameters-only checkpoint (for inference and conversion), an
Orbax PyTree under DIR/params with the ModelConfig in DIR/model_config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama_jax import distributed
from llama_jax.config import (
    PARAMETER_SHAPE_FIELDS,
    CheckpointConfig,
    ModelConfig,
    architecture_differences,
    model_config_from_dict,
)

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
CHECKSUMS_FILE = "checksums.json"  # beside a parameters checkpoint: its arrays' fingerprints
# ModelConfig fields that change the shapes or layout of the saved parameters: a resumed run
# must share them (it may change, say, the RoPE scaling of a long-context phase).
RESUME_FIELDS = PARAMETER_SHAPE_FIELDS + ("param_dtype",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which and why."""


class StalledWriteError(CheckpointError):
    """A checkpoint write did not finish within checkpoint.write_timeout_s. Its thread may still be
    blocked in the filesystem, so a CLI ends the process at once rather than wait for it at exit."""


NOTE_EVERY_S = 60.0
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory being written  # how often a long wait for a checkpoint write says that it is still waiting


def _record_outcome(wait) -> None:
    try:
        wait()
    except BaseException as err:  # noqa: BLE001 - handed to the thread that waits, re-raised there
        threading.current_thread().outcome = err


# Every checkpoint carries a fingerprint of each array it holds, computed on the devices at save
# time and checked on restore: bytes altered on disk that still decode are caught, not trained on
# or served.
CHECKSUMS = "checksums"


@jax.jit
def _fingerprint(x):
    """A uint32 for one array: the sum of its elements' bits times their position's odd weight,
    mod 2^32. Integer sums do not depend on the order of addition, so the value is the same on
    any mesh and number of devices."""
    widths = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, widths[x.dtype.itemsize]).reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def checksums(tree) -> dict[str, int]:
    """{array path: fingerprint} of a tree of arrays, one array at a time (host arrays are never
    all on a device at once)."""
    return {
        _path_name(path): int(jax.device_get(_fingerprint(leaf)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _path_name(path) -> str:
    """ "opt_state/1/0/mu/layers/attention/wq": the same for a TrainState and the plain dicts and
    lists a restore without a target gives."""
    parts = (getattr(key, attr) for key in path for attr in ("key", "name", "idx") if hasattr(key, attr))
    return "/".join(str(part) for part in parts)


def verify(tree, expected: dict[str, int] | None) -> None:
    """Raises CheckpointError naming the first array whose fingerprint differs from `expected`
    (None: a checkpoint written before fingerprints, not checked)."""
    if not expected:
        return
    found = checksums(tree)
    wrong = [name for name, value in found.items() if name in expected and expected[name] != value]
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} array(s) do not match the checksums written with them, first {wrong[0]}"
        )


class TrainCheckpointer:
    """Saves and restores {state, data iterator position, experiment} under WORKDIR/checkpoints."""

    def __init__(self, workdir: str | Path, cfg: CheckpointConfig):
        self.directory = (Path(workdir) / "checkpoints").absolute()
        self.cfg = cfg
        self._manager = None

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._remove_unfinished_writes()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.cfg.keep_last,
                keep_period=self.cfg.keep_every or None,
                enable_async_checkpointing=self.cfg.async_save,
                # Done above instead: Orbax removes them in the background, where the removal can
                # race with this run's first save of the same step and delete its files.
                cleanup_tmp_directories=False,
                create=True,
                # Orbax's own waits for the other processes during an asynchronous save.
                async_options=ocp.AsyncOptions(timeout_secs=int(self.cfg.write_timeout_s)),
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def _remove_unfinished_writes(self) -> None:
        """Deletes the temporary directories of writes a fault interrupted (Orbax writes a step
        to STEP.orbax-checkpoint-tmp-* and renames it when complete), before anything is saved."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for unfinished in self.directory.glob(f"*{_ORBAX_TMP_SUFFIX}*"):
                shutil.rmtree(unfinished, ignore_errors=True)
        distributed.barrier("remove-unfinished-writes")

    def steps(self) -> list[int]:
        return sorted(self._open().all_steps())

    @staticmethod
    def newest_step(workdir: str | Path) -> int | None:
        """The newest finished checkpoint's step in WORKDIR/checkpoints, without opening Orbax
        (a write a fault interrupted has no plain step directory yet)."""
        directory = Path(workdir) / "checkpoints"
        steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()] if directory.is_dir() else []
        return max(steps, default=None)

    def save(self, step: int, state, data_iterator, experiment: dict, *, wait: bool = False) -> None:
        """Starts writing checkpoint `step`; returns at once unless `wait` (or async is off)."""
        import grain

        with self._save_errors(step):
            manager = self._open()
            if step in manager.all_steps():
                return
            experiment = {**experiment, CHECKSUMS: {"state": checksums(state)}}
            items = {"state": ocp.args.StandardSave(state), "experiment": ocp.args.JsonSave(experiment)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
            self._wait_for_write(manager)  # the previous asynchronous write, bounded
            manager.save(step, args=ocp.args.Composite(**items), force=True)
            if wait:
                self._wait_for_write(manager, step)

    @contextlib.contextmanager
    def _save_errors(self, step):
        # An asynchronous write that failed (say, on a full disk) surfaces at the next save or wait.
        try:
            yield
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"Saving a checkpoint in {self.directory} failed near step {step} "
                f"({reason}); the checkpoints already complete are intact."
            ) from err

    def restore_latest(
        self,
        abstract_state,
        data_iterator=None,
        model: ModelConfig | None = None,
        data_record: dict | None = None,
        fresh_data_at: int | None = None,
    ):
        """(state, step) from the newest checkpoint that restores cleanly, or None if none does.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with the current run's shardings; the
        data iterator, if given, is moved to the saved position in place. If `model` is given, a
        checkpoint of a model of another shape is an error rather than damage. If `data_record`
        (the run's data settings, see `data_record`) is given, a checkpoint written with other
        data is an error, or with `checkpoint.reset_data` the data starts from its beginning. From
        the checkpoint at step `fresh_data_at` (where a phase begins) the data starts afresh.
        """
        import grain

        for step in reversed(self.steps()):
            saved = self._saved_experiment(step)
            if model is not None and saved is not None:
                self._check_model(saved, model)
            if step == fresh_data_at:
                data_iterator = None
            elif (
                data_record is not None
                and saved is not None
                and not self._same_data(step, saved, data_record)
            ):
                data_iterator = None  # checkpoint.reset_data: the new data from its beginning
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            data_state = (
                self._data_state_from_other_process_count(step) if data_iterator is not None else None
            )
            if data_iterator is not None and data_state is None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._open().restore(step, args=ocp.args.Composite(**items))
                verify(restored["state"], ((saved or {}).get(CHECKSUMS) or {}).get("state"))
                if data_state is not None:
                    data_iterator.set_state(data_state)
                return restored["state"], step
            except Exception as err:  # Orbax and TensorStore raise many kinds for a bad file
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                self._quarantine(step, reason)
        return None

    def _data_state_from_other_process_count(self, step: int) -> dict | None:
        """The data position of a checkpoint written by another number of processes, or None.

        Grain saves one iterator state per process. With data.split_by=rows every process holds
        the same state, so any one carries over; by documents, the positions cannot be mapped.
        """
        files = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        if not files or files[0].name.endswith(f"-of-{jax.process_count()}.json"):
            return None
        states = [json.loads(f.read_text()) for f in files]
        if any(state != states[0] for state in states):
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} was written by {len(files)} processes reading "
                f"separate documents, and this run has {jax.process_count()}; their data positions "
                "cannot carry over. Resume with the same number of processes (data.split_by=rows "
                "makes positions portable), or start afresh in another --workdir."
            )
        return states[0]

    def _saved_experiment(self, step: int) -> dict | None:
        """The experiment record saved with a checkpoint (None if unreadable: damage, which the
        restore itself reports)."""
        try:
            saved = self._open().restore(step, args=ocp.args.Composite(experiment=ocp.args.JsonRestore()))
            return saved["experiment"]
        except Exception:  # noqa: BLE001
            return None

    def _check_model(self, saved: dict, model: ModelConfig) -> None:
        if "model" not in saved:
            return
        differing = architecture_differences(saved["model"], model, RESUME_FIELDS)
        # LoRA's rank and targets shape the state (the adapters) as the architecture shapes a
        # whole model's: a change is a different run, not a damaged checkpoint.
        saved_lora, lora = saved["model"].get("lora"), model.lora
        shape = lambda cfg: None if not cfg else (cfg["rank"], sorted(cfg["targets"]))  # noqa: E731
        ours = None if lora is None else {"rank": lora.rank, "targets": list(lora.targets)}
        if shape(saved_lora) != shape(ours):
            describe = lambda s: "no LoRA" if s is None else f"LoRA rank {s[0]} on {', '.join(s[1])}"  # noqa: E731
            differing = [*differing, ("adapters", describe(shape(saved_lora)), describe(shape(ours)))]
        if differing:
            changes = ", ".join(f"{k} {old} -> {ours}" for k, old, ours in differing)
            raise CheckpointError(
                f"{self.directory} holds checkpoints of a different model ({changes}); "
                "use another --workdir or the same model."
            )

    def _same_data(self, step: int, saved: dict, ours: dict) -> bool:
        """Whether checkpoint `step` was written with the data settings `ours`; if not, an error,
        or False with `checkpoint.reset_data`."""
        theirs = data_record(saved)
        if theirs is None or theirs == ours:
            return True
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if not self.cfg.reset_data:
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} was written with other data settings "
                f"({', '.join(changed)} differ), so its data position does not apply; resume with "
                "the same data, set checkpoint.reset_data=true to start the new data from its "
                "beginning, or use another --workdir."
            )
        print(
            f"warning: checkpoint {self.directory / str(step)} was written with other data settings "
            f"({', '.join(changed)} differ); the new data starts from its beginning (checkpoint.reset_data).",
            flush=True,
        )
        return False

    def _quarantine(self, step: int, reason: str) -> None:
        """Moves a damaged checkpoint aside (never deletes it) so that the step can be saved again."""
        source = self.directory / str(step)
        target = self.directory / f"damaged-{step}-{int(time.time())}"
        log.info(
            "Checkpoint %s is damaged (%s); moved to %s, trying an earlier one.", source, reason, target.name
        )
        print(
            f"warning: checkpoint {source} is damaged ({reason}); moved to {target.name}, "
            "trying an earlier one.",
            flush=True,
        )
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        distributed.barrier(f"quarantine-{step}")  # the others wait until it is moved
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def close(self) -> None:
        if self._manager is not None:
            with self._save_errors(self._manager.latest_step()):
                self._wait_for_write(self._manager)
            self._manager.close()
            self._manager = None

    def _wait_for_write(self, manager, step: int | None = None) -> None:
        """Waits for the asynchronous write in progress, saying so every `NOTE_EVERY_S` seconds, for
        at most checkpoint.write_timeout_s; then StalledWriteError (a hung filesystem never hangs
        the run: the unfinished write stays a temporary directory that a resume ignores)."""
        if not self.cfg.async_save:
            return
        waiter = threading.Thread(target=_record_outcome, args=(manager.wait_until_finished,), daemon=True)
        waiter.outcome = None
        waiter.start()
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            waiter.join(min(NOTE_EVERY_S, max(self.cfg.write_timeout_s - waited, 0.0)))
            waited = time.monotonic() - started
            if not waiter.is_alive():
                if isinstance(waiter.outcome, BaseException):
                    raise waiter.outcome
                return
            where = self.directory / str(step if step is not None else manager.latest_step())
            if waited >= self.cfg.write_timeout_s:
                raise StalledWriteError(
                    f"The write of checkpoint {where} has not finished after {waited:.0f} s "
                    f"(checkpoint.write_timeout_s={self.cfg.write_timeout_s:g}): is the filesystem "
                    "stalled? It stays unfinished, a resume ignores it, and the checkpoints already "
                    "complete are intact."
                )
            print(f"still writing checkpoint {where} ({waited:.0f} s so far)", file=sys.stderr, flush=True)


def data_record(experiment: dict) -> dict | None:
    """What a data position depends on, from an experiment record (as saved with a checkpoint):
    the data settings (sources, mixture, tokenizer, seeds, split) and the batch shape."""
    if "data" not in experiment or "train" not in experiment:
        return None
    train = experiment["train"]
    record = {f"data.{k}": v for k, v in experiment["data"].items()}
    record.update({"train.seq_len": train.get("seq_len"), "train.batch_size": train.get("batch_size")})
    return record


def save_params(path: str | Path, params, cfg: ModelConfig) -> Path:
    """Writes `params` and `cfg` to the directory `path` (created; must not hold params already)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if (path / "params").exists():
        raise CheckpointError(f"{path} already holds a parameters checkpoint; choose a new directory.")
    if all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params)):
        # Host arrays (e.g. straight from load_hf) are written without Orbax's defensive copy: the
        # write completes before this returns and nothing modifies them meanwhile, so peak memory
        # stays near the parameters' own size.
        handlers = ocp.type_handlers
        registry = handlers.create_type_handler_registry(
            (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False))
        )
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
            checkpointer.save(path / "params", args=ocp.args.PyTreeSave(params))
    else:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path / "params", params)
            checkpointer.wait_until_finished()
    (path / CHECKSUMS_FILE).write_text(json.dumps(checksums(params), indent=0))
    (path / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return path


def load_params(path: str | Path, shardings=None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from `save_params`; placed with `shardings` if given."""
    path = Path(path).absolute()
    if not (path / MODEL_CONFIG_FILE).is_file() or not (path / "params").is_dir():
        raise CheckpointError(
            f"{path} is not a llama_jax parameters checkpoint (no {MODEL_CONFIG_FILE} or params/)."
        )
    cfg = model_config_from_dict(json.loads((path / MODEL_CONFIG_FILE).read_text()))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            if shardings is None:
                params = checkpointer.restore(path / "params")
            else:
                metadata = checkpointer.metadata(path / "params")
                tree = getattr(metadata, "item_metadata", metadata)
                target = jax.tree.map(
                    lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings
                )
                params = checkpointer.restore(path / "params", target)
    except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise many kinds for a bad file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is damaged ({reason}).") from None
    if (path / CHECKSUMS_FILE).is_file():
        try:
            verify(params, json.loads((path / CHECKSUMS_FILE).read_text()))
        except CheckpointError as err:
            raise CheckpointError(f"{path} is damaged: {err}.") from None
    return cfg, params


def load_for_inference(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a parameters checkpoint (`save_params`), a training workdir
    (its newest checkpoint) or one of its `checkpoints/STEP` directories. A LoRA run's checkpoints
    hold adapters, not a model: refused in one sentence (init_from.load_model merges them)."""
    cfg, params, record, workdir = _load_newest(path)
    if cfg.lora is not None:
        raise CheckpointError(_lora_run_message(workdir, record))
    return cfg, params


def load_adapters(path: str | Path) -> tuple[ModelConfig, dict, str]:
    """(ModelConfig with its LoRA settings, the adapters, the base the run recorded as init_from
    or "") of a LoRA run's workdir or checkpoint."""
    cfg, params, record, workdir = _load_newest(path)
    if cfg.lora is None:
        raise CheckpointError(f"{workdir} was not trained with LoRA: it holds a whole model.")
    return cfg, params, record.get("init_from") or ""


def is_lora_run(path: str | Path) -> bool:
    """Whether `path` is a LoRA run's workdir or checkpoint (by the experiment it recorded)."""
    path = Path(path).absolute()
    for record in (path / "experiment.json", path.parent.parent / "experiment.json"):
        if record.is_file():
            try:
                return bool((json.loads(record.read_text()).get("lora") or {}).get("rank"))
            except (OSError, ValueError, AttributeError):
                return False
    return False


def _load_newest(path: str | Path) -> tuple[ModelConfig, dict, dict, Path]:
    """(cfg, params, experiment record, workdir) of the newest checkpoint that restores cleanly."""
    path = Path(path).absolute()
    if (path / MODEL_CONFIG_FILE).is_file():
        cfg, params = load_params(path)
        return cfg, params, {}, path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "state").is_dir():
        directory, steps = path.parent, [int(path.name)]
    else:
        directory = path
        steps = sorted((int(p.name) for p in path.glob("*") if p.name.isdigit()), reverse=True)
    if not steps:
        raise CheckpointError(
            f"{path} holds no llama_jax checkpoint (neither {MODEL_CONFIG_FILE} "
            "nor checkpoints/STEP directories)."
        )
    reason = ""
    with ocp.CheckpointManager(directory) as manager:
        for step in steps:  # the newest that restores cleanly, as training resumes
            try:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(), experiment=ocp.args.JsonRestore()
                    ),
                )
                verify(restored["state"], (restored["experiment"].get(CHECKSUMS) or {}).get("state"))
                cfg = model_config_from_dict(restored["experiment"]["model"])
            except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise many kinds for a bad file
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                print(f"warning: checkpoint {directory / str(step)} is damaged ({reason}).", file=sys.stderr)
                continue
            return cfg, restored["state"]["params"], restored["experiment"], directory.parent
    raise CheckpointError(f"No checkpoint in {directory} restores cleanly (the last one tried: {reason}).")


def _lora_run_message(workdir: Path, experiment: dict) -> str:
    """Why a LoRA run's checkpoint is not a model by itself, and what to do instead."""
    base = experiment.get("init_from") or "its base"
    return (
        f"{workdir} holds LoRA adapters, not a whole model: merge them into {base} with "
        f"`python -m llama_jax.convert --from KIND {base} --to KIND OUT --merge-lora {workdir / 'adapter'}`."
    )
