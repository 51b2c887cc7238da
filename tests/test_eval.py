"""Evaluation: perplexity and multiple-choice scores against direct computations and
transformers' loss; the CLI end to end and its errors."""

import functools
import json
import math
import re

import jax
import numpy as np
import pytest
import torch

from llama_jax import eval as eval_lib
from llama_jax.convert import load_hf
from llama_jax.eval import Question, continuation_tokens, perplexity, score_choices
from llama_jax.model import Llama
from llama_jax.tokenizer import load_tokenizer

# Rows are right-padded to this length for the direct computation: under causal attention the
# padding after a row cannot change its log-probabilities, and one shape compiles once.
DIRECT_LENGTH = 40


@functools.partial(jax.jit, static_argnames="cfg")
def _padded_log_probs(params, tokens, cfg):
    return jax.nn.log_softmax(Llama(cfg).apply({"params": params}, tokens), axis=-1)


def _token_logprobs(params, cfg, ids):
    """log p(ids[t+1] | ids[:t+1]) for each t, from one forward pass without segment ids."""
    tokens = np.zeros((1, DIRECT_LENGTH), np.int32)
    tokens[0, : len(ids) - 1] = ids[:-1]
    log_probs = np.asarray(_padded_log_probs(params, tokens, cfg))[0]
    return log_probs[np.arange(len(ids) - 1), ids[1:]].astype(np.float64)


def test_perplexity_equals_a_direct_computation_over_the_same_windows(small_checkpoint):
    _, _, cfg, params = small_checkpoint
    rng = np.random.default_rng(0)
    documents = [[1] + rng.integers(2, cfg.vocab_size, n).tolist() for n in (70, 20, 0, 16)]
    seq_len = 16
    # 70 predictions: windows of 16, 16, 16, 16, 6; 20: 16, 4; 0: none; 16: one of 16.
    result = perplexity(params, cfg, documents, seq_len=seq_len, batch_size=3)
    assert (result.documents, result.windows, result.tokens) == (4, 8, 106)
    nll = []
    for doc in documents:
        for start in range(0, len(doc) - 1, seq_len):
            nll.extend(-_token_logprobs(params, cfg, doc[start : start + seq_len + 1]))
    assert len(nll) == 106
    assert result.nll == pytest.approx(np.mean(nll), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_perplexity_equals_transformers_loss(hf_model_dir):
    model, path = hf_model_dir(max_position_embeddings=64)
    cfg, params = load_hf(path)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 40)
    with torch.no_grad():
        ids_torch = torch.as_tensor(ids[None])
        loss = model(ids_torch, labels=ids_torch).loss.item()  # mean NLL of tokens 1..39
    result = perplexity(params, cfg, [ids.tolist()])
    assert result.tokens == 39 and result.windows == 1
    assert result.nll == pytest.approx(loss, rel=1e-5)


def test_continuation_split_follows_lm_eval(small_checkpoint):
    tokenizer = load_tokenizer(small_checkpoint[1])
    # The context's trailing space moves into the continuation.
    context_ids, continuation = continuation_tokens(tokenizer, "the cat ", "sat")
    assert context_ids == tokenizer.encode("the cat", bos=True)
    whole = tokenizer.encode("the cat sat", bos=True)
    assert context_ids + continuation == whole


def test_choices_are_sums_of_token_logprobs_and_acc_norm_divides_by_length(small_checkpoint):
    _, tokenizer_path, cfg, params = small_checkpoint
    tokenizer = load_tokenizer(tokenizer_path)
    # A short and a long choice: the long one loses on the sum but wins per character.
    long_choice = "llama model train token grain"  # a few long tokens
    questions = [
        Question("the model", ("of", long_choice), 1),
        Question("llama jax grain token", ("train", "model", "x=y+1;"), 0),
        Question("word " * 40, ("the", "of"), 1),
    ]  # truncated to seq_len + 1 tokens
    scores = score_choices(params, cfg, tokenizer, questions, seq_len=32, batch_size=4)
    acc, acc_norm = [], []
    for question, ours in zip(questions, scores.loglikelihoods):
        direct = []
        for choice in question.choices:
            context_ids, continuation = continuation_tokens(tokenizer, question.context, " " + choice)
            ids = (context_ids + continuation)[-33:]
            direct.append(_token_logprobs(params, cfg, ids)[-len(continuation) :].sum())
        np.testing.assert_allclose(ours, direct, rtol=1e-5)
        lengths = np.array([len(c) for c in question.choices])
        acc.append(np.argmax(direct) == question.answer)
        acc_norm.append(np.argmax(np.array(direct) / lengths) == question.answer)
    assert (scores.acc, scores.acc_norm) == (np.mean(acc), np.mean(acc_norm))
    # The first question is the case where the two metrics pick different choices.
    first = np.array(scores.loglikelihoods[0])
    assert np.argmax(first) == 0 and np.argmax(first / [2, len(long_choice)]) == 1


@pytest.fixture
def task_files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the model data " * 20)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in ("the data", "llama jax grain")))
    choices = tmp_path / "choices.jsonl"
    choices.write_text(
        json.dumps({"context": "the", "choices": ["cat", "model data"], "answer": 1})
        + "\n\n"
        + json.dumps({"context": "a", "choices": ["b"], "answer": 0})
    )
    return text, jsonl, choices


def _table(out: str) -> dict:
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.strip().splitlines())


def test_cli_perplexity_choices_and_quant(small_checkpoint, task_files, capsys):
    ckpt, tokenizer_path, cfg, params = small_checkpoint
    text, jsonl, choices = task_files
    base = ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--seq-len", "32"]
    assert eval_lib.main(base + ["--perplexity", str(text)]) == 0
    table = _table(capsys.readouterr().out)
    tokenizer = load_tokenizer(tokenizer_path)
    expected = perplexity(params, cfg, [tokenizer.encode(text.read_text(), bos=True)], seq_len=32)
    assert table["tokens"] == f"{expected.tokens:,}"
    assert float(table["perplexity"]) == pytest.approx(expected.perplexity, rel=1e-4)

    assert eval_lib.main(base + ["--perplexity", str(jsonl), "--field", "body"]) == 0
    assert _table(capsys.readouterr().out)["documents"] == "2"

    assert eval_lib.main(base + ["--choices", str(choices)]) == 0
    table = _table(capsys.readouterr().out)
    assert table["questions"] == "2" and {"acc", "acc_norm"} <= table.keys()

    assert eval_lib.main(base + ["--perplexity", str(text), "--quant", "int8"]) == 0
    table = _table(capsys.readouterr().out)
    assert table["quantization"] == "int8"
    assert int(table["weight bytes"].replace(",", "")) < int(table["weight bytes before"].replace(",", ""))
    assert float(table["perplexity"]) == pytest.approx(expected.perplexity, rel=0.02)


def test_without_bos_and_text_measures(small_checkpoint, task_files, capsys):
    ckpt, tokenizer_path, cfg, params = small_checkpoint
    tokenizer = load_tokenizer(tokenizer_path)
    assert continuation_tokens(tokenizer, "the cat ", "sat", bos=False)[0] == tokenizer.encode("the cat")
    # An empty context is BOS, with or without BOS in front of texts, as in lm-evaluation-harness.
    assert continuation_tokens(tokenizer, "", "sat", bos=False) == ([1], tokenizer.encode("sat"))

    text, _, choices = task_files
    base = ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--seq-len", "32", "--no-bos"]
    assert eval_lib.main(base + ["--perplexity", str(text)]) == 0
    table = _table(capsys.readouterr().out)
    content = text.read_text()
    ids = tokenizer.encode(content)
    expected = perplexity(params, cfg, [ids], seq_len=32, texts=[content])
    assert table["BOS"] == "no" and table["tokens"] == f"{len(ids) - 1:,}" == f"{expected.tokens:,}"
    # The text ends with a space: the harness counts the empty piece after it as a word.
    words, n_bytes = 7 * 20 + 1, len(content.encode("utf-8"))
    assert table["words"] == f"{words:,}" and table["bytes"] == f"{n_bytes:,}"
    ll = -expected.nll * expected.tokens
    assert float(table["word perplexity"]) == pytest.approx(math.exp(-ll / words), rel=1e-3)
    assert float(table["byte perplexity"]) == pytest.approx(math.exp(-ll / n_bytes), rel=1e-3)
    assert float(table["bits per byte"]) == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-3)

    assert eval_lib.main(base + ["--choices", str(choices)]) == 0
    table = _table(capsys.readouterr().out)
    questions = eval_lib.read_questions(choices)
    scores = score_choices(params, cfg, tokenizer, questions, seq_len=32, bos=False)
    assert table["acc_bytes"] == f"{scores.acc_bytes:.4f}"


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("bad_json", "Line 2 of"),
        ("bad_answer", "answer 2, which is not an index into its 2 choices"),
        ("no_field", "has no text field 'text'"),
        ("seq_len", "between 2 and the model's context of 64 tokens"),
    ],
)
def test_cli_errors_are_one_sentence(small_checkpoint, tmp_path, capsys, case, message):
    ckpt, tokenizer_path, _, _ = small_checkpoint
    bad = tmp_path / "bad.jsonl"
    good_line = json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0})
    task = ["--choices", str(bad)]
    if case == "missing":
        task = ["--perplexity", str(tmp_path / "nowhere.txt")]
    elif case == "bad_json":
        bad.write_text(good_line + "\n{not json\n")
    elif case == "bad_answer":
        bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 2}))
    elif case == "no_field":
        bad.write_text(json.dumps({"body": "x"}))
        task = ["--perplexity", str(bad)]
    elif case == "seq_len":
        bad.write_text(good_line)
        task += ["--seq-len", "65"]
    args = ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path] + task
    assert eval_lib.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
