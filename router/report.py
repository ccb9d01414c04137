"""Per-arm verdict of one experiment from the router's SQLite log: traffic, errors, latency, online accuracy
with 95 % intervals, a two-proportion test of each candidate against control, shadow agreement, and the
events (weight changes, reloads, rollbacks).

An arm's requests count every attempt it got, including attempts that failed and were retried on another arm;
its errors count those failures too, so a flaky arm shows up even when no client saw an error.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from pathlib import Path
from typing import Any

from router.config import Experiment, Target
from router.stats import percentile, two_proportion_test, wilson_interval
from router.store import read_experiment


def build_report(database: Path, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    raw = read_experiment(database, experiment.name, since)
    arms: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": 0, "errors": 0, "latencies": [],
                                                            "feedback": 0, "correct": 0, "targets": set()})
    for arm, ok, latency_ms, predicted, retried_from, model, version, truth in raw["requests"]:
        stats = arms[arm]
        stats["requests"] += 1
        stats["errors"] += 0 if ok else 1
        stats["targets"].add(str(Target(model, version)))
        if ok:
            stats["latencies"].append(latency_ms)
        if retried_from:
            arms[retried_from]["requests"] += 1
            arms[retried_from]["errors"] += 1
        if truth is not None and predicted is not None:  # only answers that named a class can be right or wrong
            stats["feedback"] += 1
            stats["correct"] += int(predicted == truth)
    names = [arm.name for arm in experiment.arms] + sorted(set(arms) - {arm.name for arm in experiment.arms})
    control = arms[experiment.control]
    rows = []
    for name in names:
        stats = arms[name]
        interval = wilson_interval(stats["correct"], stats["feedback"])
        test = None if name == experiment.control else two_proportion_test(
            control["correct"], control["feedback"], stats["correct"], stats["feedback"])
        rows.append({
            "arm": name,
            "control": name == experiment.control,
            "targets": sorted(stats["targets"]),
            "requests": stats["requests"],
            "errors": stats["errors"],
            "error_rate": stats["errors"] / stats["requests"] if stats["requests"] else None,
            "latency_ms": {f"p{q}": percentile(stats["latencies"], q) for q in (50, 95, 99)},
            "feedback": stats["feedback"],
            "accuracy": stats["correct"] / stats["feedback"] if stats["feedback"] else None,
            "accuracy_ci95": list(interval) if interval else None,
            "vs_control": None if test is None else {
                "difference": test.difference, "z": test.z, "p_value": test.p_value,
                "significant": test.significant},
        })
    shadow: dict[str, dict[str, int]] = defaultdict(lambda: {"compared": 0, "agree": 0, "errors": 0})
    for target, outcome, agree in raw["shadow"]:
        shadow[target]["compared" if outcome == "ok" else "errors"] += 1
        shadow[target]["agree"] += int(bool(agree))
    return {
        "experiment": experiment.name,
        "control": experiment.control,
        "since": since,
        "arms": rows,
        "shadow": [{"target": target, **counts,
                    "agreement": counts["agree"] / counts["compared"] if counts["compared"] else None}
                   for target, counts in sorted(shadow.items())],
        "events": [{"at": at, "kind": kind, "detail": detail} for at, kind, detail in raw["events"]],
    }


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"## Experiment `{report['experiment']}` (control: {report['control']})", "",
             "| arm | target | requests | error rate | p50 ms | p95 ms | p99 ms | feedback | accuracy (95 % CI) "
             "| vs control |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["arms"]:
        interval = row["accuracy_ci95"]
        accuracy = "–" if row["accuracy"] is None else (
            f"{row['accuracy']:.2%} ({interval[0]:.1%}–{interval[1]:.1%})")
        versus = "control" if row["control"] else "–"
        if row["vs_control"]:
            test = row["vs_control"]
            verdict = "significant" if test["significant"] else "not significant"
            versus = f"{test['difference'] * 100:+.2f} pts, p={test['p_value']:.3g} ({verdict})"
        latency = row["latency_ms"]
        lines.append(f"| {row['arm']} | {', '.join(row['targets']) or '–'} | {row['requests']} | "
                     f"{_fmt(row['error_rate'], '{:.2%}')} | {_fmt(latency['p50'], '{:.1f}')} | "
                     f"{_fmt(latency['p95'], '{:.1f}')} | {_fmt(latency['p99'], '{:.1f}')} | {row['feedback']} | "
                     f"{accuracy} | {versus} |")
    for shadow in report["shadow"]:
        lines += ["", f"Shadow {shadow['target']}: {shadow['compared']} compared, agreement "
                      f"{_fmt(shadow['agreement'], '{:.2%}')}, {shadow['errors']} failed or dropped"]
    if report["events"]:
        lines += ["", "Events:"]
        for event in report["events"]:
            when = datetime.datetime.fromtimestamp(event["at"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            lines.append(f"- {when} {event['kind']}: {event['detail']}")
    return "\n".join(lines) + "\n"
