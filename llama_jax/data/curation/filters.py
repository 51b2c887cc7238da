"""Per-document filters: the heuristic rules and language identification (Lingua)."""

from __future__ import annotations

import functools

from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import CurationError, Heuristics, Language, lingua_language
from llama_jax.data.curation.dedup import KEPT, removed


def _blocklist(options: Heuristics):
    words = list(options.blocklist)
    if options.blocklist_file:
        try:
            with open(options.blocklist_file, encoding="utf-8") as f:
                words += f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CurationError(f"Cannot read the blocklist {options.blocklist_file}: {e}.") from None
    return text_lib.blocklist_pattern(words)


def heuristics(docs, options: Heuristics):
    pattern = _blocklist(options)  # read on the driver: a bad file fails before any work

    def route(doc):
        reason = text_lib.heuristic_failure(doc["text"], options, pattern)
        return (KEPT, doc) if reason is None else removed(doc, reason)

    return docs.map(route)


@functools.cache
def _detector(languages: tuple[str, ...], low_accuracy: bool):
    from lingua import LanguageDetectorBuilder

    if languages:
        builder = LanguageDetectorBuilder.from_languages(*(lingua_language(c) for c in languages))
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def detect(text: str, options: Language) -> tuple[str, float]:
    """The most likely language's ISO 639-1 code and its confidence ("" and 0 for no letters)."""
    detector = _detector(tuple(options.languages), options.low_accuracy)
    values = detector.compute_language_confidence_values(text[: options.max_chars])
    if not values or values[0].value == 0:
        return "", 0.0
    top = values[0]
    return top.language.iso_code_639_1.name.lower(), float(top.value)


def language(docs, options: Language):
    keep = set(options.keep)

    def route(doc):
        code, confidence = detect(doc["text"], options)
        doc = {**doc, "language": code, "language_confidence": round(confidence, 4)}
        if code not in keep:
            return removed(doc, f"language {code or 'unknown'}")
        if confidence < options.min_confidence:
            return removed(doc, f"language confidence below {options.min_confidence}")
        return KEPT, doc

    return docs.map(route)
