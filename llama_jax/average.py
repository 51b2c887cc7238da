"""Checkpoint averaging (Polyak averaging), as Llama 3 builds its final models: the element-wise
mean of the parameters of several checkpoints of one model, written as a parameters checkpoint.

    python -m llama_jax.average --out ckpt/averaged runs/anneal/checkpoints/900 runs/anneal/checkpoints/1000
    python -m llama_jax.average --out ckpt/averaged --last 3 runs/anneal    # a workdir's newest three

`average(paths)` is the same from Python. Each source is a parameters checkpoint, a workdir (its
newest checkpoint) or one of its checkpoints/STEP; they must share the architecture. The mean
is accumulated in float64, one checkpoint in host memory at a time, and written in the first
checkpoint's dtype; checksums are verified on the way in and written on the way out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from llama_jax.checkpoint import CheckpointError, load_for_inference, save_params
from llama_jax.config import ModelConfig, architecture_differences


class AveragingError(ValueError):
    """Checkpoints that cannot be averaged; the message is one sentence."""


def average(paths: Sequence[str | Path], *, progress: bool | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the mean of the checkpoints' parameters) as host arrays."""
    if len(paths) < 2:
        raise AveragingError(f"Averaging needs at least two checkpoints, got {len(paths)}.")
    first_cfg, total, dtypes = None, None, None
    for path in tqdm(
        paths, desc="averaging", unit="checkpoint", disable=(not progress) if progress is not None else None
    ):
        cfg, params = load_for_inference(path)
        if "score" in params:
            raise AveragingError(f"{path} is a reward model; average language models only.")
        if first_cfg is None:
            first_cfg = cfg
            dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, params)
            total = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
            continue
        differing = architecture_differences(cfg, first_cfg)
        if differing:
            field, theirs, ours = differing[0]
            raise AveragingError(
                f"{path} is a model of another architecture than {paths[0]} ({field} {theirs} where the "
                f"first has {ours}); only checkpoints of one model can be averaged."
            )
        total = jax.tree.map(lambda acc, x: acc + np.asarray(x, np.float64), total, params)
        del params
    mean = jax.tree.map(lambda acc, dtype: (acc / len(paths)).astype(dtype), total, dtypes)
    return first_cfg, mean


def newest_checkpoints(workdir: str | Path, count: int) -> list[Path]:
    """The `count` newest step directories of a training workdir, oldest first."""
    directory = Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit()) if directory.is_dir() else []
    if len(steps) < count:
        raise AveragingError(f"{workdir} holds {len(steps)} checkpoint(s); --last {count} needs {count}.")
    return [directory / str(step) for step in steps[-count:]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.average",
        description="Average the parameters of checkpoints of one model into a parameters checkpoint.",
    )
    parser.add_argument(
        "sources", nargs="+", help="parameters checkpoints, checkpoints/STEP directories or workdirs"
    )
    parser.add_argument("--out", required=True, help="a new directory for the averaged parameters checkpoint")
    parser.add_argument("--last", type=int, help="average the N newest checkpoints of the one workdir given")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AveragingError(
                f"The destination {out} already exists and is not empty; choose a new directory."
            )
        sources = args.sources
        if args.last is not None:
            if len(sources) != 1 or args.last < 2:
                raise AveragingError("--last N takes one workdir and N of at least 2.")
            sources = newest_checkpoints(sources[0], args.last)
        for source in sources:
            if not Path(source).exists():
                raise AveragingError(f"The checkpoint {source} does not exist.")
        cfg, params = average(sources, progress=False if args.no_progress else None)
        save_params(out, params, cfg)
    except (AveragingError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Averaged {len(sources)} checkpoints into {out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
