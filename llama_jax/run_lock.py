"""One run per workdir: WORKDIR/run.lock, held for the whole run by the job's process 0.

Where the filesystem has OS file locks (local disks, NFS), the lock dies with its process, so a
run that was killed never leaves the workdir stuck: the next run takes the lock over and says
whose it was (the file still names the dead holder). Where it has none (some network and FUSE
filesystems that hosts share), the file is a lease instead: its holder rewrites it every
LEASE_RENEW_S seconds, and a lease not renewed for LEASE_EXPIRY_S seconds belongs to a run that
is gone and is taken over. Either way a second run started while the first is alive stops with one
sentence naming the first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

LEASE_RENEW_S = 20.0
LEASE_EXPIRY_S = 90.0  # several missed renewals: the holder is gone


class RunLockError(RuntimeError):
    """The workdir is in use by another run; the message is one sentence."""


class RunLock:
    def __init__(self, workdir: str | Path, enabled: bool = True, say=print):
        self.path = Path(workdir) / "run.lock"
        self.enabled, self.say, self._file = enabled, say, None
        self._renewing: threading.Event | None = None  # set to stop renewing a lease

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Takes the lock, or raises RunLockError naming its holder."""
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):  # held by a live process
                holder = _contents(file)
                file.close()
                raise self._in_use(holder) from None
            file.close()  # ENOLCK, EOPNOTSUPP...: no file locks here
            return self._acquire_lease()
        previous = _contents(file)
        if previous:  # its holder ended without releasing it: killed, or its machine went away
            self.say(f"took over {self.path} from a run that is no longer running ({previous})")
        _rewrite(file, _holder())
        self._file = file
        return self

    def release(self) -> None:
        if self._renewing is not None:
            self._renewing.set()
            self._renewing = None
            self.path.write_text("")  # an empty file: released cleanly
        if self._file is not None:
            _rewrite(self._file, "")  # an empty file: released cleanly
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def _in_use(self, holder: str) -> RunLockError:
        return RunLockError(
            f"The workdir {self.path.parent} is in use by another run ({holder or 'another process'}); "
            "wait for it to end or use another --workdir."
        )

    def _acquire_lease(self) -> RunLock:
        previous = self.path.read_text().strip()
        age = time.time() - self.path.stat().st_mtime
        if previous and age < LEASE_EXPIRY_S:
            raise self._in_use(previous)
        mine = _holder()
        self.path.write_text(mine + "\n")
        # Two runs that found the lease free at once: the one whose write landed last keeps it.
        time.sleep(1.0)
        if self.path.read_text().strip() != mine:
            raise self._in_use(self.path.read_text().strip())
        if previous:
            self.say(
                f"took over {self.path} from a run that stopped renewing it {age:.0f} s ago ({previous})"
            )
        stop = threading.Event()
        threading.Thread(target=self._renew, args=(stop,), daemon=True, name="run-lock-lease").start()
        self._renewing = stop
        return self

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a passing filesystem error: the next renewal tries again


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _contents(file) -> str:
    file.seek(0)
    return file.read().strip()


def _rewrite(file, text: str) -> None:
    file.seek(0)
    file.truncate()
    if text:
        file.write(text + "\n")
    file.flush()
