"""python -m llama_jax.data.prepare: shards, parallel workers, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.data import DataConfig, SourceConfig, make_iterator, prepare, synthetic
from llama_jax.data import sources as sources_lib
from llama_jax.tokenizer import load_tokenizer

DOCS = [f"doc{i} {t}" for i, t in enumerate(synthetic.random_documents(95, seed=7))]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return synthetic.write_sentencepiece_model(str(tmp_path_factory.mktemp("sp")))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS]
    lines.insert(10, "{broken json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run(*argv):
    return prepare.main([*argv, "--quiet"])


def read_tokens(output):
    source = sources_lib.open_source(SourceConfig(output, kind="arrayrecord", tokenized=True))
    return [source[i] for i in range(len(source))]


def test_prepare_writes_all_documents_in_order(tmp_path, corpus, tokenizer_path, capsys):
    output = str(tmp_path / "out")
    assert (
        run(
            corpus,
            "--tokenizer",
            tokenizer_path,
            "--output",
            output,
            "--docs-per-shard",
            "30",
            "--workers",
            "1",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Wrote 95 documents" in out and "skipped 1" in out
    tokenizer = load_tokenizer(tokenizer_path)
    tokens = read_tokens(output)
    assert len(tokens) == len(DOCS)
    for ids, doc in zip(tokens, DOCS):
        np.testing.assert_array_equal(ids, tokenizer.encode(doc))
    shards = sorted(f for f in os.listdir(output) if f.endswith(".array_record"))
    assert shards == [prepare.shard_name(i, 4) for i in range(4)]
    manifest = json.load(open(os.path.join(output, "manifest.json")))
    assert manifest["tokenizer_vocab_size"] == tokenizer.vocab_size
    # The pipeline reads the shards (adding BOS/EOS) like the raw corpus.
    config = DataConfig(
        sources=(SourceConfig(output, kind="arrayrecord", tokenized=True),),
        tokenizer_path=tokenizer_path,
        seq_len=64,
        batch_size=2,
    )
    assert next(make_iterator(config, None, 0, 1))["tokens"][0, 0] == tokenizer.bos_id


def test_parallel_workers_and_resume(tmp_path, corpus, tokenizer_path):
    output = str(tmp_path / "out")
    command = [
        sys.executable,
        "-m",
        "llama_jax.data.prepare",
        corpus,
        "--tokenizer",
        tokenizer_path,
        "--output",
        output,
        "--docs-per-shard",
        "20",
        "--workers",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Wrote 95 documents" in result.stdout and "skipped 1" in result.stdout
    assert "tokenizing" in result.stderr  # the tqdm progress bar
    complete = read_tokens(output)
    # Simulate an interruption: one shard missing, another half written.
    os.remove(os.path.join(output, prepare.shard_name(1, 5)))
    os.replace(
        os.path.join(output, prepare.shard_name(3, 5)),
        os.path.join(output, prepare.shard_name(3, 5) + ".tmp"),
    )
    mtime = os.path.getmtime(os.path.join(output, prepare.shard_name(0, 5)))
    assert (
        run(
            corpus,
            "--tokenizer",
            tokenizer_path,
            "--output",
            output,
            "--docs-per-shard",
            "20",
            "--workers",
            "1",
        )
        == 0
    )
    assert os.path.getmtime(os.path.join(output, prepare.shard_name(0, 5))) == mtime  # not redone
    assert not any(f.endswith(".tmp") for f in os.listdir(output))
    resumed = read_tokens(output)
    assert len(resumed) == len(complete)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, complete))


def test_bad_input(tmp_path, corpus, tokenizer_path, capsys):
    output = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing.jsonl"), "--tokenizer", tokenizer_path], "No such file"),
        ([corpus, "--tokenizer", str(tmp_path / "none.model")], "Tokenizer file not found"),
        ([corpus, "--tokenizer", corpus], "looks like JSON but is not a tokenizer.json"),
        ([corpus, "--tokenizer", tokenizer_path, "--kind", "parquet"], "not a Parquet file"),
    ]
    (tmp_path / "empty.jsonl").write_text("")
    cases.append(([str(tmp_path / "empty.jsonl"), "--tokenizer", tokenizer_path], "no documents"))
    for argv, message in cases:
        assert run(*argv, "--output", output) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # Settings that differ from an earlier run into the same directory.
    assert run(corpus, "--tokenizer", tokenizer_path, "--output", output, "--workers", "1") == 0
    assert run(corpus, "--tokenizer", tokenizer_path, "--output", output, "--docs-per-shard", "7") == 2
    assert "other settings (docs_per_shard, num_shards)" in capsys.readouterr().err
