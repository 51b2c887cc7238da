"""Evaluation: perplexity of a text, and multiple-choice scoring by log-likelihood.

    python -m llama_jax.eval (--ckpt DIR | --hf DIR) [--tokenizer FILE]
        (--perplexity FILE [--field text] | --choices FILE) [--quant int8|fp8] [--seq-len N] [--no-bos]
    python -m llama_jax.eval harness (--ckpt DIR | --hf DIR) --tasks a,b ...   (see eval_harness.py)

    perplexity(params, cfg, documents, seq_len=None, texts=None) -> Perplexity  (documents: token lists)
    score_choices(params, cfg, tokenizer, questions, seq_len=None, bos=True) -> ChoiceScores

Perplexity: each document (the whole text file, or each JSONL line's `--field`) is tokenized with
BOS (unless --no-bos) and cut into consecutive windows of `seq_len` predictions: window k reads
tokens[kL : kL + L] and predicts tokens[kL + 1 : kL + L + 1], so every token after the first is
predicted exactly once. Given the texts, it also reports lm-evaluation-harness's text-level
measures: word and byte perplexity, exp(-sum log p / words) and exp(-sum log p / UTF-8 bytes), and
bits per byte, -sum log p / bytes / ln 2, with words counted as the harness counts them.

Multiple choice follows lm-evaluation-harness: a choice is scored as the continuation
`delimiter + choice` of the context (trailing spaces of the context move into the continuation;
the continuation's tokens are those of the whole string after the context's own tokens; an empty
context is BOS), by the sum of its tokens' log-probabilities. `acc` picks the largest sum,
`acc_norm` the largest sum divided by the choice's length in characters, `acc_bytes` by its length
in UTF-8 bytes (the choice without the delimiter, as in the harness). A row too long keeps its last
seq_len + 1 tokens.

Rows are scored in batches of a fixed size, sorted by length and padded to a power-of-two length
(at most seq_len), so few shapes are compiled; the head and softmax run chunk by chunk, so the
fp32 logits of a whole batch never exist at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.quantize import MODES as QUANT_MODES
from llama_jax.quantize import quantize_params, weight_bytes
from llama_jax.scoring import EvalError, loglikelihoods  # noqa: F401  (EvalError: this CLI's errors)


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them: the pieces between runs of whitespace (so
    leading or trailing whitespace adds an empty piece, which the harness counts too)."""
    return len(re.split(r"\s+", text))


@dataclasses.dataclass(frozen=True)
class Perplexity:
    documents: int
    windows: int
    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood per predicted token, in nats
    # Of the texts the documents were tokenized from, when known (see count_words).
    words: int | None = None
    text_bytes: int | None = None  # UTF-8

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def loglikelihood(self) -> float:
        """The summed log-probability of every predicted token, in nats."""
        return -self.nll * self.tokens

    @property
    def word_perplexity(self) -> float | None:
        return None if not self.words else math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float | None:
        return None if not self.text_bytes else math.exp(-self.loglikelihood / self.text_bytes)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.text_bytes else -self.loglikelihood / self.text_bytes / math.log(2)


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    loglikelihoods: list[list[float]]  # per question, per choice: summed log-probabilities
    acc: float
    acc_norm: float  # per character of the choice
    acc_bytes: float  # per UTF-8 byte of the choice


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
    texts: Sequence[str] | None = None,
) -> Perplexity:
    """Perplexity of token `documents` (each starting with BOS, if the model wants one); given
    the `texts` they were tokenized from, also per word and per byte (see Perplexity)."""
    seq_len = _check_seq_len(cfg, seq_len)
    rows = perplexity_windows(documents, seq_len)
    n_tokens = sum(n for _, n in rows)
    if n_tokens == 0:
        raise EvalError("The text has no tokens to score (every document is shorter than two tokens).")
    total = loglikelihoods(params, cfg, rows, seq_len=seq_len, batch_size=batch_size, progress=progress).sum()
    words = text_bytes = None
    if texts is not None:
        words = sum(count_words(text) for text in texts)
        text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return Perplexity(
        documents=len(documents),
        windows=len(rows),
        tokens=n_tokens,
        nll=float(-total / n_tokens),
        words=words,
        text_bytes=text_bytes,
    )


def continuation_tokens(
    tokenizer, context: str, continuation: str, bos: bool = True
) -> tuple[list[int], list[int]]:
    """(context ids, with BOS unless `bos` is False; continuation ids), split as
    lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context, bos=bos)
    if not context_ids:  # nothing to condition on: the harness conditions on BOS
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation, bos=bos)
    return context_ids, whole[len(context_ids) :]


def choice_rows(tokenizer, question: Question, seq_len: int, delimiter: str = " ", bos: bool = True):
    """One row (ids, n) per choice: context and continuation, cut to their last seq_len + 1."""
    rows = []
    for choice in question.choices:
        context_ids, continuation_ids = continuation_tokens(
            tokenizer, question.context, delimiter + choice, bos=bos
        )
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
    bos: bool = True,
) -> ChoiceScores:
    """acc, acc_norm and acc_bytes of `questions`, and every choice's summed log-likelihood."""
    seq_len = _check_seq_len(cfg, seq_len)
    if not questions:
        raise EvalError("There are no questions to score.")
    rows = [row for q in questions for row in choice_rows(tokenizer, q, seq_len, delimiter, bos)]
    flat = loglikelihoods(params, cfg, rows, seq_len=seq_len, batch_size=batch_size, progress=progress)
    per_question, correct, at = [], np.zeros(3), 0
    for q in questions:
        scores = flat[at : at + len(q.choices)]
        at += len(q.choices)
        chars = np.array([len(choice) for choice in q.choices], np.float64)
        utf8 = np.array([len(choice.encode("utf-8")) for choice in q.choices], np.float64)
        picks = [np.argmax(scores), np.argmax(scores / chars), np.argmax(scores / utf8)]
        correct += [int(pick) == q.answer for pick in picks]
        per_question.append(scores.tolist())
    acc, acc_norm, acc_bytes = (correct / len(questions)).tolist()
    return ChoiceScores(per_question, acc, acc_norm, acc_bytes)


def _json_lines(path: Path):
    """(line number, object) for each non-blank line of a JSONL file."""
    for number, line in enumerate(_utf8_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise EvalError(f"Line {number} of {path} is not a JSON object.")
        yield number, record


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded).") from None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path} does not exist or is not a file.")
    return path


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """The texts of a .jsonl file (each line's `field`), or a whole text file as one document."""
    path = _existing(path)
    if path.suffix != ".jsonl":
        return [_utf8_text(path)]
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


def _optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _model_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one in --hf's directory)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--quant",
        choices=QUANT_MODES,
        default=None,
        help="quantize the weights first (see llama_jax.quantize)",
    )
    parser.add_argument("--no-bos", action="store_true", help="do not put BOS in front of texts")


def harness_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.eval harness",
        description="Run lm-evaluation-harness tasks on a model (needs lm-eval installed).",
    )
    _model_flags(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    parser.add_argument("--include-path", help="a directory of extra task YAML files")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (below 1: a fraction)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="context in tokens (default: the model's)"
    )
    parser.add_argument("--output", metavar="FILE", help="write the harness's results as JSON")
    return parser


def _harness_main(argv) -> int:
    args = harness_parser().parse_args(argv)
    try:
        from llama_jax import eval_harness
    except ImportError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        print(
            "error: lm-evaluation-harness is not installed; install it with `pip install lm-eval==0.4.13`.",
            file=sys.stderr,
        )
        return 2
    return eval_harness.run_cli(args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:
        return _harness_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.eval",
        description="Perplexity or multiple-choice accuracy of a model.",
        epilog="`python -m llama_jax.eval harness --help`: lm-evaluation-harness tasks instead.",
    )
    _model_flags(parser)
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
        table.append(("BOS", "no" if args.no_bos else "yes"))
        if args.perplexity:
            documents = [tokenizer.encode(text, bos=not args.no_bos) for text in texts]
            result = perplexity(params, cfg, documents, texts=texts, **options)
            table += [
                ("documents", f"{result.documents:,}"),
                ("windows", f"{result.windows:,}"),
                ("tokens", f"{result.tokens:,}"),
                ("words", f"{result.words:,}"),
                ("bytes", f"{result.text_bytes:,}"),
                ("mean NLL", f"{result.nll:.4f}"),
                ("perplexity", f"{result.perplexity:.4f}"),
                ("word perplexity", _optional(result.word_perplexity)),
                ("byte perplexity", _optional(result.byte_perplexity)),
                ("bits per byte", _optional(result.bits_per_byte)),
            ]
        else:
            scores = score_choices(
                params, cfg, tokenizer, questions, delimiter=args.delimiter, bos=not args.no_bos, **options
            )
            table += [
                ("questions", f"{len(questions):,}"),
                ("acc", f"{scores.acc:.4f}"),
                ("acc_norm", f"{scores.acc_norm:.4f}"),
                ("acc_bytes", f"{scores.acc_bytes:.4f}"),
            ]
    except (EvalError, CheckpointError, ConversionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
