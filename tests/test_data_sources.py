"""Document sources: each file kind, and bad input handled loudly, never silently."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_jax.data import COUNTERS, DataConfig, SourceConfig, make_iterator, synthetic
from llama_jax.data import sources as sources_lib
from llama_jax.tokenizer import load_tokenizer

DOCS = [f"doc{i} " + text for i, text in enumerate(synthetic.random_documents(40, seed=3))]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(synthetic.write_sentencepiece_model(str(tmp_path_factory.mktemp("sp"))))


@pytest.fixture(autouse=True)
def fresh_counters():
    COUNTERS.reset()


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def write_array_record(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return str(path)


def read_all(config: SourceConfig, vocab_size=None):
    source = sources_lib.open_source(config, vocab_size)
    return [source[i] for i in range(len(source))]


def test_text_files_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    for i, doc in enumerate(DOCS[:3]):
        (tmp_path / ("sub" if i else "") / f"{i}.txt").write_text(doc + "\nsecond line\n")
    (tmp_path / ".hidden").write_text("ignored")
    docs = read_all(SourceConfig(str(tmp_path), kind="text"))
    assert sorted(docs) == sorted(d + "\nsecond line\n" for d in DOCS[:3])


def test_text_lines_skip_blank_lines(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(DOCS[:5]) + "\n\n  \r\n" + DOCS[5] + "\r\n", encoding="utf-8")
    docs = [d for d in read_all(SourceConfig(str(path), kind="text_lines")) if d is not None]
    assert docs == DOCS[:6]


def test_jsonl_field_and_bad_lines(tmp_path):
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS[:4])]
    records.insert(1, "{not json")
    records.insert(3, {"other": "no text field"})
    records.insert(4, {"text": 17})
    path = write_jsonl(tmp_path / "a.jsonl", records)
    docs = read_all(SourceConfig(path, kind="jsonl", field="text"))
    assert [d for d in docs if d is not None] == DOCS[:4]
    assert COUNTERS.get(path, sources_lib.SKIPPED) == 3


def test_glob_and_several_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"t": d} for d in DOCS[:2]])
    write_jsonl(tmp_path / "b.jsonl", [{"t": d} for d in DOCS[2:5]])
    assert read_all(SourceConfig(str(tmp_path / "*.jsonl"), kind="jsonl", field="t")) == DOCS[:5]
    both = SourceConfig((str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")), kind="jsonl", field="t")
    assert read_all(both) == DOCS[2:5] + DOCS[:2]


def test_parquet_column(tmp_path):
    for i in range(2):
        part = DOCS[i * 20 : (i + 1) * 20]
        table = pa.table({"content": part, "n": list(range(len(part)))})
        pq.write_table(table, tmp_path / f"part{i}.parquet", row_group_size=7)
    source = sources_lib.open_source(SourceConfig(str(tmp_path), kind="parquet", field="content"))
    assert [source[i] for i in range(len(source))] == DOCS
    assert [source[i] for i in (33, 2, 19, 20)] == [DOCS[33], DOCS[2], DOCS[19], DOCS[20]]
    with pytest.raises(ValueError, match="no column 'text'"):
        sources_lib.open_source(SourceConfig(str(tmp_path), kind="parquet", field="text"))


def test_array_record_text_and_tokens(tmp_path, tokenizer):
    text_path = write_array_record(tmp_path / "text.array_record", [d.encode() for d in DOCS[:5]])
    assert read_all(SourceConfig(text_path, kind="arrayrecord")) == DOCS[:5]
    ids = [np.asarray(tokenizer.encode(d), "<i4") for d in DOCS[:5]]
    token_path = write_array_record(tmp_path / "tok.array_record", [a.tobytes() for a in ids])
    docs = read_all(SourceConfig(token_path, kind="arrayrecord", tokenized=True))
    assert all(np.array_equal(a, b) for a, b in zip(docs, ids))
    assert docs[0].dtype == np.int32


def test_non_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe bytes\n")
    docs = read_all(SourceConfig(str(path), kind="text_lines"))
    assert docs == ["good line", "bad \ufffd\ufffd bytes"]
    assert COUNTERS.get(str(path), sources_lib.INVALID_UTF8) == 1


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        sources_lib.open_source(SourceConfig(str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="No files match"):
        sources_lib.open_source(SourceConfig(str(tmp_path / "*.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No .jsonl or .json files"):
        sources_lib.open_source(SourceConfig(str(tmp_path / "empty")))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        sources_lib.open_source(SourceConfig(str(tmp_path / "empty.jsonl")))
    (tmp_path / "not.parquet").write_text("hello")
    with pytest.raises(ValueError, match="not a Parquet file"):
        sources_lib.open_source(SourceConfig(str(tmp_path / "not.parquet"), kind="parquet"))


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown source kind"):
        SourceConfig("x", kind="csv")
    with pytest.raises(ValueError, match="weight"):
        SourceConfig("x", weight=0)
    with pytest.raises(ValueError, match="packing"):
        DataConfig(
            sources=(SourceConfig("x"),),
            tokenizer_path="t",
            seq_len=8,
            batch_size=1,
            packing="greedy",
        )
    config = DataConfig.from_dict(
        {
            "sources": [{"path": "a.jsonl", "weight": 2}],
            "tokenizer_path": "t",
            "seq_len": 8,
            "batch_size": 1,
        }
    )
    assert config.sources[0].weight == 2


def _config(path, **kwargs):
    defaults = dict(tokenizer_path="unused", seq_len=32, batch_size=2, seed=0)
    return DataConfig(sources=(SourceConfig(path, kind="jsonl"),), **{**defaults, **kwargs})


def test_all_documents_unusable_raises_instead_of_hanging(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"title": "no text"}, "[1, 2"])
    forever = make_iterator(_config(path), tokenizer, 0, 1)
    with pytest.raises(ValueError, match="in a row were unusable"):
        next(forever)
    once = make_iterator(_config(path, num_epochs=1), tokenizer, 0, 1)
    with pytest.raises(ValueError, match="No usable documents"):
        next(once)


def test_mismatched_pre_tokenized_vocab(tmp_path, tokenizer):
    path = write_array_record(tmp_path / "t.array_record", [np.arange(3, dtype="<i4").tobytes()])
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer_vocab_size": 128256}))
    with pytest.raises(ValueError, match="128256-token vocabulary"):
        sources_lib.open_source(SourceConfig(path, kind="arrayrecord", tokenized=True), tokenizer.vocab_size)
