"""Scaling laws: the FLOPs model and planner against direct formulas, the fits recovering known
constants from synthetic data, the predict and fit CLIs, and their errors."""

import json
import math
import re

import numpy as np
import pytest

from llama_jax.config import model_preset
from llama_jax.scaling import ScalingError
from llama_jax.scaling.cli import main
from llama_jax.scaling.downstream import AccuracySigmoid, fit_downstream
from llama_jax.scaling.fit import bootstrap, fit_isoflop, fit_power_law, fit_scaling
from llama_jax.scaling.plan import model_for_size, plan_isoflop, write_plan

# Known constants of the synthetic sweeps.
ALPHA, A = 0.45, 2.5  # D*(C) = A C^alpha
LOSS_B, LOSS_BETA = 30.0, -0.06  # L*(C) = B C^beta
CURVATURE = 0.08  # loss - L* = CURVATURE (ln D - ln D*)^2


def synthetic_loss(budget, tokens, coefficient=A):
    d_star = coefficient * budget**ALPHA
    return LOSS_B * budget**LOSS_BETA + CURVATURE * (np.log(tokens) - np.log(d_star)) ** 2


def direct_flops_per_token(dim, layers, heads, kv_heads, head_dim, ffn, vocab, seq_len):
    """6N + 12 L H Q T with N = non-embedding parameters plus the LM head, written out."""
    per_layer = dim * head_dim * (2 * heads + 2 * kv_heads) + 3 * dim * ffn + 2 * dim
    n = layers * per_layer + dim + vocab * dim
    return 6 * n + 12 * layers * heads * head_dim * seq_len


def test_planner_flops_match_the_direct_formula():
    plan = plan_isoflop(
        [1e12, 4e12], ["64x2", "256x4"], batch_size=16, seq_len=256, vocab_size=4096, min_steps=1
    )
    assert len(plan.runs) == 4
    for run in plan.runs:
        if run.size == "64x2":  # 2 heads, 1 KV head, SwiGLU width 2/3 * 4 * 64 -> 192
            f = direct_flops_per_token(64, 2, 2, 1, 32, 192, 4096, 256)
        else:  # the tiny preset itself
            f = direct_flops_per_token(256, 4, 8, 4, 32, 768, 4096, 256)
        assert run.flops_per_token == f
        assert run.steps == round(run.budget / (f * 16 * 256))
        assert run.tokens == run.steps * 16 * 256
        assert run.flops == f * run.tokens
        assert abs(run.flops - run.budget) <= 0.5 * f * 16 * 256  # off by at most half a step
    assert model_for_size("256x4", 4096) == model_preset("tiny")


def test_planner_skips_pairs_with_too_few_steps():
    plan = plan_isoflop([2e10], ["32x1", "192x3"], min_steps=10)
    assert [run.size for run in plan.runs] == ["32x1"]
    assert plan.skipped and plan.skipped[0].startswith("C2e10_192x3")


def test_parabola_minima_and_power_laws_recover_known_constants():
    # A is sensitive: an error e in alpha moves it by C^e at the budgets (e ln C = 1.4% for
    # e = 0.0005 at 1e12), hence noise of 2e-4 nats on the losses (over 20 seeds A stays within 0.8%).
    rng = np.random.default_rng(0)
    budgets = [1e12, 3e12, 1e13, 3e13, 1e14]
    groups = {}
    for budget in budgets:
        d_star = A * budget**ALPHA
        tokens = d_star * np.array([0.2, 0.45, 1.1, 2.4, 5.0])  # not centred on the optimum
        losses = synthetic_loss(budget, tokens) + rng.normal(0, 2e-4, tokens.shape)
        groups[budget] = (tokens, losses)
    fit = fit_scaling(groups)
    for curve in fit.curves:
        assert curve.optimal_tokens == pytest.approx(A * curve.budget**ALPHA, rel=0.02)
        assert curve.optimal_loss == pytest.approx(LOSS_B * curve.budget**LOSS_BETA, rel=0.02)
        assert curve.minimum_inside
    assert fit.tokens_law.exponent == pytest.approx(ALPHA, rel=0.02)
    assert fit.tokens_law.coefficient == pytest.approx(A, rel=0.02)
    assert fit.loss_law.exponent == pytest.approx(LOSS_BETA, rel=0.02)
    assert fit.optimal_params(1e15) == pytest.approx(1e15 / (6 * A * 1e15**ALPHA), rel=0.02)
    boot = bootstrap(groups, 1e15, samples=200)
    low, high = boot.interval(boot.alpha)
    assert low <= fit.tokens_law.exponent <= high and high - low < 0.05


def test_power_law_is_exact_on_exact_data():
    law = fit_power_law([1e10, 1e12, 1e14], [7.0 * c**0.3 for c in (1e10, 1e12, 1e14)])
    assert law.exponent == pytest.approx(0.3, rel=1e-9)
    assert law.coefficient == pytest.approx(7.0, rel=1e-9)


def test_downstream_two_steps_recover_known_constants():
    rng = np.random.default_rng(1)
    flops = np.geomspace(1e18, 1e22, 9)
    nll = 5.0 - 0.2 * np.log10(flops) + rng.normal(0, 0.002, flops.shape)
    truth = AccuracySigmoid(steepness=6.0, midpoint=1.0, floor=0.25)
    accuracy = truth(nll) + rng.normal(0, 0.002, flops.shape)
    fit = fit_downstream(flops, nll, nll, accuracy, floor=0.25)
    assert fit.nll_line.intercept == pytest.approx(5.0, rel=0.02)
    assert fit.nll_line.slope == pytest.approx(-0.2, rel=0.02)
    assert fit.sigmoid.steepness == pytest.approx(6.0, rel=0.02)
    assert fit.sigmoid.midpoint == pytest.approx(1.0, rel=0.02)
    expected = 0.25 + 0.75 / (1 + math.exp(6.0 * (5.0 - 0.2 * 23 - 1.0)))
    assert fit.accuracy(1e23) == pytest.approx(expected, abs=0.01)


def _number(text, label):
    return float(re.search("^" + re.escape(label) + r"\s+([0-9.e+-]+)", text, re.M)[1])


def test_predict_cli_prints_the_direct_formula(capsys):
    assert main(["predict", "--flops", "3.8e25", "--alpha", "0.537", "--A", "0.299"]) == 0
    out = capsys.readouterr().out
    tokens, params = _number(out, "optimal tokens D*"), _number(out, "optimal parameters N*")
    direct_tokens = 0.299 * 3.8e25**0.537
    assert tokens == pytest.approx(direct_tokens, rel=1e-3)
    assert params == pytest.approx(3.8e25 / (6 * direct_tokens), rel=1e-3)
    # Llama 3: 402B parameters on 16.55T tokens; the rounded constants land within 5%.
    assert tokens == pytest.approx(16.55e12, rel=0.05) and params == pytest.approx(402e9, rel=0.05)


def _write_sweep(directory, budgets, sizes, coefficient=A, skip=()):
    """A plan and metrics.jsonl files whose final validation losses follow the synthetic law."""
    plan = plan_isoflop(budgets, sizes, min_steps=1)
    write_plan(plan, directory)
    for run in plan.runs:
        if run.name in skip:
            continue
        run_dir = directory / run.name
        run_dir.mkdir()
        loss = float(synthetic_loss(run.budget, run.tokens, coefficient))
        rows = [{"step": run.steps, "loss": 9.0}, {"step": run.steps, "eval_loss": loss}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return plan


def test_fit_cli_reads_a_sweep_and_recovers_the_law(tmp_path, capsys):
    # A coefficient that puts D* = A C^alpha inside each budget's range of token counts.
    coefficient = 5e5 / 2e12**ALPHA
    _write_sweep(tmp_path, [1e12, 2e12, 4e12], ["32x1", "64x2", "128x2", "192x3"], coefficient)
    assert main(["fit", str(tmp_path), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert _number(out, "alpha") == pytest.approx(ALPHA, rel=1e-3)
    assert _number(out, "A") == pytest.approx(coefficient, rel=1e-3)
    assert (tmp_path / "isoflops.png").stat().st_size > 1000
    assert (tmp_path / "power_law.png").stat().st_size > 1000


def test_fit_refuses_too_few_points():
    with pytest.raises(ScalingError, match="at least 3"):
        fit_isoflop(1e12, [1e5, 2e5], [5.0, 4.9])
    with pytest.raises(ScalingError, match="no minimum"):
        fit_isoflop(1e12, [1e5, 2e5, 4e5], [5.0, 5.2, 5.0])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["predict", "--flops", "-1"], "positive number of FLOPs"),
        (["predict", "--flops", "0"], "positive number of FLOPs"),
        (["predict", "--flops", "1e20", "--A", "-2"], "positive A"),
        (["plan", "--budgets", "1e12", "--sizes", "100x2"], "multiple of the head size"),
        (["plan", "--budgets", "1e12", "-5"], "positive FLOPs"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fit_cli_errors(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nowhere")]) == 2
    assert "plan.json does not exist" in capsys.readouterr().err
    # Two finished runs per budget: no parabola anywhere.
    plan = plan_isoflop([1e12, 2e12], ["32x1", "64x2", "128x2"], min_steps=1)
    _write_sweep(
        tmp_path,
        [1e12, 2e12],
        ["32x1", "64x2", "128x2"],
        skip={r.name for r in plan.runs if r.size == "128x2"},
    )
    assert main(["fit", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a parabola needs at least 3" in err
    assert len(err.strip().splitlines()) == 1
