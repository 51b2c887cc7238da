"""Evaluation: perplexity of a text, and multiple-choice scoring by log-likelihood.

    python -m llama_jax.eval (--ckpt DIR | --hf DIR) [--tokenizer FILE]
        (--perplexity FILE [--field text] | --choices FILE) [--quant int8|fp8] [--seq-len N]

    perplexity(params, cfg, documents, seq_len=None) -> Perplexity     (documents: token lists)
    score_choices(params, cfg, tokenizer, questions, seq_len=None) -> ChoiceScores

Perplexity: each document (the whole text file, or each JSONL line's `--field`) is tokenized with
BOS and cut into consecutive windows of `seq_len` predictions: window k reads tokens[kL : kL + L]
and predicts tokens[kL + 1 : kL + L + 1], so every token after BOS is predicted exactly once.

Multiple choice follows lm-evaluation-harness: a choice is scored as the continuation
`delimiter + choice` of the context (trailing spaces of the context move into the continuation;
the continuation's tokens are those of the whole string after the context's own tokens), by the
sum of its tokens' log-probabilities. `acc` picks the largest sum, `acc_norm` the largest sum
divided by the choice's length in characters. A row too long keeps its last seq_len + 1 tokens.

Rows are scored in batches of a fixed size, sorted by length and padded to a power-of-two length
(at most seq_len), so few shapes are compiled; the head and softmax run chunk by chunk
(`loss.cross_entropy_sum`), so the fp32 logits of a whole batch never exist at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from llama_jax.config import ModelConfig
from llama_jax.loss import cross_entropy_sum
from llama_jax.model import Llama, lm_head
from llama_jax.quantize import MODES as QUANT_MODES
from llama_jax.quantize import quantize_params, weight_bytes

# Shortest padded row; shorter rows share its compiled shape.
MIN_PADDED_LENGTH = 16


class EvalError(ValueError):
    """An evaluation that cannot run; the message is one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class Perplexity:
    documents: int
    windows: int
    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood per predicted token, in nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    loglikelihoods: list[list[float]]  # per question, per choice: summed log-probabilities
    acc: float
    acc_norm: float


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_batch(params, tokens, segment_ids, targets, weights, *, cfg):
    """Per row, the sum of weights * log p(target) [B]."""
    hidden = Llama(cfg).apply({"params": params}, tokens, segment_ids=segment_ids, method=Llama.hidden)
    head = lm_head(params, cfg)

    def row(h, t, w):
        nll, _ = cross_entropy_sum(h[None], head, t[None], w[None])
        return -nll

    return jax.vmap(row)(hidden, targets, weights)


def _padded_length(length: int, cap: int) -> int:
    return min(cap, max(MIN_PADDED_LENGTH, 1 << (length - 1).bit_length()))


def loglikelihoods(
    params,
    cfg: ModelConfig,
    rows: Sequence[tuple[Sequence[int], int]],
    *,
    seq_len: int,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """For each row (ids, n): the summed log-probability of the last n of `ids` given the tokens
    before them. `ids` holds at most seq_len + 1 tokens (seq_len inputs)."""
    params = jax.device_put(params)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = np.zeros(len(rows), np.float64)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        length = _padded_length(max(len(rows[i][0]) - 1 for i in batch), seq_len)
        tokens, segment_ids, targets = (np.zeros((batch_size, length), np.int32) for _ in range(3))
        weights = np.zeros((batch_size, length), np.float32)
        for r, i in enumerate(batch):
            ids, n_scored = rows[i]
            n_inputs = len(ids) - 1
            tokens[r, :n_inputs], targets[r, :n_inputs] = ids[:-1], ids[1:]
            segment_ids[r, :n_inputs] = 1
            weights[r, n_inputs - n_scored : n_inputs] = 1.0
        out = _score_batch(params, tokens, segment_ids, targets, weights, cfg=cfg)
        scores[batch] = np.asarray(out)[: len(batch)]
    return scores


def _check_seq_len(cfg: ModelConfig, seq_len: int | None) -> int:
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if not 2 <= seq_len <= cfg.max_seq_len:
        raise EvalError(
            f"The sequence length must be between 2 and the model's context of "
            f"{cfg.max_seq_len} tokens, got {seq_len}."
        )
    return seq_len


def perplexity_windows(documents: Sequence[Sequence[int]], seq_len: int):
    """Rows (window, n) of consecutive windows: each predicts the next `seq_len` tokens."""
    rows = []
    for doc in documents:
        for start in range(0, len(doc) - 1, seq_len):
            window = list(doc[start : start + seq_len + 1])
            rows.append((window, len(window) - 1))
    return rows


def perplexity(
    params,
    cfg: ModelConfig,
    documents: Sequence[Sequence[int]],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of token `documents` (each starting with BOS, if the model wants one)."""
    seq_len = _check_seq_len(cfg, seq_len)
    rows = perplexity_windows(documents, seq_len)
    n_tokens = sum(n for _, n in rows)
    if n_tokens == 0:
        raise EvalError("The text has no tokens to score (every document is shorter than two tokens).")
    total = loglikelihoods(params, cfg, rows, seq_len=seq_len, batch_size=batch_size, progress=progress).sum()
    return Perplexity(
        documents=len(documents), windows=len(rows), tokens=n_tokens, nll=float(-total / n_tokens)
    )


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids), split as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context, bos=True)
    whole = tokenizer.encode(context + continuation, bos=True)
    return context_ids, whole[len(context_ids) :]


def choice_rows(tokenizer, question: Question, seq_len: int, delimiter: str = " "):
    """One row (ids, n) per choice: context and continuation, cut to their last seq_len + 1."""
    rows = []
    for choice in question.choices:
        context_ids, continuation_ids = continuation_tokens(tokenizer, question.context, delimiter + choice)
        ids = (context_ids + continuation_ids)[-(seq_len + 1) :]
        rows.append((ids, min(len(continuation_ids), len(ids) - 1)))
    return rows


def score_choices(
    params,
    cfg: ModelConfig,
    tokenizer,
    questions: Sequence[Question],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    delimiter: str = " ",
    progress: bool = False,
) -> ChoiceScores:
    """acc and acc_norm of `questions`, and every choice's summed log-likelihood."""
    seq_len = _check_seq_len(cfg, seq_len)
    if not questions:
        raise EvalError("There are no questions to score.")
    rows = [row for q in questions for row in choice_rows(tokenizer, q, seq_len, delimiter)]
    flat = loglikelihoods(params, cfg, rows, seq_len=seq_len, batch_size=batch_size, progress=progress)
    per_question, correct, correct_norm, at = [], 0, 0, 0
    for q in questions:
        scores = flat[at : at + len(q.choices)]
        at += len(q.choices)
        lengths = np.array([len(choice) for choice in q.choices], np.float64)
        correct += int(np.argmax(scores)) == q.answer
        correct_norm += int(np.argmax(scores / lengths)) == q.answer
        per_question.append(scores.tolist())
    return ChoiceScores(per_question, correct / len(questions), correct_norm / len(questions))


def _json_lines(path: Path):
    """(line number, object) for each non-blank line of a JSONL file."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise EvalError(f"Line {number} of {path} is not a JSON object.")
        yield number, record


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path} does not exist or is not a file.")
    return path


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """The texts of a .jsonl file (each line's `field`), or a whole text file as one document."""
    path = _existing(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    documents = []
    for number, record in _json_lines(path):
        if not isinstance(record.get(field), str):
            raise EvalError(f"Line {number} of {path} has no text field {field!r}.")
        documents.append(record[field])
    return documents


def read_questions(path: str | Path) -> list[Question]:
    """Questions from JSONL lines {"context": str, "choices": [str, ...], "answer": index}."""
    path = _existing(path)
    questions = []
    for number, record in _json_lines(path):
        context, choices, answer = (record.get(k) for k in ("context", "choices", "answer"))
        if not isinstance(context, str):
            raise EvalError(f"Line {number} of {path} has no text field 'context'.")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise EvalError(f"Line {number} of {path} needs 'choices', a list of non-empty texts.")
        is_index = isinstance(answer, int) and not isinstance(answer, bool)
        if not is_index or not 0 <= answer < len(choices):
            raise EvalError(
                f"Line {number} of {path} has answer {answer!r}, which is not an index "
                f"into its {len(choices)} choices."
            )
        questions.append(Question(context, tuple(choices), answer))
    return questions


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.eval", description="Perplexity or multiple-choice accuracy of a model."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one in --hf's directory)")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--perplexity", metavar="FILE", help="a text file, or JSONL with --field")
    task.add_argument(
        "--choices", metavar="FILE", help='JSONL lines {"context": ..., "choices": [...], "answer": index}'
    )
    parser.add_argument("--field", default="text", help="the JSONL field --perplexity reads")
    parser.add_argument("--delimiter", default=" ", help="between a context and its choices")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window / row length in tokens (default: the model's context)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--quant",
        choices=QUANT_MODES,
        default=None,
        help="quantize the weights first (see llama_jax.quantize)",
    )
    args = parser.parse_args(argv)

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.convert import ConversionError
    from llama_jax.generate import load_model

    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1, got {args.batch_size}.")
        # Read the task before loading the model, so that a bad file fails fast.
        if args.perplexity:
            texts = read_documents(args.perplexity, args.field)
        else:
            questions = read_questions(args.choices)
        cfg, params, tokenizer = load_model(args.ckpt, args.hf, args.tokenizer)
        table = [("model", args.ckpt or args.hf), ("quantization", args.quant or "none")]
        if args.quant:
            table.append(("weight bytes before", f"{weight_bytes(params):,}"))
            cfg, params = quantize_params(params, cfg, args.quant)
        table.append(("weight bytes", f"{weight_bytes(params):,}"))
        options = dict(seq_len=args.seq_len, batch_size=args.batch_size, progress=True)
        if args.perplexity:
            documents = [tokenizer.encode(text, bos=True) for text in texts]
            result = perplexity(params, cfg, documents, **options)
            table += [
                ("documents", f"{result.documents:,}"),
                ("windows", f"{result.windows:,}"),
                ("tokens", f"{result.tokens:,}"),
                ("mean NLL", f"{result.nll:.4f}"),
                ("perplexity", f"{result.perplexity:.4f}"),
            ]
        else:
            scores = score_choices(params, cfg, tokenizer, questions, delimiter=args.delimiter, **options)
            table += [
                ("questions", f"{len(questions):,}"),
                ("acc", f"{scores.acc:.4f}"),
                ("acc_norm", f"{scores.acc_norm:.4f}"),
            ]
    except (EvalError, CheckpointError, ConversionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
