"""One run per workdir: an OS file lock where the filesystem has them, a renewed lease where it has
none (as on some filesystems that hosts share); a holder that is gone is taken over and named."""

import errno
import os
import time

import pytest

from llama_jax import run_lock
from llama_jax.run_lock import RunLock, RunLockError


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match=f"in use by another run \\(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / "run.lock").read_text() == ""
    RunLock(tmp_path).acquire().release()


@pytest.fixture
def no_file_locks(monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", refuse)
    monkeypatch.setattr(run_lock, "LEASE_RENEW_S", 0.1)


def test_without_file_locks_a_renewed_lease_holds_the_workdir(tmp_path, no_file_locks):
    said = []
    first = RunLock(tmp_path, say=said.append).acquire()
    lease = tmp_path / "run.lock"
    os.utime(lease, (time.time() - 30, time.time() - 30))
    time.sleep(0.5)
    assert time.time() - lease.stat().st_mtime < 1  # renewed by its holder
    with pytest.raises(RunLockError, match=f"in use by another run \\(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    assert lease.read_text() == "" and said == []
    second = RunLock(tmp_path, say=said.append).acquire()
    assert said == []  # a released lease is free: nothing taken over
    second.release()


def test_without_file_locks_a_lease_no_longer_renewed_is_taken_over(tmp_path, no_file_locks):
    lease = tmp_path / "run.lock"
    lease.write_text("pid 4242 on another-host since 2026-12-01 10:00:00\n")
    stale = time.time() - run_lock.LEASE_EXPIRY_S - 5
    os.utime(lease, (stale, stale))
    said = []
    lock = RunLock(tmp_path, say=said.append).acquire()
    assert len(said) == 1 and "took over" in said[0] and "pid 4242 on another-host" in said[0]
    assert f"pid {os.getpid()}" in lease.read_text()
    lock.release()
