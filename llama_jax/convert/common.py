"""What every reader and writer of checkpoints shares: the error type, the destination check and
its atomic writing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def atomic_directory(path: Path):
    """A temporary directory beside `path` that becomes `path` when the block ends, or is removed
    if it fails: a conversion that fails part way leaves nothing at its destination. `path` must
    be absent or empty (renaming onto an empty directory replaces it)."""
    require_empty_destination(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as err:
        raise ConversionError(f"Cannot create {path}: {err.strerror or err}.") from None
    try:
        yield partial
        partial.chmod(0o755)  # mkdtemp's 0o700 is for the unfinished directory only
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """A tokenizer with more tokens than the model's vocabulary does not belong to it."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConversionError(
            f"The tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {vocab_size}: they do not belong together."
        )
