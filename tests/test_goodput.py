"""Goodput: the loop counts the time lost to start-up, compilation, data, checkpoints and
evaluation, and metrics.jsonl reports the share left to the steps; train.profile_steps writes a
profiler trace that TensorBoard and Perfetto read."""

import gzip
import json
import time

import pytest

from llama_jax import trainer as trainer_lib
from llama_jax.config import Experiment, apply_overrides
from llama_jax.goodput import LOSSES, Goodput
from llama_jax.train import train

DELAY = 0.2  # seconds added to every batch fetch


def small_experiment(*overrides: str) -> Experiment:
    return apply_overrides(
        Experiment(),
        [
            "train.steps=6",
            "train.batch_size=8",
            "train.seq_len=64",
            "train.log_every=3",
            "train.sample_tokens=0",
            "model.n_layers=2",
            "optim.warmup_steps=2",
            *overrides,
        ],
    )


def test_report_splits_the_wall_time_between_steps_and_losses():
    clock = Goodput()
    with clock.losing("eval"):
        time.sleep(0.05)
    clock.add("data", 0.02)
    time.sleep(0.05)
    report = clock.report()
    lost = sum(report[f"lost_{cause}_s"] for cause in LOSSES)
    assert report["lost_eval_s"] >= 0.05 and report["lost_data_s"] == 0.02
    assert report["goodput"] == pytest.approx(1 - lost / report["wall_s"])
    assert 0 < report["goodput"] < 1


# Real training runs (about 15 s each): in the slow set, which CI runs after the suite.
@pytest.mark.slow
def test_slow_data_and_evaluation_show_in_the_metrics(tmp_path, monkeypatch):
    real = trainer_lib.steps_lib.global_batch

    def slow(local, sharding):  # a data pipeline that keeps the steps waiting
        time.sleep(DELAY)
        return real(local, sharding)

    monkeypatch.setattr(trainer_lib.steps_lib, "global_batch", slow)
    exp = small_experiment("train.eval_every=3", "train.eval_batches=1", "checkpoint.every_steps=3")
    train(exp, tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "goodput" in row]
    assert [row["step"] for row in logged] == [3, 6]
    first, last = logged
    # Five batches after the first (whose fetch is counted apart from the compile), at least DELAY each.
    assert last["lost_data_s"] >= 6 * DELAY * 0.99
    assert first["lost_data_s"] >= 3 * DELAY * 0.99
    assert last["lost_eval_s"] > 0 and last["lost_checkpoint_s"] > 0 and last["lost_compile_s"] > 0
    assert last["lost_startup_s"] > 0 and last["wall_s"] > first["wall_s"]
    for row in logged:
        lost = sum(row[f"lost_{cause}_s"] for cause in LOSSES)
        assert lost < row["wall_s"]
        assert row["goodput"] == pytest.approx(1 - lost / row["wall_s"], abs=1e-9)
    # The compile is counted without its batch's fetch.
    assert last["lost_compile_s"] + last["lost_data_s"] < last["wall_s"]


# Real training runs (about 15 s each): in the slow set, which CI runs after the suite.
@pytest.mark.slow
def test_profile_steps_write_a_trace_for_tensorboard_and_perfetto(tmp_path):
    exp = small_experiment("train.profile_steps=2:4", "eval_data=null")
    train(exp, tmp_path, quiet=True)
    runs = list((tmp_path / "plugins" / "profile").iterdir())
    assert len(runs) == 1  # one trace, of the steps 3 and 4
    assert [p for p in runs[0].glob("*.xplane.pb") if p.stat().st_size > 0]
    (perfetto,) = runs[0].glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    names = {event.get("name", "") for event in events.get("traceEvents", events)}
    # The jitted training step ran inside the trace: two calls of it.
    assert any("train_step" in name for name in names), sorted(names)[:50]


@pytest.mark.parametrize("text", ["4", "4:2", "a:b", "-1:3", "3:3"])
def test_bad_profile_steps_are_refused_in_one_sentence(text):
    with pytest.raises(ValueError, match="train.profile_steps must be 'a:b'"):
        small_experiment(f"train.profile_steps={text!r}")
