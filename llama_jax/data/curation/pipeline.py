"""One curation run as one Beam pipeline: read, the stages in order, write, report.

Every stage is counted on its way in and out (documents and tokens, with Beam's metrics, which
every runner supports), its removed documents are counted by reason, and a fixed sample of them is
written for a person to audit. Locally the run writes into `OUTPUT.partial` and renames it to
OUTPUT when it is complete, so a killed run never leaves something that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence

from llama_jax.data.config import SourceConfig
from llama_jax.data.curation import classify, dedup, filters, read
from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import CurateConfig, CurationError

NAMESPACE = "curate"
_PARTIAL_MARK = ".llama_jax-curate-partial"
REPORT_DIR = "report"
DATA_DIR = "data"


class _Tokens:
    """Tokens in a text: the tokenizer's when the config names one, else whitespace words."""

    def __init__(self, tokenizer_path: str):
        self.path = tokenizer_path
        self._tokenizer = None

    def __call__(self, text: str) -> int:
        if not self.path:
            return text_lib.count_words(text)
        if self._tokenizer is None:
            from llama_jax.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return len(self._tokenizer.encode(text))


def _count(pcoll, label: str, prefix: str, tokens: _Tokens):
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    docs = Metrics.counter(NAMESPACE, f"{prefix}|docs")
    token_count = Metrics.counter(NAMESPACE, f"{prefix}|tokens")

    def count(doc):
        docs.inc()
        token_count.inc(tokens(doc["text"]))
        return doc

    return pcoll | label >> beam.Map(count)


def _count_reasons(removed, label: str, stage_id: str):
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    def count(doc):
        Metrics.counter(NAMESPACE, f"{stage_id}|removed|{doc['removed_by']}").inc()
        return doc

    return removed | label >> beam.Map(count)


def _sample_key(doc: dict) -> int:
    return int.from_bytes(hashlib.blake2b(doc["id"].encode("utf-8"), digest_size=8).digest(), "little")


def _write_sample(docs: list, path: str) -> None:
    read.write_text(path, "".join(read.to_json_line(d) + "\n" for d in sorted(docs, key=lambda d: d["id"])))


def _read_inputs(pipeline, config: CurateConfig):
    import apache_beam as beam
    from apache_beam.io import fileio

    collections, unreadable = [], []
    for i, source in enumerate(config.inputs):
        files = read.input_files(source)
        if files:
            paths = pipeline | f"input{i}/files" >> beam.Create(files)
        else:
            patterns = pipeline | f"input{i}/patterns" >> beam.Create(list(source.paths))
            paths = (
                patterns
                | f"input{i}/match" >> fileio.MatchAll()
                | f"input{i}/paths" >> beam.Map(lambda m: m.path)
            )
        results = (
            paths
            | f"input{i}/reshuffle" >> beam.Reshuffle()
            | f"input{i}/read"
            >> beam.FlatMap(read.read_documents, source).with_outputs(read.UNREADABLE, main="docs")
        )
        collections.append(results.docs)
        unreadable.append(results[read.UNREADABLE])
    docs = collections | "inputs" >> beam.Flatten()
    bad = unreadable | "unreadable" >> beam.Flatten()
    return docs, bad


def build(pipeline, config: CurateConfig, work: str) -> None:
    """Adds the whole run to `pipeline`, writing under the directory `work`."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    tokens = _Tokens(config.tokenizer)
    report_dir = f"{work}/{REPORT_DIR}"
    docs, bad = _read_inputs(pipeline, config)
    unreadable_counter = Metrics.counter(NAMESPACE, "read|unreadable")

    def count_bad(record):
        unreadable_counter.inc()
        return read.to_json_line(record)

    _ = (
        bad
        | "unreadable/count" >> beam.Map(count_bad)
        | "unreadable/write"
        >> beam.io.WriteToText(
            f"{report_dir}/unreadable", file_name_suffix=".jsonl", num_shards=1, shard_name_template=""
        )
    )
    docs = _count(docs, "read/count", "read", tokens)
    domain_classes: Sequence[str] = ()
    for (name, options), stage_id in zip(config.stages, config.stage_ids):
        label = f"stage {stage_id}"
        docs = _count(docs, f"{label}/in", f"{stage_id}|in", tokens)
        if name == "exact_dedup":
            docs, removed = dedup.exact_dedup(docs, options, label)
        elif name == "minhash_dedup":
            docs, removed = dedup.minhash_dedup(docs, options, label)
        elif name == "line_dedup":
            docs, removed = dedup.line_dedup(docs, options, label)
        elif name == "heuristics":
            docs, removed = filters.heuristics(docs, options, label)
        elif name == "language":
            docs, removed = filters.language(docs, options, label)
        elif name == "quality":
            docs, removed = classify.quality(docs, options, label, stage_id, report_dir)
        else:
            docs, removed = classify.domain(docs, options, label, stage_id, report_dir)
            domain_classes = options.classes
        docs = _count(docs, f"{label}/out", f"{stage_id}|out", tokens)
        if removed is None:
            continue
        if isinstance(removed, tuple):
            removed = removed | f"{label}/removed" >> beam.Flatten()
        removed = _count_reasons(removed, f"{label}/reasons", stage_id)
        if config.samples:
            _ = (
                removed
                | f"{label}/audit sample"
                >> beam.combiners.Top.Of(config.samples, key=_sample_key, reverse=True)
                | f"{label}/write audit sample"
                >> beam.Map(_write_sample, f"{report_dir}/removed/{stage_id}.jsonl")
            )
    _write_data(docs, config, work, domain_classes, tokens)


def _write_data(docs, config: CurateConfig, work: str, classes: Sequence[str], tokens: _Tokens) -> None:
    import apache_beam as beam

    def write(pcoll, label: str, directory: str):
        _ = (
            pcoll
            | f"{label}/json" >> beam.Map(read.to_json_line)
            | f"{label}/write"
            >> beam.io.WriteToText(f"{directory}/part", file_name_suffix=".jsonl", num_shards=config.shards)
        )

    if not classes:
        write(docs, "write", f"{work}/{DATA_DIR}")
        return
    parts = docs | "by domain" >> beam.Partition(lambda d, n: list(classes).index(d["domain"]), len(classes))
    for index, name in enumerate(classes):
        counted = _count(parts[index], f"domain {name}/count", f"domain {name}", tokens)
        write(counted, f"domain {name}", f"{work}/{DATA_DIR}/{name}")


def _counters(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    values: dict[str, int] = {}
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + int(value or 0)
    return values


def summarise(config: CurateConfig, counters: dict[str, int], seconds: float) -> dict:
    def get(key):
        return counters.get(key, 0)

    stages = []
    for (name, options), stage_id in zip(config.stages, config.stage_ids):
        prefix = f"{stage_id}|removed|"
        reasons = {k[len(prefix) :]: v for k, v in counters.items() if k.startswith(prefix)}
        stages.append(
            {
                "stage": stage_id,
                "docs_in": get(f"{stage_id}|in|docs"),
                "docs_out": get(f"{stage_id}|out|docs"),
                "tokens_in": get(f"{stage_id}|in|tokens"),
                "tokens_out": get(f"{stage_id}|out|tokens"),
                "removed": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            }
        )
    domains = {}
    for name, options in config.stages:
        if name == "domain":
            for cls in options.classes:
                domains[cls] = {"docs": get(f"domain {cls}|docs"), "tokens": get(f"domain {cls}|tokens")}
    return {
        "read": {
            "docs": get("read|docs"),
            "tokens": get("read|tokens"),
            "unreadable": get("read|unreadable"),
        },
        "stages": stages,
        "domains": domains,
        "tokens_are": "tokenizer tokens" if config.tokenizer else "whitespace-separated words",
        "seconds": round(seconds, 2),
    }


def markdown(summary: dict) -> str:
    lines = [
        "| stage | documents in | documents out | tokens in | tokens out | removed, by reason |",
        "|---|---|---|---|---|---|",
    ]
    read_counts = summary["read"]
    lines.append(
        f"| read | - | {read_counts['docs']:,} | - | {read_counts['tokens']:,} | "
        f"{read_counts['unreadable']:,} unreadable (report/unreadable.jsonl) |"
    )
    for stage in summary["stages"]:
        reasons = "; ".join(f"{reason}: {count:,}" for reason, count in stage["removed"].items()) or "-"
        lines.append(
            f"| {stage['stage']} | {stage['docs_in']:,} | {stage['docs_out']:,} | "
            f"{stage['tokens_in']:,} | {stage['tokens_out']:,} | {reasons} |"
        )
    text = "\n".join(lines) + "\n"
    if summary["domains"]:
        text += "\n| domain | documents | tokens |\n|---|---|---|\n"
        for name, counts in summary["domains"].items():
            text += f"| {name} | {counts['docs']:,} | {counts['tokens']:,} |\n"
    text += f"\nTokens are {summary['tokens_are']}.\n"
    return text


def emptied_by(summary: dict) -> str | None:
    """The first stage that left no documents, or "read" when there were none to begin with."""
    if summary["read"]["docs"] == 0:
        return "read"
    for stage in summary["stages"]:
        if stage["docs_out"] == 0:
            return stage["stage"]
    return None


def _prepare_output(output: str) -> str:
    if not read.local(output):
        return output.rstrip("/")
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CurationError(
            f"The output {output} already exists; name a new directory (nothing was overwritten)."
        )
    work = output + ".partial"
    if os.path.exists(work):
        if not os.path.exists(os.path.join(work, _PARTIAL_MARK)):
            raise CurationError(f"{work} exists and is not an unfinished curation run; move it away.")
        shutil.rmtree(work)  # an unfinished earlier run of ours: nothing in it is a result
    os.makedirs(work)
    open(os.path.join(work, _PARTIAL_MARK), "w").close()
    return work


def run(config: CurateConfig, beam_args: Sequence[str] = ()) -> dict:
    """Runs the curation; returns the summary (also in OUTPUT/report/report.json and .md)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    if not config.output:
        raise CurationError("Name an output directory (output: in the config, or --output).")
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")  # in-process; Beam's newer default downloads a runner
    work = _prepare_output(config.output)
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(args))
    build(pipeline, config, work)
    result = pipeline.run()
    result.wait_until_finish()
    summary = summarise(config, _counters(result), time.perf_counter() - start)
    read.write_text(f"{work}/{REPORT_DIR}/report.json", json.dumps(summary, indent=2) + "\n")
    read.write_text(f"{work}/{REPORT_DIR}/report.md", markdown(summary))
    if read.local(config.output):
        os.remove(os.path.join(work, _PARTIAL_MARK))
        output = os.path.abspath(config.output)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked before the run)
        os.replace(work, output)
    return summary


def mixture_sources(output: str, weights: dict[str, float] | None = None) -> tuple[SourceConfig, ...]:
    """The data sources of an experiment from a run with a domain stage: one per domain, weighted
    by `weights` (domain -> weight; the default is each domain's share of the tokens)."""
    path = os.path.join(output, REPORT_DIR, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            domains = json.load(f)["domains"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"Cannot read the curation report {path}: {e}.") from None
    if not domains:
        raise ValueError(f"The curation in {output} had no domain stage.")
    if weights is not None:
        unknown = sorted(set(weights) - set(domains))
        if unknown:
            raise ValueError(f"No domain {unknown[0]!r} in {output}; its domains are {', '.join(domains)}.")
    total = sum(d["tokens"] for d in domains.values()) or 1
    sources = []
    for name, counts in domains.items():
        weight = (weights or {}).get(name, 0.0) if weights is not None else counts["tokens"] / total
        if counts["docs"] == 0 or weight <= 0:
            continue
        sources.append(
            SourceConfig(
                os.path.join(output, DATA_DIR, name),
                kind="jsonl",
                field="text",
                weight=weight,
                name=f"curated-{name}",
            )
        )
    return tuple(sources)
