"""Training: `python -m llama_jax.train [--exp NAME|PATH] [--workdir DIR] [key=value ...]`.

The command line around `trainer.Trainer`: it loads the experiment, applies the overrides, starts
the distributed runtime and runs the experiment's stage (pretraining, or `posttrain.stage`, or a
stage the experiment file registers itself). Bad input is one sentence and exit status 2.

    from llama_jax.train import train
    last = train(exp, "runs/mine")       # the same from Python: last metrics and the final state
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax

# The built-in stages register themselves on import.
import llama_jax.posttrain.grpo  # noqa: F401
import llama_jax.posttrain.ppo  # noqa: F401
import llama_jax.posttrain.stages  # noqa: F401
import llama_jax.stages.pretrain  # noqa: F401
from llama_jax import distributed
from llama_jax.averaging import AveragingError
from llama_jax.checkpoint import CheckpointError, StalledWriteError
from llama_jax.config import ConfigError, Experiment, apply_overrides, list_experiments, load_experiment
from llama_jax.convert import ConversionError
from llama_jax.data.training import DataError
from llama_jax.logs import send_logs_to
from llama_jax.run_lock import RunLockError
from llama_jax.sharding import MeshError
from llama_jax.trainer import DivergenceError, Stage, Trainer, check_workdir, get_stage


def stage_of(exp: Experiment) -> Stage:
    """The stage the experiment runs, from the registry (the built-in ones and any an experiment
    file registered)."""
    return get_stage(exp.stage_name)


def train(exp: Experiment, workdir: str | Path, *, quiet: bool = False) -> dict:
    """Runs the experiment's stage, resuming from WORKDIR/checkpoints if it can; returns the last
    logged metrics (with `eval_loss` if evaluated, and the final `state`)."""
    return Trainer(exp, workdir, stage_of(exp), quiet=quiet).run()


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
    args = parser.parse_intermixed_args(argv)  # settings may come before and after the flags
    try:
        distributed.initialize(distributed.ProcessSpec.from_args(args))  # before anything else uses JAX
        exp = apply_overrides(load_experiment(args.exp), args.overrides)
        if exp.rounds is not None:
            raise ConfigError(
                f"{exp.name} is a post-training loop of several stages; run it with "
                f"`python -m llama_jax.posttrain.rounds --exp {args.exp}`."
            )
        workdir = Path(args.workdir or Path("runs") / exp.name)
        index = jax.process_index()
        check_workdir(workdir)
        send_logs_to(workdir / ("train.log" if index == 0 else f"train.{index}.log"))
        train(exp, workdir)
    except StalledWriteError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The stalled write's thread is blocked in the filesystem and would keep the interpreter
        # from exiting: end the process here.
        os._exit(1)
    except (
        ConfigError,
        MeshError,
        DataError,
        CheckpointError,
        ConversionError,
        distributed.DistributedError,
        RunLockError,
        AveragingError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DivergenceError as err:  # not bad input: the run itself went wrong
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
