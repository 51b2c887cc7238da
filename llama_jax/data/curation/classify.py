"""Classifier stages: document quality (keep or remove) and domain (a label for the data mix).

Both train a small fast text classifier, scikit-learn's hashed word 1-2-grams into a logistic
regression with the classes weighted to balance (a rare class still moves the boundary), on
labelled documents of the stage's own input: the `sample` documents with the
smallest id hashes (a fixed, uniform sample) are labelled by a function or joined with a labels
file, the driver fits the model, and every worker scores with it (a broadcast variable). The
fitted model and its held-out accuracy are written with the report.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
from collections import Counter

from llama_jax.data.curation.config import CurationError, Domain, Labels, Quality
from llama_jax.data.curation.dedup import KEPT, removed
from llama_jax.data.curation.read import local, write_text

HELD_OUT = 5  # one labelled document in HELD_OUT measures the classifier instead of training it


def sample_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def label_function(spec: str, where: str):
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CurationError(f"{where}: cannot import {module_name} ({e}).") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise CurationError(f"{where}: {module_name} has no function {name!r}.")
    return function


def as_label(value, labels: Labels) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return "high" if value >= labels.score_threshold else "low"


def new_classifier():
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        HashingVectorizer(ngram_range=(1, 2), n_features=1 << 18, alternate_sign=False),
        LogisticRegression(max_iter=1000, C=4.0, class_weight="balanced"),
    )


def fit(examples: list[tuple[int, str, str]], stage_name: str, classes: tuple[str, ...] = ()) -> dict:
    """Fits on (id hash, text, label) examples; returns the model and how well it does on the
    held-out fifth. One sentence when the labels cannot train a classifier."""
    if not examples:
        raise CurationError(f"The {stage_name} classifier got no labelled documents.")
    counts = Counter(label for _, _, label in examples)
    if classes:
        unknown = sorted(set(counts) - set(classes))
        if unknown:
            raise CurationError(
                f"The {stage_name} labels include {unknown[0]!r}, which is not one of its classes ({', '.join(classes)})."
            )
    if len(counts) < 2:
        (only,) = counts
        raise CurationError(
            f"The {stage_name} classifier's {len(examples)} labelled documents are all {only!r}: it needs at least two classes."
        )
    held_out = [e for e in examples if e[0] % HELD_OUT == 0]
    train = [e for e in examples if e[0] % HELD_OUT != 0]
    if len({label for _, _, label in train}) < 2:
        train, held_out = examples, []
    model = new_classifier()
    model.fit([t for _, t, _ in train], [label for _, _, label in train])
    accuracy = None
    if held_out:
        predicted = model.predict([t for _, t, _ in held_out])
        accuracy = float(sum(p == label for p, (_, _, label) in zip(predicted, held_out)) / len(held_out))
    return {
        "model": model,
        "labels": dict(sorted(counts.items())),
        "trained_on": len(train),
        "held_out": len(held_out),
        "held_out_accuracy": accuracy,
    }


def load_model(path: str, where: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise CurationError(f"{where}: cannot load the classifier {path} ({e}).") from None


def _labelled_sample(docs, options: Quality | Domain, stage_name: str) -> list[tuple[int, str, str]]:
    labels = options.labels
    if labels.function:
        function = label_function(labels.function, stage_name)
        chosen = docs.map(lambda d: (sample_hash(d["id"]), d["text"])).takeOrdered(
            options.sample, key=lambda e: e[0]
        )
        try:
            values = list(function([text for _, text in chosen]))
        except Exception as e:  # noqa: BLE001 - the user's function: its failure, in one sentence
            raise CurationError(f"{stage_name}: {labels.function} failed: {type(e).__name__}: {e}") from None
        if len(values) != len(chosen):
            raise CurationError(
                f"{stage_name}: {labels.function} returned {len(values)} labels for {len(chosen)} texts."
            )
        return [(h, text, as_label(v, labels)) for (h, text), v in zip(chosen, values)]

    def parse(line):
        try:
            record = json.loads(line)
            return str(record["id"]), as_label(record["label"], labels)
        except (json.JSONDecodeError, KeyError, TypeError):
            return None, line

    given = docs.context.textFile(labels.file).map(parse)
    bad = given.filter(lambda p: p[0] is None).take(1)
    if bad:
        raise CurationError(
            f'{stage_name}: {labels.file} has a line that is not {{"id": ..., "label": ...}}: {bad[0][1][:80]!r}.'
        )
    joined = docs.map(lambda d: (d["id"], d["text"])).join(given.reduceByKey(lambda a, b: a))
    return joined.map(lambda kv: (sample_hash(kv[0]), kv[1][0], kv[1][1])).takeOrdered(
        options.sample, key=lambda e: e[0]
    )


def trained(docs, options: Quality | Domain, stage_name: str, report_dir: str, classes=()) -> dict:
    """The stage's classifier: loaded from `model`, or fitted on its labelled sample and saved."""
    if options.model:
        model = load_model(options.model, stage_name)
        found = tuple(str(c) for c in model.classes_)
        if classes and set(found) != set(classes):
            raise CurationError(f"{stage_name}: the model's classes {found} are not {tuple(classes)}.")
        return {"model": model, "loaded_from": options.model}
    if options.labels.file and local(options.labels.file) and not os.path.isfile(options.labels.file):
        raise CurationError(f"{stage_name}: no labels file {options.labels.file}.")
    summary = fit(_labelled_sample(docs, options, stage_name), stage_name, tuple(classes))
    import fsspec

    with fsspec.open(f"{report_dir}/{stage_name}.classifier.pkl", "wb") as f:
        pickle.dump(summary["model"], f)
    info = {k: v for k, v in summary.items() if k != "model"}
    write_text(f"{report_dir}/{stage_name}.classifier.json", json.dumps(info, indent=2) + "\n")
    return summary


def quality(docs, options: Quality, stage_name: str, report_dir: str):
    model = trained(docs, options, stage_name, report_dir)["model"]
    classes = [str(c) for c in model.classes_]
    if options.good not in classes:
        raise CurationError(
            f"{stage_name}: good={options.good!r} is not one of the classifier's labels ({', '.join(classes)})."
        )
    good = classes.index(options.good)
    shared = docs.context.broadcast(pickle.dumps(model))

    def per_partition(partition):
        scorer = pickle.loads(shared.value)
        for doc in partition:
            p_good = float(scorer.predict_proba([doc["text"]])[0][good])
            doc = {**doc, "quality": round(p_good, 4)}
            yield (
                removed(doc, f"quality below {options.threshold}")
                if p_good < options.threshold
                else (KEPT, doc)
            )

    return docs.mapPartitions(per_partition)


def domain(docs, options: Domain, stage_name: str, report_dir: str):
    model = trained(docs, options, stage_name, report_dir, options.classes)["model"]
    shared = docs.context.broadcast(pickle.dumps(model))

    def per_partition(partition):
        scorer = pickle.loads(shared.value)
        for doc in partition:
            probabilities = scorer.predict_proba([doc["text"]])[0]
            best = int(probabilities.argmax())
            yield (
                KEPT,
                {
                    **doc,
                    "domain": str(scorer.classes_[best]),
                    "domain_confidence": round(float(probabilities[best]), 4),
                },
            )

    return docs.mapPartitions(per_partition)
