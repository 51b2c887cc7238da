"""Llama tokenizers behind one interface.

* LLaMA 1/2: a SentencePiece BPE `tokenizer.model` (protobuf); BOS 1, EOS 2.
* Llama 3/3.1/3.2: a tiktoken BPE `tokenizer.model` (one `base64-token rank`
  per line) plus 256 special tokens numbered right after the last rank.

`load_tokenizer(path)` tells the two file kinds apart. Both tokenizers round
trip any valid Unicode; lone surrogates (which cannot be UTF-8 encoded) become
U+FFFD instead of raising.

`python -m llama_jax.tokenizer train` trains a new SentencePiece BPE model
with the settings of the LLaMA 1/2 tokenizer.
"""

from __future__ import annotations

import abc
import argparse
import base64
import binascii
import os
import re
import sys
from collections.abc import Iterator, Sequence

# The Llama 3 pre-tokenizer regex (the same as OpenAI's cl100k).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Llama 3.1's named special tokens, in id order from the first id after the
# BPE ranks; the rest of the 256 are <|reserved_special_token_{3..}|>.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# tiktoken's Rust core is slow (quadratic) on very long runs of whitespace or
# of non-whitespace and can fail on huge inputs, so, like Meta's reference
# code, we encode long text in blocks and cut runs longer than this.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} \d+\r?$")


class TokenizerFileError(ValueError):
    """The tokenizer file is missing or of a kind we cannot read."""


def llama3_special_tokens(num_ranks: int) -> dict[str, int]:
    """Names and ids of the 256 Llama 3 special tokens after `num_ranks` ranks."""
    names = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    first_reserved = 3
    while len(names) < LLAMA3_NUM_SPECIAL_TOKENS:
        names.append(f"<|reserved_special_token_{first_reserved}|>")
        first_reserved += 1
    return {name: num_ranks + i for i, name in enumerate(names)}


def _replace_lone_surrogates(text: str) -> str:
    # Pairs of surrogates become the character they encode; lone ones U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer(abc.ABC):
    """What the rest of llama_jax needs from a tokenizer."""

    path: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None
    # Ids at which generation stops.
    stop_ids: tuple[int, ...]
    # "llama2" (SentencePiece) or "llama3" (tiktoken): the model family the tokenizer belongs to.
    family: str

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text in `text` is encoded as text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` and, for each, the index in `text` where it starts."""

    @abc.abstractmethod
    def token_id(self, token: str) -> int:
        """Id of a special token or piece given by its text, e.g. "<|eot_id|>"."""

    def __reduce__(self):
        # Grain worker processes rebuild the tokenizer from its file.
        return (type(self), (self.path,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2 tokenizer: a SentencePiece model file."""

    family = "llama2"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.path = os.fspath(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            with open(self.path, "rb") as f:
                self._sp.LoadFromSerializedProto(f.read())
        except (RuntimeError, OSError) as e:
            raise TokenizerFileError(f"{self.path} is not a SentencePiece model ({e}).") from None
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = self._sp.EncodeAsIds(text)
        except (UnicodeEncodeError, RuntimeError):
            # pybind11 cannot pass lone surrogates to C++ (RuntimeError).
            ids = self._sp.EncodeAsIds(_replace_lone_surrogates(text))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        text = _replace_lone_surrogates(text)
        proto = self._sp.Encode(text, return_type="proto")
        # SentencePiece reports UTF-8 byte offsets; map them to string indices.
        char_at_byte = []
        for i, ch in enumerate(text):
            char_at_byte.extend([i] * len(ch.encode("utf-8")))
        char_at_byte.append(len(text))
        ids = [piece.id for piece in proto.pieces]
        starts = [char_at_byte[piece.begin] for piece in proto.pieces]
        return ids, starts

    def token_id(self, token: str) -> int:
        special = {"<s>": self.bos_id, "</s>": self.eos_id}
        if token in special:
            return special[token]
        token_id = self._sp.PieceToId(token)
        if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id):
            raise KeyError(f"{token!r} is not a piece of {self.path}")
        return token_id


class TiktokenTokenizer(Tokenizer):
    """Llama 3 tokenizer: tiktoken BPE ranks plus 256 special tokens."""

    family = "llama3"

    def __init__(self, path: str | os.PathLike):
        import tiktoken

        self.path = os.fspath(path)
        ranks = read_tiktoken_ranks(self.path)
        self.special_tokens = llama3_special_tokens(len(ranks))
        self._encoding = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)

    def _pieces(self, text: str) -> Iterator[str]:
        """Cuts `text` where Meta's reference tokenizer cuts it before encoding."""
        for block_start in range(0, len(text), _MAX_ENCODE_CHARS):
            block = text[block_start : block_start + _MAX_ENCODE_CHARS]
            piece_start = 0
            for run in _LONG_RUN.finditer(block):
                for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                    yield block[piece_start:cut]
                    piece_start = cut
            yield block[piece_start:]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        if len(text) <= _MAX_RUN_CHARS:
            ids.extend(self._encoding.encode_ordinary(text))
        else:
            for piece in self._pieces(text):
                ids.extend(self._encoding.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        text = _replace_lone_surrogates(text)
        ids = self.encode(text)
        _, starts = self._encoding.decode_with_offsets(ids)
        return ids, starts

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._encoding.encode_single_token(token)


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Reads a tiktoken BPE file, checking that it is one."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerFileError(
                f"{path} is not a tiktoken BPE file: line {line_number} is not '<base64 token> <rank>'."
            ) from None
        ranks[token] = rank
    if not ranks:
        raise TokenizerFileError(f"{path} is an empty tiktoken BPE file.")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(f"{path}: tiktoken ranks must be 0..{len(ranks) - 1}, each once.")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise TokenizerFileError(
            f"{path} lacks {len(missing_bytes)} of the 256 single-byte tokens a "
            "byte-level BPE needs to encode any text."
        )
    return ranks


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece or tiktoken `tokenizer.model`, whichever it is.

    `path` may also be a directory holding `tokenizer.model`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerFileError(f"Tokenizer file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise TokenizerFileError(f"Tokenizer file {path} is empty.")
    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first_line):
        return TiktokenTokenizer(path)
    if head.lstrip().startswith((b"{", b"[")):
        raise TokenizerFileError(
            f"{path} is a JSON file (Hugging Face tokenizer.json?); give the "
            "original tokenizer.model (SentencePiece or tiktoken) instead."
        )
    try:
        return SentencePieceTokenizer(path)
    except TokenizerFileError:
        raise TokenizerFileError(
            f"{path} is neither a SentencePiece model (LLaMA 1/2) nor a tiktoken BPE file (Llama 3)."
        ) from None


# --------------------------------------------------------------------------
# Training a SentencePiece BPE model like LLaMA 1/2's.

# The trainer settings stored in the LLaMA 1/2 tokenizer.model.
LLAMA_SENTENCEPIECE_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    max_sentencepiece_length=16,
    max_sentence_length=4192,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_surface=" \u2047 ",
    hard_vocab_limit=True,
    vocabulary_output_piece_score=True,
)


def _text_files(paths: Sequence[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"No such file or directory: {path}")
    if not files or all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"The training corpus {', '.join(paths)} is empty.")
    return files


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int = 32000,
    *,
    input_sentence_size: int = 0,
    num_threads: int | None = None,
    quiet: bool = False,
) -> str:
    """Trains a LLaMA-style SentencePiece BPE model; returns the .model path.

    `inputs` are text files or directories of them, one sentence per line.
    `input_sentence_size` > 0 samples that many lines (for large corpora).
    """
    import sentencepiece

    files = _text_files(inputs)
    if vocab_size < 256 + 3 + 1:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte "
            "pieces plus <unk>, <s>, </s> and at least one more."
        )
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    try:
        sentencepiece.SentencePieceTrainer.Train(
            input=files,
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2 if quiet else 0,
            **LLAMA_SENTENCEPIECE_SETTINGS,
        )
    except RuntimeError as e:
        # SentencePiece's own messages, e.g. a vocabulary too large for the corpus.
        message = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        # Drop the C++ location: "INTERNAL: src/x.cc(744) [check] message".
        message = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ", "", message)
        raise ValueError(f"SentencePiece training failed: {message}") from None
    return model_prefix + ".model"


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.tokenizer",
        description="Llama tokenizer tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a SentencePiece BPE model with LLaMA 1/2's settings",
    )
    train.add_argument("inputs", nargs="+", help="text files or directories")
    train.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="sample this many lines of the corpus (0: use all)",
    )
    train.add_argument("--num-threads", type=int, default=None)
    train.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        model = train_sentencepiece(
            args.inputs,
            args.model_prefix,
            args.vocab_size,
            input_sentence_size=args.input_sentence_size,
            num_threads=args.num_threads,
            quiet=args.quiet,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {model} ({args.vocab_size} tokens).")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
