"""Training in phases: each phase trains with its own length, batch, mesh, RoPE scaling and
learning-rate line; a run stopped inside phase 2 resumes bit for bit; the end of a phase averages checkpoints;
bad phase lists are refused in one sentence."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import phases
from llama_jax import trainer as trainer_lib
from llama_jax.checkpoint import load_for_inference
from llama_jax.config import ConfigError, Experiment, Phase, RopeScaling, apply_overrides, load_experiment
from llama_jax.optim import learning_rate_schedule
from llama_jax.train import train

PHASES = (
    Phase(name="short", tokens=8 * 64 * 4),  # 4 steps of 8 x 64
    Phase(
        name="long",
        tokens=4 * 128 * 4,  # 4 steps of 4 x 128, RoPE scaled for twice the length, annealed
        seq_len=128,
        batch_size=4,
        context=2,  # the sequence split over two devices (fsdp gives them up)
        rope_scaling=RopeScaling(factor=2.0, original_max_position_embeddings=64),
        lr_to=0.0,
        checkpoint_every=1,
        average_last=2,
    ),
)


def phased_experiment() -> Experiment:
    exp = apply_overrides(
        Experiment(),
        [
            "train.steps=8",
            "train.batch_size=8",
            "train.seq_len=64",
            "train.log_every=1",
            "train.sample_tokens=0",
            "eval_data=null",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=3",
            "model.n_layers=2",
            "optim.warmup_steps=2",
        ],
    )
    return exp.replace(phases=PHASES)


REAL_GLOBAL_BATCH = trainer_lib.steps_lib.global_batch


def batch_shapes_of_a_run(exp, workdir, monkeypatch, fail_at=None):
    """Trains `exp`, recording the batch shape of every step; raises at step `fail_at` (a crash)."""
    shapes = []
    real = REAL_GLOBAL_BATCH

    def spy(local, sharding):
        if fail_at is not None and len(shapes) == fail_at:
            raise RuntimeError("simulated crash")
        shapes.append(np.asarray(local["tokens"]).shape)
        return real(local, sharding)

    monkeypatch.setattr(trainer_lib.steps_lib, "global_batch", spy)
    return train(exp, workdir, quiet=True), shapes


def _params(workdir, step):
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    os.environ.setdefault("LLAMA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    workdir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        result, shapes = batch_shapes_of_a_run(phased_experiment(), workdir, monkeypatch)
    return workdir, result, shapes


@pytest.mark.slow  # two compiled phases end to end: run by .ci/run after the suite
def test_each_phase_trains_its_own_batch_and_schedule(reference):
    workdir, result, shapes = reference
    assert shapes == [(8, 64)] * 4 + [(4, 128)] * 4
    assert int(result["state"].step) == 8
    # A checkpoint at the boundary, and every step inside phase 2 (its own cadence).
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 7, 8]  # keep_last=3 of 2, 4, 5, 6, 7, 8
    lrs = {
        row["step"]: row["lr"]
        for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    }
    exp = phased_experiment()
    base = learning_rate_schedule(exp.optim, 8)
    # Phase 2's line: from the schedule's value at step 4 to 0 after step 7.
    for step in range(4, 8):
        assert lrs[step + 1] == pytest.approx(float(base(4)) * (8 - step) / 4, rel=1e-5)
    assert lrs[2] == pytest.approx(float(base(1)), rel=1e-5)


@pytest.mark.slow  # two compiled phases end to end: run by .ci/run after the suite
def test_phase_end_averages_its_newest_checkpoints(reference):
    workdir, _, _ = reference
    _, averaged = load_for_inference(workdir / "averaged" / "long")
    mean = jax.tree.map(
        lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, _params(workdir, 7), _params(workdir, 8)
    )
    for got, want in zip(jax.tree.leaves(averaged), jax.tree.leaves(mean)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # two compiled phases end to end: run by .ci/run after the suite
def test_a_crash_inside_phase_two_resumes_bit_for_bit(reference, tmp_path, monkeypatch):
    ref_dir, _, _ = reference
    workdir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        batch_shapes_of_a_run(phased_experiment(), workdir, monkeypatch, fail_at=6)
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 4 < newest < 8  # inside phase 2
    _, shapes = batch_shapes_of_a_run(phased_experiment(), workdir, monkeypatch)
    assert shapes == [(4, 128)] * (8 - newest)  # phase 1 is not trained again
    assert _losses(workdir) == _losses(ref_dir)
    for a, b in zip(jax.tree.leaves(_params(workdir, 8)), jax.tree.leaves(_params(ref_dir, 8))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_405b_batch_ramp_changes_the_batch_at_the_papers_token_counts():
    exp = load_experiment("llama3_1_405b")
    seen, by_phase = 0, []
    for phase, (start, end) in zip(exp.phases, phases.bounds(exp)):
        by_phase.append((phases.batch_size(exp, phase) * phases.seq_len(exp, phase), seen))
        seen += (end - start) * phases.tokens_per_step(exp, phase)
    # 4M tokens at 4,096 from the start, 8M at 8,192 after 252M tokens, 16M after 2.87T.
    assert by_phase[0] == (4 * 2**20, 0)
    assert by_phase[1][0] == 8 * 2**20 and 252e6 <= by_phase[1][1] < 252e6 + 4 * 2**20
    assert by_phase[2][0] == 16 * 2**20 and 2.87e12 <= by_phase[2][1] < 2.87e12 + 8 * 2**20
    assert phases.seq_len(exp, exp.phases[0]) == 4096
    assert exp.train.steps == phases.total_steps(exp)
    # The long-context stages reach 128K in six steps and end with the annealed 40M tokens.
    long = [p for p in exp.phases if phases.seq_len(exp, p) > 8192]
    assert len({phases.seq_len(exp, p) for p in long}) == 6 and phases.seq_len(exp, long[-1]) == 131072
    assert exp.phases[-1].lr_to == 0 and exp.phases[-1].tokens == 40e6
    assert 750e9 <= sum(p.tokens for p in long) <= 850e9


def test_bad_phase_lists_are_refused_in_one_sentence(tmp_path):
    exp = phased_experiment()
    cases = [
        (exp.replace(train=dataclasses.replace(exp.train, steps=9)), r"add up to 8 steps .* train.steps=9"),
        (
            exp.replace(phases=(PHASES[0], dataclasses.replace(PHASES[1], seq_len=1024))),
            "longer than the model",
        ),
        (
            exp.replace(phases=(PHASES[0], dataclasses.replace(PHASES[1], mixture=(1.0, 2.0)))),
            "mixture weight",
        ),
        (exp.replace(phases=(PHASES[0], dataclasses.replace(PHASES[1], name="short"))), "share a name"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            train(bad, tmp_path / "bad", quiet=True)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="phase.tokens must be positive"):
        Phase(tokens=0)


def test_phase_experiment_applies_the_phase():
    exp = phased_experiment()
    mixed = exp.replace(
        data=dataclasses.replace(exp.data, sources=exp.data.sources * 3),
        phases=(dataclasses.replace(PHASES[0], mixture=(3.0, 0.0, 1.0), context=2),),
        train=dataclasses.replace(exp.train, steps=4),
    )
    second = phases.phase_experiment(mixed, 0)
    assert [s.weight for s in second.data.sources] == [3.0, 1.0]  # the source weighted 0 left out
    assert second.mesh.context == 2 and second.train.steps == 4
    long = phases.phase_experiment(exp, 1)
    assert (long.train.seq_len, long.train.batch_size, long.train.steps) == (128, 4, 8)
    assert long.model.rope_scaling.factor == 2.0 and long.data.seed == exp.data.seed + 1
    assert math.isclose(phases.lr_segments(exp)[0][2], 0.0)


@pytest.mark.parametrize("name", ["llama3_1_8b", "llama3_1_405b"])
def test_every_phase_sees_the_whole_runs_schedule(name):
    """A phase's experiment keeps the other phases' lengths and batches, so the schedule it
    compiles (total steps, the anneal's line) is the whole run's."""
    exp = load_experiment(name)
    for index in range(len(exp.phases)):
        phase_exp = phases.phase_experiment(exp, index)
        assert phases.bounds(phase_exp) == phases.bounds(exp)
        assert phases.lr_segments(phase_exp) == phases.lr_segments(exp)
    anneal = phases.checkpoint_steps(exp, len(exp.phases) - 1)
    assert len(anneal) >= exp.phases[-1].average_last == 3
    assert anneal[-1] == exp.train.steps and anneal[0] > phases.bounds(exp)[-1][0]


def test_a_phase_that_saves_too_few_checkpoints_to_average_is_refused(tmp_path):
    exp = phased_experiment()
    bad = exp.replace(phases=(PHASES[0], dataclasses.replace(PHASES[1], checkpoint_every=0, average_last=3)))
    with pytest.raises(ConfigError, match="averages its last 3 checkpoints but saves only"):
        train(bad, tmp_path / "bad", quiet=True)


def test_a_phase_is_overridden_like_any_field():
    exp = apply_overrides(
        load_experiment("llama3_1_8b"), ["phases.6.context=2", "phases.7.mixture=[1,3]", "phases.7.lr_to=0.5"]
    )
    assert all(isinstance(p, Phase) for p in exp.phases)
    assert exp.phases[6].context == 2 and exp.phases[7].mixture == (1, 3) and exp.phases[7].lr_to == 0.5
    assert exp.phases[6].rope_scaling is None and exp.phases[0].name == "pretrain"
    with pytest.raises(ConfigError, match="phases.6.tokens=-1"):
        apply_overrides(exp, ["phases.6.tokens=-1"])
