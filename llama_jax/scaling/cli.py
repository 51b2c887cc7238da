"""`python -m llama_jax.scaling {plan,run,fit,predict}`: IsoFLOP sweeps and compute-optimal
predictions as in Llama 3.

    plan     --budgets C... [--sizes DIMxLAYERS...] [--out DIR]   the runs of an IsoFLOP sweep
    run      DIR                                                   train them (resumable)
    fit      DIR [--target-flops C] [--bootstrap N]                parabolas, power law, plots
    predict  --flops C [--alpha a] [--A A]                         D* = A C^alpha, N* = C / (6 D*)

With Llama 3's constants from its figure (alpha 0.537, A 0.299), `predict --flops 3.8e25` gives
1.629e13 tokens (16.29T) and 3.887e11 parameters (388.7B), 1.5% and 3.3% under the paper's 16.55T
and 402B. Two reasons: the constants are rounded to three digits, and at C = 3.8e25 an exponent
off by 0.00027 moves D* by 1.6% (exactly 16.55T would need alpha 0.53727 with A 0.299, or A 0.3037
with alpha 0.537); and the paper's pair does not satisfy C = 6ND itself: 6 x 402B x 16.55T =
3.99e25, 5% more than 3.8e25, so 16.55T tokens at 3.8e25 FLOPs would imply 383B parameters. The
rounder constants in the paper's text (0.53, 0.29) give 10.5T tokens and 605B parameters.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llama_jax.scaling import ScalingError

# Llama 3, figure 3: D*(C) = A C^alpha fitted on IsoFLOP runs from 6e18 to 1e22 FLOPs.
LLAMA3_ALPHA, LLAMA3_A = 0.537, 0.299
LLAMA3_FLOPS, LLAMA3_PARAMS, LLAMA3_TOKENS = 3.8e25, 402e9, 16.55e12


def _number(text: str) -> float:
    """A float; whether it is a usable one is checked later, with a message that says why."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _si(value: float) -> str:
    """1.629e13 -> '16.29T'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def predict(flops: float, alpha: float, coefficient: float) -> tuple[float, float]:
    """(optimal tokens A C^alpha, optimal parameters C / (6 D*))."""
    from llama_jax.scaling.fit import PowerLaw, check_flops, optimal_params

    flops = check_flops(flops)
    if not (math.isfinite(alpha) and coefficient > 0 and math.isfinite(coefficient)):
        raise ScalingError(
            f"The power law needs a finite alpha and a positive A, got alpha {alpha:g} and A {coefficient:g}."
        )
    tokens = float(PowerLaw(coefficient, alpha)(flops))
    if not (0 < tokens < math.inf):
        raise ScalingError(f"A C^alpha overflows for C = {flops:g}, alpha {alpha:g}, A {coefficient:g}.")
    return tokens, float(optimal_params(flops, tokens))


def cmd_predict(args) -> None:
    from llama_jax.scaling.report import pairs

    tokens, params = predict(args.flops, args.alpha, args.A)
    rows = [
        ("compute C", f"{args.flops:.4g} FLOPs"),
        ("power law", f"D*(C) = {args.A:g} C^{args.alpha:g}"),
        ("optimal tokens D*", f"{tokens:.4g} ({_si(tokens)})"),
        ("optimal parameters N*", f"{params:.4g} ({_si(params)}) = C / (6 D*)"),
    ]
    if (args.flops, args.alpha, args.A) == (LLAMA3_FLOPS, LLAMA3_ALPHA, LLAMA3_A):
        rows.append(
            (
                "Llama 3 reports",
                f"{_si(LLAMA3_PARAMS)} parameters on {_si(LLAMA3_TOKENS)} "
                f"tokens (tokens {tokens / LLAMA3_TOKENS - 1:+.1%}, "
                f"parameters {params / LLAMA3_PARAMS - 1:+.1%}; see --help)",
            )
        )
    print(pairs(rows))


def cmd_plan(args) -> None:
    from llama_jax.scaling import plan as defaults
    from llama_jax.scaling.plan import plan_isoflop, write_plan
    from llama_jax.scaling.report import plan_table

    def given(value, default):
        return default if value is None else value

    plan = plan_isoflop(
        args.budgets,
        given(args.sizes, defaults.DEFAULT_SIZES),
        batch_size=given(args.batch_size, defaults.DEFAULT_BATCH_SIZE),
        seq_len=given(args.seq_len, defaults.DEFAULT_SEQ_LEN),
        vocab_size=given(args.vocab_size, defaults.DEFAULT_VOCAB),
        min_steps=args.min_steps,
    )
    print(plan_table(plan))
    if args.out:
        print(f"wrote {write_plan(plan, args.out)}")


def cmd_run(args) -> None:
    from llama_jax.scaling.plan import read_plan
    from llama_jax.scaling.sweep import run_plan

    plan = read_plan(args.dir)
    losses = run_plan(plan, args.dir)
    print(
        f"{len(losses)} runs finished in {args.dir}; fit them with "
        f"`python -m llama_jax.scaling fit {args.dir}`"
    )


def cmd_fit(args) -> None:
    from llama_jax.scaling.fit import bootstrap, check_flops, fit_scaling_where_possible
    from llama_jax.scaling.plan import read_plan
    from llama_jax.scaling.report import isoflop_table, law_summary
    from llama_jax.scaling.sweep import read_results

    plan = read_plan(args.dir)
    groups, missing = read_results(plan, args.dir)
    if missing:
        print(f"not finished (left out): {', '.join(missing)}")
    if not groups:
        raise ScalingError(f"No run in {args.dir} has finished (a validation loss at its last step).")
    target = check_flops(
        args.target_flops if args.target_flops is not None else 10 * max(groups), "--target-flops"
    )
    fit, groups, notes = fit_scaling_where_possible(groups)
    for note in notes:
        print(f"left out: {note}")
    boot = bootstrap(groups, target, args.bootstrap, args.seed) if args.bootstrap else None
    print(isoflop_table(fit))
    print()
    print(law_summary(fit, target, boot))
    if not args.no_plots:
        from llama_jax.scaling.plots import plot_isoflops, plot_power_law

        out = Path(args.dir)
        for path in (
            plot_isoflops(fit, out / "isoflops.png"),
            plot_power_law(fit, out / "power_law.png", target, boot),
        ):
            print(f"wrote {path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.scaling",
        description="Scaling laws as in Llama 3: plan an IsoFLOP sweep, run it, fit the "
        "compute-optimal tokens D*(C) = A C^alpha and predict for a larger budget.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_plan, _add_run, _add_fit, _add_predict):
        add(commands)
    return parser


def _add_plan(commands) -> None:
    plan = commands.add_parser(
        "plan",
        help="the runs of an IsoFLOP sweep",
        description="For every budget and model size, the steps that spend the budget at "
        "6N + 12 L H Q T FLOPs per token (N: non-embedding parameters plus the LM "
        "head). Sizes are DIMxLAYERS members of the family grown from the tiny preset.",
    )
    plan.add_argument(
        "--budgets",
        type=_number,
        nargs="+",
        required=True,
        metavar="C",
        help="compute budgets in FLOPs, e.g. 1e12 2e12 4e12",
    )
    plan.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="DIMxLAYERS",
        help="model sizes (default: plan.DEFAULT_SIZES, 8x1 16x1 32x1 64x1 96x1)",
    )
    # Defaults of None stand for those of llama_jax/scaling/plan.py (not imported here: it loads
    # JAX, and `predict` should not wait for that).
    plan.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per step (default: plan.DEFAULT_BATCH_SIZE, 16)",
    )
    plan.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: plan.DEFAULT_SEQ_LEN, 128)"
    )
    plan.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="the family's vocabulary (default: plan.DEFAULT_VOCAB, 512; tiny has "
        "4096); the first run trains a tokenizer of this size and caches it",
    )
    plan.add_argument(
        "--min-steps", type=int, default=10, help="skip budget/size pairs with fewer steps (10)"
    )
    plan.add_argument("--out", metavar="DIR", help="write DIR/plan.json for `run` and `fit`")
    plan.set_defaults(handler=cmd_plan)


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run",
        help="train the runs of a plan (resumable)",
        description="Trains every run of DIR/plan.json in DIR/NAME on the "
        "default corpus, skipping finished ones.",
    )
    run.add_argument("dir", metavar="DIR")
    run.set_defaults(handler=cmd_run)


def _add_fit(commands) -> None:
    fit = commands.add_parser(
        "fit",
        help="fit a finished sweep",
        description="Reads DIR/plan.json and each run's final validation loss from "
        "DIR/NAME/metrics.jsonl; fits a parabola in log tokens per budget, the power "
        "law D*(C) = A C^alpha over the minima (with a bootstrap), and L*(C) for the "
        "loss at the optimum; writes DIR/isoflops.png and DIR/power_law.png.",
    )
    fit.add_argument("dir", metavar="DIR")
    fit.add_argument(
        "--target-flops",
        type=_number,
        default=None,
        metavar="C",
        help="predict for this budget (default: 10x the largest)",
    )
    fit.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap samples (default 1000; 0: none)"
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--no-plots", action="store_true")
    fit.set_defaults(handler=cmd_fit)


def _add_predict(commands) -> None:
    predict_parser = commands.add_parser(
        "predict",
        help="optimal tokens and parameters for a budget",
        description="D* = A C^alpha training tokens and N* = C / (6 D*) parameters (the 6ND "
        "approximation of training FLOPs). Defaults: Llama 3's constants.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict_parser.add_argument(
        "--flops", type=_number, required=True, metavar="C", help="the compute budget in FLOPs, e.g. 3.8e25"
    )
    predict_parser.add_argument(
        "--alpha", type=_number, default=LLAMA3_ALPHA, help=f"the exponent (default {LLAMA3_ALPHA}, Llama 3)"
    )
    predict_parser.add_argument(
        "--A", type=_number, default=LLAMA3_A, help=f"the coefficient (default {LLAMA3_A}, Llama 3)"
    )
    predict_parser.set_defaults(handler=cmd_predict)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.handler(args)
    except ScalingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output directory that cannot be made, a file that cannot be read
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
