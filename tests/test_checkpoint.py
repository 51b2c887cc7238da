"""Checkpoints: exact resume after SIGKILL, clean stop on SIGTERM, fallback past a damaged
checkpoint, what is kept, a different model refused, and restore onto another mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax.checkpoint import CheckpointError, TrainCheckpointer
from llama_jax.config import CheckpointConfig, Experiment, MeshConfig, apply_overrides
from llama_jax.optim import make_optimizer
from llama_jax.sharding import make_mesh
from llama_jax.stages.pretrain import Pretrain
from llama_jax.train import train

STEPS = 12


def _env(tmp_path):
    env = dict(os.environ, LLAMA_JAX_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = ""  # one CPU device in the subprocesses
    return env


# LoRA with dropout: the adapters and Adam's moments of them, and the dropout masks, resume exactly.
LORA = ("lora.rank=4", "lora.targets=[wq,wv,w1,w2]", "lora.dropout=0.1")


def _command(workdir, extra=()):
    return [
        sys.executable,
        "-m",
        "llama_jax.train",
        "--workdir",
        str(workdir),
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.batch_size=4",
        "train.seq_len=64",
        "train.sample_tokens=0",
        "checkpoint.every_steps=3",
        "optim.warmup_steps=3",
        *extra,
    ]


def _logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _start_and_signal(workdir, env, after_step, sig, extra=()):
    """Starts a run, sends `sig` once a step past `after_step` is logged, returns (process, output)."""
    process = subprocess.Popen(
        _command(workdir, extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any(step > after_step for step in _logged_steps(workdir)):
            process.send_signal(sig)
            break
        time.sleep(0.02)
    output, _ = process.communicate(timeout=300)
    return process, output


def _final_params(workdir):
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.faults  # a real SIGKILL / full disk: run by .ci/run after the suite
@pytest.mark.parametrize("extra", [(), LORA], ids=["full", "lora"])
def test_sigterm_then_sigkill_then_resume_is_exact(tmp_path, extra):
    env = _env(tmp_path)
    reference = tmp_path / "reference"
    done = subprocess.run(_command(reference, extra), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "interrupted"
    # SIGTERM: the run finishes its step, saves, and exits cleanly.
    process, output = _start_and_signal(run, env, after_step=2, sig=signal.SIGTERM, extra=extra)
    assert process.returncode == 0, output
    stopped = int(output.split("stopping at step ")[1].split()[0])
    assert 2 < stopped < STEPS and (run / "checkpoints" / str(stopped)).is_dir()
    # SIGKILL: no chance to save; the restart resumes from the last complete checkpoint.
    process, output = _start_and_signal(run, env, after_step=stopped + 4, sig=signal.SIGKILL, extra=extra)
    assert process.returncode == -signal.SIGKILL, output
    assert max(_logged_steps(run)) < STEPS
    done = subprocess.run(_command(run, extra), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout + done.stderr
    if extra:  # the checkpoints hold the adapters alone
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(_final_params(run))]
        assert names and all(n.endswith(("_lora_a']", "_lora_b']")) for n in names), names

    # Same losses at every step and the same final parameters, bit for bit.
    assert _losses(run) == _losses(reference) and len(_losses(run)) == STEPS
    for a, b in zip(jax.tree.leaves(_final_params(run)), jax.tree.leaves(_final_params(reference))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An 8-step run on the 8 simulated devices, checkpointing every 2 steps."""
    os.environ.setdefault("LLAMA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    exp = apply_overrides(
        Experiment(),
        [
            "train.steps=8",
            "train.batch_size=8",
            "train.seq_len=64",
            "train.log_every=4",
            "train.sample_tokens=0",
            "eval_data=null",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=2",
            "checkpoint.keep_every=4",
            "model.n_layers=2",
        ],
    )
    workdir = tmp_path_factory.mktemp("run")
    params = train(exp, workdir, quiet=True)["state"].params
    return exp, workdir, params


def test_keeps_the_last_k_and_every_mth(trained):
    _, workdir, _ = trained
    assert TrainCheckpointer(workdir, CheckpointConfig()).steps() == [4, 6, 8]


def test_damaged_latest_checkpoint_is_skipped(trained, tmp_path, capsys):
    exp, original, params = trained
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    for file in (workdir / "checkpoints" / "8" / "state").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\0garbage" * 4)
    resumed = train(exp, workdir, quiet=True)["state"].params
    assert "checkpoint" in capsys.readouterr().out and list((workdir / "checkpoints").glob("damaged-8-*"))
    # It went back to step 6, trained steps 7 and 8 again, and got the same parameters.
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert 8 in TrainCheckpointer(workdir, CheckpointConfig()).steps()


def test_data_position_from_another_process_count(trained, tmp_path):
    """Written by 2 processes, restored by 1: identical per-process positions (split_by=rows) carry
    over; different ones (split by documents) are refused, and nothing is moved aside."""
    from llama_jax.data.training import training_data

    exp, original, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    data_dir = workdir / "checkpoints" / "8" / "data"
    state = json.loads((data_dir / "process_0-of-1.json").read_text())
    (data_dir / "process_0-of-1.json").unlink()
    for process in range(2):
        (data_dir / f"process_{process}-of-2.json").write_text(json.dumps(state))
    checkpoints = TrainCheckpointer(workdir, exp.checkpoint)
    target = Pretrain().abstract_state(
        exp, make_optimizer(exp.optim, exp.train.steps)[0], make_mesh(exp.mesh)
    )
    data = training_data(exp, quiet=True).train
    assert checkpoints.restore_latest(target, data, model=exp.model)[1] == 8
    assert data.get_state() == state

    (data_dir / "process_1-of-2.json").write_text(json.dumps({**state, "counter": -1}))
    with pytest.raises(CheckpointError, match="written by 2 processes reading separate documents"):
        checkpoints.restore_latest(target, data, model=exp.model)
    assert checkpoints.steps() == [4, 6, 8]


def test_checkpoint_of_another_model_is_refused(trained, tmp_path):
    exp, original, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    with pytest.raises(CheckpointError, match=r"different model \(dim 256 -> 128\)"):
        train(apply_overrides(exp, ["model.dim=128", "train.steps=10"]), workdir, quiet=True)
    assert (workdir / "checkpoints" / "8").is_dir()  # nothing moved or deleted


def test_restore_onto_another_mesh(tmp_path):
    exp = apply_overrides(Experiment(), ["model.n_layers=2"])
    optimizer, _ = make_optimizer(exp.optim, exp.train.steps)
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state = Pretrain().create_state(exp, optimizer, one, jax.random.key(3))
    checkpoints = TrainCheckpointer(tmp_path, CheckpointConfig(async_save=False))
    checkpoints.save(5, state, None, {"model": {}})
    checkpoints.close()

    eight = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices())
    target = Pretrain().abstract_state(exp.replace(mesh=MeshConfig(1, 4, 2)), optimizer, eight)
    restored, step = TrainCheckpointer(tmp_path, CheckpointConfig()).restore_latest(target)
    assert step == 5
    wq = restored.params["layers"]["attention"]["wq"]
    assert tuple(wq.sharding.spec) == (None, "fsdp", "tensor", None) and len(wq.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_training_workdir_exports_to_hugging_face(trained, tmp_path):
    """The params-only export: a training workdir -> HF directory -> same logits in transformers."""
    import torch
    import transformers

    from llama_jax.convert.cli import main as convert_main
    from llama_jax.model import Llama

    exp, workdir, params = trained
    assert (
        convert_main(
            ["--from", "llama_jax", str(workdir), "--to", "hf", str(tmp_path / "hf"), "--no-progress"]
        )
        == 0
    )
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(0).integers(0, exp.model.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(
        Llama(exp.model.replace(compute_dtype="float32")).apply({"params": jax.device_get(params)}, tokens)
    )
    assert np.abs(ours - theirs).max() < 1e-4


def test_incomplete_checkpoint_directory_is_ignored(trained, tmp_path):
    """A save killed midway leaves only Orbax's temporary directory, which is never restored."""
    exp, original, params = trained
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    partial = workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1234" / "state"
    partial.mkdir(parents=True)
    (partial / "half_written").write_bytes(b"\0" * 100)
    assert TrainCheckpointer(workdir, CheckpointConfig()).steps() == [4, 6, 8]
    resumed = train(exp, workdir, quiet=True)["state"]
    assert int(resumed.step) == 8
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# Runs the training CLI with every file write past 256 KiB failing (EFBIG), as on a full disk; the
# limit is set in the child itself, before JAX starts.
_FULL_DISK = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024)); "
    "sys.argv = ['llama_jax.train'] + sys.argv[1:]; "
    "runpy.run_module('llama_jax.train', run_name='__main__')"
)


@pytest.mark.faults  # a real SIGKILL / full disk: run by .ci/run after the suite
def test_a_full_disk_during_a_save_is_reported_and_earlier_checkpoints_survive(tmp_path):
    env = _env(tmp_path)
    workdir = tmp_path / "run"
    first = subprocess.run(
        _command(workdir)[:-2] + ["checkpoint.every_steps=3", "train.steps=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    # Now every file write past 256 KiB fails, as on a full disk.
    second = subprocess.run(
        [sys.executable, "-c", _FULL_DISK] + _command(workdir)[3:],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stdout + second.stderr
    assert err[-1].startswith("error: Saving a checkpoint in") and "already complete are intact" in err[-1]
    # Orbax's background writer logs the failure with a traceback; that goes to the log file only.
    assert "Traceback" not in second.stderr and (workdir / "train.log").stat().st_size > 0
    assert TrainCheckpointer(workdir, CheckpointConfig()).steps() == [3]
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        restored = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert int(restored["state"]["step"]) == 3


class _SlowManager:
    """A checkpoint manager whose asynchronous write never finishes (a hung filesystem), or fails."""

    def __init__(self, error=None):
        import threading

        self.release, self.error = threading.Event(), error

    def wait_until_finished(self):
        if self.error is not None:
            raise self.error
        self.release.wait(30)

    def latest_step(self):
        return 8


def test_a_stalled_checkpoint_write_ends_the_wait_in_one_sentence(tmp_path, monkeypatch, capsys):
    import time

    from llama_jax import checkpoint as checkpoint_lib

    monkeypatch.setattr(checkpoint_lib, "NOTE_EVERY_S", 0.2)
    checkpointer = checkpoint_lib.TrainCheckpointer(tmp_path, CheckpointConfig(write_timeout_s=1.0))
    manager = _SlowManager()
    started = time.monotonic()
    with pytest.raises(checkpoint_lib.StalledWriteError, match=r"checkpoints/8 has not finished after 1 s"):
        checkpointer._wait_for_write(manager)
    assert time.monotonic() - started < 5
    manager.release.set()
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) >= 3 and all(n.startswith("still writing checkpoint") for n in notes)
    # A write that failed is re-raised where the run waits for it.
    with pytest.raises(OSError, match="No space left"):
        checkpointer._wait_for_write(_SlowManager(OSError(28, "No space left on device")))
