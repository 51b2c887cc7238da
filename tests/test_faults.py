"""Faults and bad settings never lose or corrupt work: divergence is caught and never applied or
saved, settings are checked before anything compiles, one run holds a workdir, a torn metrics row
does not block a resume, an unwritable workdir and a failing experiment file are one sentence.

The tests marked `faults` train real runs; `python -m pytest` leaves them out (see setup.cfg) and
`.ci/run` runs them after the suite: `python -m pytest -m faults`."""

import json
import re
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from llama_jax import train
from llama_jax.checkpoint import load_for_inference
from llama_jax.data.synthetic import random_documents, write_sentencepiece_model

EXPERIMENT = """
from llama_jax.config import CheckpointConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from llama_jax.data.config import DataConfig, SourceConfig


def experiment():
    return Experiment(
        name="small",
        model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                          vocab_size=320, max_seq_len=64),
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=6, batch_size=8, seq_len=32, log_every=2, eval_every=6, sample_tokens=0),
        checkpoint=CheckpointConfig(every_steps=2, keep_last=2),
        data=DataConfig(sources=(SourceConfig("{data}", kind="text_lines"),), tokenizer_path="{tokenizer}"),
        eval_data=None,
    )
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "docs.txt").write_text("\n".join(random_documents(400, seed=5)))
    tokenizer = write_sentencepiece_model(str(root), vocab_size=320)
    path = root / "small.py"
    path.write_text(textwrap.dedent(EXPERIMENT.format(data=root / "docs.txt", tokenizer=tokenizer)))
    return str(path)


def _strict_rows(workdir):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [
        json.loads(line, parse_constant=refuse)
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def _finite(params) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in __import__("jax").tree.leaves(params))


def _checkpointed_params(workdir):
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return steps, [load_for_inference(str(workdir / "checkpoints" / str(step)))[1] for step in steps]


@pytest.mark.faults
def test_divergence_stops_the_run_and_nothing_non_finite_is_saved(small, tmp_path, capsys):
    workdir = tmp_path / "run"
    # A checkpoint every 2 steps and a log line every 4: step 2 is saved after the blow-up.
    args = ["--exp", small, "--workdir", str(workdir), "optim.peak_lr=1e8", "optim.warmup_steps=0"]
    assert train.main(args + ["train.log_every=4"]) == 1
    err = capsys.readouterr().err
    assert "is not finite" in err and "the run stops" in err and "Traceback" not in err
    rows = _strict_rows(workdir)  # strict JSON: a non-finite value is logged as null
    assert any(row["loss"] is None or row["grad_norm"] is None for row in rows)
    steps, params = _checkpointed_params(workdir)
    assert steps == [2] and all(_finite(p) for p in params)  # the bad updates were never applied


@pytest.mark.faults
def test_skip_drops_updates_and_stops_after_max_skipped_in_a_row(small, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["--exp", small, "--workdir", str(workdir), "optim.peak_lr=1e8", "optim.warmup_steps=0"]
    assert train.main(args + ["train.on_nonfinite=skip", "train.max_skipped=3", "train.steps=12"]) == 1
    captured = capsys.readouterr()
    assert "skipped the updates of steps" in captured.out + captured.err
    assert "steps in a row" in captured.err and "train.max_skipped=3" in captured.err
    steps, params = _checkpointed_params(workdir)
    assert steps and all(_finite(p) for p in params)


@pytest.mark.parametrize(
    "override,message",
    [
        ("checkpoint.keep_last=0", "checkpoint.keep_last must be at least 1, got 0"),
        ("optim.peak_lr=-0.001", "optim.peak_lr must be positive"),
        ("train.microbatches=0", "train.microbatches must be at least 1"),
        ("train.eval_every=0", "train.eval_every must be at least 1"),
        ("model.param_dtype=int32", "must be a floating dtype"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite must be 'stop' or 'skip'"),
        ("data.seed=-1", "'data.seed=-1': seed must be at least 0"),
        ("data.worker_buffer_size=0", "worker_buffer_size must be at least 1"),
        ("data.packing_bins=0", "packing_bins must be at least 1, or None"),
        ("data.sources.0.weight=inf", "weight must be a positive number, got inf"),
        ("model.norm_eps=0", "model.norm_eps must be positive"),
        ("model.rope_theta=-1", "model.rope_theta must be positive"),
        ("model.n_layers=0", "model.n_layers must be at least 1"),
    ],
)
def test_settings_that_would_lose_work_are_refused_in_one_sentence(
    small, tmp_path, capsys, override, message
):
    assert train.main(["--exp", small, "--workdir", str(tmp_path / "w"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.faults
def test_one_run_per_workdir_and_a_dead_holder_is_taken_over(small, tmp_path, capsys):
    workdir = tmp_path / "run"
    hold = (
        "import sys, time; from llama_jax.run_lock import RunLock\n"
        f"with RunLock({str(workdir)!r}):\n    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.main(["--exp", small, "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert f"The workdir {workdir} is in use by another run (pid {holder.pid}" in err
        assert not (workdir / "checkpoints").exists()  # the second run touched nothing
    finally:
        holder.kill()  # SIGKILL: the holder never releases its lock
        holder.wait()
    assert train.main(["--exp", small, "--workdir", str(workdir)]) == 0
    out = capsys.readouterr()
    assert f"from a run that is no longer running (pid {holder.pid}" in out.out + out.err
    assert (workdir / "run.lock").read_text() == ""  # released cleanly at the end


@pytest.mark.faults
def test_a_torn_metrics_row_does_not_block_the_resume(small, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(["--exp", small, "--workdir", str(workdir), "train.steps=4"]) == 0
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 3.1')  # what a kill in the middle of a write leaves
    # (The resumed run also warms up for longer than it runs, which is named.)
    assert train.main(["--exp", small, "--workdir", str(workdir), "optim.warmup_steps=100"]) == 0
    out = capsys.readouterr()
    assert "dropped 1 unreadable line(s)" in out.out + out.err
    assert "optim.warmup_steps=100 is longer than the run (train.steps=6)" in out.out + out.err
    assert [row["step"] for row in _strict_rows(workdir)] == [2, 4, 6]


def test_an_unwritable_workdir_is_found_before_compiling(small, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert train.main(["--exp", small, "--workdir", str(tmp_path / "a_file" / "run")]) == 2
    err = capsys.readouterr().err
    assert "Cannot write to" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "source,where",
    [
        ("def experiment(:\n", ":1: SyntaxError"),
        ("def experiment():\n    return {}['model']\n", ":2: KeyError: 'model'"),
        ("import no_such_module_anywhere\n", ":1: ModuleNotFoundError"),
    ],
)
def test_an_experiment_file_that_fails_is_file_line_message(tmp_path, capsys, source, where):
    path = tmp_path / "broken.py"
    path.write_text(source)
    assert train.main(["--exp", str(path), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}{where}" in err and "Traceback" not in err


def test_an_unreachable_coordinator_is_one_sentence_after_the_timeout(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    args = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1"]
    assert train.main(args + ["--init-timeout", "2", "--workdir", str(tmp_path / "w")]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"The coordinator at 127.0.0.1:{port} did not answer within 2 s" in err and "Traceback" not in err


@pytest.mark.faults
def test_a_resume_with_other_data_is_refused_unless_reset(small, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(["--exp", small, "--workdir", str(workdir), "train.steps=4"]) == 0
    capsys.readouterr()
    other = ["--exp", small, "--workdir", str(workdir), "data.seed=7", "train.seq_len=16"]
    assert train.main(other) == 2
    err = capsys.readouterr().err
    assert "was written with other data settings (data.seed, train.seq_len differ)" in err
    assert "checkpoint.reset_data=true" in err and "Traceback" not in err
    assert train.main(other + ["checkpoint.reset_data=true"]) == 0
    out = capsys.readouterr()
    assert "the new data starts from its beginning (checkpoint.reset_data)" in out.out + out.err
    assert [row["step"] for row in _strict_rows(workdir)] == [2, 4, 6]


def test_a_recipe_that_cannot_fit_stops_before_allocating(tmp_path, capsys):
    """The main command on a laptop: from the shapes alone, one sentence pointing at the AOT check."""
    started = time.monotonic()
    assert train.main(["--exp", "llama2_70b", "--workdir", str(tmp_path / "w")]) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "llama2_70b needs at least" in err and "GiB per device" in err
    assert "the experiment targets v5p-512" in err and "`python -m llama_jax.aot --exp=llama2_70b`" in err


def _corrupt(step_dir):
    """Flips bytes in the middle of the largest array file of a checkpoint, as a bad disk would."""
    data = max((f for f in (step_dir / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0x5A for b in raw[middle : middle + 64])
    data.write_bytes(bytes(raw))


@pytest.mark.faults
def test_altered_checkpoint_bytes_are_caught_and_the_run_ends_as_if_uninterrupted(small, tmp_path, capsys):
    import jax

    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    assert train.main(["--exp", small, "--workdir", str(reference)]) == 0
    assert train.main(["--exp", small, "--workdir", str(faulty), "train.steps=4"]) == 0
    _corrupt(faulty / "checkpoints" / "4")
    capsys.readouterr()
    # Inference falls back to the newest checkpoint that verifies, with a warning.
    cfg, params = load_for_inference(str(faulty))
    warning = capsys.readouterr().err
    # The altered bytes still decode: only the checksums written at save time catch them.
    assert "checkpoints/4 is damaged" in warning and "do not match the checksums written with them" in warning
    # Training reports the damage, moves the step aside, resumes from step 2 and ends where an
    # uninterrupted run ends.
    assert train.main(["--exp", small, "--workdir", str(faulty)]) == 0
    out = capsys.readouterr()
    assert "is damaged" in out.out + out.err and "resumed from" in out.out + out.err
    assert [p.name.split("-")[1] for p in (faulty / "checkpoints").glob("damaged-*")] == ["4"]
    ours, theirs = load_for_inference(str(faulty))[1], load_for_inference(str(reference))[1]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_altered_parameters_export_is_refused_in_one_sentence(tmp_path):
    import jax

    from llama_jax.checkpoint import CheckpointError, load_params, save_params
    from llama_jax.config import ModelConfig
    from llama_jax.model import init_params

    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=320, max_seq_len=64
    )
    path = save_params(tmp_path / "export", jax.device_get(init_params(cfg, jax.random.key(0))), cfg)
    assert load_params(path)[0] == cfg  # intact: loads
    data = max((f for f in (path / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"is damaged"):
        load_params(path)


def _truncated_safetensors(path):
    file = sorted(path.glob("*.safetensors"))[0]
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return r"model.safetensors is not a readable safetensors file"


def _mistyped_config(path):
    config = json.loads((path / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (path / "config.json").write_text(json.dumps(config))
    return r"config.json has a missing or mistyped field"


def _config_not_json(path):
    (path / "config.json").write_text('{"hidden_size": 64,')
    return r"config.json is not JSON"


@pytest.mark.parametrize("damage", [_truncated_safetensors, _mistyped_config, _config_not_json])
def test_damaged_hugging_face_files_are_one_sentence(hf_model_dir, tmp_path, capsys, damage):
    from llama_jax.convert.cli import main as convert

    _, path = hf_model_dir()
    expected = damage(path)
    capsys.readouterr()
    assert (
        convert(["--from", "hf", str(path), "--to", "llama_jax", str(tmp_path / "out"), "--no-progress"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and re.search(expected, err), err


@pytest.mark.parametrize(
    "override,message",
    [
        ("posttrain.beta=-1", "posttrain.beta must be positive"),
        ("posttrain.ppo.top_p=0", r"posttrain.ppo.top_p must be in \(0, 1\]"),
        ("posttrain.ppo.gamma=2", "posttrain.ppo.gamma must be between 0 and 1"),
        ("posttrain.ppo.kl_coef=-0.1", "posttrain.ppo.kl_coef must be at least 0"),
    ],
)
def test_post_training_settings_have_ranges(override, message):
    from llama_jax.config import ConfigError, Experiment, PosttrainConfig, apply_overrides

    with pytest.raises(ConfigError, match=message):
        apply_overrides(Experiment(posttrain=PosttrainConfig(stage="ppo")), [override])


def _tear_event_file(workdir):
    """Cuts the newest TensorBoard event file in the middle of its last record."""
    events = max(workdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    size = events.stat().st_size
    with events.open("r+b") as f:
        f.truncate(size - 7)
    return events


@pytest.mark.faults
def test_what_a_kill_leaves_behind_never_blocks_the_resume(small, tmp_path, capsys):
    """A kill during a save and a log write leaves an empty step directory, Orbax's temporary
    directory, a torn metrics row and a torn TensorBoard record; the resume reports and passes
    them, and ends where an uninterrupted run ends."""
    import jax

    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    assert train.main(["--exp", small, "--workdir", str(reference)]) == 0
    assert train.main(["--exp", small, "--workdir", str(faulty), "train.steps=4"]) == 0
    # The kill came during the save of step 4 (the schedule of a 4-step run differs from a 6-step
    # run's after step 2, so the run must resume from 2 to end as the reference does).
    checkpoints = faulty / "checkpoints"
    stray = checkpoints / "4.orbax-checkpoint-tmp-1764000000"
    (checkpoints / "4").rename(stray)  # a half-written save: some of its files
    for f in sorted(p for p in stray.rglob("*") if p.is_file())[::2]:
        f.unlink()
    (checkpoints / "4").mkdir()  # and a step directory with nothing in it
    with (faulty / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')
    torn = _tear_event_file(faulty)
    capsys.readouterr()

    assert train.main(["--exp", small, "--workdir", str(faulty)]) == 0
    out = capsys.readouterr()
    said = out.out + out.err
    assert "Traceback" not in said
    assert "checkpoints/4 is damaged" in said and f"resumed from {checkpoints / '2'}" in said
    assert f"torn byte(s) from the end of {torn}" in said and "dropped 1 unreadable line(s)" in said
    assert [row["step"] for row in _strict_rows(faulty)] == [2, 4, 6]
    assert not list(checkpoints.glob("*.orbax-checkpoint-tmp*"))  # removed before the first save
    ours, theirs = load_for_inference(str(faulty))[1], load_for_inference(str(reference))[1]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.faults
@pytest.mark.parametrize(
    "kind,content,message",
    [
        ("jsonl", '{"other": 1}\n{"other": 2}\n', "documents in a row were unusable"),
        ("text_lines", "", "has no documents"),
        ("text_lines", "\n  \n\n", "documents in a row were unusable"),
    ],
)
def test_data_with_no_usable_document_is_one_sentence(small, tmp_path, capsys, kind, content, message):
    data = tmp_path / f"data.{kind}"
    data.write_text(content)
    source = f"data.sources=[{{path: {data}, kind: {kind}}}]"
    assert train.main(["--exp", small, "--workdir", str(tmp_path / "w"), source]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]
