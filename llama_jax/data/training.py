"""What the training loop needs from the data: train and eval iterators and the tokenizer.

An experiment whose `data.tokenizer_path` is empty gets a SentencePiece tokenizer trained on its training
sources once, with the model's vocabulary size, and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator

import jax

from llama_jax.data.config import DataConfig
from llama_jax.data.pipeline import make_iterator
from llama_jax.data.sources import DataError, expand_paths
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece


@dataclasses.dataclass
class TrainingData:
    train: Iterator[dict]
    eval: Callable[[], Iterator[dict]] | None  # a fresh iterator, so every evaluation sees the same batches
    tokenizer: Tokenizer
    sample_prompt: str
    chat_template: str | None = None  # post-training: the format of the chats


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama_jax"
    )
    return Path(root)


def cached_tokenizer(data: DataConfig, vocab_size: int, quiet: bool = False) -> str:
    """Path of a SentencePiece model trained on `data`'s sources, trained once per corpus."""
    files = sorted(f for source in data.sources for f in expand_paths(source.paths, source.kind))
    key = hashlib.sha256(repr((vocab_size, [(f, os.path.getsize(f)) for f in files])).encode())
    prefix = cache_dir() / "tokenizers" / f"sp{vocab_size}-{key.hexdigest()[:16]}"
    model = prefix.with_suffix(".model")
    if not model.exists():
        if not quiet:
            print(
                f"Training a {vocab_size}-token SentencePiece tokenizer on {len(files)} files "
                f"(once; cached at {model})...",
                flush=True,
            )
        tmp_prefix = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
        try:
            trained = train_sentencepiece(
                files, str(tmp_prefix), vocab_size, input_sentence_size=200_000, quiet=True
            )
        except ValueError as err:
            # Without data.tokenizer_path the tokenizer is trained on the sources: a corpus too
            # small (or unreadable) shows up here first, so say which files and what to do.
            where = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
            raise ValueError(
                f"No tokenizer could be trained on {where} ({err}); check the data sources or give "
                "data.tokenizer_path"
            ) from None
        os.replace(trained, model)  # atomic: a concurrent or killed run never sees half a file
        Path(str(tmp_prefix) + ".vocab").unlink(missing_ok=True)
    return str(model)


def training_data(exp, quiet: bool = False) -> TrainingData:
    """Iterators over this process's share of the experiment's train and eval batches."""
    try:
        return _training_data(exp, quiet)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err).rstrip(".") + ".") from None


def _training_data(exp, quiet: bool) -> TrainingData:
    processes = jax.process_count()
    tokenizer_path = exp.data.tokenizer_path or cached_tokenizer(exp.data, exp.model.vocab_size, quiet)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise DataError(
            f"The tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {exp.model.vocab_size}."
        )

    def configure(data: DataConfig, seed: int) -> DataConfig:
        return dataclasses.replace(
            data,
            tokenizer_path=tokenizer_path,
            seq_len=exp.train.seq_len,
            batch_size=exp.train.batch_size // processes,
            seed=seed,
        )

    train_config = configure(exp.data, exp.data.seed or exp.train.seed)
    train = make_iterator(train_config, tokenizer)
    eval_fn = None
    if exp.eval_data is not None:
        eval_config = configure(exp.eval_data, exp.eval_data.seed)
        make_iterator(eval_config, tokenizer)  # fail now, not at the first evaluation
        eval_fn = lambda: make_iterator(eval_config, tokenizer)  # noqa: E731
    return TrainingData(train=train, eval=eval_fn, tokenizer=tokenizer, sample_prompt=exp.train.sample_prompt)
