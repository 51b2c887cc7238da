"""Per-document measures: normalised keys for deduplication, shingles, and the heuristic rules.

Pure functions of a text; the stages in dedup.py and filters.py apply them on the Spark workers.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from urllib.parse import urlsplit

_WORD = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s+")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLET = re.compile(r"^\s*[-*\u2022\u2023\u25e6\u2043\u2219]")


def normalise(text: str) -> str:
    """Case, accents' composed forms, punctuation and whitespace ignored: the words, lowercased."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


def text_key(text: str) -> str:
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()


def url_key(url: str) -> str:
    """Scheme, `www.`, a trailing slash, the fragment and the host's case ignored."""
    parts = urlsplit(url.strip())
    host = parts.netloc.lower()
    host = host[4:] if host.startswith("www.") else host
    path = parts.path.rstrip("/") or ""
    return host + path + (f"?{parts.query}" if parts.query else "")


def line_key(line: str) -> str:
    return _SPACE.sub(" ", line.strip().lower())


def shingles(text: str, n: int) -> set[bytes]:
    """The word n-grams of the normalised text (the whole text when it has fewer than n words)."""
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def count_words(text: str) -> int:
    return len(text.split())


def _ngram_shares(words: list[str], n: int) -> tuple[float, float]:
    """(characters in the most frequent n-gram's occurrences, characters in repeated n-grams),
    each as a share of all the words' characters, as Gopher measures repetition: an n-gram's
    first occurrence is not a repeat, and a word inside several repeats counts once."""
    total = sum(len(w) for w in words)
    if total == 0 or len(words) < n:
        return 0.0, 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    top, top_count = Counter(grams).most_common(1)[0]
    top_share = sum(len(w) for w in top) * top_count / total if top_count > 1 else 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if gram in seen:
            covered[i : i + n] = [True] * n
        seen.add(gram)
    duplicate_share = sum(len(w) for w, c in zip(words, covered) if c) / total
    return top_share, duplicate_share


def heuristic_failure(text: str, rules, blocklist: re.Pattern | None) -> str | None:
    """The first rule that `text` breaks, as a short reason, or None. `rules` is a Heuristics."""
    words = text.split()
    n = len(words)
    if rules.min_words is not None and n < rules.min_words:
        return f"fewer than {rules.min_words} words"
    if rules.max_words is not None and n > rules.max_words:
        return f"more than {rules.max_words} words"
    if n == 0:
        return "no words"
    mean_length = sum(len(w) for w in words) / n
    if rules.min_mean_word_length is not None and mean_length < rules.min_mean_word_length:
        return f"mean word length below {rules.min_mean_word_length}"
    if rules.max_mean_word_length is not None and mean_length > rules.max_mean_word_length:
        return f"mean word length above {rules.max_mean_word_length}"
    if rules.max_symbol_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n > rules.max_symbol_ratio:
            return f"symbols per word above {rules.max_symbol_ratio}"
    if rules.max_non_alpha_words is not None:
        non_alpha = sum(1 for w in words if not any(c.isalpha() for c in w))
        if non_alpha / n > rules.max_non_alpha_words:
            return f"words without a letter above {rules.max_non_alpha_words}"
    if rules.max_digit_ratio is not None:
        chars = sum(1 for c in text if not c.isspace())
        if chars and sum(1 for c in text if c.isdigit()) / chars > rules.max_digit_ratio:
            return f"digits above {rules.max_digit_ratio} of characters"
    if rules.min_stop_words is not None:
        found = STOP_WORDS.intersection(w.lower() for w in _WORD.findall(text))
        if len(found) < rules.min_stop_words:
            return f"fewer than {rules.min_stop_words} stop words"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        if rules.max_bullet_lines is not None:
            if sum(1 for line in lines if _BULLET.match(line)) / len(lines) > rules.max_bullet_lines:
                return f"bullet lines above {rules.max_bullet_lines}"
        if rules.max_ellipsis_lines is not None:
            ending = sum(1 for line in lines if line.rstrip().endswith(("...", "\u2026")))
            if ending / len(lines) > rules.max_ellipsis_lines:
                return f"lines ending in an ellipsis above {rules.max_ellipsis_lines}"
        seen: set[str] = set()
        duplicate_lines = duplicate_chars = 0
        for line in lines:
            key = line.strip()
            if key in seen:
                duplicate_lines += 1
                duplicate_chars += len(key)
            seen.add(key)
        if rules.max_duplicate_lines is not None and duplicate_lines / len(lines) > rules.max_duplicate_lines:
            return f"repeated lines above {rules.max_duplicate_lines}"
        total_chars = sum(len(line.strip()) for line in lines)
        if (
            rules.max_duplicate_line_chars is not None
            and duplicate_chars / total_chars > rules.max_duplicate_line_chars
        ):
            return f"characters in repeated lines above {rules.max_duplicate_line_chars}"
    lowered = [w.lower() for w in _WORD.findall(text)]
    for size, limit in sorted((rules.max_top_ngram_chars or {}).items()):
        if _ngram_shares(lowered, size)[0] > limit:
            return f"most frequent {size}-gram above {limit} of characters"
    for size, limit in sorted((rules.max_duplicate_ngram_chars or {}).items()):
        if _ngram_shares(lowered, size)[1] > limit:
            return f"repeated {size}-grams above {limit} of characters"
    if blocklist is not None:
        hits = len(blocklist.findall(text))
        if hits > rules.max_blocklist_hits:
            return "blocklisted words"
    return None


def blocklist_pattern(words) -> re.Pattern | None:
    words = [w.strip() for w in words if w.strip()]
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
