"""python -m llama_jax.posttrain.rounds: Llama 3's loop of reward model, rejection sampling, SFT
and DPO over rounds, with model averaging; resumable, and bad input is one sentence."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import train as train_lib
from llama_jax.checkpoint import load_for_inference, save_params
from llama_jax.config import ModelConfig
from llama_jax.data import synthetic
from llama_jax.model import init_params
from llama_jax.posttrain import rounds

CFG = ModelConfig(
    dim=32,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=64,
    vocab_size=556,
    max_seq_len=128,
    compute_dtype="float32",
    init_std=0.2,
)

# The experiment file the tests run (by path, as a user would). Short replies score higher (the
# checker), so rejection sampling keeps the shortest reply of each prompt.
EXPERIMENT = """
from llama_jax.config import *
from llama_jax.data.config import DataConfig, sft_source

ROOT = {root!r}


def experiment():
    return Experiment(
        name="test_rounds",
        model=ModelConfig(**{cfg!r}),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(peak_lr=1e-3, warmup_steps=1, final_lr_ratio=1.0),
        train=TrainConfig(steps=2, batch_size=8, seq_len=128, log_every=1, eval_every=100, sample_tokens=0),
        checkpoint=CheckpointConfig(every_steps=0),
        data=DataConfig(sources=(sft_source(ROOT + "/chats.jsonl"),), tokenizer_path=ROOT + "/tok/tiktoken.model"),
        eval_data=None,
        init_from=ROOT + "/base",
        posttrain=PosttrainConfig(eval_fraction=0.25),
        rounds=RoundsConfig(
            rounds=2,
            prompts=(ROOT + "/prompts.jsonl",),
            eval_prompts=(ROOT + "/heldout.jsonl",),
            score_fn=ROOT + "/scoring.py:short",
            k=3,
            dpo_k=3,
            max_new_tokens=6,
            dpo=("train.steps=1",),
            {extra}
        ),
    )
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    tokenizer = synthetic.write_tiktoken_model(str(root / "tok"))
    assert Path(tokenizer) == root / "tok" / "tiktoken.model"
    save_params(root / "base", init_params(CFG, jax.random.key(0)), CFG)
    chats = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(16)
    ]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"add {i}"}) + "\n" for i in range(8))
    )
    (root / "heldout.jsonl").write_text(
        "".join(json.dumps({"id": f"h{i}", "prompt": f"sum {i}"}) + "\n" for i in range(4))
    )
    (root / "scoring.py").write_text("def short(prompt, response):\n    return -float(len(response))\n")
    pairs = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no no no"} for i in range(8)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def _experiment_file(root: Path, name: str, extra: str = "") -> str:
    fields = {f: getattr(CFG, f) for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")}
    fields.update(vocab_size=CFG.vocab_size, max_seq_len=CFG.max_seq_len, compute_dtype="float32")
    path = root / f"{name}.py"
    path.write_text(EXPERIMENT.format(root=str(root), cfg=fields, extra=extra))
    return str(path)


# --- the rules, against direct statements of them --------------------------------------------


def test_the_average_goes_on_only_where_it_is_at_least_as_good():
    assert rounds.choose_average({"a": 0.5, "b": 0.7}, 0.7) == "average"  # a tie: the average
    assert rounds.choose_average({"a": 0.5, "b": 0.7}, 0.69) == "b"
    assert rounds.choose_average({"a": 0.9, "b": 0.7}, 0.1) == "a"


def test_the_best_of_a_round_and_the_kept_samples():
    assert rounds.best_of_round({"previous": 0.1, "sft": 0.6, "dpo": 0.5}) == "sft"
    assert rounds.best_of_round({"previous": 0.1, "sft": 0.6, "dpo": 0.6}) == "dpo"  # a tie: the later step
    assert rounds.best_of_round({"previous": 0.7, "sft": 0.6, "dpo": 0.5}) == "previous"  # never back
    assert rounds.best_of_round({"previous": 0.6, "sft": 0.6}) == "sft"
    assert rounds.best_of_round({"previous": None, "sft": None, "dpo": None}) == "dpo"  # no scores: the last
    records = [
        {"id": "a", "messages": [1], "chosen_score": 1.0, "finished": [False, True]},
        {"id": "b", "messages": [2], "chosen_score": 0.0, "finished": [True, True]},
        {"id": "c", "messages": [3], "chosen_score": 1.0, "finished": [False, False]},
    ]
    assert [r["id"] for r in rounds.kept_samples(records, 1.0)] == ["a"]
    assert [r["id"] for r in rounds.kept_samples(records, float("-inf"))] == ["a", "b"]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (['rounds.score_fn=""'], "The loop has no scorer"),
        (["rounds.prompts=[/nowhere.jsonl]"], "rounds.prompts names /nowhere.jsonl, which does not exist"),
        (["rounds.score_fn=/nowhere.py:f"], "/nowhere.py"),
        (["init_from=/no/such/run"], "init_from names /no/such/run, which does not exist"),
        (["rounds.sft_variants=[train.seed=1]"], "lists one variant"),
        (
            ["rounds.eval_prompts=[]", "rounds.sft_variants=[train.seed=1,train.seed=2]"],
            "give rounds.eval_prompts",
        ),
        (["rounds.dpo_variants=[train.stepz=1,train.seed=2]"], "Unknown override key 'train.stepz'"),
        (["rounds.rm=[optim.peak_lr=fast]"], "optim.peak_lr=fast"),
        (["rounds.dpo_k=1"], "rounds.dpo_k must be at least 2"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(files, tmp_path, capsys, overrides, message):
    exp = _experiment_file(files, "bad")
    code = rounds.main(["--exp", exp, "--workdir", str(tmp_path / "w"), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err


def test_train_refuses_a_loop_and_names_the_command(files, tmp_path, capsys):
    assert train_lib.main(["--exp", _experiment_file(files, "loop"), "--workdir", str(tmp_path / "w")]) == 2
    assert "python -m llama_jax.posttrain.rounds --exp" in capsys.readouterr().err


# --- real loops ------------------------------------------------------------------------------


def _marker_times(workdir: Path) -> dict[str, float]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime for p in workdir.rglob("round_step_done.json")}


@pytest.mark.slow  # two real rounds, killed and resumed: after the suite
def test_two_rounds_with_a_reward_model_killed_and_resumed(files, tmp_path):
    exp = _experiment_file(files, "rm_loop", extra=f"preferences=({str(files / 'prefs.jsonl')!r},),")
    workdir = tmp_path / "loop"
    command = [sys.executable, "-m", "llama_jax.posttrain.rounds", "--exp", exp, "--workdir", str(workdir)]
    # Killed once round 1's SFT model is written, before its DPO finishes.
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    sft_done = workdir / "round1" / "sft" / "round_step_done.json"
    deadline = time.time() + 600
    while not sft_done.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = _marker_times(workdir)
    assert "round1/sft/round_step_done.json" in before and not (workdir / "round1" / "round.json").exists()

    assert rounds.main(["--exp", exp, "--workdir", str(workdir), "--quiet"]) == 0
    after = _marker_times(workdir)
    assert all(after[name] == when for name, when in before.items()), "a finished step ran again"
    summary = json.loads((workdir / "summary.json").read_text())
    first, second = summary["rounds"]
    # Each round trained its reward model and sampled with it; round 2 trained on files 1..2 (the one).
    for r, result in enumerate((first, second), start=1):
        assert result["rm"] == str(workdir / f"round{r}" / "rm")
        _, rm_params = load_for_inference(result["rm"])
        assert "score" in rm_params
        records = [json.loads(line) for line in (workdir / f"round{r}" / "rs.jsonl").read_text().splitlines()]
        assert len(records) == 8 and all(len(rec["scores"]) == 3 for rec in records)
        kept = (workdir / f"round{r}" / "samples.jsonl").read_text().splitlines()
        assert result["samples"]["kept"] == len(kept) == sum(any(rec["finished"]) for rec in records)
        assert result["samples"]["best_score"] == pytest.approx(
            np.mean([rec["chosen_score"] for rec in records])
        )
    # Round 2 samples from round 1's best model, the one with the higher held-out score (the
    # checker's: the mean of -len(greedy reply)).
    scores = {"previous": first["policy_heldout"]}
    scores.update({s: first[s]["heldout"] for s in ("sft", "dpo") if s in first})
    assert first["best"] == rounds.best_of_round(scores) and first["best_heldout"] == max(scores.values())
    best_path = first["policy"] if first["best"] == "previous" else first[first["best"]]["path"]
    assert second["policy"] == first["best_path"] == best_path
    # Each round scores the model it sampled from as it scores its own.
    replies = [
        json.loads(line) for line in (workdir / "round2" / "eval_policy.jsonl").read_text().splitlines()
    ]
    assert second["policy_heldout"] == pytest.approx(np.mean([-len(r["chosen"]) for r in replies]))
    for step, result in (("sft", first["sft"]), ("sft", second["sft"])):
        replies = [
            json.loads(line)
            for line in (Path(result["path"]).parent / f"eval_{step}.jsonl").read_text().splitlines()
        ]
        assert result["heldout"] == pytest.approx(np.mean([-len(r["chosen"]) for r in replies]))
    # Round 2's SFT data: the experiment's chats plus the kept samples of rounds 1 and 2 (a round
    # that kept none adds no file).
    recorded = json.loads((workdir / "round2" / "sft" / "experiment.json").read_text())
    sources = recorded["data"]["sources"]
    kept_files = [
        str(workdir / f"round{r}" / "samples.jsonl")
        for r in (1, 2)
        if (workdir / f"round{r}" / "samples.jsonl").read_text()
    ]
    assert kept_files, "neither round kept a sample"
    assert len(sources) == 2 and sources[1]["path"] == kept_files
    assert recorded["init_from"] == str(files / "base")  # SFT starts from the pretrained model every round
    if "dpo" in second:
        assert (
            json.loads((workdir / "round2" / "dpo" / "experiment.json").read_text())["init_from"]
            == second["sft"]["path"]
        )
    assert "| round |" in (workdir / "summary.md").read_text()

    # The same command with one more round adds it and leaves the first two alone.
    times = _marker_times(workdir)
    assert rounds.main(["--exp", exp, "--workdir", str(workdir), "--quiet", "rounds.rounds=3"]) == 0
    assert all(_marker_times(workdir)[name] == when for name, when in times.items())
    third = json.loads((workdir / "summary.json").read_text())["rounds"][2]
    assert third["policy"] == second["best_path"]
    # Another experiment in the same workdir is refused.
    assert rounds.main(["--exp", exp, "--workdir", str(workdir), "--quiet", "rounds.k=4"]) == 2


@pytest.mark.slow  # a real round with averaged SFT variants: after the suite
def test_variants_are_averaged_and_the_average_goes_on_only_if_as_good(files, tmp_path):
    exp = _experiment_file(
        files,
        "variants",
        extra='sft_variants=("optim.peak_lr=3e-3 train.seed=1", "optim.peak_lr=1e-2 train.seed=2"),',
    )
    workdir = tmp_path / "avg"
    assert rounds.main(["--exp", exp, "--workdir", str(workdir), "--quiet", "rounds.rounds=1"]) == 0
    sft = json.loads((workdir / "summary.json").read_text())["rounds"][0]["sft"]
    round_dir = workdir / "round1"
    # The average is the mean of the two variants' parameters.
    members = [load_for_inference(round_dir / f"sft_v{i}")[1] for i in (0, 1)]
    _, average = load_for_inference(round_dir / "sft_avg")
    for a, b, mean in zip(*(jax.tree.leaves(p) for p in (*members, average))):
        np.testing.assert_allclose(mean, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)
    # The variants differ (their learning rates), and the choice follows the held-out scores.
    assert not np.allclose(jax.tree.leaves(members[0])[0], jax.tree.leaves(members[1])[0])
    assert set(sft["variants"]) == {"sft_v0", "sft_v1"}
    by_path = {str(round_dir / name): score for name, score in sft["variants"].items()}
    chosen = rounds.choose_average(by_path, sft["average"])
    assert sft["path"] == (str(round_dir / "sft_avg") if chosen == "average" else chosen)
    assert sft["heldout"] == max([sft["average"], *sft["variants"].values()])
    assert json.loads((round_dir / "sft_v1" / "experiment.json").read_text())["optim"]["peak_lr"] == 1e-2


def test_a_round_begun_from_another_model_is_moved_aside_not_reused(tmp_path):
    """A round's samples and models belong to the model it sampled from: started again from
    another one, the earlier work is kept aside and the round begins empty."""
    from types import SimpleNamespace

    loop = SimpleNamespace(log=lambda message: None)
    round_dir = tmp_path / "round2"
    rounds.Loop._start_round(loop, round_dir, "/runs/a")
    (round_dir / "rs.jsonl.done").touch()
    rounds.Loop._start_round(loop, round_dir, "/runs/a")  # the same model: the work stays
    assert (round_dir / "rs.jsonl.done").exists()
    rounds.Loop._start_round(loop, round_dir, "/runs/b")
    aside = tmp_path / "round2.from-another-policy-1"
    assert (aside / "rs.jsonl.done").exists() and json.loads((aside / "policy.json").read_text())[
        "policy"
    ] == "/runs/a"
    assert sorted(p.name for p in round_dir.iterdir()) == ["policy.json"]
    rounds.Loop._start_round(loop, round_dir, "/runs/a")
    assert (tmp_path / "round2.from-another-policy-2").is_dir()


def test_round_one_samples_from_a_hugging_face_download(files, hf_model_dir, tmp_path):
    """init_from a Hugging Face directory, as a user starts from released weights: the loop takes
    its tokenizer and samples from it as `rejection_sample --hf` does."""
    import shutil

    from llama_jax import rejection_sample
    from llama_jax.config import Experiment, RoundsConfig
    from llama_jax.data.config import DataConfig, sft_source
    from llama_jax.data.synthetic import write_sentencepiece_model

    _, hf_dir = hf_model_dir(vocab_size=320)
    shutil.copy(write_sentencepiece_model(str(tmp_path / "tok"), vocab_size=320), hf_dir / "tokenizer.model")
    exp = Experiment(
        name="hf_rounds",
        init_from=str(hf_dir),
        data=DataConfig(sources=(sft_source(str(files / "chats.jsonl")),), tokenizer_path=""),
        rounds=RoundsConfig(
            prompts=(str(files / "prompts.jsonl"),),
            eval_prompts=(str(files / "heldout.jsonl"),),
            score_fn=f"{files / 'scoring.py'}:short",
            max_new_tokens=5,
        ),
    )
    loop = rounds.Loop(exp, tmp_path / "loop", quiet=True)
    assert loop.tokenizer == str(hf_dir / "tokenizer.model")
    scorer = ["--score", exp.rounds.score_fn]
    score = loop.heldout(str(hf_dir), tmp_path / "loop" / "eval_policy.jsonl", scorer)
    direct = tmp_path / "direct.jsonl"
    argv = ["--hf", str(hf_dir), "--prompts", str(files / "heldout.jsonl"), "--out", str(direct), *scorer]
    assert (
        rejection_sample.main(argv + ["--k", "1", "--temperature", "0", "--max-new-tokens", "5", "--quiet"])
        == 0
    )
    replies = [json.loads(line)["chosen"] for line in direct.read_text().splitlines()]
    ours = [
        json.loads(line)["chosen"]
        for line in (tmp_path / "loop" / "eval_policy.jsonl").read_text().splitlines()
    ]
    assert ours == replies and score == pytest.approx(np.mean([-len(r) for r in replies]))

    # A Meta directory is refused in one sentence: the sampler does not read it.
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(rounds.RoundsError, match="a Meta directory, which the sampler does not read"):
        rounds.Loop(exp.replace(init_from=str(meta)), tmp_path / "loop2", quiet=True)


def test_paths_are_made_absolute_so_a_loop_resumes_from_anywhere(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files)
    exp = _loop_experiment(files).replace(init_from="base")
    exp = exp.replace(rounds=dataclasses.replace(exp.rounds, prompts=("prompts.jsonl",)))
    loop = rounds.Loop(exp, "relative_loop", quiet=True)
    assert loop.workdir == files / "relative_loop"
    assert loop.exp.init_from == str(files / "base") and loop.cfg.prompts == (str(files / "prompts.jsonl"),)
    assert loop.cfg.eval_prompts == (str(files / "heldout.jsonl"),)


def test_a_step_stopped_on_request_is_not_marked_finished(files, tmp_path, monkeypatch):
    """SIGTERM (or a preemption) makes the trainer save and return early: the step must not count
    as finished, and the same command finishes it."""
    from llama_jax import trainer

    loop = rounds.Loop(_loop_experiment(files), tmp_path / "loop", quiet=True)
    sft = loop.step_experiment("sft", 1, loop.exp.data.sources, loop.exp.init_from)
    workdir = tmp_path / "loop" / "round1" / "sft"
    with monkeypatch.context() as patch:
        patch.setattr(trainer.StopRequest, "should_stop", lambda self, step: True)  # as after SIGTERM
        with pytest.raises(rounds.Interrupted, match="stopped at step 1 of 2"):
            loop.train(sft, workdir)
    assert not (workdir / "round_step_done.json").exists()
    loop.train(sft, workdir)  # resumes from the saved step and finishes
    assert json.loads((workdir / "round_step_done.json").read_text())["metrics"]
    assert (workdir / "checkpoints" / "2").is_dir()


def _loop_experiment(files):
    from llama_jax.config import load_experiment

    return load_experiment(_experiment_file(files, "direct"))


def test_a_variant_with_an_unclosed_quote_is_one_sentence(files, tmp_path, capsys):
    exp = _experiment_file(files, "quote", extra="""sft_variants=('train.seed=1 "x', "train.seed=2"),""")
    assert rounds.main(["--exp", exp, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: The variant ") and "No closing quotation" in err and len(err.splitlines()) == 1
    )
