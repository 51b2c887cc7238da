"""The training CLI: bad input stops with one sentence, and a short real run learns and logs."""

import json
import os
import subprocess
import sys

import pytest

from llama_jax import train
from llama_jax.config import Experiment, apply_overrides


@pytest.mark.parametrize(
    "args,message",
    [
        (["--exp", "llama9_1b"], "Unknown experiment 'llama9_1b'"),
        (["train.stepz=3"], "Unknown override key 'train.stepz'. Did you mean 'train.steps'?"),
        (["optim.peak_lr=fast"], "Bad override 'optim.peak_lr=fast'"),
        (["mesh.data=3"], "do not divide the 8 devices"),
        (["mesh.data=8", "train.batch_size=12"], "not divisible by the data-parallel size 8"),
        (["mesh.dcn=3"], "mesh.dcn=3 does not divide the 8 devices"),
        (["mesh.dcn=-2"], "mesh.dcn must be 0 (one per slice) or positive"),
        (["mesh.dcn=2", "mesh.data=3"], "do not divide the 4 devices of each of 2 slices"),
        (["train.seq_len=4096"], "longer than the model's max_seq_len=512"),
        (["data.sources.0.path=/nonexistent/*.txt"], "No files match /nonexistent/*.txt"),
        (["train.profile_steps=5"], "train.profile_steps must be 'a:b' with 0 <= a < b"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, message, capsys, tmp_path):
    assert train.main(args + ["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("before", [True, False])
def test_settings_are_read_before_and_after_the_flags(before, capsys, tmp_path):
    flags, settings = ["--workdir", str(tmp_path / "w")], ["train.steps=5", "optim.peak_lr=-1"]
    assert train.main(settings + flags if before else flags + settings) == 2
    assert "'optim.peak_lr=-1': optim.peak_lr must be positive" in capsys.readouterr().err


def test_a_text_setting_keeps_its_text():
    # YAML would read 2:4 as the number 124 and 007 as 7; a text field takes what was written.
    exp = apply_overrides(Experiment(), ["train.profile_steps=2:4", "train.sample_prompt=007"])
    assert exp.train.profile_steps == "2:4" and exp.train.profile_range == (2, 4)
    assert exp.train.sample_prompt == "007"


def test_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "llama2_70b" in out and "llama3_1_405b" in out and "tiny" in out


# A real CLI run in a subprocess (about 45 s): in the slow set, which CI runs after the suite.
@pytest.mark.slow
def test_short_run_learns_and_writes_metrics(tmp_path):
    env = dict(os.environ, LLAMA_JAX_CACHE=str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_jax.train",
            "--workdir",
            str(workdir),
            "train.steps=30",
            "train.log_every=10",
            "train.eval_every=30",
            "train.eval_batches=2",
            "train.batch_size=8",
            "train.seq_len=64",
            "train.sample_tokens=8",
            "optim.warmup_steps=5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [10, 20, 30]
    for row in logged:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"} <= set(row)
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5  # it learns
    assert any("eval_loss" in r for r in rows)
    assert list(workdir.glob("events.out.tfevents.*"))
    assert "sample: def " in result.stderr + result.stdout
    assert json.loads((workdir / "experiment.json").read_text())["train"]["steps"] == 30
