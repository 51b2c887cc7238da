"""Classifier stages: document quality (keep or remove) and domain (a label for the data mix).

Both train a small fast text classifier, scikit-learn's hashed word 1-2-grams into a logistic
regression, on labelled documents of the stage's own input, inside the pipeline: the `sample`
documents with the smallest id hashes (a fixed, uniform sample) are labelled by a function or
joined with a labels file, one worker fits the model, and every worker scores with it as a side
input. The fitted model and its held-out accuracy are written with the report.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
from collections import Counter

from llama_jax.data.curation.config import CurationError, Domain, Labels, Quality
from llama_jax.data.curation.dedup import removed

HELD_OUT = 5  # one labelled document in HELD_OUT measures the classifier instead of training it


def _hash(doc_id: str) -> int:
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
        LogisticRegression(max_iter=1000, C=4.0),
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
        "model": pickle.dumps(model),
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


def _trained(docs, options: Quality | Domain, label: str, stage_name: str, report_dir: str, classes=()):
    """A singleton PCollection holding the fitted classifier's summary (model bytes included)."""
    import apache_beam as beam

    if options.model:
        model = load_model(options.model, stage_name)
        found = tuple(str(c) for c in model.classes_)
        if classes and set(found) != set(classes):
            raise CurationError(f"{stage_name}: the model's classes {found} are not {tuple(classes)}.")
        summary = {"model": pickle.dumps(model), "loaded_from": options.model}
        return docs.pipeline | f"{label}/model" >> beam.Create([summary])

    labels = options.labels
    if labels.function:
        function = label_function(labels.function, stage_name)
        sample = (
            docs
            | f"{label}/hash" >> beam.Map(lambda d: (_hash(d["id"]), d["text"]))
            | f"{label}/sample" >> beam.combiners.Top.Of(options.sample, key=lambda e: e[0], reverse=True)
        )

        def label_all(chosen):
            values = list(function([text for _, text in chosen]))
            if len(values) != len(chosen):
                raise CurationError(
                    f"{stage_name}: {labels.function} returned {len(values)} labels for {len(chosen)} texts."
                )
            return [(h, text, as_label(v, labels)) for (h, text), v in zip(chosen, values)]

        examples = sample | f"{label}/label" >> beam.Map(label_all)
    else:

        def parse(line):
            try:
                record = json.loads(line)
                return str(record["id"]), as_label(record["label"], labels)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CurationError(
                    f'{stage_name}: {labels.file} has a line that is not {{"id": ..., "label": ...}}: {line[:80]!r}.'
                ) from None

        given = (
            docs.pipeline
            | f"{label}/read_labels" >> beam.io.ReadFromText(labels.file)
            | f"{label}/parse" >> beam.Map(parse)
        )
        by_id = docs | f"{label}/by_id" >> beam.Map(lambda d: (d["id"], d["text"]))

        def joined(item):
            doc_id, grouped = item
            texts, found = list(grouped["text"]), list(grouped["label"])
            if texts and found:
                yield _hash(doc_id), texts[0], found[0]

        examples = (
            {"text": by_id, "label": given}
            | f"{label}/join" >> beam.CoGroupByKey()
            | f"{label}/labelled" >> beam.FlatMap(joined)
            | f"{label}/sample" >> beam.combiners.Top.Of(options.sample, key=lambda e: e[0], reverse=True)
        )
    trained = examples | f"{label}/fit" >> beam.Map(fit, stage_name, tuple(classes))
    _ = trained | f"{label}/save" >> beam.Map(_save, report_dir, stage_name)
    return trained


def _save(summary: dict, report_dir: str, stage_name: str) -> None:
    from llama_jax.data.curation.read import write_text

    if "loaded_from" in summary:
        return
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(f"{report_dir}/{stage_name}.classifier.pkl") as f:
        f.write(summary["model"])
    info = {k: v for k, v in summary.items() if k != "model"}
    write_text(f"{report_dir}/{stage_name}.classifier.json", json.dumps(info, indent=2) + "\n")


class _Scorer:
    """Unpickles the model once per worker and scores documents in place."""

    def __init__(self):
        self._key = None
        self._model = None

    def model(self, summary):
        if self._key is not summary:
            self._key, self._model = summary, pickle.loads(summary["model"])
        return self._model


def quality(docs, options: Quality, label: str, stage_name: str, report_dir: str):
    import apache_beam as beam

    trained = _trained(docs, options, label, stage_name, report_dir)
    scorer = _Scorer()

    def route(doc, summary):
        model = scorer.model(summary)
        classes = [str(c) for c in model.classes_]
        if options.good not in classes:
            raise CurationError(
                f"{stage_name}: good={options.good!r} is not one of the classifier's labels ({', '.join(classes)})."
            )
        p_good = float(model.predict_proba([doc["text"]])[0][classes.index(options.good)])
        doc = {**doc, "quality": round(p_good, 4)}
        if p_good < options.threshold:
            yield beam.pvalue.TaggedOutput("removed", removed(doc, f"quality below {options.threshold}"))
        else:
            yield doc

    results = docs | f"{label}/score" >> beam.FlatMap(route, beam.pvalue.AsSingleton(trained)).with_outputs(
        "removed", main="kept"
    )
    return results.kept, results.removed


def domain(docs, options: Domain, label: str, stage_name: str, report_dir: str):
    import apache_beam as beam

    trained = _trained(docs, options, label, stage_name, report_dir, options.classes)
    scorer = _Scorer()

    def assign(doc, summary):
        model = scorer.model(summary)
        probabilities = model.predict_proba([doc["text"]])[0]
        best = int(probabilities.argmax())
        return {
            **doc,
            "domain": str(model.classes_[best]),
            "domain_confidence": round(float(probabilities[best]), 4),
        }

    labelled = docs | f"{label}/assign" >> beam.Map(assign, beam.pvalue.AsSingleton(trained))
    return labelled, None
