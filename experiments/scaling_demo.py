"""Scaling laws as in Llama 3, end to end on a CPU: an IsoFLOP sweep, the fits, and a check.

    PYTHONPATH=. python experiments/scaling_demo.py [--workdir runs/scaling_demo] [--smoke]

1. Plans an IsoFLOP sweep (4 budgets x 4 sizes of the tiny family, `llama_jax.scaling.plan`) and
   trains every run on the default corpus (the Python standard library's source), each with its
   own complete schedule; the final validation loss is on the held-out split.
2. Scores every run on a synthetic multiple-choice task made from the held-out split with
   `llama_jax.eval.score_choices`: given a few lines of code and the first half of the next line,
   pick the true second half among 4 (the others are second halves of other lines). Per run: the
   correct answer's NLL per character, and acc_norm.
3. Fits a parabola in log tokens per budget, the power law D*(C) = A C^alpha over the minima
   (with a bootstrap) and, for the loss at the optimum, a second power law L*(C) = B C^beta over
   the minima's losses.
4. Predicts for 10x the largest budget: D*, N* = C / (6 D*), and L*. It then trains that run, the
   member of the family whose FLOPs per token are closest to C / D* (so that it spends C on D*
   tokens), and compares the predicted loss L*(C) with the one it reaches.
5. Downstream, in two steps: a line of task NLL against log FLOPs through each budget's best run
   (the compute-optimal models, as in Llama 3), a sigmoid from NLL to accuracy through all the
   sweep's runs; both predicted for the check run and compared with its scores.

Writes isoflops.png, power_law.png, downstream.png and summary.json to the workdir and prints the
figures. Resumable: a run with a validation loss at its last step and a task score is skipped, an
interrupted one resumes from its checkpoint. `--smoke` does the same at a toy scale (2 budgets x 3
sizes, a few hundred steps of models of 5K to 30K parameters; two or three minutes) to show that
every part works. The full demo takes about 20 minutes on 2 busy CPU cores.
Not an experiment for `llama_jax.train` (it defines no `experiment()`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax.config import Experiment
from llama_jax.data.sources import expand_paths
from llama_jax.data.training import cached_tokenizer
from llama_jax.eval import Question, score_choices
from llama_jax.scaling import ScalingError
from llama_jax.scaling.downstream import fit_downstream
from llama_jax.scaling.fit import bootstrap, fit_scaling_where_possible, optimal_params
from llama_jax.scaling.plan import (
    DEFAULT_VOCAB,
    Plan,
    model_for_size,
    nearest_size,
    plan_isoflop,
    plan_run,
    read_plan,
    run_name,
    write_plan,
)
from llama_jax.scaling.plots import plot_downstream, plot_isoflops, plot_power_law
from llama_jax.scaling.report import isoflop_table, law_summary, pairs, plan_table, table
from llama_jax.scaling.sweep import final_eval_loss, train_run
from llama_jax.tokenizer import load_tokenizer

# The full demo: 4 budgets x 4 one-layer sizes, four neighbours in the ladder around each budget's
# optimum (found in a pilot sweep: between 16x1 and 32x1 at 2.5e11, between 32x1 and 64x1 at
# 1e12), a 512-token vocabulary (see llama_jax/scaling/plan.py for why so small), 16 x 128 tokens a
# step; the check run then spends 1e13 FLOPs.
FULL = dict(
    sizes={
        1.25e11: ("8x1", "16x1", "24x1", "32x1"),
        2.5e11: ("8x1", "16x1", "32x1", "64x1"),
        5e11: ("16x1", "32x1", "64x1", "96x1"),
        1e12: ("16x1", "32x1", "64x1", "96x1"),
    },
    batch_size=16,
    seq_len=128,
    min_steps=10,
    questions=400,
)
# The smoke test: every step at a toy scale. At budgets this small the narrowest models win, so
# its minima may lie outside its runs (the table says so); it shows that the code runs, not a law.
SMOKE = dict(
    sizes={4e10: ("8x1", "16x1", "32x1"), 8e10: ("8x1", "16x1", "32x1")},
    batch_size=8,
    seq_len=128,
    min_steps=3,
    questions=48,
)
CHECK_FACTOR = 10  # the check run's budget, times the largest of the sweep
N_CHOICES = 4
SCORE_SEQ_LEN = 64  # every row is cut to its last 65 tokens: one compiled shape per model
TASK_FILE, SCORE_FILE = "task.jsonl", "task_score.json"


# ------------------------------------------------------------------------------------------
# The synthetic multiple-choice task


def make_questions(n: int, seed: int = 0, context_lines: int = 6) -> list[Question]:
    """Questions from the held-out split: `context_lines` lines of code and the start of the next
    line, cut at a space near its middle; the choices are that line's true rest and the rests of
    N_CHOICES - 1 other lines of similar length."""
    source = Experiment().eval_data.sources[0]
    rng = random.Random(seed)
    candidates = []  # (preceding lines, head, tail)
    for path in expand_paths(source.paths, source.kind):
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        for i in range(context_lines, len(lines)):
            line = lines[i].rstrip()
            spaces = [j for j, ch in enumerate(line) if ch == " " and line[:j].strip()]
            if not 30 <= len(line.strip()) <= 90 or not spaces:
                continue
            cut = min(spaces, key=lambda j: abs(j - len(line) / 2))
            head, tail = line[:cut], line[cut + 1 :]
            if len(tail) >= 8 and head.strip():
                candidates.append(("\n".join(lines[i - context_lines : i]), head, tail))
    if len(candidates) < n * N_CHOICES:
        raise ScalingError(
            f"The held-out split has {len(candidates)} usable lines; {n} questions need {n * N_CHOICES}."
        )
    rng.shuffle(candidates)
    by_length = sorted(range(len(candidates)), key=lambda k: len(candidates[k][2]))
    rank = {k: r for r, k in enumerate(by_length)}
    questions = []
    for k in range(n):
        before, head, tail = candidates[k]
        # Distractors: rests of lines of about the same length, so length alone gives nothing away.
        r = rank[k]
        pool = [candidates[j][2] for j in by_length[max(0, r - 40) : r + 40] if j != k]
        distractors = rng.sample(sorted(set(pool) - {tail}), N_CHOICES - 1)
        choices = distractors + [tail]
        rng.shuffle(choices)
        questions.append(Question(f"{before}\n{head}", tuple(choices), choices.index(tail)))
    return questions


def score_task(params, cfg, tokenizer, questions: list[Question]) -> dict:
    """The correct answer's NLL per character (mean over questions), acc and acc_norm."""
    scores = score_choices(params, cfg, tokenizer, questions, seq_len=SCORE_SEQ_LEN, batch_size=64)
    nll = [-lls[q.answer] / len(q.choices[q.answer]) for q, lls in zip(questions, scores.loglikelihoods)]
    return {"task_nll": float(np.mean(nll)), "acc": scores.acc, "acc_norm": scores.acc_norm}


def load_or_make_task(workdir: Path, n: int) -> list[Question]:
    path = workdir / TASK_FILE
    if path.is_file():
        from llama_jax.eval import read_questions

        return read_questions(path)
    questions = make_questions(n)
    path.write_text(
        "".join(
            json.dumps({"context": q.context, "choices": list(q.choices), "answer": q.answer}) + "\n"
            for q in questions
        )
    )
    return questions


# ------------------------------------------------------------------------------------------
# Running


def run_and_score(run, plan: Plan, workdir: Path, tokenizer, questions) -> dict:
    """A run's validation loss and task scores: read if there, else trained and scored."""
    run_dir = workdir / run.name
    score_path = run_dir / SCORE_FILE
    loss = final_eval_loss(run_dir, run.steps)
    if loss is not None and score_path.is_file():
        return {"eval_loss": loss, **json.loads(score_path.read_text())}
    start = time.perf_counter()
    loss, params = train_run(run, run_dir, plan.batch_size, plan.seq_len)  # restores if trained
    scores = score_task(params, model_for_size(run.size, run.vocab_size), tokenizer, questions)
    scores["seconds"] = time.perf_counter() - start
    score_path.write_text(json.dumps(scores) + "\n")
    tqdm.write(
        f"{run.name}: validation loss {loss:.4f}, task NLL/char {scores['task_nll']:.4f}, "
        f"acc_norm {scores['acc_norm']:.3f} ({scores['seconds']:.0f} s)"
    )
    return {"eval_loss": loss, **scores}


def settle_plan(workdir: Path, plan: Plan) -> Plan:
    """The sweep's plan, written once; a workdir planned differently is refused."""
    if (workdir / "plan.json").is_file():
        if read_plan(workdir) != plan:
            raise ScalingError(
                f"{workdir} holds a different sweep (plan.json); use another --workdir or delete it."
            )
    else:
        write_plan(plan, workdir)
    return plan


# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for what each step does."
    )
    parser.add_argument(
        "--workdir", default=None, help="default runs/scaling_demo (runs/scaling_demo_smoke with --smoke)"
    )
    parser.add_argument("--smoke", action="store_true", help="a toy-scale run of every step")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples (1000)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    workdir = Path(args.workdir or ("runs/scaling_demo_smoke" if args.smoke else "runs/scaling_demo"))
    try:
        summary = demo(workdir, setup, args.bootstrap)
    except ScalingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {workdir / 'summary.json'} and the plots in {workdir}")
    return 0


def demo(workdir: Path, setup: dict, n_bootstrap: int) -> dict:
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    plan = settle_plan(
        workdir,
        plan_isoflop(
            list(setup["sizes"]),
            setup["sizes"],
            batch_size=setup["batch_size"],
            seq_len=setup["seq_len"],
            vocab_size=DEFAULT_VOCAB,
            min_steps=setup["min_steps"],
        ),
    )
    print(plan_table(plan), flush=True)
    base = Experiment()
    tokenizer = load_tokenizer(cached_tokenizer(base.data, DEFAULT_VOCAB))
    questions = load_or_make_task(workdir, setup["questions"])

    # 1-2. The sweep, scored.
    results = {}
    for run in tqdm(plan.runs, desc="IsoFLOP sweep", unit="run", dynamic_ncols=True):
        results[run.name] = run_and_score(run, plan, workdir, tokenizer, questions)
    groups: dict[float, tuple[list, list]] = {}
    for run in plan.runs:
        tokens, losses = groups.setdefault(run.budget, ([], []))
        tokens.append(run.tokens)
        losses.append(results[run.name]["eval_loss"])

    # 3. The fits.
    target = CHECK_FACTOR * max(plan.budgets)
    fit, used, notes = fit_scaling_where_possible(groups)
    boot = bootstrap(used, target, n_bootstrap) if n_bootstrap else None

    # 4. The check: the predicted compute-optimal run at 10x the largest budget, trained.
    tokens_star = fit.optimal_tokens(target)
    size = nearest_size(target / tokens_star, plan.seq_len, DEFAULT_VOCAB)
    check = plan_run(
        target, size, plan.batch_size, plan.seq_len, DEFAULT_VOCAB, name="check_" + run_name(target, size)
    )
    tqdm.write(f"check run: {check.name}, {check.steps} steps (D* = {tokens_star:.4g} tokens)")
    check_result = run_and_score(check, plan, workdir, tokenizer, questions)

    # 5. Downstream: the line through each budget's best run, the sigmoid through every run.
    runs = list(plan.runs)
    best = [
        min(
            (i for i, r in enumerate(runs) if r.budget == b), key=lambda i: results[runs[i].name]["eval_loss"]
        )
        for b in plan.budgets
    ]
    flops = [r.flops for r in runs]
    nll = [results[r.name]["task_nll"] for r in runs]
    acc = [results[r.name]["acc_norm"] for r in runs]
    floor = 1.0 / N_CHOICES
    try:
        downstream = fit_downstream([flops[i] for i in best], [nll[i] for i in best], nll, acc, floor=floor)
    except ScalingError as err:  # e.g. every run at chance: say so, keep the rest
        downstream, downstream_error = None, str(err)

    # Figures and tables.
    plot_isoflops(fit, workdir / "isoflops.png")
    plot_power_law(fit, workdir / "power_law.png", target, boot, actual=(check.flops, check.tokens))
    if downstream is not None:
        plot_downstream(
            downstream,
            workdir / "downstream.png",
            flops,
            nll,
            acc,
            best,
            check=(check.flops, check_result["task_nll"], check_result["acc_norm"]),
        )
    print()
    print(
        table(
            ("run", "tokens", "FLOPs", "val loss", "task NLL/char", "acc_norm"),
            [
                (
                    r.name,
                    f"{r.tokens:,}",
                    f"{r.flops:.3g}",
                    f"{results[r.name]['eval_loss']:.4f}",
                    f"{results[r.name]['task_nll']:.4f}",
                    f"{results[r.name]['acc_norm']:.3f}",
                )
                for r in runs
            ],
        )
    )
    for note in notes:
        print(f"left out of the fit: {note}")
    print()
    print(isoflop_table(fit))
    print()
    print(law_summary(fit, target, boot))
    predicted_loss = fit.optimal_loss(target)
    elapsed = time.perf_counter() - started
    rows = [
        ("check budget C", f"{target:.4g} FLOPs ({CHECK_FACTOR}x the largest sweep budget)"),
        (
            "predicted D*, N* = C/(6 D*)",
            f"{tokens_star:.4g} tokens, {float(optimal_params(target, tokens_star)):.4g} params",
        ),
        ("run as", f"{check.size}: N = {check.params:,}, {check.tokens:,} tokens, {check.flops:.4g} FLOPs"),
        ("validation loss: predicted L*(C)", f"{predicted_loss:.4f}"),
        (
            "validation loss: actual",
            f"{check_result['eval_loss']:.4f} ({check_result['eval_loss'] - predicted_loss:+.4f})",
        ),
    ]
    if downstream is None:
        rows.append(("downstream fit", f"none: {downstream_error}"))
        downstream_summary = {"error": downstream_error}
    else:
        predicted_nll, predicted_acc = downstream.nll(check.flops), downstream.accuracy(check.flops)
        line, sigmoid = downstream.nll_line, downstream.sigmoid
        rows += [
            ("task NLL/char: predicted, actual", f"{predicted_nll:.4f}, {check_result['task_nll']:.4f}"),
            ("acc_norm: predicted, actual", f"{predicted_acc:.3f}, {check_result['acc_norm']:.3f}"),
            (
                "downstream fit",
                f"nll = {line.intercept:.4f} {line.slope:+.4f} log10 C; "
                f"acc = {floor:g} + {1 - floor:g} / (1 + exp({sigmoid.steepness:.3g}"
                f" (nll - {sigmoid.midpoint:.4f})))",
            ),
        ]
        downstream_summary = {
            "intercept": line.intercept,
            "slope": line.slope,
            "steepness": sigmoid.steepness,
            "midpoint": sigmoid.midpoint,
            "predicted_task_nll": predicted_nll,
            "predicted_acc_norm": predicted_acc,
        }
    rows += [
        ("questions", f"{len(questions)} x {N_CHOICES} choices (chance {floor:g})"),
        ("wall time of this invocation", f"{elapsed:.0f} s (runs trained earlier not counted)"),
    ]
    print()
    print(pairs(rows))
    return {
        "plan": {
            "sizes": {f"{b:g}": s for b, s in setup["sizes"].items()},
            "vocab_size": DEFAULT_VOCAB,
            "batch_size": plan.batch_size,
            "seq_len": plan.seq_len,
        },
        "runs": {
            r.name: {
                "budget": r.budget,
                "size": r.size,
                "params": r.params,
                "tokens": r.tokens,
                "flops": r.flops,
                **results[r.name],
            }
            for r in runs
        },
        "minima": [
            {
                "budget": c.budget,
                "tokens": c.optimal_tokens,
                "loss": c.optimal_loss,
                "inside": c.minimum_inside,
            }
            for c in fit.curves
        ],
        "left_out": notes,
        "tokens_law": {"A": fit.tokens_law.coefficient, "alpha": fit.tokens_law.exponent},
        "loss_law": {"B": fit.loss_law.coefficient, "beta": fit.loss_law.exponent},
        "bootstrap_90": None
        if boot is None
        else {
            "alpha": boot.interval(boot.alpha),
            "A": boot.interval(boot.coefficient),
            "tokens_at_check": boot.interval(boot.tokens_at_target),
            "loss_at_check": boot.interval(boot.loss_at_target),
        },
        "check": {
            "budget": target,
            "predicted_tokens": tokens_star,
            "predicted_params": float(optimal_params(target, tokens_star)),
            "size": check.size,
            "params": check.params,
            "tokens": check.tokens,
            "flops": check.flops,
            "predicted_loss": predicted_loss,
            **check_result,
        },
        "downstream": downstream_summary,
        "wall_seconds": elapsed,
    }


if __name__ == "__main__":
    sys.exit(main())
