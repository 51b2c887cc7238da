"""The tables the CLI and the demo print."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from llama_jax.scaling.fit import Bootstrap, ScalingFit, optimal_params

if TYPE_CHECKING:  # plan.py loads JAX; `predict` should start without it
    from llama_jax.scaling.plan import Plan


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    cells = [list(header)] + [list(row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def pairs(rows: Sequence[tuple[str, str]]) -> str:
    """Name / value lines."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plan_table(plan: Plan) -> str:
    rows = [
        (
            run.name,
            run.size,
            f"{run.params / 1e6:.3f}M",
            f"{run.flops_per_token:.4g}",
            f"{run.steps:,}",
            f"{run.tokens:,}",
            f"{run.flops:.4g}",
            f"{run.flops / run.budget - 1:+.1%}",
        )
        for run in plan.runs
    ]
    text = table(("run", "size", "N", "FLOPs/token", "steps", "tokens", "FLOPs", "vs budget"), rows)
    vocab = plan.runs[0].vocab_size
    text += f"\n{len(plan.runs)} runs, {plan.batch_size} x {plan.seq_len} tokens a step, vocabulary {vocab}"
    if plan.skipped:
        text += "; skipped (too few steps): " + ", ".join(plan.skipped)
    return text


def isoflop_table(fit: ScalingFit) -> str:
    rows = []
    for curve in fit.curves:
        rows.append(
            (
                f"{curve.budget:.3g}",
                str(len(curve.tokens)),
                f"{curve.optimal_tokens:.4g}",
                f"{float(optimal_params(curve.budget, curve.optimal_tokens)):.4g}",
                f"{curve.optimal_loss:.4f}",
                "yes" if curve.minimum_inside else "NO",
            )
        )
    return table(
        ("budget C", "runs", "optimal tokens D*", "N* = C/(6 D*)", "loss at D*", "D* inside runs"), rows
    )


def law_summary(fit: ScalingFit, target_flops: float, boot: Bootstrap | None = None) -> str:
    law, loss_law = fit.tokens_law, fit.loss_law

    def interval(values, fmt):
        if boot is None:
            return ""
        low, high = boot.interval(values)
        return f"  (90% bootstrap: {low:{fmt}} .. {high:{fmt}})"

    tokens = fit.optimal_tokens(target_flops)
    rows = [
        ("power law", f"D*(C) = A C^alpha, least squares in log-log over {len(fit.curves)} minima"),
        ("alpha", f"{law.exponent:.4f}" + interval(boot.alpha if boot else None, ".4f")),
        ("A", f"{law.coefficient:.4g}" + interval(boot.coefficient if boot else None, ".4g")),
        ("loss law", f"L*(C) = {loss_law.coefficient:.4g} C^{loss_law.exponent:.4f}"),
        (f"at C = {target_flops:.4g}", ""),
        ("  optimal tokens D*", f"{tokens:.4g}" + interval(boot.tokens_at_target if boot else None, ".4g")),
        ("  optimal params N* = C/(6 D*)", f"{float(optimal_params(target_flops, tokens)):.4g}"),
        (
            "  loss at the optimum L*",
            f"{fit.optimal_loss(target_flops):.4f}" + interval(boot.loss_at_target if boot else None, ".4f"),
        ),
    ]
    if boot is not None:
        note = f"{len(boot.alpha)} of {boot.requested} samples fitted (runs redrawn per budget)"
        if all(len(curve.tokens) == 3 for curve in fit.curves):
            note += "; with 3 runs a budget every usable redraw is the same 3, so no spread"
        rows.append(("bootstrap", note))
    return pairs(rows)
