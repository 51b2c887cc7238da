"""Training in phases: one run, several sequence lengths, batches, mixtures and learning-rate
segments, one after the other (docs/reference.md, "Training in phases").

An experiment with `phases` trains phase 1 for its token budget, then phase 2 from where phase 1
ended, and so on; `train.steps` must be their sum. Phase i trains `phase_experiment(exp, i)`: the
experiment with the phase's settings and `train.steps` set to the step the phase ends at. Each
phase compiles once, saves a checkpoint at its last step, and resumes exactly inside itself; at
a boundary the next phase starts its own data (a new shuffle: its data seed is the experiment's
plus the phase's index). The optimizer state and the schedule run on across the boundaries: the
schedule spans the whole run, and a phase's `lr_to` replaces it by a straight line inside that
phase (Llama 3's anneal: 0).
"""

from __future__ import annotations

import dataclasses
import math

from llama_jax.config import ConfigError, Experiment, Phase


def batch_size(exp: Experiment, phase: Phase) -> int:
    return phase.batch_size or exp.train.batch_size


def seq_len(exp: Experiment, phase: Phase) -> int:
    return phase.seq_len or exp.train.seq_len


def tokens_per_step(exp: Experiment, phase: Phase) -> int:
    return batch_size(exp, phase) * seq_len(exp, phase)


def steps(exp: Experiment, phase: Phase) -> int:
    return math.ceil(phase.tokens / tokens_per_step(exp, phase))


def bounds(exp: Experiment) -> list[tuple[int, int]]:
    """(first step, step after the last) of each phase; one phase of train.steps without phases."""
    if not exp.phases:
        return [(0, exp.train.steps)]
    out, start = [], 0
    for phase in exp.phases:
        out.append((start, start + steps(exp, phase)))
        start = out[-1][1]
    return out


def total_steps(exp: Experiment) -> int:
    """The whole run's steps (what the learning-rate schedule spans)."""
    return bounds(exp)[-1][1]


def name(exp: Experiment, index: int) -> str:
    return exp.phases[index].name or f"phase{index + 1}"


def lr_segments(exp: Experiment) -> tuple[tuple[int, int, float], ...]:
    """(start, end, rate at the end) of each phase that sets its own learning-rate line."""
    return tuple(
        (start, end, phase.lr_to) for phase, (start, end) in zip(exp.phases, bounds(exp)) if phase.lr_to >= 0
    )


def phase_at(exp: Experiment, step: int) -> int:
    """The index of the phase that trains step `step` (the last one past the end)."""
    for index, (_, end) in enumerate(bounds(exp)):
        if step < end:
            return index
    return len(bounds(exp)) - 1


def check_phases(exp: Experiment) -> None:
    """A phase list that cannot run stops here with one sentence."""
    if not exp.phases:
        return
    names = [name(exp, i) for i in range(len(exp.phases))]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two phases share a name ({', '.join(names)}); give each its own.")
    for index, phase in enumerate(exp.phases):
        label = f"Phase {names[index]!r}"
        length = seq_len(exp, phase)
        if length > exp.model.max_seq_len:
            raise ConfigError(
                f"{label} trains at seq_len={length}, longer than the model's max_seq_len="
                f"{exp.model.max_seq_len}."
            )
        if phase.tokens < tokens_per_step(exp, phase):
            raise ConfigError(
                f"{label} has {phase.tokens:,.0f} tokens, less than one step of "
                f"{tokens_per_step(exp, phase):,} ({batch_size(exp, phase)} x {length})."
            )
        if phase.mixture and len(phase.mixture) != len(exp.data.sources):
            raise ConfigError(
                f"{label} gives {len(phase.mixture)} mixture weight(s) for the "
                f"{len(exp.data.sources)} data source(s)."
            )
        if phase.average_last > exp.checkpoint.keep_last:
            raise ConfigError(
                f"{label} averages its last {phase.average_last} checkpoints but only "
                f"checkpoint.keep_last={exp.checkpoint.keep_last} are kept."
            )
        if phase.average_last > len(checkpoint_steps(exp, index)):
            raise ConfigError(
                f"{label} averages its last {phase.average_last} checkpoints but saves only "
                f"{len(checkpoint_steps(exp, index))}; set its checkpoint_every lower."
            )

    total = total_steps(exp)
    if exp.train.steps != total:
        tokens = sum(phase.tokens for phase in exp.phases)
        raise ConfigError(
            f"The phases add up to {total:,} steps ({tokens:,.0f} tokens) but train.steps="
            f"{exp.train.steps:,}; set train.steps={total} or change the phases' tokens."
        )


def phase_experiment(exp: Experiment, index: int) -> Experiment:
    """The experiment phase `index` trains: its settings, and train.steps = the step it ends at."""
    phase, (_, end) = exp.phases[index], bounds(exp)[index]
    train = dataclasses.replace(
        exp.train,
        steps=end,
        seq_len=seq_len(exp, phase),
        batch_size=batch_size(exp, phase),
        microbatches=phase.microbatches or exp.train.microbatches,
        keep_logits=exp.train.keep_logits if phase.keep_logits is None else phase.keep_logits,
    )
    model = exp.model.replace(rope_scaling=phase.rope_scaling) if phase.rope_scaling else exp.model
    sources = exp.data.sources
    if phase.mixture:  # a weight of 0 leaves the source out of the phase
        sources = tuple(dataclasses.replace(s, weight=w) for s, w in zip(sources, phase.mixture) if w > 0)
    data = dataclasses.replace(exp.data, sources=sources, seed=exp.data.seed + index)
    mesh = dataclasses.replace(exp.mesh, context=phase.context) if phase.context else exp.mesh
    checkpoint = exp.checkpoint
    if phase.checkpoint_every:
        checkpoint = dataclasses.replace(checkpoint, every_steps=phase.checkpoint_every)
    # Every phase's length and batch written out, so that the phases (and the schedule over them)
    # come out the same from this experiment as from the whole one.
    resolved = tuple(
        dataclasses.replace(p, seq_len=seq_len(exp, p), batch_size=batch_size(exp, p)) for p in exp.phases
    )
    return exp.replace(train=train, model=model, data=data, mesh=mesh, checkpoint=checkpoint, phases=resolved)


def checkpoint_steps(exp: Experiment, index: int) -> list[int]:
    """The steps phase `index` saves a checkpoint at: its cadence (counted from step 0, as the
    loop does) and its last step."""
    start, end = bounds(exp)[index]
    every = exp.phases[index].checkpoint_every or exp.checkpoint.every_steps
    steps = [s for s in range(start + 1, end + 1) if every and s % every == 0] if every else []
    return sorted(set(steps) | {end})
