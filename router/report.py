"""Per-arm verdict of one experiment from the router's request log (SQLite or PostgreSQL): traffic, errors,
latency, online accuracy with 95 % intervals, each candidate's decision against control (router.verdict:
always-valid statistics, corrected for the number of candidates, with the labels still needed) and its latency
against control, shadow agreement, and the latest EVENTS events (weight changes, reloads, rollbacks).

An arm's requests count every attempt it got, including attempts that failed and were retried on another arm;
its errors count those failures too, so a flaky arm shows up even when no client saw an error.

The database does the counting (`router.store.Backend.summarize`: counts, the order statistics the percentiles
need and a bounded latency sample, never an experiment's whole history in Python); this module turns those
aggregates into the verdict, the same for any store that produces a `LogSummary`.

The decisions stay valid however often the report is read, for a fixed start (`since`: the whole log by
default). A window that slides with the clock ("the last hour") tests different labels at each reading: its
figures describe, its verdicts are not the sequential test's.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from router.config import Experiment, RouterConfig, with_weights
from router.stats import wilson_interval
from router.store import ArmSummary, LogSummary, Store, backend_for
from router.verdict import ArmEvidence, decide, latency, method

PERCENTILES = (50, 95, 99)
# Latencies per arm the latency comparison resamples: bounds the bootstrap's cost (1000 resamples of this many).
LATENCY_SAMPLE = 2000
# The latest events a report lists: a long-lived experiment's history would otherwise grow every report.
EVENTS = 30


def build_report(config: RouterConfig, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    """The report of one experiment from the log `config.store` names (SQLite at `config.database`, or the
    PostgreSQL server every replica writes to), without a router (any thread; the CLI's path). The weights are
    those in force: the file's, or the override the routers share."""
    backend = backend_for(config)
    try:
        summary = backend.summarize(experiment.name, since, PERCENTILES, LATENCY_SAMPLE, EVENTS)
        override = backend.overrides(config.experiments_digest).get(experiment.name)
    finally:
        backend.close()
    if override is not None:
        experiment = with_weights(experiment, override.weights)
    report = report_of(summary, experiment, since)
    report["rolled_back"] = override is not None and override.rollback  # as the routers' own reports say
    return report


async def live_report(store: Store, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    """The router's report: everything queued is committed first, then the database aggregates it and the
    statistics are computed on worker threads while the event loop keeps serving."""
    summary = await store.summary(experiment.name, since, PERCENTILES, LATENCY_SAMPLE, EVENTS)
    return await asyncio.to_thread(report_of, summary, experiment, since)


def report_of(summary: LogSummary, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    """The verdict from the log's aggregates (`Store.summary`, whatever database computed them): the
    experiment's arms in file order, then any other arm the log names; intervals and decisions against
    control. Arms the log names that the experiment no longer has are shown, not decided about."""
    configured = [arm.name for arm in experiment.arms]
    names = configured + sorted(set(summary.arms) - set(configured))
    empty = ArmSummary(0, 0, 0, 0, (), dict.fromkeys(PERCENTILES))
    arms = {name: summary.arms.get(name, empty) for name in names}
    control = arms.get(experiment.control, empty)

    def evidence(name: str) -> ArmEvidence:
        return ArmEvidence(name, arms[name].feedback, arms[name].correct, experiment.weights.get(name, 0.0))

    candidates = [name for name in configured if name != experiment.control]
    decided = decide(evidence(experiment.control), [evidence(name) for name in candidates], experiment.decision)
    rows = []
    for name, stats in arms.items():
        interval = wilson_interval(stats.correct, stats.feedback)
        rows.append({
            "arm": name,
            "control": name == experiment.control,
            "weight": experiment.weights.get(name),
            "targets": list(stats.targets),
            "requests": stats.requests,
            "errors": stats.errors,
            "error_rate": stats.errors / stats.requests if stats.requests else None,
            "latency_ms": {f"p{q}": stats.latency_ms.get(q) for q in PERCENTILES},
            "feedback": stats.feedback,
            "accuracy": stats.correct / stats.feedback if stats.feedback else None,
            "accuracy_ci95": list(interval) if interval else None,
            "vs_control": decided.get(name),
            "latency_vs_control": latency(control.latency_sample_ms, stats.latency_sample_ms)
            if name in decided else None,
        })
    return {
        "experiment": experiment.name,
        "control": experiment.control,
        "since": since,
        "decision": method(experiment.decision, len(candidates)),
        "arms": rows,
        "shadow": [{"target": shadow.target, "compared": shadow.compared, "agree": shadow.agree,
                    "errors": shadow.errors,
                    "agreement": shadow.agree / shadow.compared if shadow.compared else None}
                   for shadow in summary.shadow],
        "events": [{"at": event.at, "kind": event.kind, "detail": event.detail} for event in summary.events],
    }


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def _interval(values: list[float] | None, scale: float, pattern: str) -> str:
    return "–" if values is None else f"{pattern.format(values[0] * scale)} to {pattern.format(values[1] * scale)}"


def to_markdown(report: dict[str, Any]) -> str:
    decision = report["decision"]
    lines = [f"## Experiment `{report['experiment']}` (control: {report['control']})", "",
             "| arm | target | weight | requests | error rate | p50 ms | p95 ms | p99 ms | feedback "
             "| accuracy (95 % CI) | vs control, pts (always-valid CS) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["arms"]:
        interval = row["accuracy_ci95"]
        accuracy = "–" if row["accuracy"] is None else (
            f"{row['accuracy']:.2%} ({interval[0]:.1%}–{interval[1]:.1%})")
        versus, verdict = ("control", "control") if row["control"] else ("–", "–")
        if row["vs_control"]:
            test = row["vs_control"]
            if test["difference"] is not None:
                versus = (f"{test['difference'] * 100:+.2f} ({_interval(test['confidence_sequence'], 100, '{:+.2f}')})"
                          f", p={test['p_value_holm']:.3g}")
            verdict = test["summary"]
        latency = row["latency_ms"]
        lines.append(f"| {row['arm']} | {', '.join(row['targets']) or '–'} | {_fmt(row['weight'], '{:g}')} | "
                     f"{row['requests']} | {_fmt(row['error_rate'], '{:.2%}')} | {_fmt(latency['p50'], '{:.1f}')} | "
                     f"{_fmt(latency['p95'], '{:.1f}')} | {_fmt(latency['p99'], '{:.1f}')} | {row['feedback']} | "
                     f"{accuracy} | {versus} | {verdict} |")
    lines += ["", f"Verdicts: {decision['test']}; α = {decision['alpha']:g} over {decision['candidates']} "
                  f"candidate(s) (intervals at {decision['interval_level']:.2%}; a better or worse claim's at the "
                  "level Holm rejected it at), read as often as you like; labels "
                  f"needed for a {decision['min_difference'] * 100:g}-pt difference at {decision['power']:.0%} power. "
                  "p is Holm-adjusted."]
    compared = [row for row in report["arms"] if row["latency_vs_control"]]
    if compared:
        lines += ["", "Latency vs control (candidate minus control, ms; bootstrap 95 % CI):"]
        for row in compared:
            latency_diff = row["latency_vs_control"]
            parts = [f"{q} {latency_diff[q]['difference']:+.1f} ({_interval(latency_diff[q]['ci95'], 1, '{:+.1f}')})"
                     for q in ("p50", "p99")]
            lines.append(f"- {row['arm']}: {', '.join(parts)} (answers sampled: {latency_diff['samples'][1]} here, "
                         f"{latency_diff['samples'][0]} on control)")
    for shadow in report["shadow"]:
        lines += ["", f"Shadow {shadow['target']}: {shadow['compared']} compared, agreement "
                      f"{_fmt(shadow['agreement'], '{:.2%}')}, {shadow['errors']} failed or dropped"]
    if report["events"]:
        lines += ["", f"Events (the latest {EVENTS} at most):"]
        for event in report["events"]:
            when = datetime.datetime.fromtimestamp(event["at"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            lines.append(f"- {when} {event['kind']}: {event['detail']}")
    return "\n".join(lines) + "\n"
