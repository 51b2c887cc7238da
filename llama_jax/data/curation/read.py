"""Documents in and out of the pipeline.

A document is a dict: `id` (the file and the record's position, so ids sort in corpus order),
`text`, `url` when the input has one, and the record's other fields, which are written back out.
A file, line or row that cannot be read (not UTF-8, not JSON, no text field) is not a document:
it comes out tagged UNREADABLE with where and why, and the report counts and lists it.
Files are opened with fsspec, so inputs and reports may live on any file system it knows
(gs://, s3://, hdfs://) as well as on local disk.
"""

from __future__ import annotations

import json
import os

from llama_jax.data.curation.config import CurationError, InputConfig
from llama_jax.data.sources import expand_paths

DOCUMENT, UNREADABLE = "document", "unreadable"


def local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def input_files(source: InputConfig) -> list[str]:
    """The files a source names: local files, directories and globs, or remote globs."""
    files: list[str] = []
    for path in source.paths:
        if local(path):
            try:
                files += expand_paths([path.removeprefix("file://")], source.kind)
            except FileNotFoundError as e:
                raise CurationError(f"{e}.") from None
            continue
        import fsspec

        fs, _, _ = fsspec.get_fs_token_paths(path)
        protocol = path.split("://", 1)[0]
        found = sorted(f"{protocol}://{p}" for p in fs.glob(path.split("://", 1)[1]) if fs.isfile(p))
        if not found:
            raise CurationError(f"No files match {path}.")
        files += found
    return list(dict.fromkeys(files))  # a file named twice is read once


def _unreadable(path: str, where: str, reason: str):
    return UNREADABLE, {"path": path, "where": where, "reason": reason}


def _document(source: InputConfig, path: str, index: int | None, record: dict, text: str):
    doc = {k: v for k, v in record.items() if k not in (source.field, "id", "text")}
    doc["id"] = path if index is None else f"{path}#{index:010d}"
    doc["text"] = text
    url = record.get(source.url_field)
    if isinstance(url, str) and url:
        doc["url"] = url
    if source.url_field != "url":
        doc.pop(source.url_field, None)
    return DOCUMENT, doc


def read_documents(path: str, source: InputConfig):
    """Yields (DOCUMENT, doc) for each document of one file and (UNREADABLE, record) for what
    cannot be read; streams the file, so a file never has to fit in memory (but for kind text,
    where the file is the document)."""
    import fsspec

    try:
        handle = fsspec.open(path, "rb", compression="infer").open()  # .gz, .bz2, .zst, ...
    except OSError as e:
        yield _unreadable(path, path, f"cannot open: {e}")
        return
    with handle:
        if source.kind == "parquet":
            yield from _read_parquet(handle, path, source)
            return
        if source.kind == "text":
            data = handle.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _unreadable(path, path, f"not UTF-8 at byte {e.start}")
                return
            if text.strip():
                yield _document(source, path, None, {}, text)
            return
        for index, raw in enumerate(handle):
            where = f"{path}:{index + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _unreadable(path, where, f"not UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue
            if source.kind == "text_lines":
                yield _document(source, path, index, {}, line.rstrip("\r\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield _unreadable(path, where, f"not JSON ({e.msg})")
                continue
            text = record.get(source.field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield _unreadable(path, where, f"no text in field {source.field!r}")
                continue
            yield _document(source, path, index, record, text)


def _read_parquet(handle, path: str, source: InputConfig):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(handle)
        if source.field not in parquet.schema_arrow.names:
            yield _unreadable(path, path, f"no column {source.field!r}")
            return
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                text = record.get(source.field)
                if isinstance(text, str):
                    yield _document(source, path, index, record, text)
                else:
                    yield _unreadable(path, f"{path} row {index}", f"no text in column {source.field!r}")
                index += 1
    except (pa.ArrowException, OSError) as e:
        yield _unreadable(path, path, f"not a readable Parquet file ({str(e).splitlines()[0]})")


def to_json_line(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False, default=str)


def write_text(path: str, text: str) -> None:
    """Writes a report file, locally or on any file system fsspec knows."""
    if local(path):
        path = path.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    import fsspec

    with fsspec.open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_lines(path: str, lines) -> None:
    """Streams JSON lines (an iterator) to a report file."""
    if local(path):
        path = path.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handle = open(path, "w", encoding="utf-8")
    else:
        import fsspec

        handle = fsspec.open(path, "w", encoding="utf-8").open()
    with handle:
        for line in lines:
            handle.write(line + "\n")
