"""One run per workdir: WORKDIR/run.lock, held with an OS file lock for the whole run.

The lock dies with its process, so a run that was killed never leaves the workdir stuck: the next
run takes the lock over and says whose it was (the file still names the dead holder). A second
run started while the first is alive stops with one sentence naming the first.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class RunLockError(RuntimeError):
    """The workdir is in use by another run; the message is one sentence."""


class RunLock:
    def __init__(self, workdir: str | Path, enabled: bool = True, say=print):
        self.path = Path(workdir) / "run.lock"
        self.enabled, self.say, self._file = enabled, say, None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunLockError(
                f"The workdir {self.path.parent} is in use by another run ({holder}); wait for it "
                "to end or use another --workdir."
            ) from None
        file.seek(0)
        previous = file.read().strip()
        if previous:  # its holder ended without releasing it: killed, or its machine went away
            self.say(f"took over {self.path} from a run that is no longer running ({previous})")
        file.seek(0)
        file.truncate()
        file.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # an empty file: released cleanly
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
