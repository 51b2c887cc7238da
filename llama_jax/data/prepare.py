"""Pre-tokenizes a corpus into ArrayRecord shards of int32 token ids.

    python -m llama_jax.data.prepare data/*.jsonl --kind jsonl --field text \\
        --tokenizer tokenizer.model --output tokenized/ --workers 2

Shard k holds documents [k * docs_per_shard, (k + 1) * docs_per_shard) of the
corpus in order, one record per document, without BOS/EOS (the pipeline adds
them). Worker processes write shards in parallel, each to a temporary file
renamed when complete, so an interrupted run resumes where it stopped when the
same command is run again. `manifest.json` records the settings; read the
result with `SourceConfig(output, kind="arrayrecord", tokenized=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence

import numpy as np

from llama_jax.data import sources as sources_lib
from llama_jax.data.config import SourceConfig
from llama_jax.tokenizer import Tokenizer, load_tokenizer

FORMAT = "llama_jax.tokens.v1"

# Set in each worker process by _start_worker.
_worker_source = None
_worker_tokenizer: Tokenizer | None = None


def shard_name(shard: int, num_shards: int) -> str:
    return f"tokens-{shard:05d}-of-{num_shards:05d}.array_record"


def _start_worker(source, tokenizer: Tokenizer) -> None:
    global _worker_source, _worker_tokenizer
    _worker_source, _worker_tokenizer = source, tokenizer


def _write_shard(task: tuple[str, int, int, int, int]) -> dict[str, int]:
    """Tokenizes documents [start, stop) into one shard; returns its counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    output, shard, num_shards, start, stop = task
    final_path = os.path.join(output, shard_name(shard, num_shards))
    temp_path = final_path + ".tmp"
    stats = {"shard": shard, "documents": 0, "tokens": 0, "skipped": 0}
    writer = ArrayRecordWriter(temp_path, "group_size:1")
    try:
        for index in range(start, stop):
            document = _worker_source[index]
            if document is None:
                stats["skipped"] += 1
                continue
            ids = np.asarray(_worker_tokenizer.encode(document), sources_lib.TOKEN_DTYPE)
            writer.write(ids.tobytes())
            stats["documents"] += 1
            stats["tokens"] += len(ids)
    finally:
        writer.close()
    # Counts first, then the rename that marks the shard done.
    with open(final_path.replace(".array_record", ".stats.json"), "w") as f:
        json.dump(stats, f)
    os.replace(temp_path, final_path)
    return stats


def _manifest(args, source, tokenizer: Tokenizer, num_shards: int) -> dict:
    return {
        "format": FORMAT,
        "inputs": [os.path.abspath(p) for p in args.inputs],
        "kind": args.kind,
        "field": args.field,
        "num_documents": len(source),
        "docs_per_shard": args.docs_per_shard,
        "num_shards": num_shards,
        "tokenizer": os.path.abspath(tokenizer.path),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "dtype": "int32",
    }


def _check_or_write_manifest(output: str, manifest: dict) -> None:
    path = os.path.join(output, sources_lib.MANIFEST_NAME)
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != manifest:
            changed = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise ValueError(
                f"{output} holds a preparation with other settings ({', '.join(changed)}); "
                "use a new --output directory."
            )
        return
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)


def prepare(args: argparse.Namespace) -> dict[str, int]:
    """Runs the preparation described by the parsed command line."""
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size >= 2**31:
        raise ValueError("Token ids must fit in int32.")
    config = SourceConfig(tuple(args.inputs), kind=args.kind, field=args.field)
    source = sources_lib.open_source(config)
    num_shards = math.ceil(len(source) / args.docs_per_shard)
    os.makedirs(args.output, exist_ok=True)
    _check_or_write_manifest(args.output, _manifest(args, source, tokenizer, num_shards))

    tasks, done_documents = [], 0
    for shard in range(num_shards):
        start = shard * args.docs_per_shard
        stop = min(start + args.docs_per_shard, len(source))
        final_path = os.path.join(args.output, shard_name(shard, num_shards))
        if os.path.exists(final_path):
            done_documents += stop - start
        else:
            if os.path.exists(final_path + ".tmp"):
                os.remove(final_path + ".tmp")  # left by an interrupted run
            tasks.append((args.output, shard, num_shards, start, stop))

    from tqdm import tqdm

    progress = tqdm(
        total=len(source),
        initial=done_documents,
        unit="doc",
        desc="tokenizing",
        disable=args.quiet,
    )
    with progress:
        if args.workers <= 1:
            _start_worker(source, tokenizer)
            for task in tasks:
                stats = _write_shard(task)
                progress.update(stats["documents"] + stats["skipped"])
        else:
            # spawn: forking a process that may hold threads (Grain, tqdm) is unsafe.
            context = multiprocessing.get_context("spawn")
            with context.Pool(args.workers, _start_worker, (source, tokenizer)) as pool:
                for stats in pool.imap_unordered(_write_shard, tasks):
                    progress.update(stats["documents"] + stats["skipped"])
    return _totals(args.output, num_shards)


def _totals(output: str, num_shards: int) -> dict[str, int]:
    totals = {"shards": num_shards, "documents": 0, "tokens": 0, "skipped": 0}
    for shard in range(num_shards):
        path = os.path.join(output, shard_name(shard, num_shards).replace(".array_record", ".stats.json"))
        with open(path) as f:
            stats = json.load(f)
        for key in ("documents", "tokens", "skipped"):
            totals[key] += stats[key]
    return totals


def _discard(output: str, num_shards: int) -> None:
    """Removes what a preparation that read no document wrote (its empty shards, their stats and
    the manifest), so that the same --output can be used again with other settings."""
    names = [sources_lib.MANIFEST_NAME]
    for shard in range(num_shards):
        name = shard_name(shard, num_shards)
        names += [name, name.replace(".array_record", ".stats.json")]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output, name))
    with contextlib.suppress(OSError):
        os.rmdir(output)  # only if nothing else is there


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.data.prepare",
        description="Pre-tokenize a corpus into ArrayRecord shards (resumable).",
    )
    parser.add_argument("inputs", nargs="+", help="files, directories or globs")
    parser.add_argument(
        "--kind", default="jsonl", choices=["text", "text_lines", "jsonl", "parquet", "arrayrecord"]
    )
    parser.add_argument("--field", default="text", help="JSONL field or Parquet column")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model")
    parser.add_argument("--output", required=True, help="directory for the shards")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--docs-per-shard", type=int, default=10_000)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.docs_per_shard < 1:
        parser.error("--docs-per-shard must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        totals = prepare(args)
    except KeyboardInterrupt:
        print("Interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if totals["documents"] == 0:
        _discard(args.output, totals["shards"])
        print(
            f"error: no document could be read ({totals['skipped']} skipped); check --kind "
            f"(here {args.kind}) and --field (here {args.field}). Nothing was kept in {args.output}.",
            file=sys.stderr,
        )
        return 2
    print(
        f"Wrote {totals['documents']} documents ({totals['tokens']} tokens) in "
        f"{totals['shards']} shards to {args.output}; skipped {totals['skipped']}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
