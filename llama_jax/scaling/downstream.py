"""Downstream prediction in two steps, as in Llama 3 (section 3.2.1).

1. The normalised negative log-likelihood of the correct answer (summed over its tokens, divided
   by its length in characters, as `eval.score_choices`'s acc_norm normalises) is a straight line
   in log10 of the training FLOPs: nll(C) = intercept + slope * log10(C).
2. Accuracy is a sigmoid of that NLL, from chance (1 / number of choices) up to a ceiling (1):
   acc(nll) = floor + (ceiling - floor) / (1 + exp(steepness * (nll - midpoint))).

Chained, they predict the accuracy of a model trained with C FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from llama_jax.scaling import ScalingError


@dataclasses.dataclass(frozen=True)
class NllLine:
    """nll = intercept + slope * log10(flops)."""

    intercept: float
    slope: float

    def __call__(self, flops):
        return self.intercept + self.slope * np.log10(np.asarray(flops, np.float64))


@dataclasses.dataclass(frozen=True)
class AccuracySigmoid:
    """acc = floor + (ceiling - floor) / (1 + exp(steepness * (nll - midpoint)))."""

    steepness: float
    midpoint: float
    floor: float
    ceiling: float = 1.0

    def __call__(self, nll):
        z = self.steepness * (np.asarray(nll, np.float64) - self.midpoint)
        return self.floor + (self.ceiling - self.floor) / (1.0 + np.exp(np.clip(z, -500, 500)))


@dataclasses.dataclass(frozen=True)
class DownstreamFit:
    nll_line: NllLine
    sigmoid: AccuracySigmoid

    def nll(self, flops: float) -> float:
        return float(self.nll_line(flops))

    def accuracy(self, flops: float) -> float:
        return float(self.sigmoid(self.nll_line(flops)))


def fit_nll_line(flops: Sequence[float], nll: Sequence[float]) -> NllLine:
    """Step 1: least squares of the task NLL on log10 FLOPs."""
    flops = np.asarray(flops, np.float64)
    nll = np.asarray(nll, np.float64)
    if flops.shape != nll.shape or flops.ndim != 1:
        raise ScalingError("FLOPs and NLLs must be two lists of the same length.")
    if not np.all(flops > 0):
        raise ScalingError("Training FLOPs must be positive.")
    if len(np.unique(flops)) < 2:
        raise ScalingError("A line of NLL against FLOPs needs runs at 2 or more distinct budgets.")
    slope, intercept = np.polyfit(np.log10(flops), nll, 1)
    return NllLine(float(intercept), float(slope))


def fit_accuracy_sigmoid(
    nll: Sequence[float], accuracy: Sequence[float], floor: float, ceiling: float = 1.0
) -> AccuracySigmoid:
    """Step 2: the steepness and midpoint of the sigmoid, by least squares in accuracy (started
    from the straight line through the logits of the accuracies)."""
    from scipy.optimize import curve_fit

    nll = np.asarray(nll, np.float64)
    accuracy = np.asarray(accuracy, np.float64)
    if nll.shape != accuracy.shape or nll.ndim != 1:
        raise ScalingError("NLLs and accuracies must be two lists of the same length.")
    if not 0 <= floor < ceiling <= 1:
        raise ScalingError(f"The sigmoid needs 0 <= floor < ceiling <= 1, got {floor:g} and {ceiling:g}.")
    if len(nll) < 3 or len(np.unique(nll)) < 2:
        raise ScalingError("A sigmoid of accuracy against NLL needs at least 3 runs with different NLLs.")
    if np.ptp(accuracy) == 0:
        raise ScalingError("Every run has the same accuracy; no sigmoid can be fitted.")
    # Start: logit((acc - floor) / (ceiling - floor)) = -steepness * (nll - midpoint).
    share = np.clip((accuracy - floor) / (ceiling - floor), 0.02, 0.98)
    slope, intercept = np.polyfit(nll, np.log(share / (1 - share)), 1)
    if slope < 0:
        start = (-slope, intercept / -slope)
    else:  # accuracy not falling with NLL: start from a gentle slope through the middle
        start = (1.0 / max(np.ptp(nll), 1e-6), float(np.median(nll)))

    def model(x, steepness, midpoint):
        return AccuracySigmoid(steepness, midpoint, floor, ceiling)(x)

    try:
        (steepness, midpoint), _ = curve_fit(model, nll, accuracy, p0=start, maxfev=20000)
    except RuntimeError as err:
        raise ScalingError(f"The sigmoid fit did not converge ({err}).") from None
    if not (math.isfinite(steepness) and math.isfinite(midpoint)):
        raise ScalingError("The sigmoid fit gave non-finite constants.")
    return AccuracySigmoid(float(steepness), float(midpoint), floor, ceiling)


def fit_downstream(
    line_flops: Sequence[float],
    line_nll: Sequence[float],
    sigmoid_nll: Sequence[float],
    sigmoid_accuracy: Sequence[float],
    *,
    floor: float,
    ceiling: float = 1.0,
) -> DownstreamFit:
    """Both steps. Llama 3 fits the line on compute-optimal models and the sigmoid on all the
    models it has, so the two steps take their own points."""
    return DownstreamFit(
        fit_nll_line(line_flops, line_nll),
        fit_accuracy_sigmoid(sigmoid_nll, sigmoid_accuracy, floor, ceiling),
    )
