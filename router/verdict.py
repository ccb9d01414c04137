"""The decision about each candidate arm of an experiment, valid however often the report is read: *better*,
*worse*, *no difference larger than X* or *too early* (with the labels it still needs), from the always-valid
statistics of router.sequential corrected for the number of candidates; and its latency against control.

- better / worse: the candidate's always-valid p-value, Holm-adjusted over the experiment's m candidates, is at
  most α. The chance of any false claim of a difference, over all candidates and all the times anyone reads the
  report, stays at most α. The interval shown with the claim is the confidence sequence at the level Holm's step
  rejected at (1 − α/(m − k + 1) for the k-th smallest p-value): it excludes 0, as the claim says.
- no difference larger than X: the candidate's confidence sequence at level 1 − α/m (Bonferroni: all m hold at
  once, at all times, with probability 1 − α) lies within ±X, X being the experiment's `decision.min_difference`.
- too early: neither yet. The labels the candidate still needs (and control meanwhile, at the current weights)
  before the test finds a true difference of X with the stated power, at level α/m (Holm's first step); or, when
  it has those already, that no difference has shown yet but its interval is not yet inside ±X.

Latency is described, not decided: percentile-bootstrap 95 % intervals of the p50 and p99 differences, from
each arm's latency sample (bounded: router.report.LATENCY_SAMPLE answers per arm, a fixed seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.config import Decision
from router.sequential import (
    MIXTURE_SD,
    always_valid_p,
    detectable_difference,
    difference_variance,
    half_width,
    holm,
    holm_levels,
    labels_needed,
    mixture_critical,
    smoothed_accuracy,
)
from router.stats import bootstrap_percentile_differences

BETTER, WORSE, NO_DIFFERENCE, TOO_EARLY = "better", "worse", "no difference", "too early"
LATENCY_PERCENTILES = (50, 99)


@dataclass(frozen=True)
class ArmEvidence:
    """What the log says about one arm's accuracy, and the weight it routes with now."""

    name: str
    labels: int  # answers judged by a true label
    correct: int
    weight: float


def method(decision: Decision, candidates: int) -> dict[str, Any]:
    """The settings a report's verdicts were made with."""
    m = max(candidates, 1)
    # interval_level: undecided candidates' (Bonferroni); a claim's own is its row's confidence_level.
    return {"alpha": decision.alpha, "power": decision.power, "min_difference": decision.min_difference,
            "candidates": candidates, "interval_level": 1 - decision.alpha / m, "mixture_sd": MIXTURE_SD,
            "test": "mixture SPRT (always-valid p-values, confidence sequences), Holm across candidates"}


def decide(control: ArmEvidence, candidates: Sequence[ArmEvidence], decision: Decision) -> dict[str, dict[str, Any]]:
    """Each candidate's comparison with control, by name."""
    m = max(len(candidates), 1)
    level = decision.alpha / m
    critical = mixture_critical(level)
    p_values: list[float] = []
    found: list[tuple[float, float] | None] = []  # (estimate, variance) once both arms have labels
    for arm in candidates:
        if arm.labels == 0 or control.labels == 0:
            p_values.append(1.0)
            found.append(None)
            continue
        estimate = arm.correct / arm.labels - control.correct / control.labels
        variance = float(difference_variance(control.correct, control.labels, arm.correct, arm.labels))
        p_values.append(always_valid_p(estimate, variance))
        found.append((estimate, variance))
    adjusted = holm(p_values)
    steps = holm_levels(p_values, decision.alpha)
    p_control = float(smoothed_accuracy(control.correct, control.labels))
    compared = {}
    for arm, p_value, p_holm, step, evidence in zip(candidates, p_values, adjusted, steps, found, strict=True):
        # A claim's interval at the level Holm rejected at (it excludes 0); any other at Bonferroni's α/m.
        shown = step if p_holm <= decision.alpha else level
        row: dict[str, Any] = {"difference": None, "confidence_sequence": None, "confidence_level": 1 - shown,
                               "p_value": p_value, "p_value_holm": p_holm, "detectable_difference": None}
        if evidence is not None:
            estimate, variance = evidence
            half = float(half_width(variance, shown))
            # A difference of two accuracies lies in [-1, 1]: the sequence is cut to it (it still covers θ).
            row.update(difference=estimate, confidence_sequence=[max(estimate - half, -1.0), min(estimate + half, 1.0)],
                       detectable_difference=detectable_difference(variance, decision.power, critical))
        needed = _needed(control, arm, p_control, decision, critical)
        row["verdict"], row["summary"] = _verdict(row, decision, arm, needed)
        row["labels_needed"], row["control_labels_needed"] = needed if row["verdict"] == TOO_EARLY else (None, None)
        compared[arm.name] = row
    return compared


def _needed(control: ArmEvidence, arm: ArmEvidence, p_control: float, decision: Decision,
            critical: Callable[[float], float]) -> tuple[int | None, int | None]:
    """More labels on the candidate and on control until a difference of X is found with the stated power;
    None when the candidate gets no traffic or no count would do."""
    if arm.weight <= 0:
        return None, None
    ratio = control.weight / arm.weight
    extra = labels_needed(decision.min_difference, p_control, control.labels, arm.labels, ratio, decision.power,
                          critical)
    return (None, None) if extra is None else (extra, math.ceil(extra * ratio))


def _verdict(row: dict[str, Any], decision: Decision, arm: ArmEvidence,
             needed: tuple[int | None, int | None]) -> tuple[str, str]:
    x = decision.min_difference * 100
    if row["difference"] is not None and row["p_value_holm"] <= decision.alpha:
        low, high = (value * 100 for value in row["confidence_sequence"])
        verdict = BETTER if row["difference"] > 0 else WORSE
        return verdict, f"{verdict}: {row['difference'] * 100:+.2f} pts ({low:+.2f} to {high:+.2f})"
    sequence = row["confidence_sequence"]
    if sequence is not None and -decision.min_difference < sequence[0] and sequence[1] < decision.min_difference:
        return NO_DIFFERENCE, f"no difference larger than {x:g} pts"
    extra, on_control = needed
    if extra is None or on_control is None:
        why = "it gets no traffic (weight 0)" if arm.weight <= 0 else "not reachable at the current weights"
        return TOO_EARLY, f"too early, and no more labels will tell a {x:g}-pt difference: {why}"
    if extra == 0 and sequence is not None:
        # "~0 more labels" would read as a promise: the count is there, yet no difference has shown and the
        # interval still reaches past ±X. Only more labels narrow it.
        low, high = (value * 100 for value in sequence)
        return TOO_EARLY, (f"too early: enough labels to find a {x:g}-pt difference with {decision.power:.0%} power, "
                           f"none found ({row['difference'] * 100:+.2f} pts, {low:+.2f} to {high:+.2f}), "
                           f"not yet shown within ±{x:g} pts")
    return TOO_EARLY, (f"too early: ~{extra:,} more labels here (and ~{on_control:,} on control) to find a "
                       f"{x:g}-pt difference with {decision.power:.0%} power")


def latency(control: Sequence[float], candidate: Sequence[float]) -> dict[str, Any] | None:
    """The candidate's p50 and p99 minus control's, with bootstrap 95 % intervals; None with too few answers."""
    found = bootstrap_percentile_differences(control, candidate, LATENCY_PERCENTILES)
    if found is None:
        return None
    return {"samples": [len(control), len(candidate)],
            **{f"p{q}": {"difference": d, "ci95": [low, high]} for q, (d, low, high) in
               ((q, found[float(q)]) for q in LATENCY_PERCENTILES)}}
