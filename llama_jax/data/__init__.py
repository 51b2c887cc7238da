"""Input pipeline: Llama-tokenized, packed, per-host batches on Grain.

    from llama_jax.data import DataConfig, SourceConfig, make_iterator

    config = DataConfig(
        sources=(SourceConfig("web/*.jsonl", kind="jsonl", weight=0.5),
                 SourceConfig("code/", kind="parquet", field="content", weight=0.5)),
        tokenizer_path="tokenizer.model", seq_len=4096, batch_size=8, seed=0)
    batches = make_iterator(config)
    batch = next(batches)  # tokens, positions, segment_ids, loss_mask

See pipeline.py for the batch contract and checkpointing.
"""

from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.data.pipeline import Batch, make_dataset, make_iterator
from llama_jax.data.sources import COUNTERS

__all__ = [
    "Batch",
    "COUNTERS",
    "DataConfig",
    "SourceConfig",
    "make_dataset",
    "make_iterator",
]
