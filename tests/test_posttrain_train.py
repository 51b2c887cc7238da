"""SFT, reward model and DPO through train.train and the CLI: the chain of checkpoints, the
reported metrics, DPO's reference (precomputed = online, = the starting model), bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from llama_jax import train as train_lib
from llama_jax.checkpoint import save_params
from llama_jax.config import (
    CheckpointConfig,
    Experiment,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    PosttrainConfig,
    TrainConfig,
)
from llama_jax.data import synthetic
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.model import init_params
from llama_jax.posttrain.data import sft_source

# Every stage trains for real here (an SFT run others start from): after the suite.
pytestmark = pytest.mark.slow

MODEL = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=556,
    max_seq_len=64,
    compute_dtype="float32",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("posttrain")
    rng = np.random.default_rng(0)
    chats, pairs = [], []
    for _ in range(160):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"{a}+{b}"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        )
        pairs.append({"prompt": f"{a}+{b}", "chosen": str(a + b), "rejected": "no idea at all", "margin": 1})
    for name, records in (("chats", chats), ("pairs", pairs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {
        "root": root,
        "tokenizer": synthetic.write_tiktoken_model(str(root / "tok")),
        "chats": str(root / "chats.jsonl"),
        "pairs": str(root / "pairs.jsonl"),
    }


def _experiment(files, stage, steps, init_from="", **settings):
    source = sft_source(files["chats"]) if stage == "sft" else SourceConfig(files["pairs"])
    return Experiment(
        name=f"test_{stage}",
        model=MODEL,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=2, final_lr_ratio=1.0),
        train=TrainConfig(
            steps=steps, batch_size=8, seq_len=64, log_every=1, eval_every=steps, sample_tokens=0
        ),
        checkpoint=CheckpointConfig(every_steps=0),
        data=DataConfig(sources=(source,), tokenizer_path=files["tokenizer"] if stage == "sft" else ""),
        eval_data=None,
        posttrain=PosttrainConfig(stage=stage, **settings),
        init_from=init_from,
    )


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(files):
    workdir = files["root"] / "sft"
    train_lib.train(_experiment(files, "sft", 30), workdir, quiet=True)
    return workdir


def test_sft_learns_and_records_its_tokenizer(sft_run, files):
    losses = [row["loss"] for row in _metrics(sft_run) if "loss" in row]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    recorded = json.loads((sft_run / "experiment.json").read_text())
    assert recorded["data"]["tokenizer_path"] == files["tokenizer"]
    assert recorded["posttrain"]["stage"] == "sft"


def test_reward_model_from_sft_reports_held_out_accuracy(sft_run, files):
    exp = _experiment(files, "rm", 30, init_from=str(sft_run), use_margin=True, eval_fraction=0.1)
    out = train_lib.train(exp, files["root"] / "rm", quiet=True)
    # The backbone came from the SFT checkpoint (its tokenizer too): the embeddings moved little.
    from llama_jax.checkpoint import load_for_inference

    _, sft_params = load_for_inference(sft_run)
    moved = np.abs(
        np.asarray(out["state"].params["backbone"]["tok_embeddings"])
        - np.asarray(sft_params["tok_embeddings"])
    ).max()
    assert moved < 0.5
    assert set(out["state"].params["score"]) == {"kernel", "bias"}
    assert out["eval_accuracy"] == 1.0  # an easy preference, learnt
    assert out["eval_chosen_score"] > out["eval_rejected_score"] + 1.0
    rows = [r for r in _metrics(files["root"] / "rm") if "eval_accuracy" in r]
    assert len(rows) == 1 and rows[0]["step"] == 30


def test_dpo_reference_precomputed_equals_online_and_starts_at_the_policy(sft_run, files):
    results = {}
    for mode in ("precompute", "online"):
        exp = _experiment(files, "dpo", 3, init_from=str(sft_run), reference_logprobs=mode, beta=0.5)
        if mode == "online":  # also: two microbatches give the one-batch step
            exp = exp.replace(train=dataclasses.replace(exp.train, microbatches=2), mesh=MeshConfig(1, 4, 2))
        train_lib.train(exp, files["root"] / f"dpo_{mode}", quiet=True)
        results[mode] = _metrics(files["root"] / f"dpo_{mode}")
    for a, b in zip(*results.values()):
        assert a.keys() == b.keys()
        for key in a:
            # At step 1 the margins are 0 up to rounding, so their sign (accuracy) is noise.
            timing = key in ("tokens_per_s", "step_time_s", "mfu", "goodput", "wall_s") or key.startswith(
                "lost_"
            )
            if not timing and (key, a["step"]) != ("accuracy", 1):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    first = results["precompute"][0]
    # Step 1: the policy is the reference, so rewards and margin are 0 and the loss is
    # log 2 + 0.2 x the chosen NLL.
    assert first["margin"] == pytest.approx(0.0, abs=1e-5) and first["chosen_reward"] == pytest.approx(
        0.0, abs=1e-5
    )
    assert first["loss"] == pytest.approx(np.log(2) + 0.2 * first["chosen_nll"], rel=1e-5)
    steps = [r for r in results["precompute"] if "loss" in r]
    assert len(steps) == 3 and steps[-1]["margin"] > 0  # and the preference is being learnt
    evaluated = [r for r in results["precompute"] if "eval_loss" in r]
    assert len(evaluated) == 1 and {"eval_accuracy", "eval_margin", "eval_chosen_reward"} <= set(evaluated[0])


@pytest.fixture(scope="module")
def other_shape_checkpoint(files):
    other = MODEL.replace(n_layers=3)
    return save_params(files["root"] / "other", init_params(other, jax.random.key(0)), other)


def _run_cli(exp, workdir, overrides, capsys, monkeypatch):
    monkeypatch.setattr(train_lib, "load_experiment", lambda name: exp)
    code = train_lib.main(["--exp", "x", "--workdir", str(workdir)] + overrides)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "case,message",
    [
        (
            "reference",
            "The reference checkpoint {other} is a model of another shape (n_layers 3 where the "
            "experiment has 2).",
        ),
        (
            "init",
            "init_from {other} is a model of another architecture (n_layers 3 where the experiment has 2)",
        ),
        ("no_tokenizer", "The dpo stage needs data.tokenizer_path"),
        ("missing", "init_from /nonexistent does not exist."),
        ("bad_pairs", "has no usable preference pairs"),
        ("stage", "posttrain.stage must be one of sft, rm, dpo, ppo"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(
    case, message, files, sft_run, other_shape_checkpoint, tmp_path, capsys, monkeypatch
):
    exp = _experiment(files, "dpo", 1, init_from=str(sft_run))
    overrides = {
        "reference": [f"posttrain.reference={other_shape_checkpoint}"],
        "init": [
            f"init_from={other_shape_checkpoint}",
            f"data.tokenizer_path={files['tokenizer']}",
        ],
        "no_tokenizer": ["init_from=''"],
        "missing": ["init_from=/nonexistent", f"data.tokenizer_path={files['tokenizer']}"],
        "bad_pairs": [f"data.sources.0.path={files['chats']}"],
        "stage": ["posttrain.stage=ppx"],
    }[case]
    code, err = _run_cli(exp, tmp_path / "run", overrides, capsys, monkeypatch)
    assert code == 2, err
    # Skipped records are warned about (see test_posttrain_data); the error is one last line.
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and message.format(other=other_shape_checkpoint) in last, err
    assert "Traceback" not in err and all(line.startswith("WARNING") for line in err.splitlines()[:-1])


@pytest.mark.parametrize(
    "name,message",
    [
        ("tiny_sft", "error: No such file or directory: data/tiny_sft.jsonl."),
        ("tiny_rm", "error: init_from runs/tiny_sft does not exist."),
        ("tiny_dpo", "error: init_from runs/tiny_sft does not exist."),
        ("tiny_ppo", "error: init_from runs/tiny_sft does not exist."),
    ],
)
def test_experiment_files_point_at_their_inputs(name, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where data/ and runs/ do not exist
    assert train_lib.main(["--exp", name, "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip() == message


LORA = LoraConfig(rank=8, alpha=16.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


@pytest.fixture(scope="module")
def sft_lora_run(sft_run, files):
    exp = _experiment(files, "sft", 12, init_from=str(sft_run)).replace(lora=LORA)
    workdir = files["root"] / "sft_lora"
    return workdir, train_lib.train(exp, workdir, quiet=True)


def test_lora_sft_trains_adapters_alone_and_writes_peft_files(sft_lora_run, sft_run):
    from llama_jax import lora as lora_lib
    from llama_jax.checkpoint import CheckpointError, load_for_inference
    from llama_jax.convert.peft import load_peft
    from llama_jax.init_from import load_model, source_params

    workdir, out = sft_lora_run
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(out["state"].params)]
    assert names and all(n.endswith(("_lora_a']", "_lora_b']")) for n in names)
    losses = [row["loss"] for row in _metrics(workdir) if "loss" in row]
    assert len(losses) == 12 and np.isfinite(losses).all()
    # The adapters, in PEFT's layout, are the state's.
    lora, adapters = load_peft(workdir / "adapter", MODEL)
    assert lora.rank == 8 and set(lora.targets) == set(LORA.targets)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(out["state"].params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # A LoRA run's checkpoint is not a whole model by itself: one sentence says how to merge it...
    with pytest.raises(CheckpointError, match="holds LoRA adapters, not a whole model"):
        load_for_inference(workdir)
    # ...and as a starting point it comes folded into the base it recorded.
    cfg, merged = load_model(workdir)
    assert cfg.lora is None
    expected = lora_lib.merged_weights(lora_lib.merge(source_params(sft_run, MODEL), adapters), lora)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    moved = np.abs(
        merged["layers"]["attention"]["wq"] - source_params(sft_run, MODEL)["layers"]["attention"]["wq"]
    )
    assert moved.max() > 0


def test_lora_dpo_reference_is_the_base_with_adapters_off(sft_lora_run, files):
    # From the LoRA SFT run (its adapters folded into its base), with fresh adapters.
    exp = _experiment(files, "dpo", 4, init_from=str(sft_lora_run[0]), beta=0.5).replace(lora=LORA)
    workdir = files["root"] / "dpo_lora"
    train_lib.train(exp, workdir, quiet=True)
    steps = [r for r in _metrics(workdir) if "loss" in r]
    first = steps[0]
    # Step 1: B = 0, so the policy computes its reference (the base), up to the compiler's
    # different fusions of the two forward passes.
    assert first["margin"] == pytest.approx(0.0, abs=1e-5) and first["chosen_reward"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert first["loss"] == pytest.approx(np.log(2) + 0.2 * first["chosen_nll"], rel=1e-5)
    assert len(steps) == 4 and steps[-1]["margin"] > 0


def test_lora_reward_model_trains_its_head_and_adapters(sft_run, files):
    exp = _experiment(files, "rm", 20, init_from=str(sft_run), eval_fraction=0.1).replace(lora=LORA)
    out = train_lib.train(exp, files["root"] / "rm_lora", quiet=True)
    assert set(out["state"].params) == {"backbone", "score"}
    assert np.abs(np.asarray(out["state"].params["score"]["kernel"])).max() > 0
    assert out["eval_accuracy"] >= 0.9
