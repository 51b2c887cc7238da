"""Random-access document sources: text, JSONL, Parquet and ArrayRecord files.

Each source is a sequence of documents (`len` and `[i]`) that Grain's
`MapDataset.source` can shuffle, shard and read from several threads.
`source[i]` is a `str` (text), a list of messages (chat data), an int32
array (pre-tokenized ArrayRecord) or `None` for a document that cannot be
used; every `None` is logged and counted in `COUNTERS`.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.data.config import SourceConfig

logger = logging.getLogger("llama_jax.data")

# File name endings searched for in directories, per source kind.
_SUFFIXES = {
    "text": None,  # every file that is not hidden
    "text_lines": None,
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "arrayrecord": (".array_record", ".arrayrecord"),
}
MANIFEST_NAME = "manifest.json"
TOKEN_DTYPE = np.dtype("<i4")


class DataError(ValueError):
    """Data that cannot be read or used; the message is one sentence for the user. Raised while
    batches are read too (from the first training step), so the CLIs catch it wherever it arises."""


class Counters:
    """Thread-safe counts of skipped and split documents, logged as they grow."""

    def __init__(self):
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, source: str, event: str, detail: str = "", level: int = logging.WARNING) -> None:
        with self._lock:
            self._counts[(source, event)] += 1
            n = self._counts[(source, event)]
        # Log the first few, then every power of ten, so bad data is visible
        # without flooding the log.
        if n <= 5 or str(n).rstrip("0") == "1":
            logger.log(level, "%s: %s%s (%d so far).", source, event, detail, n)

    def get(self, source: str, event: str) -> int:
        with self._lock:
            return self._counts[(source, event)]

    def total(self, event: str) -> int:
        with self._lock:
            return sum(n for (_, e), n in self._counts.items() if e == event)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


COUNTERS = Counters()
SKIPPED = "skipped a document"
INVALID_UTF8 = "replaced invalid UTF-8 bytes with U+FFFD"


def expand_paths(paths: Sequence[str], kind: str) -> list[str]:
    """Files named by `paths` (files, directories, globs), in a stable order."""
    suffixes = _SUFFIXES[kind]
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [
                    os.path.join(root, n)
                    for n in names
                    if not n.startswith(".")
                    and n != MANIFEST_NAME
                    and (suffixes is None or n.endswith(suffixes) or ".array_record-" in n)
                ]
            files += sorted(found)
        elif os.path.isfile(path):
            files.append(path)
        elif glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"No files match {path}")
            files += matches
        else:
            raise FileNotFoundError(f"No such file or directory: {path}")
    if not files:
        wanted = "files" if suffixes is None else " or ".join(suffixes) + " files"
        raise FileNotFoundError(f"No {wanted} found in {', '.join(paths)}")
    return files


def decode_utf8(data: bytes, source: str, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        COUNTERS.add(source, INVALID_UTF8, f" in {where}")
        return data.decode("utf-8", errors="replace")


class _Files:
    """Lazily opened read-only file descriptors; safe for threads and pickling."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._fds: dict[int, int] = {}

    def read(self, file_index: int, offset: int, length: int) -> bytes:
        fd = self._fds.get(file_index)
        if fd is None:
            fd = self._fds.setdefault(file_index, os.open(self.paths[file_index], os.O_RDONLY))
        return os.pread(fd, length, offset)  # no shared file position: thread safe

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.paths = state["paths"]
        self._fds = {}


class TextFileSource:
    """Each file is one document."""

    def __init__(self, name: str, paths: Sequence[str]):
        self.name = name
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str | None:
        path = self._paths[index]
        with open(path, "rb") as f:
            text = decode_utf8(f.read(), self.name, path)
        if not text.strip():
            COUNTERS.add(self.name, SKIPPED, f": {path} is empty")
            return None
        return text


def _index_lines(path: str, block_size: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths (without the newline) of non-empty lines."""
    starts, ends = [np.zeros(1, np.int64)], []
    position = 0
    with open(path, "rb") as f:
        while block := f.read(block_size):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
            ends.append(newlines + position)
            starts.append(newlines + position + 1)
            position += len(block)
    ends.append(np.array([position], np.int64))
    start, end = np.concatenate(starts), np.concatenate(ends)
    keep = end > start
    return start[keep], (end - start)[keep]


class LineSource:
    """Each non-empty line is one document: plain text, or JSON with `field`."""

    def __init__(
        self,
        name: str,
        paths: Sequence[str],
        *,
        json_field: str | None = None,
        chat: bool = False,
    ):
        self.name = name
        self._files = _Files(paths)
        self._json_field = json_field
        self._chat = chat
        file_ids, starts, lengths = [], [], []
        for i, path in enumerate(paths):
            s, n = _index_lines(path)
            file_ids.append(np.full(len(s), i, np.int32))
            starts.append(s)
            lengths.append(n)
        self._file_ids = np.concatenate(file_ids)
        self._starts = np.concatenate(starts)
        self._lengths = np.concatenate(lengths)

    def __len__(self) -> int:
        return len(self._starts)

    def _where(self, index: int) -> str:
        # Line numbers are not stored; the byte offset locates the line.
        path = self._files.paths[self._file_ids[index]]
        return f"{path} at byte {self._starts[index]}"

    def __getitem__(self, index: int) -> Any:
        data = self._files.read(
            int(self._file_ids[index]), int(self._starts[index]), int(self._lengths[index])
        )
        text = decode_utf8(data.rstrip(b"\r"), self.name, self._where(index))
        if self._json_field is None:
            if not text.strip():
                return None  # blank lines are not documents; nothing to report
            return text
        try:
            record = json.loads(text)
        except ValueError:
            if not text.strip():
                return None
            COUNTERS.add(self.name, SKIPPED, f": line {self._where(index)} is not JSON")
            return None
        return _field_of(record, self._json_field, self._chat, self.name, self._where(index))


def _field_of(record: Any, field: str, chat: bool, name: str, where: str) -> Any:
    value = record.get(field) if isinstance(record, dict) else None
    if chat:
        if isinstance(value, list) and value:
            return value
        COUNTERS.add(name, SKIPPED, f": {where} has no list of messages in {field!r}")
        return None
    if isinstance(value, str) and value:
        return value
    problem = "an empty" if value == "" else "no string"
    COUNTERS.add(name, SKIPPED, f": {where} has {problem} field {field!r}")
    return None


class ParquetSource:
    """Each row is one document, in column `field`."""

    def __init__(self, name: str, paths: Sequence[str], field: str, chat: bool = False):
        import pyarrow.parquet as pq

        self.name = name
        self._paths = list(paths)
        self._field = field
        self._chat = chat
        # (file, row group) of every row group, and the first row of each.
        self._groups: list[tuple[int, int]] = []
        first_rows = [0]
        for i, path in enumerate(self._paths):
            try:
                metadata = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises several error types
                raise ValueError(f"{path} is not a Parquet file ({e}).") from None
            if field not in metadata.schema.names:
                raise ValueError(f"{path} has no column {field!r}; its columns: {metadata.schema.names}")
            for group in range(metadata.num_row_groups):
                self._groups.append((i, group))
                first_rows.append(first_rows[-1] + metadata.row_group(group).num_rows)
        self._first_rows = np.array(first_rows, np.int64)
        self._init_cache()

    def _init_cache(self):
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()
        self._open: dict[int, Any] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_cache", "_open"):
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return int(self._first_rows[-1])

    def _row_group(self, group: int) -> list[Any]:
        import pyarrow.parquet as pq

        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            file_index, group_in_file = self._groups[group]
            if file_index not in self._open:
                self._open[file_index] = pq.ParquetFile(self._paths[file_index])
            table = self._open[file_index].read_row_group(group_in_file, columns=[self._field])
            rows = table.column(0).to_pylist()
            self._cache[group] = rows
            if len(self._cache) > 8:  # random access touches many groups; keep a few
                self._cache.popitem(last=False)
            return rows

    def __getitem__(self, index: int) -> Any:
        group = int(np.searchsorted(self._first_rows, index, side="right")) - 1
        value = self._row_group(group)[index - int(self._first_rows[group])]
        where = f"{self._paths[self._groups[group][0]]} row {index}"
        if isinstance(value, bytes) and not self._chat:
            value = decode_utf8(value, self.name, where)
        return _field_of({self._field: value}, self._field, self._chat, self.name, where)


class ArrayRecordSource:
    """Each record is one document: UTF-8 text, or int32 token ids."""

    def __init__(
        self,
        name: str,
        paths: Sequence[str],
        tokenized: bool,
        vocab_size: int | None = None,
    ):
        import grain

        self.name = name
        self._tokenized = tokenized
        if tokenized and vocab_size is not None:
            _check_manifest(paths, vocab_size)
        try:
            self._records = grain.sources.ArrayRecordDataSource(list(paths))
        except Exception as e:  # array_record raises bare RuntimeErrors
            raise ValueError(f"Cannot read ArrayRecord files {paths[0]}...: {e}") from None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Any:
        record = self._records[index]
        if not self._tokenized:
            text = decode_utf8(record, self.name, f"record {index}")
            return text if text else None
        if len(record) % TOKEN_DTYPE.itemsize or not record:
            COUNTERS.add(self.name, SKIPPED, f": record {index} is not int32 token ids")
            return None
        return np.frombuffer(record, TOKEN_DTYPE).astype(np.int32)


def _check_manifest(paths: Sequence[str], vocab_size: int) -> None:
    """Refuses token ids written with a tokenizer of another vocabulary size."""
    for directory in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        manifest_path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.exists(manifest_path):
            continue
        with open(manifest_path) as f:
            prepared_vocab = json.load(f).get("tokenizer_vocab_size")
        if prepared_vocab is not None and prepared_vocab != vocab_size:
            raise ValueError(
                f"{directory} was tokenized with a {prepared_vocab}-token vocabulary "
                f"but the tokenizer in use has {vocab_size} tokens."
            )


def open_source(config: SourceConfig, vocab_size: int | None = None):
    """The documents of `config`; raises if there are none."""
    name = config.display_name
    files = expand_paths(config.paths, config.kind)
    chat = config.chat_template is not None
    if config.kind == "text":
        source = TextFileSource(name, files)
    elif config.kind == "text_lines":
        source = LineSource(name, files)
    elif config.kind == "jsonl":
        source = LineSource(name, files, json_field=config.field, chat=chat)
    elif config.kind == "parquet":
        source = ParquetSource(name, files, config.field, chat=chat)
    else:
        source = ArrayRecordSource(name, files, config.tokenized, vocab_size)
    if len(source) == 0:
        raise ValueError(f"Source {name} has no documents ({len(files)} files, all empty).")
    return source
