"""What an experiment says about its data: sources, tokenizer, batch shape."""

from __future__ import annotations

import dataclasses
import math
import os
import sysconfig
from collections.abc import Mapping, Sequence
from typing import Any

from llama_jax.ranges import check_ranges, non_negative, positive

# Source kinds and what one document is in each.
SOURCE_KINDS = {
    "text": "one document per file (files or directories of them)",
    "text_lines": "one document per non-empty line of text files",
    "jsonl": "one document per line, a JSON object whose `field` holds it",
    "parquet": "one document per row, in column `field`",
    "arrayrecord": "one document per record: UTF-8 text, or int32 token ids "
    "when `tokenized` (written by `python -m llama_jax.data.prepare`)",
}
PACKINGS = ("first_fit", "concat_then_split")
# How the processes (hosts) of a multi-host job share the data.
SPLITS = {
    "documents": "each process reads every process_count-th document and packs its own rows (fast; "
    "the batches depend on the number of processes)",
    "rows": "every process reads and packs all the documents and keeps its own rows of each global "
    "batch (each host tokenizes everything; the batches are the same on any number of hosts)",
}


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One corpus.

    Attributes:
      path: a file, a directory (searched recursively) or a glob; or several.
      kind: one of SOURCE_KINDS.
      field: the JSONL field or Parquet column holding the document.
      weight: relative share of documents drawn from this source in a mixture.
      tokenized: ArrayRecord records are token ids (from `prepare`), not text.
      chat_template: "llama2" or "llama3" when `field` holds a dialog, a list of
        {"role", "content"} messages; the loss then covers assistant replies only.
      name: for logs and errors; defaults to the first path.
    """

    path: str | tuple[str, ...]
    kind: str = "jsonl"
    field: str = "text"
    weight: float = 1.0
    tokenized: bool = False
    chat_template: str | None = None
    name: str = ""

    def __post_init__(self):
        if isinstance(self.path, (str, os.PathLike)):
            object.__setattr__(self, "path", os.fspath(self.path))
        else:  # a list, tuple or OmegaConf ListConfig of paths
            object.__setattr__(self, "path", tuple(os.fspath(p) for p in self.path))
        if not self.paths:
            raise ValueError("A data source needs at least one path.")
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"Unknown source kind {self.kind!r}; use one of {sorted(SOURCE_KINDS)}.")
        try:  # overrides arrive untyped here: data.sources.0.weight=2
            object.__setattr__(self, "weight", float(self.weight))
        except (TypeError, ValueError):
            raise ValueError(
                f"Source {self.display_name}: weight must be a number, got {self.weight!r}."
            ) from None
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(
                f"Source {self.display_name}: weight must be a positive number, got {self.weight!r}."
            )
        if self.tokenized and self.kind != "arrayrecord":
            raise ValueError("Only arrayrecord sources can be pre-tokenized.")
        if self.chat_template not in (None, "llama2", "llama3", "hf"):
            raise ValueError(
                f"Unknown chat template {self.chat_template!r}; use llama2, llama3 or hf (the tokenizer's own)."
            )
        if self.chat_template and self.kind not in ("jsonl", "parquet"):
            raise ValueError("Chat data must come from jsonl or parquet sources.")

    @property
    def paths(self) -> tuple[str, ...]:
        return self.path if isinstance(self.path, tuple) else (self.path,)

    @property
    def display_name(self) -> str:
        return self.name or self.paths[0]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline of one experiment.

    Attributes:
      sources: the corpora, mixed by their weights.
      tokenizer_path: a SentencePiece or tiktoken `tokenizer.model`.
      seq_len: tokens per row.
      batch_size: rows per batch on each process (host).
      seed: seeds shuffling and packing; the same seed gives the same batches.
      shuffle: shuffle documents (differently each epoch).
      num_epochs: passes over the data; None repeats forever. With several
        sources, the pass ends when the first source (relative to its weight)
        runs out.
      add_bos, add_eos: wrap each text document in BOS ... EOS.
      packing: "first_fit" keeps documents that fit whole within a row and pads
        the rest of the row; "concat_then_split" fills every row completely,
        continuing a document on the next row.
      packing_bins: rows packed at once by first_fit (default: batch_size).
      read_threads: threads reading and tokenizing documents in each process.
      worker_count: extra processes running the pipeline (0: none).
      worker_buffer_size: batches each worker process prepares ahead.
      drop_remainder: drop a last, incomplete batch (at the end of num_epochs).
      split_by: how the processes of a multi-host job share the data, one of SPLITS.
    """

    sources: tuple[SourceConfig, ...]
    # In an Experiment, the training loop fills these in: seq_len and batch_size (per process)
    # from train.*, and an empty tokenizer_path with a tokenizer trained on the sources and cached.
    tokenizer_path: str = ""
    seq_len: int = 0
    batch_size: int = 0
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    packing: str = "first_fit"
    packing_bins: int | None = None
    read_threads: int = 2
    worker_count: int = 0
    worker_buffer_size: int = 2
    drop_remainder: bool = True
    split_by: str = "documents"

    def __post_init__(self):
        sources = tuple(SourceConfig(**s) if isinstance(s, Mapping) else s for s in self.sources)
        object.__setattr__(self, "sources", sources)
        if not sources:
            raise ValueError("DataConfig needs at least one source.")
        # In an Experiment, seq_len and batch_size are 0 until the loop fills them in from train.*.
        check_ranges(
            "",
            self,
            [
                ("seq_len", non_negative, "at least 1 (or 0 in an Experiment)"),
                ("batch_size", non_negative, "at least 1 (or 0 in an Experiment)"),
                ("seed", non_negative, "at least 0"),
                ("num_epochs", positive, "at least 1, or None for forever"),
                ("packing_bins", positive, "at least 1, or None for batch_size"),
                ("read_threads", positive, "at least 1"),
                ("worker_count", non_negative, "at least 0"),
                ("worker_buffer_size", positive, "at least 1"),
            ],
        )
        if self.packing not in PACKINGS:
            raise ValueError(f"Unknown packing {self.packing!r}; use one of {PACKINGS}.")
        if self.split_by not in SPLITS:
            raise ValueError(f"Unknown split_by {self.split_by!r}; use one of {sorted(SPLITS)}.")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DataConfig:
        """Builds a DataConfig from plain dicts, e.g. an OmegaConf container."""
        config = dict(config)
        config["sources"] = tuple(SourceConfig(**dict(s)) for s in _as_sequence(config.get("sources", ())))
        return cls(**config)


def _as_sequence(value: Any) -> Sequence[Any]:
    if isinstance(value, Mapping):
        raise ValueError("DataConfig.sources must be a list of sources.")
    return list(value)


# The embedded default corpus: the Python standard library's own top-level modules (no
# site-packages, no tests), present wherever Python is, split by first letter into a training
# and a held-out part (a few MB and about 1 MB of source).
_STDLIB = sysconfig.get_paths()["stdlib"]
STDLIB_TRAIN = DataConfig(
    sources=(SourceConfig(os.path.join(_STDLIB, "[a-s]*.py"), kind="text", name="python-stdlib[a-s]"),)
)
STDLIB_EVAL = DataConfig(
    sources=(SourceConfig(os.path.join(_STDLIB, "[t-z]*.py"), kind="text", name="python-stdlib[t-z]"),),
    shuffle=False,
)


def sft_source(path: str | Sequence[str], chat_template: str | None = None, name: str = "") -> SourceConfig:
    """The data source of an SFT run: JSONL conversations under `messages`."""
    return SourceConfig(
        path if isinstance(path, str) else tuple(path),
        kind="jsonl",
        field="messages",
        chat_template=chat_template,
        name=name,
    )
