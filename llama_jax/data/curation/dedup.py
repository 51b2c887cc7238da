"""Deduplication stages: exact (text or URL), near duplicates (MinHash LSH), repeated lines.

Each stage maps an RDD of documents to an RDD of (tag, document): KEPT, REMOVED (the document
carries `removed_by`, the reason) or TRIMMED (lines cut from a kept document, for the audit).
All three work by grouping on keys, so no worker ever holds more than one group: the corpus never
has to fit in memory.
"""

from __future__ import annotations

import hashlib

import numpy as np

from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import ExactDedup, LineDedup, MinHashDedup

KEPT, REMOVED, TRIMMED = "kept", "removed", "trimmed"


def removed(doc: dict, reason: str, detail: str = "") -> tuple[str, dict]:
    out = dict(doc)
    out["removed_by"] = reason
    if detail:
        out["detail"] = detail
    return REMOVED, out


def exact_dedup(docs, options: ExactDedup):
    def key(doc):
        if options.key == "url":
            return text_lib.url_key(doc["url"])
        return text_lib.text_key(doc["text"])

    def first_of_group(item):
        _, group = item
        group = sorted(group, key=lambda d: d["id"])
        yield KEPT, group[0]
        for doc in group[1:]:
            yield removed(doc, f"exact duplicate ({options.key})", group[0]["id"])

    if options.key == "url":  # documents without a URL pass
        passing = docs.filter(lambda d: "url" not in d).map(lambda d: (KEPT, d))
        docs = docs.filter(lambda d: "url" in d)
    grouped = docs.map(lambda d: (key(d), d)).groupByKey().flatMap(first_of_group)
    return grouped.union(passing) if options.key == "url" else grouped


# Every LSH candidate pair is checked against the threshold with its signatures, so a false
# positive of the banding costs a comparison and a false negative costs a missed duplicate: the
# bands are chosen with false negatives weighted nine times as much.
FALSE_NEGATIVE_WEIGHT = 0.9


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows) whose S-curve 1 - (1 - s^rows)^bands best separates similarities below
    and above `threshold`: the least weighted area of false positives and false negatives."""
    s = np.linspace(0.0, 1.0, 1001)
    best = (np.inf, 1, num_perm)
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        caught = 1 - (1 - s**rows) ** bands
        false_positive = np.trapezoid(np.where(s < threshold, caught, 0), s)
        false_negative = np.trapezoid(np.where(s >= threshold, 1 - caught, 0), s)
        loss = (1 - FALSE_NEGATIVE_WEIGHT) * false_positive + FALSE_NEGATIVE_WEIGHT * false_negative
        best = min(best, (loss, bands, rows))
    return best[1], best[2]


def signatures(docs, options: MinHashDedup):
    """(id, MinHash signature) per document, with datasketch; permutations made once per partition."""

    def per_partition(partition):
        from datasketch import MinHash

        template = MinHash(num_perm=options.num_perm, seed=options.seed)
        for doc in partition:
            minhash = template.copy()
            minhash.clear()
            minhash.update_batch(sorted(text_lib.shingles(doc["text"], options.ngram)))
            yield doc["id"], minhash.hashvalues.astype(np.uint64)

    return docs.mapPartitions(per_partition)


def minhash_dedup(docs, options: MinHashDedup):
    bands, rows = (
        (options.bands, options.rows) if options.bands else optimal_bands(options.threshold, options.num_perm)
    )

    def band_keys(item):
        doc_id, signature = item
        for band in range(bands):
            chunk = signature[band * rows : (band + 1) * rows].tobytes()
            yield (
                hashlib.blake2b(band.to_bytes(2, "little") + chunk, digest_size=12).digest(),
                (doc_id, signature),
            )

    def duplicates_in_bucket(item):
        _, members = item
        members = sorted(members, key=lambda m: m[0])
        for j in range(1, len(members)):
            doc_id, signature = members[j]
            for other_id, other in members[: min(j, options.max_bucket)]:
                if float(np.mean(signature == other)) >= options.threshold:
                    yield doc_id, other_id
                    break

    flagged = (
        signatures(docs, options)
        .flatMap(band_keys)
        .groupByKey()
        .flatMap(duplicates_in_bucket)
        .reduceByKey(min)
    )

    def split(item):
        _, (doc, original) = item
        return removed(doc, "near duplicate", original) if original else (KEPT, doc)

    return docs.map(lambda d: (d["id"], d)).leftOuterJoin(flagged).map(split)


def _line_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=12).digest()


def line_dedup(docs, options: LineDedup):
    def line_hashes(doc):
        for key in {text_lib.line_key(line) for line in doc["text"].splitlines()}:
            if len(key) >= options.min_chars:
                yield _line_digest(key), doc["id"]

    def frequent(item):
        digest, doc_ids = item
        if len(doc_ids) >= options.min_documents:
            for doc_id in doc_ids:
                yield doc_id, digest

    boilerplate = docs.flatMap(line_hashes).groupByKey().flatMap(frequent).groupByKey()

    def strip(item):
        _, (doc, drop) = item
        if not drop:
            yield KEPT, doc
            return
        drop = set(drop)
        kept_lines, dropped = [], []
        for line in doc["text"].splitlines(keepends=True):
            key = text_lib.line_key(line)
            cut = len(key) >= options.min_chars and _line_digest(key) in drop
            (dropped if cut else kept_lines).append(line)
        text = "".join(kept_lines)
        if text_lib.count_words(text) < options.min_words:
            yield removed(doc, "only repeated lines")
            return
        yield TRIMMED, {"id": doc["id"], "text": "".join(dropped), "removed_by": "repeated lines"}
        yield KEPT, {**doc, "text": text}

    return docs.map(lambda d: (d["id"], d)).leftOuterJoin(boilerplate).flatMap(strip)
