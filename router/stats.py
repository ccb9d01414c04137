"""The statistics of a verdict: percentiles, Wilson intervals for accuracy, a two-proportion z-test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054


def rank_positions(count: int, q: float) -> tuple[int, int, float]:
    """Where the q-th percentile (0-100) of `count` sorted values lies: the 0-based positions of the two order
    statistics around it and the fraction of the way from the first to the second (NumPy's linear method).
    The request log computes its percentiles in SQL from just these two values."""
    position = (count - 1) * q / 100.0
    low = math.floor(position)
    return low, min(low + 1, count - 1), position - low


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics (NumPy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    low, high, fraction = rank_positions(len(ordered), q)
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion: honest at small counts and near 0 or 1, unlike p ± z·se."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ProportionTest:
    difference: float  # candidate minus control
    z: float
    p_value: float  # two-sided

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


def two_proportion_test(control_successes: int, control_trials: int, candidate_successes: int,
                        candidate_trials: int) -> ProportionTest | None:
    """Pooled two-proportion z-test of candidate vs control; None when either arm has no trials."""
    if control_trials == 0 or candidate_trials == 0:
        return None
    p_control = control_successes / control_trials
    p_candidate = candidate_successes / candidate_trials
    pooled = (control_successes + candidate_successes) / (control_trials + candidate_trials)
    variance = pooled * (1 - pooled) * (1 / control_trials + 1 / candidate_trials)
    difference = p_candidate - p_control
    if variance == 0:  # both arms all right or all wrong: no evidence of a difference
        return ProportionTest(difference, 0.0, 1.0)
    z = difference / math.sqrt(variance)
    return ProportionTest(difference, z, math.erfc(abs(z) / math.sqrt(2)))
