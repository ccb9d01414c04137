"""The fixed-sample statistics of a report: percentiles, Wilson intervals for accuracy and bootstrap intervals of
latency percentile differences. What decides about a candidate read continuously is in router.sequential (the
classical z-test it replaced claims differences that are not there when read continuously: tests/test_sequential.py
measures how often)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054
# The bootstrap's bounds: resamples per interval, and the fewest answers per arm worth an interval of a p99.
BOOTSTRAP_RESAMPLES = 1000
MIN_BOOTSTRAP_SAMPLES = 20


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


def bootstrap_percentile_differences(control: Sequence[float], candidate: Sequence[float],
                                     percentiles: Sequence[float] = (50, 99), level: float = 0.95,
                                     resamples: int = BOOTSTRAP_RESAMPLES,
                                     seed: int = 0) -> dict[float, tuple[float, float, float]] | None:
    """Candidate minus control at each percentile (0-100), with a percentile-bootstrap interval at `level`: each
    arm resampled with replacement on its own, `resamples` times, from a fixed seed (the same samples give the
    same interval). None when either arm has fewer than MIN_BOOTSTRAP_SAMPLES values. The cost is
    resamples × (len(control) + len(candidate)) values: callers cap the samples (router.report.LATENCY_SAMPLE)."""
    if min(len(control), len(candidate)) < MIN_BOOTSTRAP_SAMPLES:
        return None
    rng = np.random.default_rng(seed)
    qs = np.asarray(percentiles, dtype=np.float64)
    resampled = []
    for values in (np.asarray(control, dtype=np.float64), np.asarray(candidate, dtype=np.float64)):
        draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
        resampled.append(np.percentile(draws, qs, axis=1))  # (percentiles, resamples)
    differences = resampled[1] - resampled[0]
    tail = (1 - level) / 2 * 100
    lows, highs = np.percentile(differences, [tail, 100 - tail], axis=1)
    observed = np.percentile(np.asarray(candidate, dtype=np.float64), qs) - np.percentile(
        np.asarray(control, dtype=np.float64), qs)
    return {float(q): (float(d), float(low), float(high)) for q, d, low, high in zip(qs, observed, lows, highs,
                                                                                     strict=True)}
