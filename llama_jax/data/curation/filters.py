"""Per-document filters: the heuristic rules and language identification (Lingua)."""

from __future__ import annotations

import functools

from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import CurationError, Heuristics, Language, lingua_language
from llama_jax.data.curation.dedup import removed


def _split(docs, label: str, check):
    """(kept, removed) by `check(doc)`, which returns a reason to remove or None; `check` may
    also return (reason or None, fields to add)."""
    import apache_beam as beam

    def route(doc):
        reason = check(doc)
        extra = {}
        if isinstance(reason, tuple):
            reason, extra = reason
        if extra:
            doc = {**doc, **extra}
        if reason is None:
            yield doc
        else:
            yield beam.pvalue.TaggedOutput("removed", removed(doc, reason))

    results = docs | label >> beam.FlatMap(route).with_outputs("removed", main="kept")
    return results.kept, results.removed


def _blocklist(options: Heuristics):
    words = list(options.blocklist)
    if options.blocklist_file:
        try:
            with open(options.blocklist_file, encoding="utf-8") as f:
                words += f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CurationError(f"Cannot read the blocklist {options.blocklist_file}: {e}.") from None
    return text_lib.blocklist_pattern(words)


def heuristics(docs, options: Heuristics, label: str):
    pattern = _blocklist(options)  # read once, at construction: a bad file fails before any work
    return _split(
        docs, f"{label}/rules", lambda doc: text_lib.heuristic_failure(doc["text"], options, pattern)
    )


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


def language(docs, options: Language, label: str):
    keep = set(options.keep)

    def check(doc):
        code, confidence = detect(doc["text"], options)
        fields = {"language": code, "language_confidence": round(confidence, 4)}
        if code not in keep:
            return f"language {code or 'unknown'}", fields
        if confidence < options.min_confidence:
            return f"language confidence below {options.min_confidence}", fields
        return None, fields

    return _split(docs, f"{label}/detect", check)
