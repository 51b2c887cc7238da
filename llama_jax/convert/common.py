"""What every reader and writer of checkpoints shares: the error type and the destination check."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says which tensor or field and why."""


def require_empty_destination(path: Path) -> None:
    """Conversions never overwrite: the destination must be absent or an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(
            f"The destination {path} already exists and is not empty; choose a new directory."
        )


def read_json_object(file: Path) -> dict:
    """A config file's JSON object (config.json, params.json), or one sentence saying why not."""
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConversionError(f"{file} is not JSON ({err}).") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{file} does not hold a JSON object.")
    return value


@contextlib.contextmanager
def config_fields(file: Path):
    """A config whose fields are missing or of the wrong type is one sentence naming the file."""
    try:
        yield
    except ConversionError:
        raise
    except (TypeError, KeyError, ValueError, ArithmeticError) as err:
        raise ConversionError(
            f"{file} has a missing or mistyped field ({type(err).__name__}: {err})."
        ) from None


@contextlib.contextmanager
def readable(file: Path, kind: str):
    """A truncated or damaged weights file is one sentence, not its library's traceback."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own kinds, and OSError
        message = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{file} is not a readable {kind} file ({message}).") from None
