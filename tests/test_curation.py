"""Data curation: each stage on small hand-made inputs with known answers, the report, and bad input.

Every test runs the real Spark pipeline (local mode) through `pipeline.run` or the CLI.
"""

from __future__ import annotations

import json
import random

import pytest

from llama_jax.data import curate
from llama_jax.data.config import SourceConfig
from llama_jax.data.curation import dedup, pipeline
from llama_jax.data.curation import text as text_lib
from llama_jax.data.curation.config import Heuristics, parse_config
from llama_jax.data.sources import open_source

WORDS = (
    "river stone garden window letter bridge market silver morning winter candle harbor meadow "
    "forest valley thunder lantern orchard painter village station kitchen mirror blanket engine "
    "pocket island ladder carpet feather basket compass tunnel anchor pillow rocket saddle marble "
    "the and of with"
).split()


def prose(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def curate_records(tmp_path, records, stages, **settings):
    """Runs the stages over `records`; returns (kept texts by id, summary, output dir)."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    out = tmp_path / "out"
    config = parse_config({"inputs": [{"path": corpus}], "output": str(out), "stages": stages, **settings})
    summary = pipeline.run(config)
    kept = {}
    for path in sorted((out / "data").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            kept[int(doc["id"].rsplit("#", 1)[1])] = doc
    return kept, summary, out


def test_exact_dedup_by_normalised_text_and_url(tmp_path):
    rng = random.Random(0)
    base = [prose(rng, 30) for _ in range(4)]
    records = [
        {"text": base[0], "url": "https://www.example.org/a/"},
        {"text": base[1]},
        {"text": "  " + base[0].upper().replace(" ", "  ,\n") + "!"},  # case, spacing, punctuation
        {"text": base[2], "url": "http://example.org/a"},  # same URL as record 0, other text
        {"text": base[3]},
        {"text": base[1] + " extra"},  # not the same text
    ]
    kept, summary, _ = curate_records(tmp_path, records, ["exact_dedup", {"exact_dedup": {"key": "url"}}])
    assert sorted(kept) == [0, 1, 4, 5]
    assert summary["stages"][0]["removed"] == {"exact duplicate (text)": 1}
    assert summary["stages"][1]["removed"] == {"exact duplicate (url)": 1}
    assert text_lib.url_key("HTTPS://WWW.Example.org/a/#top") == text_lib.url_key("http://example.org/a")


def _jaccard(a: str, b: str, n: int) -> float:
    sa, sb = text_lib.shingles(a, n), text_lib.shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def test_minhash_removes_pairs_above_the_threshold_and_keeps_those_below(tmp_path):
    rng = random.Random(1)
    records, expected_removed, similarities = [], set(), {}
    for pair in range(12):
        original = prose(rng, 200).split()
        changed = list(original)
        # Changing every k-th word sets the 3-gram Jaccard similarity: 0.96, 0.90, 0.46 and 0.
        step = [100, 60, 8, 3, 2, 1][pair % 6]
        for i in range(0, len(changed), step):
            changed[i] = "zz" + str(rng.randrange(10**6))
        a, b = " ".join(original), " ".join(changed)
        similarity = _jaccard(a, b, 3)
        records += [{"text": a}, {"text": b}]
        similarities[len(records) - 1] = similarity
        if similarity >= 0.8:
            expected_removed.add(len(records) - 1)
    # The test only means something if the similarities fall clearly on both sides of 0.8.
    assert all(abs(s - 0.8) > 0.08 for s in similarities.values())
    assert 0 < len(expected_removed) < len(similarities)
    stage = {"minhash_dedup": {"ngram": 3, "num_perm": 256, "threshold": 0.8}}
    kept, summary, out = curate_records(tmp_path, records, [stage])
    assert set(range(len(records))) - set(kept) == expected_removed
    sample = [
        json.loads(line) for line in (out / "report/removed/minhash_dedup.jsonl").read_text().splitlines()
    ]
    assert {int(d["id"].rsplit("#", 1)[1]) for d in sample} == expected_removed
    assert all(int(d["detail"].rsplit("#", 1)[1]) == int(d["id"].rsplit("#", 1)[1]) - 1 for d in sample)


def test_optimal_bands_catch_pairs_at_the_threshold_and_few_far_below():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = dedup.optimal_bands(threshold, 128)
        assert bands * rows <= 128

        def caught(s):  # the probability that a pair of similarity s shares a band
            return 1 - (1 - s**rows) ** bands

        # Candidates are checked afterwards, so the banding favours recall at the threshold...
        assert caught(threshold) > 0.75 and caught(min(threshold + 0.05, 1.0)) > 0.9, (bands, rows)
        # ...while pairs far below it rarely become candidates.
        assert caught(threshold - 0.3) < 0.1, (bands, rows)


def test_line_dedup_strips_lines_shared_by_many_documents(tmp_path):
    rng = random.Random(2)
    cookie = "We use cookies to improve your experience. Accept all"
    nav = "Home | About | Contact | Careers"
    records = []
    for i in range(8):
        lines = [prose(rng, 12), cookie, prose(rng, 12)]
        if i < 5:
            lines.append(nav)  # in 5 documents: below min_documents=6, kept
        lines.append("ok.")  # in every document but shorter than min_chars: kept
        records.append({"text": "\n".join(lines)})
    records.append({"text": cookie + "\n" + cookie})  # nothing but boilerplate
    kept, summary, _ = curate_records(
        tmp_path, records, [{"line_dedup": {"min_documents": 6, "min_chars": 10}}]
    )
    assert sorted(kept) == list(range(8))
    for i, doc in kept.items():
        original = records[i]["text"].splitlines()
        assert doc["text"].splitlines() == [line for line in original if line != cookie]
    assert summary["stages"][0]["removed"] == {"repeated lines": 8, "only repeated lines": 1}
    words = sum(len(r["text"].split()) for r in records)
    assert summary["stages"][0]["tokens_out"] == words - 9 * len(cookie.split()) - len(cookie.split())


def test_heuristic_rules_at_their_edges():
    rules = Heuristics(
        min_words=5, max_duplicate_ngram_chars=None, max_top_ngram_chars=None, min_stop_words=None
    )
    failure = text_lib.heuristic_failure
    stop = Heuristics(min_words=1, max_top_ngram_chars=None, max_duplicate_ngram_chars=None)
    assert failure("Rivers and lakes of Europe", stop, None) is None  # "and", "of"
    assert failure("Rivers and lakes AND seas", stop, None) == "fewer than 2 stop words"  # one, twice
    assert failure("alpha beta gamma delta epsilon", rules, None) is None
    assert failure("alpha beta gamma delta", rules, None) == "fewer than 5 words"
    assert failure("a b c d e f", rules, None) == "mean word length below 3.0"
    assert (
        failure(
            "abcdefghijkl " * 5,
            Heuristics(
                min_words=5,
                max_duplicate_lines=None,
                max_top_ngram_chars=None,
                max_duplicate_ngram_chars=None,
                min_stop_words=None,
            ),
            None,
        )
        == "mean word length above 10.0"
    )
    # 10 words, 2 symbols: 0.2 per word > 0.1.
    assert (
        failure("# alpha beta gamma delta epsilon zeta eta theta iota ...", rules, None)
        == "symbols per word above 0.1"
    )
    assert failure("alpha 12 34 56 78 90 beta gamma delta", rules, None) == "words without a letter above 0.2"
    lines = "\n".join(["one two three four"] * 3 + ["five six seven eight"])
    assert failure(lines, rules, None) == "repeated lines above 0.3"
    block = text_lib.blocklist_pattern(["casino", "free money"])
    assert failure("classic casinos alpha beta gamma", rules, block) is None  # whole words only
    assert failure("Casino alpha beta gamma delta", rules, block) == "blocklisted words"
    assert failure("FREE  money alpha beta gamma", rules, block) is None  # a phrase is matched as written
    assert failure("free money alpha beta gamma", rules, block) == "blocklisted words"


def test_ngram_shares_equal_the_direct_formula():
    words = "a b a b a b c d".split()
    top, duplicate = text_lib._ngram_shares(words, 2)
    # ("a","b") occurs 3 times: 6 characters of 8. The repeats (not first occurrences) of the
    # bigrams are at words 2-3, 3-4 and 4-5: words 2 to 5, 4 characters of 8.
    assert top == pytest.approx(6 / 8)
    assert duplicate == pytest.approx(4 / 8)
    rules = Heuristics(
        min_words=1,
        max_top_ngram_chars={2: 0.5},
        max_duplicate_ngram_chars=None,
        max_mean_word_length=None,
        min_mean_word_length=None,
        max_duplicate_lines=None,
        min_stop_words=None,
    )
    assert (
        text_lib.heuristic_failure(" ".join(words), rules, None)
        == "most frequent 2-gram above 0.5 of characters"
    )


ENGLISH = "The harbour was quiet in the early morning, and the fishermen were mending their nets on the old stone pier."
FRENCH = "Le port était calme au petit matin, et les pêcheurs réparaient leurs filets sur la vieille jetée de pierre."
GERMAN = (
    "Der Hafen war am frühen Morgen ruhig, und die Fischer flickten ihre Netze auf dem alten steinernen Pier."
)
SPANISH = "El puerto estaba tranquilo por la mañana temprano, y los pescadores remendaban sus redes en el viejo muelle."


def test_language_identification_labels_and_keeps(tmp_path):
    records = [{"text": t} for t in (ENGLISH, FRENCH, GERMAN, SPANISH, "12345 67890 !!!")]
    kept, summary, out = curate_records(
        tmp_path, records, [{"language": {"keep": ["en"], "min_confidence": 0.5}}]
    )
    assert sorted(kept) == [0]
    assert kept[0]["language"] == "en" and kept[0]["language_confidence"] >= 0.5
    removed = {
        int(d["id"].rsplit("#", 1)[1]): d
        for d in map(json.loads, (out / "report/removed/language.jsonl").read_text().splitlines())
    }
    assert [removed[i]["language"] for i in (1, 2, 3)] == ["fr", "de", "es"]
    assert removed[4]["removed_by"] == "language unknown"


def quality_labels(texts):
    """Stand-in for a judge: a text is good when most of its words are real words."""
    return [1.0 if sum(w in WORDS for w in t.split()) > len(t.split()) / 2 else 0.0 for t in texts]


def failing_labels(texts):
    raise RuntimeError("the judge is out")


def domain_labels(texts):
    return ["numbers" if any(c.isdigit() for c in t) else "words" for t in texts]


def _spam(rng):
    return " ".join(f"xq{rng.randrange(50)}z" for _ in range(40))


def test_quality_classifier_trained_from_a_scoring_function(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    (tmp_path / "judges.py").write_text("from test_curation import quality_labels\n")
    rng = random.Random(3)
    records = [{"text": prose(rng, 40) if i % 3 else _spam(rng)} for i in range(120)]
    stage = {"quality": {"labels": {"function": "judges:quality_labels"}, "sample": 60, "threshold": 0.5}}
    kept, summary, out = curate_records(tmp_path, records, [stage])
    assert sorted(kept) == [i for i in range(120) if i % 3]  # learned from 60 labels, applied to all
    assert all(doc["quality"] >= 0.5 for doc in kept.values())
    info = json.loads((out / "report/quality.classifier.json").read_text())
    assert sum(info["labels"].values()) == 60 and set(info["labels"]) == {"high", "low"}
    assert info["held_out_accuracy"] == 1.0
    # The saved model loads into a second run that trains nothing.
    out2 = tmp_path / "out2"
    config = parse_config(
        {
            "inputs": [{"path": str(tmp_path / "corpus.jsonl")}],
            "output": str(out2),
            "stages": [{"quality": {"model": str(out / "report/quality.classifier.pkl")}}],
        }
    )
    assert pipeline.run(config)["stages"][0]["docs_out"] == 80


def test_domain_classifier_from_a_labels_file_feeds_the_mixture(tmp_path):
    rng = random.Random(4)
    records = [
        {"text": prose(rng, 30) if i % 2 else " ".join(str(rng.randrange(999)) + " units" for _ in range(15))}
        for i in range(40)
    ]
    corpus = tmp_path / "corpus.jsonl"
    labels = tmp_path / "labels.jsonl"
    write_jsonl(
        labels,
        [{"id": f"{corpus}#{i:010d}", "label": "words" if i % 2 else "numbers"} for i in range(0, 40, 2)]
        + [{"id": f"{corpus}#{i:010d}", "label": "words"} for i in range(1, 40, 2)],
    )
    records.append(dict(records[1]))  # a duplicate, removed by a stage after the domain stage
    stage = {"domain": {"classes": ["words", "numbers"], "labels": {"file": str(labels)}}}
    kept, summary, out = curate_records(tmp_path, records, [stage, "exact_dedup"])
    assert {i: d["domain"] for i, d in kept.items()} == {
        i: "words" if i % 2 else "numbers" for i in range(40)
    }
    tokens = {
        name: sum(
            len(r["text"].split()) for i, r in enumerate(records[:40]) if (i % 2 == 1) == (name == "words")
        )
        for name in ("words", "numbers")
    }
    assert summary["domains"] == {
        "words": {"docs": 20, "tokens": tokens["words"]},
        "numbers": {"docs": 20, "tokens": tokens["numbers"]},
    }
    sources = pipeline.mixture_sources(str(out))
    total = sum(tokens.values())
    assert {s.name: s.weight for s in sources} == pytest.approx(
        {f"curated-{k}": v / total for k, v in tokens.items()}
    )
    # The training pipeline reads a domain's shards as they are.
    source = open_source(SourceConfig(sources[0].path, kind="jsonl"))
    assert sorted(source[i] for i in range(len(source))) == sorted(
        r["text"] for i, r in enumerate(records[:40]) if (i % 2 == 1) == (sources[0].name == "curated-words")
    )
    assert [s.weight for s in pipeline.mixture_sources(str(out), {"words": 3.0})] == [3.0]


def run_cli(args, capsys):
    code = curate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_reports_unreadable_input_and_writes_the_report(tmp_path, capsys):
    rng = random.Random(5)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "wb") as f:
        for _ in range(5):
            f.write(json.dumps({"text": prose(rng, 60)}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9 latin-1"}\n')
        f.write(b"{not json\n")
        f.write(b'{"body": "no text field"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"inputs:\n  - {{path: {corpus}}}\n  - {{path: {tmp_path / 'latin1.txt'}, kind: text}}\n"
        f"output: {tmp_path / 'out'}\nstages:\n  - heuristics\n"
    )
    code, out, err = run_cli([config], capsys)
    assert code == 0, err
    assert "4 unreadable records" in out
    unreadable = [
        json.loads(line) for line in (tmp_path / "out/report/unreadable.jsonl").read_text().splitlines()
    ]
    assert sorted(u["reason"].split(" ")[0] for u in unreadable) == ["no", "not", "not", "not"]
    assert {u["where"] for u in unreadable} >= {f"{corpus}:6", f"{corpus}:7", f"{corpus}:8"}
    report = json.loads((tmp_path / "out/report/report.json").read_text())
    assert report["read"] == {"files": 2, "docs": 5, "tokens": 300, "unreadable": 4}
    assert "| heuristics | 5 | 5 |" in (tmp_path / "out/report/report.md").read_text()
    # A second run never writes over the first.
    code, out, err = run_cli([config], capsys)
    assert code == 1 and "already exists" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "yaml, message",
    [
        ("stages: [dedupe]", "Unknown stage 'dedupe'"),
        ("stages: [{heuristics: {min_wrds: 3}}]", "has no option 'min_wrds'"),
        ("stages: [{minhash_dedup: {bands: 20, rows: 8}}]", "exceeds num_perm"),
        ("stages: [{language: {keep: [xx]}}]", "'xx' is not an ISO 639-1 code"),
        ("stages: [{quality: {}}]", "needs labels.file or labels.function"),
        ("stages: [{heuristics: {min_words: -1}}]", "min_words must be"),
        ("stages: [heuristics]\nshards: 0", "shards must be"),
        ("stages: [heuristics]\nbatch: 3", "Unknown setting 'batch'"),
        ("stages: 5", "stages must be a list of stages, got 5."),
        (
            "stages: [{quality: {labels: {function: 'test_curation:quality_labels'}, sample: 30}}]\n",
            "are all 'high'",
        ),
        ("stages: [{heuristics: {min_words: 10000}}]", "Stage heuristics removed every document"),
        (
            "stages: [{quality: {labels: {function: 'test_curation:failing_labels'}}}]",
            "test_curation:failing_labels failed: RuntimeError: the judge is out",
        ),
    ],
)
def test_bad_configs_are_one_sentence(tmp_path, capsys, monkeypatch, yaml, message):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    rng = random.Random(6)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": prose(rng, 60)} for _ in range(10)])
    config = tmp_path / "c.yaml"
    config.write_text(f"inputs: [{{path: {corpus}}}]\noutput: {tmp_path / 'out'}\n{yaml}\n")
    code, out, err = run_cli([config], capsys)
    assert code == 1
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_killed_run_leaves_no_output_and_the_next_run_finishes(tmp_path, capsys):
    rng = random.Random(7)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": prose(rng, 60)} for _ in range(10)])
    # What a killed run leaves: the partial directory with its mark.
    partial = tmp_path / "out.partial"
    (partial / "data").mkdir(parents=True)
    (partial / ".llama_jax-curate-partial").touch()
    (partial / "data/part-00000-of-00004.jsonl").write_text("half a line")
    config = tmp_path / "c.yaml"
    config.write_text(f"inputs: [{{path: {corpus}}}]\noutput: {tmp_path / 'out'}\nstages: [exact_dedup]\n")
    code, out, err = run_cli([config], capsys)
    assert code == 0, err
    assert not partial.exists()
    lines = [line for p in (tmp_path / "out/data").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(lines) == 10
    # A directory of someone else's at OUTPUT.partial is never removed.
    other = tmp_path / "other.partial"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    code, out, err = run_cli([config, "--output", tmp_path / "other"], capsys)
    assert code == 1 and "not an unfinished curation run" in err
    assert (other / "precious.txt").read_text() == "keep me"


def test_parquet_and_text_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(8)
    texts = [prose(rng, 20) for _ in range(6)]
    pq.write_table(
        pa.table({"content": texts[:4], "n": list(range(4))}), tmp_path / "a.parquet", row_group_size=2
    )
    (tmp_path / "docs").mkdir()
    for i, t in enumerate(texts[4:] + [texts[0]]):
        (tmp_path / "docs" / f"{i}.txt").write_text(t)
    import gzip

    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:  # compressed input, named twice
        f.write(json.dumps({"text": texts[1]}) + "\n" + json.dumps({"text": "gzipped " + texts[2]}) + "\n")
    config = parse_config(
        {
            "inputs": [
                {"path": str(tmp_path / "a.parquet"), "kind": "parquet", "field": "content"},
                {"path": str(tmp_path / "docs"), "kind": "text"},
                {"path": [str(tmp_path / "more.jsonl.gz")] * 2},
            ],
            "output": str(tmp_path / "out"),
            "stages": ["exact_dedup"],
        }
    )
    summary = pipeline.run(config)
    assert summary["read"]["docs"] == 9 and summary["stages"][0]["docs_out"] == 7
    rows = [
        json.loads(line)
        for p in (tmp_path / "out/data").glob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert sorted(r["text"] for r in rows) == sorted(texts + ["gzipped " + texts[2]])
    assert sorted(r["n"] for r in rows if "n" in r) == [0, 1, 2, 3]  # other columns are kept


@pytest.fixture(scope="module", autouse=True)
def _stop_spark_afterwards():
    """The tests share one local Spark; it stops when they are done, freeing its JVM's memory."""
    yield
    from pyspark import SparkContext

    if SparkContext._active_spark_context is not None:
        SparkContext._active_spark_context.stop()


def test_no_java_is_one_sentence(tmp_path, capsys, monkeypatch):
    rng = random.Random(9)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": prose(rng, 60)}])
    config = tmp_path / "c.yaml"
    config.write_text(f"inputs: [{{path: {corpus}}}]\noutput: {tmp_path / 'out'}\nstages: [exact_dedup]\n")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))
    code, out, err = run_cli([config], capsys)
    assert code == 1 and err.strip() == (
        "Spark needs Java 17 or later, and none was found: set JAVA_HOME or put java on PATH."
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_local_workers_run_the_drivers_python(monkeypatch):
    """The workers unpickle the stages with llama_jax's own packages, activated environment or not."""
    import sys

    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    session = pipeline.spark_session("local[1]")
    assert session.sparkContext.pythonExec == sys.executable
    prefixes = session.sparkContext.parallelize([0], 1).map(lambda _: __import__("sys").prefix).collect()
    assert prefixes == [sys.prefix]
