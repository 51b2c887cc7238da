"""Deduplication stages: exact (text or URL), near duplicates (MinHash LSH), repeated lines.

Each stage maps a PCollection of documents to (kept, removed); a removed document carries
`removed_by` (the reason). All three work by grouping on keys, so no worker ever holds more than
one group: the corpus never has to fit in memory.
"""

from __future__ import annotations

import hashlib

import numpy as np

from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import ExactDedup, LineDedup, MinHashDedup


def removed(doc: dict, reason: str, detail: str = "") -> dict:
    out = dict(doc)
    out["removed_by"] = reason
    if detail:
        out["detail"] = detail
    return out


def exact_dedup(docs, options: ExactDedup, label: str):
    import apache_beam as beam

    def keyed(doc):
        if options.key == "url":
            if "url" not in doc:
                return ("", doc)  # no URL: passes
            return ("u" + text_lib.url_key(doc["url"]), doc)
        return ("t" + text_lib.text_key(doc["text"]), doc)

    def first_of_group(item):
        key, group = item
        group = sorted(group, key=lambda d: d["id"])
        if not key:
            yield from group
            return
        yield group[0]
        for doc in group[1:]:
            yield beam.pvalue.TaggedOutput(
                "removed", removed(doc, f"exact duplicate ({options.key})", group[0]["id"])
            )

    results = (
        docs
        | f"{label}/key" >> beam.Map(keyed)
        | f"{label}/group" >> beam.GroupByKey()
        | f"{label}/first" >> beam.FlatMap(first_of_group).with_outputs("removed", main="kept")
    )
    return results.kept, results.removed


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows) whose S-curve 1 - (1 - s^rows)^bands best separates similarities below
    and above `threshold`: the least area of false positives plus false negatives."""
    s = np.linspace(0.0, 1.0, 1001)
    best = (np.inf, 1, num_perm)
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        caught = 1 - (1 - s**rows) ** bands
        false_positive = np.trapezoid(np.where(s < threshold, caught, 0), s)
        false_negative = np.trapezoid(np.where(s >= threshold, 1 - caught, 0), s)
        best = min(best, (false_positive + false_negative, bands, rows))
    return best[1], best[2]


class _Signature:
    """MinHash signatures with datasketch; the permutations are made once per worker."""

    def __init__(self, options: MinHashDedup):
        self.options = options
        self._template = None

    def __call__(self, doc: dict):
        from datasketch import MinHash

        if self._template is None:
            self._template = MinHash(num_perm=self.options.num_perm, seed=self.options.seed)
        minhash = self._template.copy()
        minhash.clear()
        minhash.update_batch(sorted(text_lib.shingles(doc["text"], self.options.ngram)))
        return doc["id"], minhash.hashvalues.astype(np.uint64)


def minhash_dedup(docs, options: MinHashDedup, label: str):
    import apache_beam as beam

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
        if len(members) < 2:
            return
        earlier = members[: options.max_bucket]
        for j in range(1, len(members)):
            doc_id, signature = members[j]
            for other_id, other in earlier[: min(j, options.max_bucket)]:
                if float(np.mean(signature == other)) >= options.threshold:
                    yield doc_id, other_id
                    break

    signatures = docs | f"{label}/signature" >> beam.Map(_Signature(options))
    flagged = (
        signatures
        | f"{label}/bands" >> beam.FlatMap(band_keys)
        | f"{label}/buckets" >> beam.GroupByKey()
        | f"{label}/compare" >> beam.FlatMap(duplicates_in_bucket)
    )
    by_id = docs | f"{label}/by_id" >> beam.Map(lambda d: (d["id"], d))

    def split(item):
        _, grouped = item
        for doc in grouped["doc"]:
            originals = sorted(grouped["of"])
            if originals:
                yield beam.pvalue.TaggedOutput("removed", removed(doc, "near duplicate", originals[0]))
            else:
                yield doc

    results = (
        {"doc": by_id, "of": flagged}
        | f"{label}/join" >> beam.CoGroupByKey()
        | f"{label}/split" >> beam.FlatMap(split).with_outputs("removed", main="kept")
    )
    return results.kept, results.removed


def line_dedup(docs, options: LineDedup, label: str):
    import apache_beam as beam

    def line_hashes(doc):
        keys = {text_lib.line_key(line) for line in doc["text"].splitlines()}
        for key in keys:
            if len(key) >= options.min_chars:
                yield hashlib.blake2b(key.encode("utf-8"), digest_size=12).digest(), doc["id"]

    def frequent(item):
        line, doc_ids = item
        doc_ids = list(doc_ids)
        if len(doc_ids) >= options.min_documents:
            for doc_id in doc_ids:
                yield doc_id, line

    boilerplate = (
        docs
        | f"{label}/lines" >> beam.FlatMap(line_hashes)
        | f"{label}/by_line" >> beam.GroupByKey()
        | f"{label}/frequent" >> beam.FlatMap(frequent)
    )
    by_id = docs | f"{label}/by_id" >> beam.Map(lambda d: (d["id"], d))

    def strip(item):
        _, grouped = item
        drop = set(grouped["lines"])
        for doc in grouped["doc"]:
            if not drop:
                yield doc
                continue
            kept_lines, dropped = [], []
            for line in doc["text"].splitlines(keepends=True):
                key = text_lib.line_key(line)
                digest = hashlib.blake2b(key.encode("utf-8"), digest_size=12).digest()
                (dropped if len(key) >= options.min_chars and digest in drop else kept_lines).append(line)
            text = "".join(kept_lines)
            if text_lib.count_words(text) < options.min_words:
                yield beam.pvalue.TaggedOutput("removed", removed(doc, "only repeated lines"))
                continue
            yield beam.pvalue.TaggedOutput(
                "lines", removed({"id": doc["id"], "text": "".join(dropped)}, "repeated lines")
            )
            out = dict(doc)
            out["text"] = text
            yield out

    results = (
        {"doc": by_id, "lines": boilerplate}
        | f"{label}/join" >> beam.CoGroupByKey()
        | f"{label}/strip" >> beam.FlatMap(strip).with_outputs("removed", "lines", main="kept")
    )
    return results.kept, (results.removed, results.lines)
