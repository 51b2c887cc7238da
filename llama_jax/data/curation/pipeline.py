"""One curation run as one Spark application: read, the stages in order, write, report.

Each stage's output is persisted (memory, spilling to disk) and counted once: documents and
tokens kept, documents removed by reason, and a fixed sample of what it removed, written for a
person to audit. Locally the run writes into `OUTPUT.partial` and renames it to OUTPUT when it is
complete, so a killed run never leaves something that looks finished.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence

from llama_jax.data.config import SourceConfig
from llama_jax.data.curation import classify, dedup, filters, read
from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import CurateConfig, CurationError
from llama_jax.data.curation.dedup import KEPT, REMOVED

_PARTIAL_MARK = ".llama_jax-curate-partial"
REPORT_DIR = "report"
DATA_DIR = "data"


class Tokens:
    """Tokens in a text: the tokenizer's when the config names one, else whitespace words."""

    def __init__(self, tokenizer_path: str):
        self.path = tokenizer_path
        self._tokenizer = None

    def __getstate__(self):  # workers load their own tokenizer
        return {"path": self.path, "_tokenizer": None}

    def __call__(self, text: str) -> int:
        if not self.path:
            return text_lib.count_words(text)
        if self._tokenizer is None:
            from llama_jax.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return len(self._tokenizer.encode(text))


def spark_session(master: str = "local[*]", conf: Sequence[str] = (), progress: bool = False):
    """The Spark session; `conf` items are key=value Spark settings."""
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # nothing listens beyond this host
        # pyspark starts its workers with PYSPARK_PYTHON, else whatever `python3` is on PATH (not
        # `spark.pyspark.python`): without this, a virtual environment run as `.venv/bin/python`
        # without activating it would unpickle the stages in a Python that lacks llama_jax's packages.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    log4j = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
    builder = (
        SparkSession.builder.appName("llama_jax.data.curate")
        .master(master)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", str(progress).lower())
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
    )
    for item in conf:
        key, _, value = item.partition("=")
        builder = builder.config(key, value)
    with warnings.catch_warnings():  # pyspark checks pandas' version, which curation never uses
        warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
        session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def _stats(tokens: Tokens):
    """Per-partition counts of a tagged RDD, merged with `_merge`."""

    def per_partition(partition):
        counts = {
            "docs": 0,
            "tokens": 0,
            "reasons": Counter(),
            "domains": Counter(),
            "domain_tokens": Counter(),
        }
        for tag, doc in partition:
            if tag == KEPT:
                n = tokens(doc["text"])
                counts["docs"] += 1
                counts["tokens"] += n
                if "domain" in doc:
                    counts["domains"][doc["domain"]] += 1
                    counts["domain_tokens"][doc["domain"]] += n
            else:
                counts["reasons"][doc.get("removed_by") or doc.get("reason") or tag] += 1
        yield counts

    return per_partition


def _merge(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _empty_counts() -> dict:
    return {"docs": 0, "tokens": 0, "reasons": Counter(), "domains": Counter(), "domain_tokens": Counter()}


def _apply_stage(name: str, options, docs, stage_id: str, report_dir: str):
    if name == "exact_dedup":
        return dedup.exact_dedup(docs, options)
    if name == "minhash_dedup":
        return dedup.minhash_dedup(docs, options)
    if name == "line_dedup":
        return dedup.line_dedup(docs, options)
    if name == "heuristics":
        return filters.heuristics(docs, options)
    if name == "language":
        return filters.language(docs, options)
    if name == "quality":
        return classify.quality(docs, options, stage_id, report_dir)
    return classify.domain(docs, options, stage_id, report_dir)


def _read(sc, config: CurateConfig):
    files = [(i, path) for i, source in enumerate(config.inputs) for path in read.input_files(source)]
    inputs = config.inputs
    slices = max(1, min(len(files), 4 * sc.defaultParallelism))
    return sc.parallelize(files, slices).flatMap(
        lambda item: read.read_documents(item[1], inputs[item[0]])
    ), len(files)


def _write_data(docs, directory: str, shards: int) -> None:
    docs.sortBy(lambda d: d["id"], numPartitions=shards).map(read.to_json_line).saveAsTextFile(directory)
    if read.local(directory):  # readers find JSONL shards by their suffix
        for path in glob.glob(os.path.join(directory, "part-*")):
            if not path.endswith((".crc", ".jsonl")):
                os.replace(path, path + ".jsonl")
        for path in glob.glob(os.path.join(directory, ".*.crc")):
            os.remove(path)


def _stage_record(stage_id: str, docs_in: int, tokens_in: int, counts: dict, seconds: float) -> dict:
    return {
        "stage": stage_id,
        "docs_in": docs_in,
        "docs_out": counts["docs"],
        "tokens_in": tokens_in,
        "tokens_out": counts["tokens"],
        "removed": dict(counts["reasons"].most_common()),
        "seconds": round(seconds, 3),
    }


def build_and_run(session, config: CurateConfig, work: str, log=print) -> dict:
    """Runs every stage, writing under the directory `work`; returns the summary."""
    from pyspark import StorageLevel

    sc = session.sparkContext
    tokens = Tokens(config.tokenizer)
    report_dir = f"{work}/{REPORT_DIR}"
    tagged, n_files = _read(sc, config)
    tagged = tagged.persist(StorageLevel.MEMORY_AND_DISK)
    counts = (
        tagged.map(lambda t: (KEPT, t[1]) if t[0] == read.DOCUMENT else (REMOVED, t[1]))
        .mapPartitions(_stats(tokens))
        .fold(_empty_counts(), _merge)
    )
    unreadable = tagged.filter(lambda t: t[0] == read.UNREADABLE).map(lambda t: read.to_json_line(t[1]))
    read.write_lines(f"{report_dir}/unreadable.jsonl", unreadable.toLocalIterator())
    summary = {
        "read": {
            "files": n_files,
            "docs": counts["docs"],
            "tokens": counts["tokens"],
            "unreadable": sum(counts["reasons"].values()),
        },
        "stages": [],
        "domains": {},
        "tokens_are": "tokenizer tokens" if config.tokenizer else "whitespace-separated words",
    }
    log(
        f"read {summary['read']['docs']:,} documents from {n_files:,} files ({summary['read']['unreadable']:,} unreadable)"
    )
    docs = tagged.filter(lambda t: t[0] == read.DOCUMENT).map(lambda t: t[1])
    if n_files < sc.defaultParallelism:  # a partition per file: spread a few big files over the cores
        docs = docs.repartition(2 * sc.defaultParallelism)
    docs_in, tokens_in, previous, classes = counts["docs"], counts["tokens"], tagged, ()
    for (name, options), stage_id in zip(config.stages, config.stage_ids):
        start = time.perf_counter()
        tagged = _apply_stage(name, options, docs, stage_id, report_dir).persist(StorageLevel.MEMORY_AND_DISK)
        counts = tagged.mapPartitions(_stats(tokens)).fold(_empty_counts(), _merge)
        seconds = time.perf_counter() - start
        previous.unpersist()
        if config.samples:
            audit = (
                tagged.filter(lambda t: t[0] != KEPT)
                .map(lambda t: t[1])
                .takeOrdered(config.samples, key=lambda d: classify.sample_hash(d["id"]))
            )
            read.write_lines(
                f"{report_dir}/removed/{stage_id}.jsonl",
                (read.to_json_line(d) for d in sorted(audit, key=lambda d: d["id"])),
            )
        summary["stages"].append(_stage_record(stage_id, docs_in, tokens_in, counts, seconds))
        log(f"{stage_id}: {docs_in:,} -> {counts['docs']:,} documents in {seconds:.1f} s")
        if name == "domain":
            classes = options.classes
        if classes:  # the domains' counts as they leave the last stage
            summary["domains"] = {
                c: {"docs": counts["domains"].get(c, 0), "tokens": counts["domain_tokens"].get(c, 0)}
                for c in classes
            }
        docs = tagged.filter(lambda t: t[0] == KEPT).map(lambda t: t[1])
        docs_in, tokens_in, previous = counts["docs"], counts["tokens"], tagged
    if classes:
        for name in classes:
            _write_data(
                docs.filter(lambda d, name=name: d["domain"] == name),
                f"{work}/{DATA_DIR}/{name}",
                config.shards,
            )
    else:
        _write_data(docs, f"{work}/{DATA_DIR}", config.shards)
    previous.unpersist()
    return summary


def markdown(summary: dict) -> str:
    lines = [
        "| stage | documents in | documents out | tokens in | tokens out | removed, by reason | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    read_counts = summary["read"]
    lines.append(
        f"| read | - | {read_counts['docs']:,} | - | {read_counts['tokens']:,} | "
        f"{read_counts['unreadable']:,} unreadable (report/unreadable.jsonl) | - |"
    )
    for stage in summary["stages"]:
        reasons = "; ".join(f"{reason}: {count:,}" for reason, count in stage["removed"].items()) or "-"
        lines.append(
            f"| {stage['stage']} | {stage['docs_in']:,} | {stage['docs_out']:,} | "
            f"{stage['tokens_in']:,} | {stage['tokens_out']:,} | {reasons} | {stage['seconds']:.1f} |"
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
    output = os.path.abspath(output.removeprefix("file://"))
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CurationError(
            f"The output {output} already exists; name a new directory (nothing was overwritten)."
        )
    work = output + ".partial"
    if os.path.exists(work):
        if not os.path.exists(os.path.join(work, _PARTIAL_MARK)):
            raise CurationError(f"{work} exists and is not an unfinished curation run; move it away.")
        shutil.rmtree(work)  # an unfinished earlier run of ours: nothing in it is a result
    try:
        os.makedirs(work)
        open(os.path.join(work, _PARTIAL_MARK), "w").close()
    except OSError as err:
        raise CurationError(f"Cannot create the output {output}: {err.strerror or err}.") from None
    return work


def run(config: CurateConfig, session=None, log=print) -> dict:
    """Runs the curation (on a local Spark unless `session` says otherwise); returns the summary,
    also written to OUTPUT/report/report.json and report.md."""
    if not config.output:
        raise CurationError("Name an output directory (output: in the config, or --output).")
    work = _prepare_output(config.output)
    session = session or spark_session()
    start = time.perf_counter()
    summary = build_and_run(session, config, work, log)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    read.write_text(f"{work}/{REPORT_DIR}/report.json", json.dumps(summary, indent=2) + "\n")
    read.write_text(f"{work}/{REPORT_DIR}/report.md", markdown(summary))
    if read.local(config.output):
        os.remove(os.path.join(work, _PARTIAL_MARK))
        output = os.path.abspath(config.output.removeprefix("file://"))
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
        weight = weights.get(name, 0.0) if weights is not None else counts["tokens"] / total
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
