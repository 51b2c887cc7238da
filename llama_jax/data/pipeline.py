"""The Grain pipeline: documents -> tokens -> packed rows -> per-host batches.

Per source: read documents at random (MapDataset), keep this process's shard
(every process_count-th document), shuffle (a new order each epoch), repeat,
tokenize. Sources are then mixed by weight, read ahead by threads, documents
longer than seq_len are split, and the rest is packed into rows of seq_len
with Grain's packers and batched.

A batch is a dict of numpy arrays of shape [batch_size, seq_len]:
  tokens      int32
  positions   int32, 0, 1, 2, ... restarting at each document in the row
  segment_ids int32, 1, 2, 3, ... numbering the documents of the row; 0 = padding
  loss_mask   float32, 1.0 on training targets; 0.0 on padding and, in chat
              data, on everything but the assistant replies.

Everything is a deterministic function of the config and the seed, and the
iterator's position is a small JSON-able state, which is saved and restored
with Orbax through Grain's checkpoint handler::

  manager.save(step, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(data_iterator), ...))
  manager.restore(step, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(data_iterator), ...))
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from llama_jax.chat_template import encode_chat
from llama_jax.data import sources as sources_lib
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]
SPLIT = "split a document longer than seq_len into rows"
# This many unusable documents in a row means the data or config is wrong; we
# stop rather than spin forever looking for a usable one.
MAX_CONSECUTIVE_SKIPS = 10_000
# Shards of up to this many documents are shuffled with a stored permutation.
SMALL_SHUFFLE_MAX = 1 << 22


class DocumentEncoder:
    """Turns one document into {"tokens": int32, "loss_mask": float32} arrays."""

    def __init__(self, tokenizer: Tokenizer, source: SourceConfig, add_bos: bool, add_eos: bool):
        self.tokenizer = tokenizer
        self.source = source
        self.add_bos = add_bos
        self.add_eos = add_eos

    def __call__(self, document: Any) -> dict[str, np.ndarray] | None:
        if document is None:
            return None
        if self.source.chat_template is not None:
            try:
                chat = encode_chat(self.tokenizer, document, template=self.source.chat_template)
            except ValueError as e:
                sources_lib.COUNTERS.add(self.source.display_name, sources_lib.SKIPPED, f": {e}")
                return None
            if not any(chat.assistant_mask):  # nothing to learn from
                sources_lib.COUNTERS.add(
                    self.source.display_name, sources_lib.SKIPPED, ": a dialog without an assistant turn"
                )
                return None
            tokens = np.asarray(chat.ids, np.int32)
            return {"tokens": tokens, "loss_mask": np.asarray(chat.assistant_mask, np.float32)}
        if isinstance(document, np.ndarray):  # pre-tokenized, without BOS/EOS
            parts = [[self.tokenizer.bos_id]] * self.add_bos + [document]
            tokens = np.concatenate(parts + [[self.tokenizer.eos_id]] * self.add_eos)
        else:
            tokens = self.tokenizer.encode(document, bos=self.add_bos, eos=self.add_eos)
        tokens = np.asarray(tokens, np.int32)
        if not len(tokens):
            return None
        return {"tokens": tokens, "loss_mask": np.ones(len(tokens), np.float32)}


class _SplitLongDocumentsIterator(grain.DatasetIterator):
    """Drops unusable documents (None) and cuts the rest into <= seq_len pieces."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pieces: list[dict[str, np.ndarray]] = []
        self._next_piece = 0
        # The parent's state before the document now being cut: with the index of
        # the next piece, enough to checkpoint without storing any tokens.
        self._parent_state = self._parent.get_state()
        self._documents_seen = 0

    def _cut(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        length = len(document["tokens"])
        if length <= self._seq_len:
            return [document]
        starts = range(0, length, self._seq_len)
        sources_lib.COUNTERS.add("pipeline", SPLIT, f" ({length} tokens, {len(starts)} rows)", logging.INFO)
        return [{k: v[s : s + self._seq_len] for k, v in document.items()} for s in starts]

    def _next_document(self) -> dict[str, np.ndarray]:
        skipped = 0
        while True:
            self._parent_state = self._parent.get_state()
            try:
                document = next(self._parent)
            except StopIteration:
                if not self._documents_seen and skipped:
                    raise sources_lib.DataError(
                        "No usable documents: every document was skipped (see the warnings above)."
                    ) from None
                raise
            if document is not None:
                self._documents_seen += 1
                return document
            skipped += 1
            if skipped >= MAX_CONSECUTIVE_SKIPS:
                raise sources_lib.DataError(
                    f"{skipped} documents in a row were unusable (see the warnings "
                    "above); check the source files, kinds and field names."
                )

    def __next__(self) -> dict[str, np.ndarray]:
        while self._next_piece >= len(self._pieces):
            self._pieces = self._cut(self._next_document())
            self._next_piece = 0
        piece = self._pieces[self._next_piece]
        self._next_piece += 1
        return piece

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent_state, "next_piece": self._next_piece}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._parent_state = state["parent"]
        self._pieces, self._next_piece = [], 0
        # A restored run used documents before its saved state, so running out of
        # usable ones after it is not the all-unusable error.
        self._documents_seen = max(self._documents_seen, 1)
        if state["next_piece"]:
            # Cut the same document again and skip the pieces already returned.
            self._pieces = self._cut(self._next_document())
            self._next_piece = state["next_piece"]


class _SplitLongDocuments(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> grain.DatasetIterator:
        return _SplitLongDocumentsIterator(self._parent.__iter__(), self._seq_len)


class _SmallShuffle(grain.MapDataset):
    """Shuffles with a stored permutation, drawn anew for each epoch.

    Grain's stateless index_shuffle takes milliseconds per element on datasets
    of a few hundred elements; a permutation of a small dataset is cheap to keep.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            rng = np.random.default_rng([self._seed, epoch])
            permutation = rng.permutation(len(self._parent)).astype(np.int32)
            # Reader threads straddle at most two epochs at a time.
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = permutation
        return permutation

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, index_in_epoch = divmod(index, len(self._parent))
        return self._parent[int(self._permutation(epoch)[index_in_epoch])]


def _shuffle(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
    if len(ds) <= SMALL_SHUFFLE_MAX:
        return _SmallShuffle(ds, seed)
    return ds.shuffle(seed=seed)


def _to_batch_contract(packed: dict[str, np.ndarray]) -> Batch:
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.float32),
    }


def _source_seed(seed: int, source_index: int) -> int:
    return (seed * 1_000_003 + source_index * 7_919) % 2**32


def documents(
    config: DataConfig,
    tokenizer: Tokenizer,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """This process's tokenized documents of all sources, shuffled and mixed."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    per_source = []
    for i, source_config in enumerate(config.sources):
        source = sources_lib.open_source(source_config, tokenizer.vocab_size)
        if len(source) < process_count:
            raise ValueError(
                f"Source {source_config.display_name} has {len(source)} documents, "
                f"fewer than the {process_count} processes reading it."
            )
        ds = grain.MapDataset.source(source)[process_index::process_count]
        if config.shuffle:
            ds = _shuffle(ds, _source_seed(config.seed, i))
        ds = ds.repeat(config.num_epochs)
        encoder = DocumentEncoder(tokenizer, source_config, config.add_bos, config.add_eos)
        per_source.append(ds.map(encoder))
    if len(per_source) == 1:
        return per_source[0]
    return grain.MapDataset.mix(per_source, [s.weight for s in config.sources])


def pack(docs: grain.IterDataset, config: DataConfig) -> grain.IterDataset:
    """Rows of seq_len tokens in the batch contract (without the batch axis)."""
    docs = _SplitLongDocuments(docs, config.seq_len)
    lengths = {"tokens": config.seq_len, "loss_mask": config.seq_len}
    if config.packing == "first_fit":
        rows = grain.experimental.FirstFitPackIterDataset(
            docs,
            length_struct=lengths,
            num_packing_bins=config.packing_bins or config.batch_size,
            seed=config.seed,
            shuffle_bins=config.shuffle,
        )
    else:
        rows = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct=lengths)
    return rows.map(_to_batch_contract)


def make_dataset(
    config: DataConfig,
    tokenizer: Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The batches of this process as a Grain IterDataset (see make_iterator)."""
    for name in ("seq_len", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(config, name)}.")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer_path)
    # With split_by="rows" every process packs the global batch and keeps its own rows of it.
    rows_of = (process_index, process_count) if config.split_by == "rows" else None
    if rows_of:
        process_index, process_count = 0, 1
    docs = documents(config, tokenizer, process_index, process_count)
    read_options = grain.ReadOptions(
        num_threads=config.read_threads,
        prefetch_buffer_size=max(64, 16 * config.read_threads),
    )
    # allow_nones: unusable documents reach the splitter, which counts them
    # and stops a run whose data is all unusable instead of spinning forever.
    ds = docs.to_iter_dataset(read_options, allow_nones=True)
    if rows_of:  # pack exactly as one process would, then slice
        index, count = rows_of
        rows = slice(index * config.batch_size, (index + 1) * config.batch_size)
        whole = dataclasses.replace(config, batch_size=config.batch_size * count)
        ds = pack(ds, whole).batch(whole.batch_size, drop_remainder=config.drop_remainder)
        ds = ds.map(_KeepRows(rows))
    else:
        ds = pack(ds, config).batch(config.batch_size, drop_remainder=config.drop_remainder)
    if config.worker_count > 0:
        _use_default_absl_flags()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count,
                per_worker_buffer_size=config.worker_buffer_size,
            )
        )
    return ds


@dataclasses.dataclass(frozen=True)
class _KeepRows:
    """This process's rows of a global batch (a picklable callable, for worker processes)."""

    rows: slice

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: value[self.rows] for key, value in batch.items()}


def _use_default_absl_flags() -> None:
    # Grain's worker processes read absl flags, which only absl.app parses;
    # programs started otherwise (pytest, plain scripts) get the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(
    config: DataConfig,
    tokenizer: Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An iterator over this process's batches; checkpoint it with Orbax.

    Args:
      config: the data config.
      tokenizer: defaults to load_tokenizer(config.tokenizer_path).
      process_index, process_count: which shard of the documents this process
        reads; default jax.process_index() and jax.process_count().

    Returns:
      A Grain DatasetIterator of Batch dicts with get_state()/set_state(), which
      grain.checkpoint.CheckpointSave/CheckpointRestore save through Orbax.
    """
    return iter(make_dataset(config, tokenizer, process_index, process_count))
