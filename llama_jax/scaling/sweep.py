"""Running a plan and reading what its runs left behind.

A sweep directory holds `plan.json` and one workdir per run, SWEEP/NAME, where `llama_jax.train`
writes metrics.jsonl, checkpoints and experiment.json. A run counts as finished when its
metrics.jsonl has an `eval_loss` at its last step; finished runs are skipped, and an interrupted
one resumes from its checkpoint, so running a sweep again picks up where it stopped.

Every run is the default `tiny` experiment (the Python standard library corpus, its held-out split
for the validation loss, AdamW at peak lr 2e-3) with the model, the steps and the batch of its
plan; warmup is 10% of the steps and the cosine ends at the last step, so each run is complete in
itself, as IsoFLOP runs must be. The validation loss is evaluated once, at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from llama_jax.config import CheckpointConfig, Experiment
from llama_jax.scaling import ScalingError
from llama_jax.scaling.plan import Plan, PlannedRun, model_for_size

# Batches of the held-out split in the final validation loss: it reads the split in order, so a
# few batches would be a few files; 64 x 16 x 128 tokens cost a second or two even at 1e13 FLOPs.
EVAL_BATCHES = 64
WARMUP_FRACTION = 0.1  # as `tiny`: 15 warmup steps of 150


def experiment_for(
    run: PlannedRun, batch_size: int, seq_len: int, base: Experiment | None = None
) -> Experiment:
    """The Experiment that trains `run` (see the module docstring)."""
    base = base or Experiment()
    train = dataclasses.replace(
        base.train,
        steps=run.steps,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_every=run.steps,
        eval_batches=EVAL_BATCHES,
        log_every=min(10, run.steps),
        sample_tokens=0,
    )
    optim = dataclasses.replace(
        base.optim, warmup_steps=max(1, round(WARMUP_FRACTION * run.steps)), decay_steps=0
    )
    # One checkpoint, at the end: enough to resume or to score the model afterwards.
    checkpoint = CheckpointConfig(every_steps=0, keep_last=1)
    return base.replace(
        name=run.name,
        model=model_for_size(run.size, run.vocab_size),
        train=train,
        optim=optim,
        checkpoint=checkpoint,
        description=f"IsoFLOP run: {run.size} for {run.tokens:,} tokens, {run.flops:.3g} FLOPs",
    )


def final_eval_loss(workdir: str | Path, steps: int) -> float | None:
    """The validation loss a run logged at step `steps`, or None if it has not got there."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return None
    loss = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if row.get("step") == steps and "eval_loss" in row:
            loss = float(row["eval_loss"])
    return loss


def train_run(run: PlannedRun, workdir: str | Path, batch_size: int, seq_len: int):
    """Trains `run` in `workdir` (resuming if it can) -> (final validation loss, parameters).
    A run already trained to the end is restored from its checkpoint, not trained again."""
    from llama_jax.logs import send_logs_to
    from llama_jax.train import train

    workdir = Path(workdir)
    send_logs_to(workdir / "train.log")
    out = train(experiment_for(run, batch_size, seq_len), workdir, quiet=True)
    loss = out.get("eval_loss", final_eval_loss(workdir, run.steps))
    if loss is None:
        raise ScalingError(
            f"Run {run.name} ended without a validation loss at step {run.steps}; "
            f"see {workdir / 'metrics.jsonl'}."
        )
    return loss, out["state"].params


def run_plan(
    plan: Plan,
    sweep_dir: str | Path,
    after: Callable[[PlannedRun, Path, object], None] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Trains every unfinished run of `plan` in SWEEP/NAME; `after(run, workdir, params)` is
    called after each run trained here. Returns every run's final validation loss."""
    from tqdm import tqdm

    sweep_dir = Path(sweep_dir)
    losses = {}
    bar = tqdm(plan.runs, desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.name)
        workdir = sweep_dir / run.name
        loss = final_eval_loss(workdir, run.steps)
        if loss is None:
            loss, params = train_run(run, workdir, plan.batch_size, plan.seq_len)
            if after is not None:
                after(run, workdir, params)
        losses[run.name] = loss
    return losses


def read_results(plan: Plan, sweep_dir: str | Path) -> tuple[dict, list[str]]:
    """({budget: (tokens, losses)} of the finished runs, names of the unfinished ones)."""
    groups: dict[float, tuple[list, list]] = {}
    missing = []
    for run in plan.runs:
        loss = final_eval_loss(Path(sweep_dir) / run.name, run.steps)
        if loss is None:
            missing.append(run.name)
            continue
        tokens, losses = groups.setdefault(run.budget, ([], []))
        tokens.append(run.tokens)
        losses.append(loss)
    return groups, missing
