"""What every reader and writer of checkpoints shares: the error type and the destination check."""

from __future__ import annotations

from pathlib import Path


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says which tensor or field and why."""


def require_empty_destination(path: Path) -> None:
    """Conversions never overwrite: the destination must be absent or an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(
            f"The destination {path} already exists and is not empty; choose a new directory."
        )
