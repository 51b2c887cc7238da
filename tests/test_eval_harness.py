"""lm-evaluation-harness: our `llama_jax` model type against the harness's own `hf` model on the
same random weights and tokenizer (local tasks of each request type), the text and choice measures
of llama_jax.eval against direct formulas and the harness's numbers, and the CLI."""

import json
import math
import re
import sys

import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from llama_jax import eval as eval_lib
from llama_jax.convert import load_hf, save_hf
from llama_jax.eval import Question, perplexity, score_choices
from llama_jax.eval_harness import LlamaJaxLM
from llama_jax.tokenizer import load_tokenizer

# The harness runs take half a minute: in the slow set, which `.ci/run` runs after the suite.
pytestmark = pytest.mark.slow

# Shorter than the model's 64 tokens, so that the texts below need several rolling windows.
MAX_LENGTH = 32
TOLERANCE = 1e-4

QUESTIONS = [
    ("the cat sat on the", ["model", "mat", "grain ünï"], 1),
    ("llama jax", ["train", "token data", "x"], 0),
    ("a model of", ["the data", "llama", "café"], 2),
    ("we train the", ["model", "cat", "tokens of text"], 0),
    ("grain token", ["the", "of", "data model"], 1),
    ("on the", ["mat", "data", "jax grain"], 2),
    ("the data", ["of the model", "cat", "sat"], 0),
    ("x = y +", ["1", "model", "ünïcödé"], 1),
]
# 30 to 60 tokens each: several windows of MAX_LENGTH, one of the model's whole context.
TEXTS = [
    "the cat sat on the model data and the llama ate grain the cat sat on",
    "token data of the model train  jax grain\nthe cat sat on the mat. ",
    " leading space, ünïcödé text, and 12345 numbers\n",
    "llama jax grain token model data train of the cat sat on the mat again",
]
GEN_PROMPTS = ["the cat sat on", "llama jax", "a model of the data", "we", "grain token data of"]


def _write_tasks(root):
    """Three local tasks, one per request type, reading JSONL files beside them."""
    data = {
        "mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "ppl": [{"text": t} for t in TEXTS],
        "gen": [{"question": q, "answer": "x"} for q in GEN_PROMPTS],
    }
    for name, rows in data.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def task(name, body):
        head = (
            f"task: tiny_{name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {root / f'{name}.jsonl'}\ntest_split: test\n"
        )
        (root / f"tiny_{name}.yaml").write_text(head + body)

    task(
        "mc",
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "  - metric: acc_bytes\n",
    )
    task(
        "ppl",
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n",
    )
    task(
        "gen",
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.', 'mat']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    )


@pytest.fixture(scope="module")
def setup(small_checkpoint, tmp_path_factory):
    """(HF directory of the small checkpoint with its tokenizer, task directory, cfg, params)."""
    _, tokenizer_path, cfg, params = small_checkpoint
    root = tmp_path_factory.mktemp("harness")
    hf_dir = save_hf(params, cfg, root / "hf", tokenizer=load_tokenizer(tokenizer_path))
    cfg, params = load_hf(hf_dir)  # the config our model type reads (one compilation for both)
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    tokenizer = load_tokenizer(hf_dir)
    lengths = [len(tokenizer.encode(t, bos=True)) for t in TEXTS]
    assert all(MAX_LENGTH < n < cfg.max_seq_len for n in lengths), lengths
    return hf_dir, tasks, cfg, params


def _hf_lm(hf_dir, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(hf_dir), device="cpu", dtype="float32", max_length=MAX_LENGTH, batch_size=8, **kwargs
    )


def _evaluate(lm, tasks_dir, names):
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


@pytest.fixture(scope="module")
def harness_runs(setup):
    """The harness's results for the three tasks, with its `hf` model and with ours."""
    hf_dir, tasks, _, _ = setup
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    # tokenizer.json, as transformers reads it: SentencePiece's own file gives the same ids, but
    # decodes invalid UTF-8 (a random model's byte tokens) to other replacement characters.
    ours = LlamaJaxLM.from_files(
        hf=str(hf_dir), tokenizer=str(hf_dir / "tokenizer.json"), max_length=MAX_LENGTH, batch_size=4
    )
    return _evaluate(_hf_lm(hf_dir), tasks, names), _evaluate(ours, tasks, names)


def _responses(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


def test_registered_with_the_harness(setup):
    from lm_eval.api.registry import get_model

    assert get_model("llama_jax") is LlamaJaxLM
    hf_dir, _, cfg, _ = setup
    lm = get_model("llama_jax").create_from_arg_string(
        f"hf={hf_dir},max_length=16,add_bos=False", {"batch_size": "3", "device": "cpu"}
    )
    assert (lm.max_length, lm.batch_size, lm.add_bos, lm.cfg) == (16, 3, False, cfg)


def test_same_results_as_the_harness_hf_model(harness_runs):
    hf, ours = harness_runs
    worst = 0.0
    for task in ("tiny_mc", "tiny_ppl"):
        expected, got = _responses(hf, task), _responses(ours, task)
        assert len(expected) == len(got) == {"tiny_mc": 8, "tiny_ppl": 4}[task]
        for doc_expected, doc_got in zip(expected, got):
            for e, g in zip(doc_expected, doc_got):
                e, g = np.atleast_1d(e[0]), np.atleast_1d(g[0])  # (ll, is_greedy) or ll
                np.testing.assert_allclose(g.astype(float), e.astype(float), atol=TOLERANCE, rtol=0)
                worst = max(worst, abs(float(g[0]) - float(e[0])))
    print(f"max |loglikelihood difference| against hf: {worst:.2e}")
    assert _responses(ours, "tiny_gen") == _responses(hf, "tiny_gen")
    assert any(r[0][0] for r in _responses(ours, "tiny_gen"))  # something was generated
    for metric in ("acc,none", "acc_norm,none", "acc_bytes,none"):
        assert ours["results"]["tiny_mc"][metric] == hf["results"]["tiny_mc"][metric], metric
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        expected = hf["results"]["tiny_ppl"][metric]
        assert ours["results"]["tiny_ppl"][metric] == pytest.approx(expected, rel=1e-5), metric


def test_choice_scores_match_the_harness_and_direct_formulas(setup, harness_runs):
    hf_dir, _, cfg, params = setup
    questions = [Question(q, tuple(c), a) for q, c, a in QUESTIONS]
    scores = score_choices(params, cfg, load_tokenizer(hf_dir), questions, seq_len=MAX_LENGTH, batch_size=4)
    harness_lls = [[r[0][0] for r in doc] for doc in _responses(harness_runs[0], "tiny_mc")]
    np.testing.assert_allclose(scores.loglikelihoods, harness_lls, atol=TOLERANCE, rtol=0)
    picks = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for question, lls in zip(questions, scores.loglikelihoods):
        chars = [len(c) for c in question.choices]
        utf8 = [len(c.encode("utf-8")) for c in question.choices]
        picks["acc"].append(np.argmax(lls) == question.answer)
        picks["acc_norm"].append(np.argmax(np.divide(lls, chars)) == question.answer)
        picks["acc_bytes"].append(np.argmax(np.divide(lls, utf8)) == question.answer)
    for metric, correct in picks.items():
        assert getattr(scores, metric) == np.mean(correct)
        assert getattr(scores, metric) == harness_runs[0]["results"]["tiny_mc"][f"{metric},none"]


def test_text_measures_match_the_harness_and_direct_formulas(setup):
    """Without BOS in the text (the harness's add_bos_token=False), the harness's rolling windows
    over the model's whole context are our perplexity's windows: the same log-likelihoods, and so
    the same word and byte perplexity and bits per byte."""
    hf_dir, tasks, cfg, params = setup
    tokenizer = load_tokenizer(hf_dir)
    documents = [tokenizer.encode(t, bos=True) for t in TEXTS]
    result = perplexity(params, cfg, documents, texts=TEXTS, batch_size=4)
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert (result.words, result.text_bytes, result.windows) == (words, n_bytes, len(TEXTS))
    ll = -result.nll * result.tokens
    assert result.word_perplexity == pytest.approx(math.exp(-ll / words), rel=1e-12)
    assert result.byte_perplexity == pytest.approx(math.exp(-ll / n_bytes), rel=1e-12)
    assert result.bits_per_byte == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-12)

    lm = LlamaJaxLM.from_files(hf=str(hf_dir), add_bos=False, batch_size=4)
    harness = _evaluate(lm, tasks, ["tiny_ppl"])
    per_doc = [r[0][0] for r in _responses(harness, "tiny_ppl")]
    assert sum(per_doc) == pytest.approx(ll, abs=TOLERANCE)
    numbers = harness["results"]["tiny_ppl"]
    assert numbers["word_perplexity,none"] == pytest.approx(result.word_perplexity, rel=1e-5)
    assert numbers["byte_perplexity,none"] == pytest.approx(result.byte_perplexity, rel=1e-5)
    assert numbers["bits_per_byte,none"] == pytest.approx(result.bits_per_byte, rel=1e-5)


def test_requests_without_bos_match_hf_without_bos(setup):
    hf_dir, _, _, _ = setup
    hf = _hf_lm(hf_dir, add_bos_token=False)
    ours = LlamaJaxLM.from_files(hf=str(hf_dir), add_bos=False, max_length=MAX_LENGTH, batch_size=4)
    pairs = [("the cat ", "sat"), ("", "llama jax"), ("a model of the data" * 4, " grain token")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in expected]
    np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in expected], atol=TOLERANCE, rtol=0)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), atol=TOLERANCE, rtol=0
    )


def test_cli_runs_a_task_and_writes_the_results(setup, tmp_path, capsys):
    hf_dir, tasks, _, _ = setup
    output = tmp_path / "results.json"
    args = ["harness", "--hf", str(hf_dir), "--tasks", "tiny_mc", "--include-path", str(tasks)]
    assert eval_lib.main(args + ["--limit", "4", "--batch-size", "4", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "acc_bytes" in table
    results = json.loads(output.read_text())
    assert len(results["samples"]["tiny_mc"]) == 4 and "acc,none" in results["results"]["tiny_mc"]


def _one_sentence_error(capsys, message):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_cli_bad_input_is_one_sentence(setup, tmp_path, capsys, monkeypatch):
    hf_dir, tasks, _, _ = setup
    missing = ["harness", "--hf", str(tmp_path / "nowhere"), "--tasks", "tiny_mc"]
    assert eval_lib.main(missing) == 2
    _one_sentence_error(capsys, "does not exist")
    bad_include = ["harness", "--hf", str(hf_dir), "--tasks", "x", "--include-path", str(tmp_path / "no")]
    assert eval_lib.main(bad_include) == 2
    _one_sentence_error(capsys, "--include-path")

    # Without lm-eval installed.
    import llama_jax

    monkeypatch.delitem(sys.modules, "llama_jax.eval_harness")
    monkeypatch.delattr(llama_jax, "eval_harness")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert eval_lib.main(["harness", "--hf", str(hf_dir), "--tasks", "tiny_mc"]) == 2
    _one_sentence_error(capsys, "lm-evaluation-harness is not installed")


def test_cli_unknown_task_is_one_sentence(setup, capsys):
    # About 10 s: the harness's ~15,000 built-in tasks are indexed to be sure the name is none of them.
    hf_dir, tasks, _, _ = setup
    args = ["harness", "--hf", str(hf_dir), "--tasks", "tiny_mc,no_such_task", "--include-path", str(tasks)]
    assert eval_lib.main(args) == 2
    _one_sentence_error(capsys, "Unknown task 'no_such_task'")
