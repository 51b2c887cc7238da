"""A llama_jax model judges a sample of a corpus, writing labels for a curation classifier.

    python -m llama_jax.judge curate.yaml --ckpt DIR --tokenizer T --output labels.jsonl

As Llama 3 labelled documents with Llama 2 to train its quality classifiers: each sampled document
is put into a prompt that asks whether it is good, and its label is the model's probability of
answering "yes" rather than "no" (the two answers' log-likelihoods, softmaxed). The sample is the
`--sample` documents of the config's inputs with the smallest id hashes, the same rule the
classifier stages use, so a stage reading these labels (`labels: {file: labels.jsonl}`) trains on
them directly. Documents are read as the curation pipeline reads them, so the ids match.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

DEFAULT_PROMPT = (
    "Below is a document. Is it of high quality: informative, well written and worth learning "
    "from? Answer yes or no.\n\nDocument:\n{text}\n\nAnswer:"
)


def documents(config) -> Iterator[dict]:
    """Every readable document of the curation config's inputs, as the pipeline reads them."""
    from llama_jax.data.curation import read

    for source in config.inputs:
        for path in read.input_files(source):
            for tag, item in read.read_documents(path, source):
                if tag == read.DOCUMENT:
                    yield item


def sample(docs: Iterator[dict], size: int) -> list[dict]:
    """The `size` documents with the smallest id hashes, holding only those in memory."""
    from llama_jax.data.curation.classify import sample_hash

    chosen = heapq.nsmallest(size, ((sample_hash(d["id"]), d["id"], d["text"]) for d in docs))
    return [{"id": doc_id, "text": text} for _, doc_id, text in chosen]


def judge(
    params,
    cfg,
    tokenizer,
    texts: Sequence[str],
    *,
    prompt: str = DEFAULT_PROMPT,
    max_text_tokens: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """P("yes") / (P("yes") + P("no")) after `prompt` holding each text (cut to max_text_tokens)."""
    from llama_jax.eval import Question, choice_rows
    from llama_jax.scoring import loglikelihoods

    seq_len = cfg.max_seq_len
    rows = []
    for text in texts:
        if max_text_tokens:
            text = tokenizer.decode(tokenizer.encode(text)[:max_text_tokens])
        question = Question(context=prompt.format(text=text), choices=("yes", "no"), answer=0)
        rows += choice_rows(tokenizer, question, seq_len)
    scores = loglikelihoods(params, cfg, rows, seq_len=seq_len, batch_size=batch_size, progress=progress)
    yes, no = scores[0::2], scores[1::2]
    return 1.0 / (1.0 + np.exp(no - yes))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.judge",
        description="Labels a sample of a curation config's inputs with a model's yes/no judgement.",
    )
    p.add_argument("config", help="the curation YAML whose inputs are sampled")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --hf's directory)")
    p.add_argument("--output", required=True, help="the labels JSONL to write")
    p.add_argument("--sample", type=int, default=2000, help="documents to judge (default 2000)")
    p.add_argument("--prompt", help="a text file with the prompt; {text} marks the document")
    p.add_argument("--max-text-tokens", type=int, default=512, help="tokens of each document shown")
    p.add_argument("--batch-size", type=int, default=8)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.convert import ConversionError
    from llama_jax.data.curation.config import CurationError, load_config
    from llama_jax.generate import load_model

    try:
        for name in ("sample", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
        if args.max_text_tokens < 0:
            raise ValueError(f"--max-text-tokens must be at least 0, got {args.max_text_tokens}.")
        prompt = DEFAULT_PROMPT
        if args.prompt:
            with open(args.prompt, encoding="utf-8") as f:
                prompt = f.read()
        if "{text}" not in prompt:
            raise ValueError("The prompt must contain {text}, where the document goes.")
        if os.path.exists(args.output):
            raise ValueError(f"{args.output} already exists; name a new file (nothing was overwritten).")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise ValueError(f"--output {args.output}: its directory does not exist.")
        config = load_config(args.config)
        chosen = sample(documents(config), args.sample)
        if not chosen:
            raise ValueError("The config's inputs hold no readable documents.")
        cfg, params, tokenizer = load_model(args.ckpt, args.hf, args.tokenizer)
        scores = judge(
            params,
            cfg,
            tokenizer,
            [d["text"] for d in chosen],
            prompt=prompt,
            max_text_tokens=args.max_text_tokens,
            batch_size=args.batch_size,
            progress=True,
        )
    except (CurationError, CheckpointError, ConversionError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    temporary = args.output + ".partial"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            for doc, score in zip(chosen, scores):
                f.write(json.dumps({"id": doc["id"], "label": round(float(score), 6)}) + "\n")
        os.replace(temporary, args.output)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}.", file=sys.stderr)
        return 2
    print(
        f"Judged {len(chosen):,} documents: mean P(yes) {float(np.mean(scores)):.3f}; labels in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
