"""Multi-host training: two processes joined by JAX's distributed runtime over localhost (CPU
collectives through gloo) train exactly as one process with the same devices and mesh."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

STEPS = 6
# 4 devices in all, as data=2 x fsdp=2; rows of each batch split between the processes so that
# both runs see the same global batches.
COMMON = [
    "train.steps=%d" % STEPS,
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.sample_tokens=4",
    "optim.warmup_steps=2",
    "checkpoint.every_steps=3",
    "mesh.data=2",
    "mesh.fsdp=2",
    "data.split_by=rows",
    "eval_data.split_by=rows",
]


def _env(tmp_path, devices):
    env = dict(os.environ, LLAMA_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("one")
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax.train", "--workdir", str(workdir)] + COMMON,
        env=_env(tmp_path, 4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, workdir, result


@pytest.mark.slow  # two real training processes and a third for the reference: after the suite
def test_two_processes_train_exactly_as_one(one_process, tmp_path):
    cache_from, single, single_result = one_process
    workdir = tmp_path / "run"
    env = _env(cache_from, 2)  # the tokenizer trained by the one-process run is reused
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_jax.train",
                "--workdir",
                str(workdir),
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ]
            + COMMON,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    train_1, eval_1 = _losses(single)
    train_2, eval_2 = _losses(workdir)
    assert len(train_2) == STEPS and len(eval_2) == 2
    np.testing.assert_allclose(train_2, train_1, rtol=1e-5)
    np.testing.assert_allclose(eval_2, eval_1, rtol=1e-5)
    # Process 0 speaks for the job; both processes keep their own log file.
    assert "sample:" in outputs[0][1] + outputs[0][0] and "sample:" not in outputs[1][1] + outputs[1][0]
    assert (workdir / "train.log").exists() and (workdir / "train.1.log").exists()
    # The checkpoints are written collectively: one directory per step, each process's data position.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert sorted(p.name for p in (workdir / "checkpoints" / "6" / "data").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_an_incomplete_process_spec_is_one_sentence(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax.train", "--coordinator", "localhost:1234"],
        env=_env(tmp_path, 1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: A multi-host job needs all of")


def _two_processes(args, env, workdir=None):
    address = f"localhost:{_free_port()}"
    return [
        subprocess.Popen(
            args + ["--coordinator", address, "--num-processes", "2", "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.mark.faults
def test_a_locked_workdir_stops_every_process_in_one_sentence(tmp_path):
    """Process 0 holds the lock for the job; when it finds the workdir in use, the other processes
    learn it too and stop, rather than wait for process 0 in the first collective."""
    from llama_jax.run_lock import RunLock

    workdir = tmp_path / "run"
    with RunLock(workdir):
        procs = _two_processes(
            [sys.executable, "-m", "llama_jax.train", "--workdir", str(workdir)] + COMMON, _env(tmp_path, 2)
        )
        outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert f"is in use by another run (pid {os.getpid()} on" in outputs[0][1].splitlines()[-1]
    assert "is in use by another run (process 0 found it locked)" in outputs[1][1].splitlines()[-1]
    assert not (workdir / "checkpoints").exists()


BARRIER = """
import sys, time
import jax
from llama_jax import distributed
spec = distributed.ProcessSpec("{address}", 2, int(sys.argv[1]), 60.0)
distributed.initialize(spec)
jax.devices()  # both backends up, as in a run
if spec.process_id == 0:
    time.sleep(25)  # never reaches the barrier in time
else:
    try:
        distributed.barrier("the test", timeout_s=2)
    except distributed.DistributedError as err:
        print("error:", err, file=sys.stderr)
        sys.exit(2)
"""


@pytest.mark.faults
def test_a_process_that_does_not_come_ends_the_wait_in_one_sentence(tmp_path):
    address = f"localhost:{_free_port()}"
    script = tmp_path / "barrier.py"
    script.write_text(BARRIER.format(address=address))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i)],
            env=_env(tmp_path, 1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    started = time.monotonic()
    lines = []
    for line in procs[1].stderr:  # the sentence comes when the wait ends, well before process 0 wakes
        lines.append(line)
        if line.startswith("error:"):
            break
    waited = time.monotonic() - started
    for p in procs:
        p.kill()
        p.wait()
    assert "Process 1 waited 2 s for the other processes at 'the test'" in lines[-1], "".join(lines)[-2000:]
    assert waited < 20
