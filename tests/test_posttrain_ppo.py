"""PPO: the rollout layout, one iteration's advantages against a direct computation, a short run
that learns from a scoring function, its checkpoint as a policy, resume, and bad settings."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import train as train_lib
from llama_jax.checkpoint import load_for_inference
from llama_jax.config import (
    CheckpointConfig,
    Experiment,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    PosttrainConfig,
    PPOConfig,
    TrainConfig,
)
from llama_jax.data import synthetic
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.model import Llama, init_params
from llama_jax.optim import make_optimizer
from llama_jax.posttrain.ppo import PPOState, make_ppo_functions, rollout_batch
from llama_jax.scalar_model import ScalarModel
from llama_jax.steps import NONFINITE

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=556,
    max_seq_len=64,
    compute_dtype="float32",
    init_std=0.1,
)


def test_rollout_batch_layout():
    batch = rollout_batch([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], 6)
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 7, 8, 0], [4, 9, 10, 11, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["response_mask"], [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])


def test_advantages_match_a_direct_computation():
    settings = PPOConfig(kl_coef=0.1, gamma=0.9, lam=0.8, whiten_scores=False)
    exp = Experiment(
        model=CFG,
        posttrain=PosttrainConfig(stage="ppo", ppo=settings),
        train=TrainConfig(seq_len=8, loss_chunk=4),
    )
    optimizer, schedule = make_optimizer(OptimConfig(), 10)
    advantages, _ = make_ppo_functions(exp, CFG, optimizer, optimizer, schedule)
    policy, reference = (jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(i)) for i in (0, 1))
    value = jax.jit(
        lambda rng: nn.meta.unbox(ScalarModel(CFG).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    )(jax.random.key(2))
    value["score"]["kernel"] = jax.random.normal(jax.random.key(3), (CFG.dim, 1))
    batch = rollout_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15, 16]], 8)
    scores = np.array([1.5, -0.5], np.float32)
    out, _ = advantages(policy, reference, value, batch, jnp.asarray(scores))

    llama = jax.jit(lambda p: Llama(CFG).apply({"params": p}, batch["tokens"]))
    logits = {
        name: np.asarray(llama(p), np.float64) for name, p in (("policy", policy), ("reference", reference))
    }
    values = np.asarray(jax.jit(ScalarModel(CFG).apply)({"params": value}, batch["tokens"]), np.float64)
    raw_advantages = np.zeros((2, 8))
    for b in range(2):
        # Position t acts by choosing token t + 1, a response token.
        acts = [t for t in range(7) if batch["response_mask"][b, t + 1]]
        logp = {}
        for name, row in logits.items():
            logp[name] = [
                row[b, t, batch["tokens"][b, t + 1]] - np.log(np.exp(row[b, t]).sum()) for t in acts
            ]
        np.testing.assert_allclose(np.asarray(out["old_log_probs"])[b, acts], logp["policy"], rtol=1e-4)
        rewards = [-0.1 * (p - r) for p, r in zip(logp["policy"], logp["reference"])]
        rewards[-1] += scores[b]
        v = [values[b, t] for t in acts] + [0.0]
        deltas = [rewards[i] + 0.9 * v[i + 1] - v[i] for i in range(len(acts))]
        for i, t in enumerate(acts):
            raw_advantages[b, t] = sum((0.9 * 0.8) ** k * deltas[i + k] for k in range(len(acts) - i))
            assert float(out["returns"][b, t]) == pytest.approx(
                raw_advantages[b, t] + v[i], rel=1e-3, abs=1e-4
            )
        assert np.asarray(out["mask"])[b].sum() == len(acts)
    on = np.asarray(out["mask"]) > 0
    whitened = (raw_advantages[on] - raw_advantages[on].mean()) / raw_advantages[on].std()
    np.testing.assert_allclose(np.asarray(out["advantages"])[on], whitened, rtol=1e-3, atol=1e-3)


# A whole PPO run (about 20 s): in the slow set, which CI runs after the suite.
@pytest.mark.slow
def test_a_nonfinite_minibatch_is_not_applied():
    exp = Experiment(
        model=CFG, posttrain=PosttrainConfig(stage="ppo"), train=TrainConfig(seq_len=8, loss_chunk=4)
    )
    optimizer, schedule = make_optimizer(OptimConfig(peak_lr=1e-3, warmup_steps=0), 10)
    advantages, update = make_ppo_functions(exp, CFG, optimizer, optimizer, schedule)
    policy, reference = (jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(i)) for i in (0, 1))
    value = jax.jit(
        lambda rng: nn.meta.unbox(ScalarModel(CFG).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    )(jax.random.key(2))
    batch = rollout_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15, 16]], 8)
    data, _ = advantages(policy, reference, value, batch, jnp.asarray([1.0, -1.0]))
    state = PPOState(
        step=jnp.zeros((), jnp.int32),
        params=policy,
        opt_state=optimizer.init(policy),
        value_params=value,
        value_opt_state=optimizer.init(value),
    )
    applied, metrics = update(state, data)
    assert float(metrics[NONFINITE]) == 0.0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), applied.params, policy))
    assert any(moved)

    poisoned = {**data, "advantages": data["advantages"].at[0, 4].set(jnp.nan)}
    kept, metrics = update(state, poisoned)
    assert float(metrics[NONFINITE]) == 1.0
    for new, old in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    prompts = [{"prompt": f"{i}+{i}", "answer": 2 * i} for i in range(40)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "scoring.py").write_text(
        "def short(prompt, response):\n"
        "    assert 'answer' in prompt and prompt['messages'][0]['role'] == 'user'\n"
        "    return -float(len(response))\n"
    )
    return {
        "root": root,
        "tokenizer": synthetic.write_tiktoken_model(str(root / "tok")),
        "prompts": str(root / "prompts.jsonl"),
        "score": f"{root / 'scoring.py'}:short",
    }


def _experiment(files, steps, **settings):
    ppo = dict(max_new_tokens=12, minibatch_size=8, temperature=1.0, eval_prompts=8, kl_coef=0.01)
    ppo.update(settings.pop("ppo", {}))
    return Experiment(
        name="test_ppo",
        model=CFG,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=1, final_lr_ratio=1.0),
        train=TrainConfig(steps=steps, batch_size=16, seq_len=48, log_every=1, eval_every=100),
        checkpoint=CheckpointConfig(every_steps=0),
        data=DataConfig(sources=(SourceConfig(files["prompts"]),), tokenizer_path=files["tokenizer"]),
        eval_data=None,
        posttrain=PosttrainConfig(
            **{"stage": "ppo", "score_fn": files["score"], **settings}, ppo=PPOConfig(**ppo)
        ),
    )


@pytest.mark.slow  # a real PPO run and its resume: after the suite
def test_ppo_learns_from_a_scoring_function_and_resumes(files):
    workdir = files["root"] / "run"
    out = train_lib.train(_experiment(files, 8), workdir, quiet=True)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "score" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("kl", "reward", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "response_length"):
        assert all(np.isfinite(r[key]) for r in steps), key
    # Shorter responses score higher: the policy learns to stop early.
    first, final = np.mean([r["score"] for r in steps[:2]]), np.mean([r["score"] for r in steps[-2:]])
    assert final > first + 5, (first, final)
    assert "eval_score" in out
    # The checkpoint is a policy like any other.
    cfg, params = load_for_inference(workdir)
    assert cfg == CFG and set(params) == set(out["state"].params)
    # Asked for more iterations, it goes on from the checkpoint.
    more = train_lib.train(_experiment(files, 9), workdir, quiet=True)
    assert int(more["state"].step) == 9
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "score" in r] == list(range(1, 10))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"reward_model": "/x"}, "exactly one of posttrain.reward_model and posttrain.score_fn"),
        ({"ppo": {"minibatch_size": 6}}, "not a multiple of ppo.minibatch_size=6"),
        ({"ppo": {"max_new_tokens": 48}}, "must leave room for the prompt"),
        ({"score_fn": "nowhere_xyz:f"}, "Cannot import nowhere_xyz"),
        ({"score_fn": "", "reward_model": "/nonexistent"}, "The reward model /nonexistent does not exist"),
        ({"safety_score_fn": "nowhere_xyz:g"}, "Cannot import nowhere_xyz"),
        ({"stage": "grpo", "group_size": 1}, "GRPO needs posttrain.group_size of at least 2"),
        (
            {"stage": "grpo", "group_size": 3, "ppo": {"minibatch_size": 32}},
            "48 responses per iteration is not a multiple of ppo.minibatch_size=32",
        ),
        ({"stage": "grpo", "reward_model": "/x"}, "GRPO needs exactly one of posttrain.reward_model"),
        ({"safety_reward_model": "/nonexistent"}, "The reward model /nonexistent does not exist"),
    ],
)
def test_bad_settings_are_one_sentence_and_exit_2(files, tmp_path, capsys, monkeypatch, settings, message):
    exp = _experiment(files, 1, **settings)
    monkeypatch.setattr(train_lib, "load_experiment", lambda name: exp)
    assert train_lib.main(["--exp", "x", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: ") and message in err, err


@pytest.mark.slow  # a real GRPO run and its resume: after the suite
def test_grpo_learns_from_a_scoring_function_and_resumes(files):
    """GRPO from the same start and scorer as PPO's test: 8 prompts x 4 responses per iteration,
    no value model; shorter responses score higher and it learns to stop early."""
    workdir = files["root"] / "grpo"
    exp = _experiment(files, 8, stage="grpo", group_size=4)
    exp = exp.replace(train=dataclasses.replace(exp.train, batch_size=8))
    out = train_lib.train(exp, workdir, quiet=True)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "score" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("kl", "policy_loss", "clip_fraction", "group_score_std", "response_length"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert "value_loss" not in steps[0]  # no value model
    first, final = np.mean([r["score"] for r in steps[:2]]), np.mean([r["score"] for r in steps[-2:]])
    assert final > first + 5, (first, final)
    assert "eval_score" in out
    cfg, params = load_for_inference(workdir)
    assert cfg == CFG and set(params) == set(out["state"].params)
    more = train_lib.train(exp.replace(train=dataclasses.replace(exp.train, steps=9)), workdir, quiet=True)
    assert int(more["state"].step) == 9


@pytest.mark.slow  # a real PPO run: after the suite
def test_ppo_scores_with_two_reward_models(files):
    """A safety function that judges every response unsafe (sigmoid of -100 - length < 0.15):
    every score is the safety one, and the metrics say so."""
    root = files["root"]
    (root / "safety.py").write_text("def harsh(prompt, response):\n    return -100.0 - len(response)\n")
    workdir = root / "safety_run"
    train_lib.train(_experiment(files, 2, safety_score_fn=f"{root / 'safety.py'}:harsh"), workdir, quiet=True)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "score" in r]
    assert len(steps) == 2 and all(r["safety_share"] == 1.0 and r["score"] <= -100 for r in steps)


@pytest.mark.slow  # a real PPO run: after the suite
def test_ppo_with_lora_trains_policy_and_value_adapters(files):
    exp = _experiment(files, 8).replace(
        lora=LoraConfig(rank=8, alpha=16.0, targets=("wq", "wv", "w1", "w2", "output"))
    )
    exp = exp.replace(optim=dataclasses.replace(exp.optim, peak_lr=1e-2))
    workdir = files["root"] / "lora"
    out = train_lib.train(exp, workdir, quiet=True)
    state = out["state"]
    names = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]  # noqa: E731
    assert all(n.endswith(("_lora_a']", "_lora_b']")) for n in names(state.params))
    # The value model: its own adapters and its scalar head, apart from the policy's.
    assert set(state.value_params) == {"backbone", "score"}
    assert all(n.endswith(("_lora_a']", "_lora_b']")) for n in names(state.value_params["backbone"]))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "score" in r]
    # Step 1: the adapters are zero, so the policy is its reference: no KL.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    first, final = np.mean([r["score"] for r in steps[:2]]), np.mean([r["score"] for r in steps[-2:]])
    assert final > first + 3, (first, final)
    assert (workdir / "adapter" / "adapter_config.json").is_file()
