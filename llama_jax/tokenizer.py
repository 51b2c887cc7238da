"""Llama tokenizers behind one interface.

* LLaMA 1/2: a SentencePiece BPE `tokenizer.model` (protobuf); BOS 1, EOS 2.
* Llama 3/3.1/3.2: a tiktoken BPE `tokenizer.model` (one `base64-token rank`
  per line) plus 256 special tokens numbered right after the last rank.
* A Hugging Face `tokenizer.json` (run by the `tokenizers` library), with BOS,
  EOS and pad from `tokenizer_config.json` beside it.

`load_tokenizer(path)` tells the file kinds apart; given a directory (e.g. a
Hugging Face download) it takes `tokenizer.model`, else
`original/tokenizer.model`, else `tokenizer.json`. All tokenizers round trip
any valid Unicode; lone surrogates (which cannot be UTF-8 encoded) become
U+FFFD instead of raising.

Special-token text follows Meta's (tiktoken's) rules: `encode` reads text such
as "<|eot_id|>" as that special token only when `allowed_special` allows it,
and as ordinary text otherwise.

A tokenizer also carries the Hugging Face files next to it, if any:
`tokenizer_config` (tokenizer_config.json) and `chat_template` (its Jinja
template, which chat_template.py renders).

`python -m llama_jax.tokenizer train` trains a new SentencePiece BPE model
with the settings of the LLaMA 1/2 tokenizer.
"""

from __future__ import annotations

import abc
import argparse
import base64
import binascii
import functools
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import AbstractSet, Any, Literal, Union

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
# The tokens the Llama 3 chat format is made of: a tokenizer.json holding them is of that family.
LLAMA3_CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Where a directory (e.g. a Hugging Face download) keeps its tokenizer, in order of preference:
# Meta's own file first, then the tokenizers-library file.
TOKENIZER_FILES = ("tokenizer.model", os.path.join("original", "tokenizer.model"), "tokenizer.json")

# tiktoken's Rust core is slow (quadratic) on very long runs of whitespace or
# of non-whitespace and can fail on huge inputs, so, like Meta's reference
# code, we encode long text in blocks and cut runs longer than this.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} \d+\r?$")

# "all" or a set of special-token strings, as in Meta's Tokenizer.encode.
SpecialTokenSet = Union[Literal["all"], AbstractSet[str]]


class TokenizerFileError(ValueError):
    """The tokenizer file is missing or of a kind we cannot read."""


class SpecialTokenError(ValueError):
    """Text holds a special token that the caller disallowed."""


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


@functools.lru_cache(maxsize=64)
def _special_token_regex(tokens: frozenset[str]) -> re.Pattern:
    # Longest first, so that a token wins over any token it starts with.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def split_at_special_tokens(text: str, allowed: frozenset[str]) -> Iterator[tuple[int, str, bool]]:
    """(start, piece, is_special): `text` cut before and after each allowed special token."""
    if not allowed:
        yield 0, text, False
        return
    position = 0
    for match in _special_token_regex(allowed).finditer(text):
        if match.start() > position:
            yield position, text[position : match.start()], False
        yield match.start(), match.group(), True
        position = match.end()
    if position < len(text) or not text:
        yield position, text[position:], False


def hf_files_directory(tokenizer_file: str) -> str:
    """The directory of the Hugging Face files (tokenizer_config.json, chat_template.jinja) that go
    with a tokenizer file: its own, or for Meta's file in a download's `original/`, the download's."""
    directory = os.path.dirname(os.path.abspath(tokenizer_file))
    if os.path.basename(directory) == "original" and not os.path.isfile(
        os.path.join(directory, "tokenizer_config.json")
    ):
        return os.path.dirname(directory)
    return directory


def read_tokenizer_config(tokenizer_file: str) -> dict[str, Any]:
    """tokenizer_config.json of `hf_files_directory(tokenizer_file)`, or {} if there is none."""
    path = os.path.join(hf_files_directory(tokenizer_file), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerFileError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise TokenizerFileError(f"{path} is not a JSON object.")
    return config


def special_token_text(value: Any) -> str | None:
    """The text of a special token as tokenizer_config.json gives it: a string or an AddedToken
    object ({"content": ...}); None if unset."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer(abc.ABC):
    """What the rest of llama_jax needs from a tokenizer."""

    path: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None
    # Ids at which generation stops.
    stop_ids: tuple[int, ...]
    # "llama2" or "llama3": the model family, and so the chat format, the tokenizer belongs to.
    family: str
    # The text of each special token and its id.
    special_tokens: dict[str, int]

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: SpecialTokenSet = frozenset(),
        disallowed_special: SpecialTokenSet = frozenset(),
    ) -> list[int]:
        """Token ids of `text`, special-token text handled as Meta's Tokenizer.encode does.

        Special-token text in `allowed_special` ("all", or a set of special-token strings) becomes
        those special tokens; any other special-token text is encoded as ordinary text, unless it is
        in `disallowed_special` ("all": every special token not allowed), which raises
        SpecialTokenError. Names that are not special tokens of this tokenizer are ignored.
        """
        allowed = self._allowed(allowed_special)
        self._refuse_disallowed(text, allowed, disallowed_special)
        ids = self._encode(text, allowed)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_with_offsets(
        self, text: str, *, allowed_special: SpecialTokenSet = frozenset()
    ) -> tuple[list[int], list[int]]:
        """Token ids of `text` (as `encode`) and, for each, the index in `text` where it starts."""
        return self._encode_with_offsets(_replace_lone_surrogates(text), self._allowed(allowed_special))

    @abc.abstractmethod
    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        """Ids of `text`, with the `allowed` special-token texts as special tokens."""

    @abc.abstractmethod
    def _encode_with_offsets(self, text: str, allowed: frozenset[str]) -> tuple[list[int], list[int]]:
        """Ids and start offsets of `text` (no lone surrogates)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""

    @abc.abstractmethod
    def token_id(self, token: str) -> int:
        """Id of a special token or piece given by its text, e.g. "<|eot_id|>"."""

    @functools.cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json that goes with the file (see `hf_files_directory`), or {}."""
        return read_tokenizer_config(self.path)

    @functools.cached_property
    def chat_template(self) -> str | None:
        """The Jinja chat template that goes with the file, as transformers finds it:
        chat_template.jinja, else tokenizer_config.json's `chat_template` (of several, the one
        named "default"); None if there is none."""
        jinja_file = os.path.join(hf_files_directory(self.path), "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise TokenizerFileError(
                    f"tokenizer_config.json beside {self.path} has chat templates named "
                    f"{sorted(map(str, named))} but none named 'default'."
                )
            template = named["default"]
        return template if isinstance(template, str) else None

    def _allowed(self, allowed_special: SpecialTokenSet) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):  # a lone name would be read as a set of characters
            raise SpecialTokenError(
                f"allowed_special is 'all' or a set of token strings, not {allowed_special!r}."
            )
        return frozenset(allowed_special).intersection(self.special_tokens)

    def _refuse_disallowed(
        self, text: str, allowed: frozenset[str], disallowed_special: SpecialTokenSet
    ) -> None:
        if disallowed_special == "all":
            disallowed = frozenset(self.special_tokens) - allowed
        elif isinstance(disallowed_special, str):
            raise SpecialTokenError(
                f"disallowed_special is 'all' or a set of token strings, not {disallowed_special!r}."
            )
        else:
            disallowed = frozenset(disallowed_special)
        match = _special_token_regex(disallowed).search(text) if disallowed else None
        if match:
            raise SpecialTokenError(
                f"The text holds the special token {match.group()!r}, which is disallowed here "
                "(allow it to encode it as that token, or leave it out of disallowed_special to encode it as text)."
            )

    def __reduce__(self):
        # Grain worker processes rebuild the tokenizer from its file.
        return (type(self), (self.path,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2 tokenizer: a SentencePiece model file.

    Its special tokens are the control and unknown pieces (`<unk>`, `<s>`, `</s>`); allowed
    special-token text is cut out and the text between encoded piece by piece, as transformers'
    (legacy) Llama 2 tokenizer does.
    """

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
        self.special_tokens = {
            self._sp.IdToPiece(i): i
            for i in range(self.vocab_size)
            if self._sp.IsControl(i) or self._sp.IsUnknown(i)
        }

    def _encode_text(self, text: str) -> list[int]:
        try:
            return self._sp.EncodeAsIds(text)
        except (UnicodeEncodeError, RuntimeError):
            # pybind11 cannot pass lone surrogates to C++ (RuntimeError).
            return self._sp.EncodeAsIds(_replace_lone_surrogates(text))

    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        ids: list[int] = []
        for _, piece, is_special in split_at_special_tokens(text, allowed):
            ids.extend([self.special_tokens[piece]] if is_special else self._encode_text(piece))
        return ids

    def _encode_with_offsets(self, text: str, allowed: frozenset[str]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        for start, piece, is_special in split_at_special_tokens(text, allowed):
            if is_special:
                ids.append(self.special_tokens[piece])
                starts.append(start)
                continue
            proto = self._sp.Encode(piece, return_type="proto")
            # SentencePiece reports UTF-8 byte offsets; map them to string indices.
            char_at_byte = []
            for i, ch in enumerate(piece):
                char_at_byte.extend([i] * len(ch.encode("utf-8")))
            char_at_byte.append(len(piece))
            ids.extend(p.id for p in proto.pieces)
            starts.extend(start + char_at_byte[p.begin] for p in proto.pieces)
        return ids, starts

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        token_id = self._sp.PieceToId(token)
        if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id):
            raise KeyError(f"{token!r} is not a piece of {self.path}")
        return token_id


class TiktokenTokenizer(Tokenizer):
    """Llama 3 tokenizer: tiktoken BPE ranks plus 256 special tokens; encodes as Meta's does."""

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
        # Meta's stop tokens: end of text, end of message (a tool call awaits its result), end of turn.
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

    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        def encode_piece(piece: str) -> list[int]:
            if not allowed:
                return self._encoding.encode_ordinary(piece)
            # The disallowed check is done; tiktoken's own would refuse all other special text.
            return self._encoding.encode(piece, allowed_special=allowed, disallowed_special=())

        if len(text) <= _MAX_RUN_CHARS:
            return encode_piece(text)
        return [i for piece in self._pieces(text) for i in encode_piece(piece)]

    def _encode_with_offsets(self, text: str, allowed: frozenset[str]) -> tuple[list[int], list[int]]:
        ids = self._encode(text, allowed)
        _, starts = self._encoding.decode_with_offsets(ids)
        return ids, starts

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._encoding.encode_single_token(token)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library, encoding as transformers'
    tokenizer of the same files does.

    Family: "llama3" if the vocabulary holds the Llama 3 chat tokens, else "llama2". BOS and EOS:
    for Llama 3 Meta's `<|begin_of_text|>` and `<|end_of_text|>` (instruct models' configs name
    `<|eot_id|>` as EOS, which is a stop id here), otherwise tokenizer_config.json's bos_token and
    eos_token (default `<s>`, `</s>`). Stop ids: EOS, the config's EOS and, for Llama 3, `<|eom_id|>`
    and `<|eot_id|>`. Special tokens: the file's added tokens marked special.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        # Special-token text is text unless allowed: the library parses it only in _parsing.
        self._plain = self._load()
        self._plain.encode_special_tokens = True
        added = self._plain.get_added_tokens_decoder()
        self.special_tokens = {token.content: i for i, token in added.items() if token.special}
        vocab = self._plain.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.family = "llama3" if all(t in vocab for t in LLAMA3_CHAT_TOKENS) else "llama2"
        config = self.tokenizer_config
        names = {key: special_token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
        if self.family == "llama3":
            # Meta's BOS and EOS, whichever EOS the config names (a stop id here either way).
            bos = "<|begin_of_text|>"
            eos = "<|end_of_text|>" if "<|end_of_text|>" in vocab else names["eos_token"]
            pad = names["pad_token"] or "<|finetune_right_pad_id|>"
            stops = [eos, "<|eom_id|>", "<|eot_id|>", names["eos_token"]]
        else:
            bos, eos, pad = names["bos_token"] or "<s>", names["eos_token"] or "</s>", names["pad_token"]
            stops = [eos]
        for role, token in (("BOS", bos), ("EOS", eos)):
            if token not in vocab:
                raise TokenizerFileError(
                    f"{self.path} has no {role} token {token!r} (set {role.lower()}_token in tokenizer_config.json)."
                )
        self.bos_id, self.eos_id = vocab[bos], vocab[eos]
        self.pad_id = vocab.get(pad) if pad else None
        self.stop_ids = tuple(dict.fromkeys(vocab[t] for t in stops if t in vocab))

    def _load(self):
        import tokenizers

        try:
            return tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the library raises plain Exceptions with serde's message
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerFileError(
                f"{self.path} looks like JSON but is not a tokenizer.json ({reason})."
            ) from None

    @functools.cached_property
    def _parsing(self):
        # A second instance that reads all special-token text as special tokens (as transformers
        # does); not a flag flipped on the first, so that threads sharing the tokenizer cannot race.
        return self._load()

    def _library_encode(self, text: str, allowed: frozenset[str]):
        library = self._parsing if allowed and allowed == self.special_tokens.keys() else self._plain
        try:
            return library.encode(text, add_special_tokens=False)
        except TypeError:  # lone surrogates cannot cross into Rust
            return library.encode(_replace_lone_surrogates(text), add_special_tokens=False)

    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        return self._encode_with_offsets(text, allowed)[0]

    def _encode_with_offsets(self, text: str, allowed: frozenset[str]) -> tuple[list[int], list[int]]:
        if not allowed or allowed == self.special_tokens.keys():
            encoding = self._library_encode(text, allowed)
            return encoding.ids, [start for start, _ in encoding.offsets]
        # Some special tokens allowed: cut them out (as the library would) and encode the rest as text.
        ids: list[int] = []
        starts: list[int] = []
        for start, piece, is_special in split_at_special_tokens(text, allowed):
            if is_special:
                ids.append(self.special_tokens[piece])
                starts.append(start)
            else:
                encoding = self._library_encode(piece, frozenset())
                ids.extend(encoding.ids)
                starts.extend(start + s for s, _ in encoding.offsets)
        return ids, starts

    def decode(self, ids: Sequence[int]) -> str:
        return self._plain.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self._plain.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a token of {self.path}")
        return token_id


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


def find_tokenizer_file(directory: str) -> str:
    """The tokenizer file of a directory: the first of TOKENIZER_FILES it holds."""
    for name in TOKENIZER_FILES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise TokenizerFileError(f"No tokenizer in {directory}: looked for {', '.join(TOKENIZER_FILES)}.")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece or tiktoken `tokenizer.model`, or a Hugging Face `tokenizer.json`,
    whichever it is.

    `path` may also be a directory, e.g. a Hugging Face download: see `find_tokenizer_file`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = find_tokenizer_file(path)
    if not os.path.isfile(path):
        raise TokenizerFileError(f"Tokenizer file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise TokenizerFileError(f"Tokenizer file {path} is empty.")
    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first_line):
        return TiktokenTokenizer(path)
    if head.lstrip().startswith(b"{"):
        return HuggingFaceTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except TokenizerFileError:
        raise TokenizerFileError(
            f"{path} is neither a SentencePiece model (LLaMA 1/2), a tiktoken BPE file (Llama 3) "
            "nor a Hugging Face tokenizer.json."
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
