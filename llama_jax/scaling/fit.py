"""Compute-optimal fits as in Llama 3 (section 3.2.1).

1. Per compute budget C, the final validation loss of the runs against log tokens is fitted with
   a second-degree polynomial; its minimum is the compute-optimal point (D*, L*) of that budget.
2. Over the budgets' minima, the power law D*(C) = A C^alpha (a straight line in log-log space,
   least squares). The implied optimal parameter count is N*(C) = C / (6 D*(C)): the 6ND
   approximation, which leaves out the attention term of the FLOPs model.
3. For the loss at the optimum, a second power law L*(C) = B C^beta over the same minima (no
   irreducible term: with a handful of budgets there is nothing to pin one down).

Uncertainty: a case bootstrap. Each sample redraws, with replacement, the runs of every budget,
refits the parabolas (a draw with fewer than three distinct token counts, or a curve without a
minimum, is drawn again) and the power laws; intervals are percentiles of the samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from llama_jax.scaling import ScalingError


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** exponent."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        return self.coefficient * np.asarray(x, np.float64) ** self.exponent


@dataclasses.dataclass(frozen=True)
class IsoFlopCurve:
    """The parabola loss = a u^2 + b u + c in u = ln(tokens), fitted at one budget."""

    budget: float
    tokens: tuple[float, ...]
    losses: tuple[float, ...]
    a: float
    b: float
    c: float

    @property
    def optimal_tokens(self) -> float:
        return math.exp(-self.b / (2 * self.a))

    @property
    def optimal_loss(self) -> float:
        return self.c - self.b**2 / (4 * self.a)

    @property
    def minimum_inside(self) -> bool:
        """Whether the minimum lies between the smallest and largest token counts sampled."""
        return min(self.tokens) <= self.optimal_tokens <= max(self.tokens)

    def loss(self, tokens):
        u = np.log(np.asarray(tokens, np.float64))
        return self.a * u**2 + self.b * u + self.c


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    curves: tuple[IsoFlopCurve, ...]
    tokens_law: PowerLaw  # D*(C) = A C^alpha
    loss_law: PowerLaw  # L*(C) = B C^beta

    def optimal_tokens(self, flops: float) -> float:
        return float(self.tokens_law(flops))

    def optimal_params(self, flops: float) -> float:
        return optimal_params(flops, self.optimal_tokens(flops))

    def optimal_loss(self, flops: float) -> float:
        return float(self.loss_law(flops))


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    alpha: np.ndarray  # per sample
    coefficient: np.ndarray  # A per sample
    tokens_at_target: np.ndarray
    loss_at_target: np.ndarray
    requested: int

    def interval(self, values: np.ndarray, level: float = 0.9) -> tuple[float, float]:
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high)


def optimal_params(flops, tokens):
    """N* = C / (6 D*): the parameters that spend C FLOPs on D* tokens at 6 FLOPs per parameter
    and token."""
    return np.asarray(flops, np.float64) / (6.0 * np.asarray(tokens, np.float64))


def check_flops(flops: float, what: str = "The compute budget") -> float:
    flops = float(flops)
    if not (flops > 0 and math.isfinite(flops)):
        raise ScalingError(f"{what} must be a positive number of FLOPs, got {flops:g}.")
    return flops


def fit_isoflop(budget: float, tokens: Sequence[float], losses: Sequence[float]) -> IsoFlopCurve:
    """The second-degree polynomial of loss in ln(tokens) at one budget, with its minimum."""
    tokens = np.asarray(tokens, np.float64)
    losses = np.asarray(losses, np.float64)
    if tokens.shape != losses.shape or tokens.ndim != 1:
        raise ScalingError(f"Budget {budget:.3g}: tokens and losses must be two lists of the same length.")
    if len(np.unique(tokens)) < 3:
        raise ScalingError(
            f"Budget {budget:.3g} has {len(np.unique(tokens))} distinct token "
            "counts; a parabola needs at least 3."
        )
    if not (np.all(tokens > 0) and np.all(np.isfinite(losses))):
        raise ScalingError(f"Budget {budget:.3g} has a non-positive token count or a non-finite loss.")
    a, b, c = np.polyfit(np.log(tokens), losses, 2)
    if not a > 0:
        raise ScalingError(
            f"The IsoFLOP curve of budget {budget:.3g} opens downwards (no minimum); "
            "its runs do not straddle the optimum."
        )
    return IsoFlopCurve(budget, tuple(tokens.tolist()), tuple(losses.tolist()), float(a), float(b), float(c))


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """y = coefficient * x^exponent by least squares on ln y = ln coefficient + exponent ln x."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(np.unique(x)) < 2:
        raise ScalingError(
            f"A power law needs points at 2 or more distinct budgets, got {len(np.unique(x))}."
        )
    if not (np.all(x > 0) and np.all(y > 0)):
        raise ScalingError("A power law needs positive values.")
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(math.exp(log_coefficient)), float(exponent))


Groups = Mapping[float, tuple[Sequence[float], Sequence[float]]]  # budget -> (tokens, losses)


def fit_scaling(groups: Groups) -> ScalingFit:
    """Parabolas per budget, then D*(C) and L*(C) over their minima."""
    curves = tuple(fit_isoflop(budget, *groups[budget]) for budget in sorted(groups))
    budgets = [curve.budget for curve in curves]
    return ScalingFit(
        curves,
        fit_power_law(budgets, [curve.optimal_tokens for curve in curves]),
        fit_power_law(budgets, [curve.optimal_loss for curve in curves]),
    )


def fit_scaling_where_possible(groups: Groups) -> tuple[ScalingFit, Groups, list[str]]:
    """As `fit_scaling`, leaving out the budgets whose curve cannot be fitted (too few runs, no
    minimum) -> (fit, the groups used, one line per budget left out and why). Fails when fewer
    than two budgets remain."""
    used, notes = {}, []
    for budget in sorted(groups):
        try:
            fit_isoflop(budget, *groups[budget])
            used[budget] = groups[budget]
        except ScalingError as err:
            notes.append(str(err))
    if len(used) < 2:
        first = f" (first problem: {notes[0].rstrip('.')})" if notes else ""
        raise ScalingError(
            f"Only {len(used)} of {len(groups)} budgets give an IsoFLOP minimum and "
            f"the power law needs 2{first}."
        )
    return fit_scaling(used), used, notes


def bootstrap(
    groups: Groups, target_flops: float, samples: int = 1000, seed: int = 0, max_redraws: int = 100
) -> Bootstrap:
    """Case bootstrap of the whole fit (see the module docstring)."""
    rng = np.random.default_rng(seed)
    arrays = {
        budget: (np.asarray(tokens, np.float64), np.asarray(losses, np.float64))
        for budget, (tokens, losses) in groups.items()
    }
    alphas, coefficients, tokens_at_target, losses_at_target = [], [], [], []
    for _ in range(samples):
        curves = []
        for budget, (tokens, losses) in sorted(arrays.items()):
            for _ in range(max_redraws):
                pick = rng.integers(0, len(tokens), len(tokens))
                if len(np.unique(tokens[pick])) < 3:
                    continue
                try:
                    curves.append(fit_isoflop(budget, tokens[pick], losses[pick]))
                    break
                except ScalingError:
                    continue
        if len(curves) < len(arrays):
            continue  # a budget without any usable redraw: the sample is dropped
        budgets = [c.budget for c in curves]
        tokens_law = fit_power_law(budgets, [c.optimal_tokens for c in curves])
        loss_law = fit_power_law(budgets, [c.optimal_loss for c in curves])
        alphas.append(tokens_law.exponent)
        coefficients.append(tokens_law.coefficient)
        tokens_at_target.append(float(tokens_law(target_flops)))
        losses_at_target.append(float(loss_law(target_flops)))
    if not alphas:
        raise ScalingError("No bootstrap sample could be fitted; the sweep needs more runs per budget.")
    return Bootstrap(
        np.array(alphas),
        np.array(coefficients),
        np.array(tokens_at_target),
        np.array(losses_at_target),
        samples,
    )
