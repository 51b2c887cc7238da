"""python -m llama_jax.rejection_sample: best (and worst) of K by a scoring function or a reward
model, batched and resumable; bad input is one sentence and exit 2."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import rejection_sample
from llama_jax.checkpoint import save_params
from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.data import synthetic
from llama_jax.model import init_params
from llama_jax.posttrain.reward import RewardModelScorer
from llama_jax.scalar_model import ScalarModel, last_token_values

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=556,
    max_seq_len=96,
    compute_dtype="float32",
    init_std=0.2,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    policy = save_params(root / "policy", init_params(CFG, jax.random.key(0)), CFG)
    rm_params = nn.meta.unbox(
        ScalarModel(CFG).init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    rm_params["score"]["kernel"] = jax.random.normal(jax.random.key(2), (CFG.dim, 1))
    reward_model = save_params(root / "rm", rm_params, CFG)
    prompts = [{"prompt": f"{i}+{i}", "id": f"p{i}", "answer": 2 * i} for i in range(5)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "first3.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:3]))
    (root / "scoring.py").write_text(
        "def by_length(prompt, response):\n"
        "    assert prompt['messages'][-1]['role'] == 'user' and 'answer' in prompt\n"
        "    return float(len(response))\n"
    )
    return {
        "root": root,
        "policy": str(policy),
        "rm": str(reward_model),
        "rm_params": rm_params,
        "tokenizer": synthetic.write_tiktoken_model(str(root / "tok")),
    }


def _args(setup, out, *extra, prompts="prompts.jsonl"):
    return [
        "--ckpt",
        setup["policy"],
        "--tokenizer",
        setup["tokenizer"],
        "--prompts",
        str(setup["root"] / prompts),
        "--out",
        str(out),
        "--k",
        "4",
        "--batch-prompts",
        "2",
        "--max-new-tokens",
        "12",
        "--quiet",
        *extra,
    ]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_and_worst_by_a_function_and_resume(setup, tmp_path):
    out = tmp_path / "pairs.jsonl"
    score = ["--score", f"{setup['root'] / 'scoring.py'}:by_length", "--pairs"]
    assert rejection_sample.main(_args(setup, out, *score, prompts="first3.jsonl")) == 0
    assert [r["id"] for r in _read(out)] == ["p0", "p1", "p2"]
    with open(out, "a") as f:  # a run killed while writing
        f.write('{"id": "p3", "prom')
    assert rejection_sample.main(_args(setup, out, *score)) == 0
    records = _read(out)
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3", "p4"]  # each prompt once
    for r in records:
        assert len(r["scores"]) == len(r["finished"]) == 4
        # Among the samples that finished (all of them if none did).
        eligible = [s for s, f in zip(r["scores"], r["finished"]) if f] or r["scores"]
        assert r["chosen_score"] == max(eligible) == len(r["chosen"])
        if "rejected" in r:
            assert r["rejected_score"] == min(eligible) == len(r["rejected"]) < r["chosen_score"]
        else:
            assert min(eligible) == max(eligible)
        assert r["messages"] == r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]
    assert any("rejected" in r for r in records)


def test_reward_model_scores(setup, tmp_path):
    out = tmp_path / "best.jsonl"
    assert rejection_sample.main(_args(setup, out, "--reward-model", setup["rm"])) == 0
    records = _read(out)
    assert len(records) == 5
    for r in records:
        eligible = [s for s, f in zip(r["scores"], r["finished"]) if f] or r["scores"]
        assert "rejected" not in r and r["chosen_score"] == max(eligible)
        assert len(set(r["scores"])) > 1


def test_reward_model_scorer_pads_without_changing_scores(setup):
    rng = np.random.default_rng(0)
    sequences = [list(rng.integers(1, CFG.vocab_size, n)) for n in (5, 17, 40)]
    scorer = RewardModelScorer(CFG, setup["rm_params"], batch_size=2, bucket=16)
    got = scorer.score_tokens(sequences)
    direct = jax.jit(
        lambda p, t: last_token_values(ScalarModel(CFG).apply({"params": p}, t), jnp.ones_like(t))
    )
    for sequence, score in zip(sequences, got):  # each alone, unpadded
        expected = float(direct(setup["rm_params"], jnp.asarray([sequence], jnp.int32))[0])
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--score", "no_such_module_xyz:f"], "Cannot import no_such_module_xyz"),
        (["--score", "scoring"], "is not of the form module:function"),
        (["--score", "json:no_such_function"], "json has no function 'no_such_function'"),
        (["--score", "json:dumps", "--pairs", "--k", "1"], "--pairs needs --k of at least 2"),
        (["--reward-model", "POLICY"], "is a language model, not a reward model"),
        (["--reward-model", "/nonexistent"], "The reward model /nonexistent does not exist"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(setup, tmp_path, capsys, extra, message):
    extra = [setup["policy"] if x == "POLICY" else x for x in extra]
    assert rejection_sample.main(_args(setup, tmp_path / "o.jsonl", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_bad_prompts_file_and_foreign_output(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    args = _args(setup, tmp_path / "o.jsonl", "--score", "json:dumps")
    args[args.index("--prompts") + 1] = str(bad)
    assert rejection_sample.main(args) == 2
    assert "has no usable prompts" in capsys.readouterr().err
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "not ours"}\n')
    assert rejection_sample.main(_args(setup, foreign, "--score", "json:dumps")) == 2
    assert "is not a record of an earlier run" in capsys.readouterr().err


def test_bucketed_prompt_padding_does_not_change_generation():
    from llama_jax.generate import generate

    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    plain = generate(params, CFG, prompts, SamplingConfig(6))
    assert generate(params, CFG, prompts, SamplingConfig(6), prompt_bucket=32) == plain


def test_a_scoring_file_may_define_dataclasses(tmp_path):
    from llama_jax.posttrain.reward import load_function

    (tmp_path / "checker.py").write_text(
        "import dataclasses\n\n@dataclasses.dataclass(frozen=True)\nclass Settings:\n    bonus: float = 1.0\n\n"
        "def score(prompt, response):\n    return Settings().bonus * (response == prompt['answer'])\n"
    )
    fn = load_function(f"{tmp_path / 'checker.py'}:score")
    assert fn({"answer": "7"}, "7") == 1.0 and fn({"answer": "7"}, "8") == 0.0


def test_two_reward_models_combine_as_llama_2_does():
    """SafetyGatedScorer: the safety score where the prompt is tagged unsafe or sigmoid(safety)
    < 0.15, the helpfulness score otherwise (checked against the rule written out per response)."""
    from llama_jax.posttrain.reward import FunctionScorer, SafetyGatedScorer, ScoringError, load_scorer

    rng = np.random.default_rng(0)
    helpful_scores, safety_scores = rng.normal(size=64) * 3, rng.normal(size=64) * 3
    records = [{"prompt": str(i), "unsafe": i % 5 == 0} for i in range(64)]
    lookup = lambda table: FunctionScorer(lambda r, t: table[int(r["prompt"])], "t")  # noqa: E731
    scorer = SafetyGatedScorer(lookup(helpful_scores), lookup(safety_scores))
    got = scorer(records, [[]] * 64, [[]] * 64, [""] * 64)
    sigmoid = 1 / (1 + np.exp(-safety_scores))
    expected = [
        s if (r["unsafe"] or p < 0.15) else h
        for r, h, s, p in zip(records, helpful_scores, safety_scores, sigmoid)
    ]
    np.testing.assert_array_equal(got, expected)
    by_safety = [r["unsafe"] or p < 0.15 for r, p in zip(records, sigmoid)]
    assert 0 < sum(by_safety) < 64 and scorer.safety_share == np.mean(by_safety)
    # Through load_scorer (as PPO and rejection sampling call it); bad input is one sentence.
    combined = load_scorer(score_fn="json:dumps", safety_score_fn="json:dumps", safety_threshold=0.3)
    assert isinstance(combined, SafetyGatedScorer) and combined.threshold == 0.3
    with pytest.raises(ScoringError, match="safety reward model or a safety scoring function"):
        load_scorer(score_fn="json:dumps", safety_reward_model="x", safety_score_fn="json:dumps")
    with pytest.raises(ScoringError, match=r"probability in \(0, 1\)"):
        load_scorer(score_fn="json:dumps", safety_score_fn="json:dumps", safety_threshold=1.5)


@pytest.mark.slow  # a sampling run: after the suite
def test_rejection_sampling_with_a_safety_model(setup, tmp_path):
    """--safety-score: responses to prompts tagged unsafe are ranked by the safety function."""
    root = setup["root"]
    prompts = [{"prompt": f"{i}+{i}", "id": f"p{i}", "answer": 2 * i, "unsafe": i % 2 == 0} for i in range(4)]
    (root / "tagged.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "safety.py").write_text("def short(prompt, response):\n    return 1000.0 - len(response)\n")
    out = tmp_path / "o.jsonl"
    extra = ["--score", f"{root / 'scoring.py'}:by_length", "--safety-score", f"{root / 'safety.py'}:short"]
    # Safety scores near 1000 are never below the threshold: only the tag sends a prompt to safety.
    extra += ["--safety-threshold", "0.5"]
    assert rejection_sample.main(_args(setup, out, *extra, prompts="tagged.jsonl")) == 0
    for r in _read(out):
        eligible = [s for s, f in zip(r["scores"], r["finished"]) if f] or r["scores"]
        assert r["chosen_score"] == max(eligible)
        unsafe = int(r["id"][1:]) % 2 == 0
        assert r["chosen_score"] == (1000 - len(r["chosen"]) if unsafe else len(r["chosen"]))
