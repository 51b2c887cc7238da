"""Packed tokens per second of the input pipeline on this machine's CPUs.

    python experiments/bench_data.py                       # synthetic corpus and tokenizer
    python experiments/bench_data.py --tokenizer llama3/tokenizer.model --corpus data.jsonl
    python experiments/bench_data.py --pretokenized --workers 2

Without --corpus it writes a synthetic JSONL corpus of Zipf-distributed random
words; without --tokenizer it trains a SentencePiece BPE model on it with
LLaMA's settings. It reports the tokens of documents (not padding) delivered
per second after a warm-up, i.e. what the training loop would receive.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from llama_jax.data import DataConfig, SourceConfig, make_iterator, prepare
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece


def write_corpus(directory: str, num_docs: int, seed: int = 0) -> str:
    """JSONL of documents of Zipf-distributed made-up words (~1.5 KB each)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocabulary = ["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20_000)]
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "w") as f:
        for _ in range(num_docs):
            words = rng.zipf(1.3, int(rng.integers(50, 450))) % len(vocabulary)
            f.write(json.dumps({"text": " ".join(vocabulary[w] for w in words) + "."}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="a JSONL file with a 'text' field")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: train one)")
    parser.add_argument("--num-docs", type=int, default=20_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--packing", default="first_fit")
    parser.add_argument("--pretokenized", action="store_true", help="read prepare's ArrayRecord shards")
    parser.add_argument("--warmup-batches", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        corpus = args.corpus or write_corpus(scratch, args.num_docs)
        tokenizer_path = args.tokenizer or train_sentencepiece(
            [_plain_text(corpus, scratch)],
            os.path.join(scratch, "sp"),
            args.vocab_size,
            input_sentence_size=20_000,
            quiet=True,
        )
        source = SourceConfig(corpus, kind="jsonl")
        if args.pretokenized:
            shards = os.path.join(scratch, "tokens")
            prepare.main(
                [
                    corpus,
                    "--tokenizer",
                    tokenizer_path,
                    "--output",
                    shards,
                    "--quiet",
                    "--workers",
                    str(max(1, args.workers)),
                    "--docs-per-shard",
                    "2000",
                ]
            )
            source = SourceConfig(shards, kind="arrayrecord", tokenized=True)
        config = DataConfig(
            sources=(source,),
            tokenizer_path=tokenizer_path,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            read_threads=args.read_threads,
            worker_count=args.workers,
            packing=args.packing,
        )
        tokenizer = load_tokenizer(tokenizer_path)
        batches = make_iterator(config, tokenizer, 0, 1)
        for _ in range(args.warmup_batches):
            next(batches)
        start, tokens, rows = time.perf_counter(), 0, 0
        while time.perf_counter() - start < args.seconds:
            batch = next(batches)
            tokens += int(np.count_nonzero(batch["segment_ids"]))
            rows += batch["tokens"].shape[0]
        elapsed = time.perf_counter() - start
    print(
        f"{tokens / elapsed:,.0f} packed tokens/s ({rows / elapsed:,.1f} rows/s, "
        f"fill {tokens / (rows * args.seq_len):.1%}) | {os.cpu_count()} CPUs, "
        f"{'pre-tokenized' if args.pretokenized else 'tokenizing'}, "
        f"read_threads={args.read_threads}, workers={args.workers}, "
        f"packing={args.packing}, seq_len={args.seq_len}, batch={args.batch_size}, "
        f"vocab={tokenizer.vocab_size}"
    )


def _plain_text(corpus: str, directory: str) -> str:
    """The corpus as one document per line, for SentencePiece training."""
    path = os.path.join(directory, "train.txt")
    with open(corpus) as src, open(path, "w") as dst:
        for line in src:
            dst.write(json.loads(line)["text"][:4000] + "\n")
    return path


if __name__ == "__main__":
    main()
