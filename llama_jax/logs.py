"""Where the command-line tools send the libraries' log records: to a file in the workdir.

Orbax, Grain and absl log errors with full tracebacks from background threads (a checkpoint write
that hits a full disk, say) before the main thread sees the same error and reports it in one
sentence, and TensorStore's callbacks report their own failures as unraisable exceptions.
The terminal should show that sentence, not the tracebacks, so every log record goes to
WORKDIR/train.log (one file per process), and only JAX's own warnings (a GPU found without a CUDA
jaxlib, for instance) and llama_jax's stay on stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"


def _log_unraisable(unraisable) -> None:
    # Exceptions that nothing can catch (TensorStore's callbacks into an event loop that Orbax has
    # already closed after a failed write, for one) would print a bare traceback on stderr.
    logging.getLogger("python.unraisable").error(
        "%s %r",
        unraisable.err_msg or "Exception ignored in",
        unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


class _OnTerminal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and record.name.split(".")[0] in ("jax", "llama_jax")


def send_logs_to(path: str | Path) -> Path:
    """Routes all log records (and Python warnings) to the file `path` from now on, for this process.

    Replaces the handlers on the root logger (absl installs one that writes everything to stderr).
    Calling it again moves the log to a new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        if getattr(handler, "_llama_jax", False):
            handler.close()
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter(_FORMAT))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.addFilter(_OnTerminal())
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for handler in (to_file, to_terminal):
        handler._llama_jax = True  # noqa: SLF001 - marks the handlers this module owns
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("absl", "orbax"):  # absl sets its own level; INFO is enough in the file
        logging.getLogger(noisy).setLevel(logging.INFO)
    logging.captureWarnings(True)  # e.g. asyncio's "coroutine was never awaited" after a failed save
    sys.unraisablehook = _log_unraisable
    return path
