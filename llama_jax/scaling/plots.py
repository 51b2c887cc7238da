"""PNG figures of a scaling fit: IsoFLOP curves with their minima, the power law with its data
points, and the two downstream steps. matplotlib draws off-screen (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llama_jax.scaling.downstream import DownstreamFit
from llama_jax.scaling.fit import Bootstrap, ScalingFit


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: str | Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_isoflops(fit: ScalingFit, path: str | Path) -> Path:
    """Validation loss against training tokens per budget: runs, parabola, minimum."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(fit.curves)))
    for curve, color in zip(fit.curves, colors):
        low, high = min(curve.tokens) / 1.5, max(curve.tokens) * 1.5
        grid = np.geomspace(min(low, curve.optimal_tokens), max(high, curve.optimal_tokens), 100)
        axes.plot(grid, curve.loss(grid), color=color, lw=1.2)
        axes.scatter(curve.tokens, curve.losses, color=color, s=22, label=f"{curve.budget:.2g} FLOPs")
        axes.scatter(
            [curve.optimal_tokens],
            [curve.optimal_loss],
            color=color,
            marker="*",
            s=160,
            edgecolor="black",
            zorder=3,
        )
    axes.set_xscale("log")
    axes.set_xlabel("training tokens")
    axes.set_ylabel("validation loss")
    axes.set_title("IsoFLOP curves (stars: compute-optimal minima)")
    axes.legend(fontsize=8)
    return _save(plt, figure, path)


def plot_power_law(
    fit: ScalingFit,
    path: str | Path,
    target_flops: float | None = None,
    boot: Bootstrap | None = None,
    actual: tuple[float, float] | None = None,
) -> Path:
    """Optimal tokens against compute: the minima, the fitted power law extended to the target,
    the bootstrap's 90% band, and an actual run (FLOPs, tokens) if given."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    budgets = [c.budget for c in fit.curves]
    top = max([*budgets, target_flops or 0])
    grid = np.geomspace(min(budgets) / 2, top * 2, 100)
    law = fit.tokens_law
    axes.plot(grid, law(grid), color="tab:blue", label=f"D* = {law.coefficient:.3g} C^{law.exponent:.3f}")
    if boot is not None:
        samples = boot.coefficient[:, None] * grid[None, :] ** boot.alpha[:, None]
        axes.fill_between(
            grid,
            *np.percentile(samples, [5, 95], axis=0),
            color="tab:blue",
            alpha=0.15,
            label="bootstrap 90%",
        )
    axes.scatter(
        budgets, [c.optimal_tokens for c in fit.curves], color="black", zorder=3, label="IsoFLOP minima"
    )
    if target_flops is not None:
        axes.scatter(
            [target_flops],
            [fit.optimal_tokens(target_flops)],
            marker="*",
            s=160,
            color="tab:red",
            zorder=3,
            label=f"prediction at {target_flops:.2g}",
        )
    if actual is not None:
        axes.scatter(
            [actual[0]], [actual[1]], marker="x", s=80, color="tab:orange", zorder=4, label="check run"
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("compute C (FLOPs)")
    axes.set_ylabel("compute-optimal tokens D*")
    axes.set_title("Compute-optimal training tokens")
    axes.legend(fontsize=8)
    return _save(plt, figure, path)


def plot_downstream(
    fit: DownstreamFit,
    path: str | Path,
    flops: Sequence[float],
    nll: Sequence[float],
    accuracy: Sequence[float],
    line_points: Sequence[int] = (),
    check: tuple[float, float, float] | None = None,
) -> Path:
    """Left: task NLL against FLOPs with the line (its points filled). Right: accuracy against
    NLL with the sigmoid. `check` is a held-out run's (FLOPs, NLL, accuracy)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    flops, nll, accuracy = (np.asarray(x, np.float64) for x in (flops, nll, accuracy))
    on_line = np.zeros(len(flops), bool)
    on_line[list(line_points)] = True
    grid = np.geomspace(flops.min() / 2, max(flops.max(), check[0] if check else 0) * 2, 100)
    left.plot(grid, fit.nll_line(grid), color="tab:blue")
    left.scatter(flops[~on_line], nll[~on_line], facecolors="none", edgecolors="gray", label="runs")
    left.scatter(flops[on_line], nll[on_line], color="black", label="fitted (best per budget)")
    nll_grid = np.linspace(min(nll.min(), fit.nll_line(grid).min()), nll.max() * 1.05, 100)
    right.plot(nll_grid, fit.sigmoid(nll_grid), color="tab:blue")
    right.scatter(nll, accuracy, color="black", label="runs")
    if check is not None:
        left.scatter([check[0]], [check[1]], marker="x", s=80, color="tab:orange", label="check run")
        right.scatter([check[1]], [check[2]], marker="x", s=80, color="tab:orange", label="check run")
    left.set_xscale("log")
    left.set_xlabel("compute C (FLOPs)")
    left.set_ylabel("correct answer NLL per character")
    left.set_title("Step 1: NLL against compute")
    right.set_xlabel("correct answer NLL per character")
    right.set_ylabel("accuracy (acc_norm)")
    right.set_title("Step 2: accuracy against NLL")
    for axes in (left, right):
        axes.legend(fontsize=8)
    return _save(plt, figure, path)
