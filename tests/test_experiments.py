"""Experiments: every recipe builds abstractly on a mesh, overrides are type-checked, the schedule
follows the recipe."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from llama_jax import phases
from llama_jax.config import (
    DEFAULT_RULES,
    ConfigError,
    Experiment,
    OptimConfig,
    apply_overrides,
    list_experiments,
    load_experiment,
)
from llama_jax.optim import learning_rate_schedule, make_optimizer
from llama_jax.sharding import make_mesh
from llama_jax.train import stage_of

POSTTRAINING = [name for name in list_experiments() if load_experiment(name).posttrain is not None]
RECIPES = [name for name in list_experiments() if name != "tiny" and name not in POSTTRAINING]


def test_every_preset_has_a_recipe():
    assert set(POSTTRAINING) == {
        f"{size}_{stage}" for size in ("llama3_8b", "tiny") for stage in ("sft", "rm", "dpo", "ppo")
    } | {"llama3_1_8b_qlora_sft", "llama3_1_70b_lora_sft", "llama3_8b_rounds"}
    assert set(RECIPES) == {
        "llama1_7b",
        "llama1_13b",
        "llama1_33b",
        "llama1_65b",
        "llama2_7b",
        "llama2_13b",
        "llama2_70b",
        "llama3_8b",
        "llama3_70b",
        "llama3_1_8b",
        "llama3_1_70b",
        "llama3_1_405b",
    }


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_abstractly_on_a_mesh(name):
    exp = load_experiment(name)
    tokens_per_step = exp.train.batch_size * exp.train.seq_len
    family = name.split("_")[0]
    # docs/reference.md, "Recipes": batch in tokens, context, optimizer constants.
    expected_batch = 16 * 2**20 if name == "llama3_1_405b" else 4 * 2**20
    assert tokens_per_step == expected_batch
    assert exp.train.seq_len == {"llama1": 2048, "llama2": 4096, "llama3": 8192}[family]
    assert (exp.optim.b1, exp.optim.b2, exp.optim.weight_decay, exp.optim.clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert exp.optim.final_lr_ratio == (0.01 if family == "llama3" else 0.1)
    assert exp.target.startswith("v5p-")
    # Its whole TrainState gets shardings from the logical rules, without allocating anything.
    mesh = make_mesh(exp.mesh, jax.devices())
    optimizer, _ = make_optimizer(exp.optim, exp.train.steps)
    shardings = stage_of(exp).state_shardings(exp, optimizer, mesh)
    wq = shardings.params["layers"]["attention"]["wq"]  # [layers, embed, heads, head_dim]
    assert wq.spec[1] == ("fsdp" if mesh.shape["fsdp"] > 1 else None)
    assert wq.spec[2] == ("tensor" if mesh.shape["tensor"] > 1 else None)
    assert len(jax.tree.leaves(shardings.opt_state)) > 2 * len(jax.tree.leaves(shardings.params))


@pytest.mark.parametrize("name", POSTTRAINING)
def test_posttraining_builds_abstractly_on_a_mesh(name):
    exp = load_experiment(name)
    mesh = make_mesh(exp.mesh, jax.devices())
    optimizer, _ = make_optimizer(exp.optim, exp.train.steps)
    params = stage_of(exp).state_shardings(exp, optimizer, mesh).params
    if exp.lora.rank:  # the state trains the adapters alone
        leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        assert leaves and all(n.endswith(("_lora_a']", "_lora_b']")) for n in leaves)
    elif exp.posttrain.stage == "rm":  # the backbone plus a scalar head, no LM head
        assert set(params) == {"backbone", "score"} and "output" not in params["backbone"]
    else:
        assert "output" in params or exp.model.tie_embeddings


def test_posttraining_recipes_follow_the_papers():
    sft, rm, dpo, ppo = (load_experiment(f"llama3_8b_{s}") for s in ("sft", "rm", "dpo", "ppo"))
    assert sft.optim.peak_lr == 1e-5 and 8500 <= sft.train.steps <= 9000
    assert sft.data.sources[0].field == "messages"
    assert not rm.posttrain.use_margin  # Llama 3: no margin
    assert (dpo.posttrain.beta, dpo.optim.peak_lr, dpo.posttrain.nll_coef) == (0.1, 1e-5, 0.2)
    assert dpo.posttrain.mask_special_tokens
    assert (ppo.optim.peak_lr, ppo.posttrain.ppo.clip, ppo.posttrain.ppo.kl_coef) == (1e-6, 0.2, 0.01)
    # The loop's steps are the stage recipes: each step's experiment equals its recipe's settings.
    from llama_jax.config import apply_overrides

    loop = load_experiment("llama3_8b_rounds")
    assert loop.rounds.rounds == 6 and 10 <= loop.rounds.k <= 30
    for step, recipe in (("rm", rm), ("dpo", dpo)):
        ours = apply_overrides(loop, list(getattr(loop.rounds, step)))
        assert (ours.train.steps, ours.train.batch_size, ours.train.seq_len) == (
            recipe.train.steps,
            recipe.train.batch_size,
            recipe.train.seq_len,
        )
        assert ours.optim == recipe.optim
    assert (loop.optim, loop.train) == (sft.optim, sft.train)
    assert (loop.posttrain.beta, loop.posttrain.nll_coef) == (dpo.posttrain.beta, dpo.posttrain.nll_coef)


def test_recipe_token_budgets():
    llama2 = load_experiment("llama2_70b")
    assert llama2.optim.peak_lr == 1.5e-4 and llama2.optim.eps == 1e-5
    assert math.isclose(llama2.train.steps * 4 * 2**20, 2.0e12, rel_tol=1e-5)
    big = load_experiment("llama3_1_405b")
    assert big.train.steps == phases.total_steps(big)
    assert (big.optim.peak_lr, big.optim.warmup_steps, big.optim.decay_steps) == (8e-5, 8000, 1_200_000)
    # The last 40M tokens: the anneal phase (the schedule's own anneal is off).
    assert big.optim.anneal_steps == 0 and big.phases[-1].lr_to == 0.0
    assert phases.steps(big, big.phases[-1]) == math.ceil(40e6 / (16 * 2**20))
    assert big.mesh.tensor == 8 and big.train.microbatches == 32


def test_schedule_follows_the_recipe_formula():
    cfg = OptimConfig(peak_lr=3e-4, warmup_steps=100, decay_steps=1000, final_lr_ratio=0.01, anneal_steps=50)
    schedule = learning_rate_schedule(cfg, total_steps=1200)
    floor = 3e-6
    for step in [0, 50, 99]:
        assert np.isclose(schedule(step), 3e-4 * (step + 1) / 100)
    for step in [100, 400, 999]:
        cosine = floor + (3e-4 - floor) * 0.5 * (1 + math.cos(math.pi * (step - 100) / 900))
        assert np.isclose(schedule(step), cosine, rtol=1e-5)
    assert np.isclose(schedule(1100), floor)  # the floor between decay and anneal
    assert np.isclose(schedule(1175), floor / 2)  # halfway down the anneal
    assert float(schedule(1200)) == 0.0


def test_overrides_are_typed_and_reach_nested_fields():
    exp = apply_overrides(
        Experiment(),
        [
            "optim.peak_lr=1e-4",
            "mesh.tensor=2",
            "train.steps=7",
            "model.remat=full",
            "data.sources.0.weight=2",
            "eval_data=null",
        ],
    )
    assert exp.optim.peak_lr == 1e-4 and exp.mesh.tensor == 2 and exp.train.steps == 7
    assert exp.model.remat == "full" and exp.data.sources[0].weight == 2.0 and exp.eval_data is None
    assert exp.model.vocab_size == Experiment().model.vocab_size  # untouched fields keep their values


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.peak_rl=1e-4", "Unknown override key 'optim.peak_rl'. Did you mean 'optim.peak_lr'?"),
        ("train.steps=many", "Bad override 'train.steps=many'"),
        ("model.remat=sometimes", "remat must be one of"),
        ("train.steps", "is not of the form key=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        apply_overrides(Experiment(), [override])


def test_unknown_experiment_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'llama2_70b'"):
        load_experiment("llama2-70b")


def test_mesh_rules_are_configuration():
    """The logical-axis rules are the experiment's: without an `embed` rule the FSDP mesh leaves
    the weights whole, and the command line can give the table too."""
    exp = apply_overrides(Experiment(), ["model.n_layers=2", "mesh.fsdp=8"])
    mesh = make_mesh(exp.mesh, jax.devices())
    optimizer, _ = make_optimizer(exp.optim, 10)

    def wq_spec(exp):
        return stage_of(exp).state_shardings(exp, optimizer, mesh).params["layers"]["attention"]["wq"].spec

    assert wq_spec(exp)[1] == "fsdp"
    rules = tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES)
    assert tuple(wq_spec(exp.replace(mesh=dataclasses.replace(exp.mesh, rules=rules)))) == (
        None,
        None,
        None,
        None,
    )
    overridden = apply_overrides(exp, ["mesh.rules=[[batch,[data,fsdp]],[embed,null]]"])
    assert overridden.mesh.rules == (("batch", ("data", "fsdp")), ("embed", None))
    with pytest.raises(ConfigError, match="not a .logical axis, mesh axes. pair"):
        apply_overrides(exp, ["mesh.rules=[[batch]]"])
