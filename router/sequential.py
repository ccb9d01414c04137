"""Inference about a candidate's accuracy difference that stays valid however often it is read: the mixture
sequential probability ratio test (mSPRT), its confidence sequence, Holm's correction across candidates, and the
labels a candidate still needs.

The difference θ = accuracy(candidate) − accuracy(control) is estimated by θ̂ = x_t/n_t − x_c/n_c, with variance
V = p_t(1 − p_t)/n_t + p_c(1 − p_c)/n_c. Mixing the alternatives θ over a normal N(0, τ²), the likelihood ratio
of "some θ ≠ 0" against "θ = 0" for normal data is

    Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))

(Johari, Pekelis & Walsh, "Always valid inference: continuous monitoring of A/B tests", Operations Research
70(3), 2022, arXiv:1512.04922, §5: their two-stream formula with V in place of 2σ²/n; Robbins' mixture, 1970).
Under θ = 0 it is a nonnegative martingale over the labels as they arrive, so by Ville's inequality the chance it
*ever* reaches 1/α is at most α: p = min(1, 1/Λ) is an always-valid p-value, and inverting the test at every θ
gives a confidence sequence that covers θ at every moment at once with probability 1 − α:

    θ̂ ± sqrt(V (V + τ²) / τ² · (2 ln(1/α) + ln((V + τ²) / V)))

Labels are Bernoulli, not normal, and V is estimated (each arm's p from (x + ½)/(n + 1), so it is never 0): the
guarantee is asymptotic. tests/test_sequential.py simulates thousands of A/A experiments read after every label
and measures the error rate: at or below α (it is well below: Ville's bound holds over an endless experiment).

τ sets which differences the test finds soonest: a small τ finds a tiny difference with fewer labels but needs
thousands of labels even for a large one; a large τ the reverse. At 90 % accuracy and α = 0.05, MIXTURE_SD = 2
points needs about 20 % more labels than τ = 0.5 points to find a half-point difference, and a third as many to
find a 10-point one (tests/test_sequential.py asserts both).

Holm's step-down correction of always-valid p-values keeps the chance of any false claim over all candidates at
α, at every moment: a false claim needs a true null's p-value at or below α/m₀ at some time, each of which has
chance at most α/m₀.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

# τ, the spread of the normal mixture over accuracy differences (a fraction: 0.02 is 2 points). See above.
MIXTURE_SD = 0.02
# Labels a candidate may still need before the search gives up: "unreachable at the current weights".
MAX_LABELS = 10**9


def smoothed_accuracy(correct: npt.ArrayLike, labels: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(x + ½)/(n + 1): the accuracy used in variances, never exactly 0 or 1 (a perfect arm still has a variance)."""
    return (np.asarray(correct, dtype=np.float64) + 0.5) / (np.asarray(labels, dtype=np.float64) + 1.0)


def proportions_variance(p_control: npt.ArrayLike, control_labels: npt.ArrayLike, p_candidate: npt.ArrayLike,
                         candidate_labels: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """V = p_t(1 − p_t)/n_t + p_c(1 − p_c)/n_c: the variance of θ̂ for given accuracies; every count must be > 0."""
    p_c, p_t = np.asarray(p_control, dtype=np.float64), np.asarray(p_candidate, dtype=np.float64)
    return np.asarray(p_c * (1 - p_c) / np.asarray(control_labels, dtype=np.float64)
                      + p_t * (1 - p_t) / np.asarray(candidate_labels, dtype=np.float64))


def difference_variance(control_correct: npt.ArrayLike, control_labels: npt.ArrayLike, candidate_correct: npt.ArrayLike,
                        candidate_labels: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The variance V of θ̂ as estimated from the counts (unpooled, each arm's own smoothed accuracy)."""
    return proportions_variance(smoothed_accuracy(control_correct, control_labels), control_labels,
                                smoothed_accuracy(candidate_correct, candidate_labels), candidate_labels)


def log_likelihood_ratio(estimate: npt.ArrayLike, variance: npt.ArrayLike, tau: float = MIXTURE_SD,
                         null: float = 0.0) -> npt.NDArray[np.float64]:
    """ln Λ of the normal-mixture SPRT of "θ = null" for an estimate with the given variance (element-wise:
    the simulation passes whole matrices of experiments × looks)."""
    v = np.asarray(variance, dtype=np.float64)
    shifted = np.asarray(estimate, dtype=np.float64) - null
    tau2 = tau * tau
    return np.asarray(0.5 * np.log(v / (v + tau2)) + tau2 * shifted * shifted / (2 * v * (v + tau2)))


def always_valid_p(estimate: float, variance: float, tau: float = MIXTURE_SD) -> float:
    """min(1, 1/Λ): P(this ever falls to α or below | θ = 0) ≤ α."""
    return float(min(1.0, math.exp(-float(log_likelihood_ratio(estimate, variance, tau)))))


def half_width(variance: npt.ArrayLike, alpha: float, tau: float = MIXTURE_SD) -> npt.NDArray[np.float64]:
    """Half the width of the confidence sequence at level 1 − α: every θ whose test Λ(θ) stays below 1/α."""
    v = np.asarray(variance, dtype=np.float64)
    tau2 = tau * tau
    return np.asarray(np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((v + tau2) / v))))


def mixture_critical(alpha: float, tau: float = MIXTURE_SD) -> Callable[[float], float]:
    """The test's boundary in standard errors, |θ̂|/√V, as a function of V (it grows slowly as labels accrue)."""
    return lambda variance: float(half_width(variance, alpha, tau)) / math.sqrt(variance)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): reject those at or below α. Same order as given."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(_ascending(p_values)):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def holm_levels(p_values: Sequence[float], alpha: float) -> list[float]:
    """The level Holm's step tests each hypothesis at: α/(m − k + 1) for the k-th smallest p-value. A hypothesis
    Holm rejects has its p-value at or below its level, so its confidence sequence at that level excludes 0
    (the sequence is the test inverted): the interval shown with a claim agrees with the claim. Same order."""
    m = len(p_values)
    levels = [alpha] * m  # each is set below
    for rank, index in enumerate(_ascending(p_values)):
        levels[index] = alpha / (m - rank)
    return levels


def _ascending(p_values: Sequence[float]) -> list[int]:
    """The indices of the p-values from the smallest up: the order Holm's steps take (ties in the given order)."""
    return sorted(range(len(p_values)), key=lambda index: p_values[index])


def labels_needed(difference: float, p_control: float, control_labels: int, candidate_labels: int, ratio: float,
                  power: float, critical: Callable[[float], float]) -> int | None:
    """More labels the candidate needs (the control getting `ratio` times as many meanwhile, as the weights send
    them) until a test that claims once |θ̂|/√V ≥ critical(V) finds a true `difference` with probability `power`.

    Read at that count alone, the test finds it with that probability (the estimate is normal around the true
    difference); read continuously, it can only have found it sooner: the count is an upper bound. The
    candidate's accuracy is taken `difference` away from control's, towards ½ (the larger variance). None when
    no count up to MAX_LABELS does (the candidate gets no traffic, or control gets none and has too few)."""
    p_candidate = p_control - difference if p_control > 0.5 else p_control + difference
    p_candidate = min(max(p_candidate, 0.0), 1.0)

    def found(extra: int) -> bool:
        n_control, n_candidate = control_labels + ratio * extra, candidate_labels + extra
        if n_control <= 0 or n_candidate <= 0:
            return False
        variance = float(proportions_variance(p_control, n_control, p_candidate, n_candidate))
        if variance <= 0:  # both accuracies exactly 0 or 1: any difference shows at once
            return True
        return difference >= detectable_difference(variance, power, critical)

    if found(0):
        return 0
    if not found(MAX_LABELS):
        return None
    low, high = 0, 1
    while not found(high):  # doubling, then bisection: about 60 evaluations at most
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if found(middle):
            high = middle
        else:
            low = middle
    return high


def detectable_difference(variance: float, power: float, critical: Callable[[float], float]) -> float:
    """The smallest difference the test finds with probability `power` at an estimate's current variance: the
    estimate, normal around the true difference with this variance, clears critical(V)·√V that often."""
    return (critical(variance) + NormalDist().inv_cdf(power)) * math.sqrt(variance)
