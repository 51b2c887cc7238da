"""Checkpoint averaging (Polyak averaging), as Llama 3 builds its final models: the element-wise
mean of the parameters of several checkpoints of one model. `python -m llama_jax.average` is its
command line; a phase's `average_last` (phases.py) runs it at the phase's end.

The mean is accumulated in float64, one checkpoint in host memory at a time, and written in the
first checkpoint's dtype; checksums are verified on the way in and written on the way out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from llama_jax.checkpoint import load_for_inference, save_params
from llama_jax.config import ModelConfig, architecture_differences
from llama_jax.convert.common import atomic_directory


class AveragingError(ValueError):
    """Checkpoints that cannot be averaged; the message is one sentence."""


def recorded_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer file a checkpoint's run recorded (its workdir's experiment.json), or the one
    an export holds beside its parameters; None where it does not say."""
    path = Path(path)
    for record in (path / "experiment.json", path.parent.parent / "experiment.json"):  # workdir, STEP
        if record.is_file():
            try:
                recorded = json.loads(record.read_text()).get("data", {}).get("tokenizer_path")
            except ValueError:
                recorded = None
            if recorded:
                return Path(recorded)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return path / name
    return None


def _tokenizer_digest(path: Path) -> str | None:
    """A digest of the tokenizer's file (a directory's tokenizer.json); None if it is gone."""
    target = path / "tokenizer.json" if path.is_dir() else path
    if not target.is_file():
        return None
    return hashlib.sha256(target.read_bytes()).hexdigest()


def check_same_tokenizer(paths: Sequence[str | Path]) -> None:
    """Checkpoints whose runs recorded tokenizers must have the same one (by content): the token
    ids mean the same thing only then."""
    seen: tuple[str, Path, str] | None = None  # (source, tokenizer, digest) of the first that says
    for path in paths:
        tokenizer = recorded_tokenizer(path)
        digest = tokenizer and _tokenizer_digest(tokenizer)
        if not digest:
            continue
        if seen is None:
            seen = (str(path), tokenizer, digest)
        elif digest != seen[2]:
            raise AveragingError(
                f"{path} was trained with the tokenizer {tokenizer} and {seen[0]} with {seen[1]}, "
                "which differ; only models of one tokenizer can be averaged."
            )


def average(paths: Sequence[str | Path], *, progress: bool | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the mean of the checkpoints' parameters) as host arrays."""
    if len(paths) < 2:
        raise AveragingError(f"Averaging needs at least two checkpoints, got {len(paths)}.")
    check_same_tokenizer(paths)
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


def write_average(paths: Sequence[str | Path], out: str | Path, *, progress: bool | None = None) -> Path:
    """The mean of `paths` written as a parameters checkpoint at `out` (a new or empty directory),
    all at once: a run killed while writing leaves nothing at `out`."""
    cfg, params = average(paths, progress=progress)
    out = Path(out).absolute()
    with atomic_directory(out) as partial:
        save_params(partial, params, cfg)
    return out
