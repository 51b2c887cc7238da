"""Small synthetic corpora and tokenizers, made offline, for tests and benchmarks.

The tokenizers are real of their kind (a SentencePiece model trained with
LLaMA's settings, a tiktoken BPE file with all 256 bytes plus learned merges),
only with tiny vocabularies.
"""

from __future__ import annotations

import base64
import os

import numpy as np

# Words from several scripts, with digits and emoji, so tokenizers see them all.
WORDS = (
    "the of and to in is was for on that with as by at from llama jax grain "
    "token data model train 2024 3.14 naïve über café 東京 数据 모델 данные "
    "😀 🚀 x=y+1; (a,b) don't we'll"
).split()


def random_text(rng: np.random.Generator, min_words: int = 1, max_words: int = 60) -> str:
    n = int(rng.integers(min_words, max_words + 1))
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def random_documents(n: int, seed: int = 0, **kwargs) -> list[str]:
    rng = np.random.default_rng(seed)
    return [random_text(rng, **kwargs) for _ in range(n)]


def write_sentencepiece_model(directory: str, vocab_size: int = 320) -> str:
    """Trains a LLaMA-style SentencePiece BPE model; returns its path."""
    from llama_jax.tokenizer import train_sentencepiece

    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "sp_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(random_documents(2000, seed=1)))
    return train_sentencepiece([corpus], os.path.join(directory, "sp"), vocab_size, num_threads=1, quiet=True)


def write_tiktoken_model(directory: str, num_ranks: int = 300) -> str:
    """Writes a tiktoken BPE file of `num_ranks` ranks; returns its path."""
    from tiktoken import _educational

    from llama_jax.tokenizer import LLAMA3_PATTERN

    os.makedirs(directory, exist_ok=True)
    text = "\n".join(random_documents(300, seed=2, max_words=20))
    ranks = _educational.bpe_train(text, num_ranks, LLAMA3_PATTERN, visualise=None)
    path = os.path.join(directory, "tiktoken.model")
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    return path
