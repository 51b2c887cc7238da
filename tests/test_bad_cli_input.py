"""Bad input to the command-line tools that once gave a traceback, exited 0 or named the wrong
problem: each is now one line on stderr and a non-zero exit, before any model is loaded or
compiled. (Each tool's own tests cover its other bad inputs.)"""

from __future__ import annotations

import json

import pytest

from llama_jax import aot, generate, rejection_sample, serve, train
from llama_jax import eval as eval_cli
from llama_jax.convert.common import ConversionError, atomic_directory
from llama_jax.data import curate, prepare
from llama_jax.data.curation.config import CurationError, load_config
from llama_jax.data.synthetic import write_sentencepiece_model
from llama_jax.eval import EvalError, read_documents
from llama_jax.scaling import cli as scaling_cli


def one_error_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for part in expected:
        assert part in last, last
    return last


@pytest.fixture
def blocked(tmp_path):
    """A path whose parent is a regular file: nothing can be created there."""
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out"


def test_experiment_file_that_is_not_python_or_is_a_directory(tmp_path, capsys):
    (tmp_path / "exp.bin").write_bytes(b"\x00\xff garbage")
    assert train.main(["--exp", str(tmp_path / "exp.bin"), "--workdir", str(tmp_path / "w")]) == 2
    one_error_line(capsys, "is not a Python file")
    assert train.main(["--exp", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    one_error_line(capsys, "is a directory, not a file")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--exp", "llama3_8b", "--slices", "0"], "--slices must be at least 1"),
        (["--check", "README.md"], "--check goes with --recipes"),
        (["--exp", "tiny"], "names no TPU slice"),
    ],
)
def test_aot_rejects_before_compiling(argv, message, capsys):
    assert aot.main(argv) == 2
    one_error_line(capsys, message)


def test_an_output_that_cannot_be_created(blocked, capsys):
    with pytest.raises(ConversionError, match="Cannot create"), atomic_directory(blocked):
        pass
    assert scaling_cli.main(["plan", "--budgets", "2.5e11", "--sizes", "16x1", "--out", str(blocked)]) == 2
    one_error_line(capsys, str(blocked))


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("inputs: [a, b\nstages: [c\n")
    with pytest.raises(CurationError, match=r"bad.yaml is not valid YAML: .* at line \d+"):
        load_config(str(config))
    assert curate.main([str(config)]) == 1
    one_error_line(capsys, "is not valid YAML")


def test_prepare_with_nothing_readable_fails(tmp_path, capsys):
    tokenizer = write_sentencepiece_model(str(tmp_path / "tok"), vocab_size=320)
    corpus = tmp_path / "notes.txt"
    corpus.write_text("plain text, not JSON\nmore of it\n")
    argv = [str(corpus), "--tokenizer", tokenizer, "--output", str(tmp_path / "out"), "--quiet"]
    assert prepare.main(argv + ["--workers", "1"]) == 2  # --kind defaults to jsonl
    one_error_line(capsys, "no document could be read", "--kind (here jsonl)")
    assert not (tmp_path / "out").exists()  # so the corrected command can use the same --output
    assert prepare.main(argv + ["--workers", "1", "--kind", "text_lines"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(argv + ["--workers", "0"])
    assert exit_info.value.code == 2


def test_generate_flags_that_need_chat_and_a_missing_model(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert generate.main(["--ckpt", missing, "--prompt", "hi", "--system", "Be brief"]) == 2
    one_error_line(capsys, "--system goes with --chat")
    assert generate.main(["--ckpt", missing, "--prompt", "hi"]) == 2
    one_error_line(capsys, f"--ckpt {missing} does not exist")
    assert generate.main(["--hf", str(tmp_path), "--prompt", "hi"]) == 2
    one_error_line(capsys, "has no config.json")


def test_rejection_sampling_safety_threshold(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    base = ["--ckpt", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    base += ["--score", "json:dumps"]
    assert rejection_sample.main(base + ["--safety-threshold", "0.3"]) == 2
    one_error_line(capsys, "--safety-threshold goes with")
    assert rejection_sample.main(base + ["--safety-score", "json:dumps", "--safety-threshold", "2"]) == 2
    one_error_line(capsys, "probability in (0, 1)")


def test_eval_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EvalError, match="latin1.txt is not UTF-8 text"):
        read_documents(path)


def test_harness_limit_and_output_are_checked_first(tmp_path, blocked, capsys):
    base = ["harness", "--hf", str(tmp_path), "--tasks", "anything"]
    assert eval_cli.main(base + ["--limit", "-3"]) == 2
    one_error_line(capsys, "--limit must be positive")
    assert eval_cli.main(base + ["--output", str(blocked / "r.json")]) == 2
    one_error_line(capsys, "its directory does not exist")


def test_harness_names_a_task_file_that_does_not_parse(tmp_path, capsys):
    """The harness skips a task YAML it cannot parse; its task must not be merely "unknown"."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "good.yaml").write_text("task: good\ndataset_path: json\nprocess_docs: !function utils.docs\n")
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\n  output_type: [loglikelihood\n")
    args = ["harness", "--hf", str(tmp_path), "--tasks", "broken", "--include-path", str(tasks)]
    assert eval_cli.main(args) == 2
    message = one_error_line(capsys, "Unknown task 'broken'")
    assert "broken.yaml line 3" in message and "good.yaml" not in message


def test_serve_checks_its_sizes_before_loading_a_model(tmp_path, capsys):
    assert serve.main(["--hf", str(tmp_path), "--max-len", "0"]) == 2
    one_error_line(capsys, "--max-len must be at least 2")
    assert serve.main(["--hf", str(tmp_path), "--slots", "0"]) == 2
    one_error_line(capsys, "--slots must be at least 1")
