"""Per-arm verdict of one experiment from the router's request log (SQLite or PostgreSQL): traffic, errors,
latency, online accuracy with 95 % intervals, a two-proportion test of each candidate against control, shadow
agreement, and the events (weight changes, reloads, rollbacks).

An arm's requests count every attempt it got, including attempts that failed and were retried on another arm;
its errors count those failures too, so a flaky arm shows up even when no client saw an error.

The database does the counting (`router.store.Backend.summarize`: counts and the order statistics the percentiles need,
never an experiment's whole history in Python); this module turns those aggregates into the verdict, the same
for any store that produces a `LogSummary`.
"""

from __future__ import annotations

import datetime
from typing import Any

from router.config import Experiment, RouterConfig
from router.stats import two_proportion_test, wilson_interval
from router.store import ArmSummary, LogSummary, Store, backend_for

PERCENTILES = (50, 95, 99)


def build_report(config: RouterConfig, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    """The report of one experiment from the log `config.store` names (SQLite at `config.database`, or the
    PostgreSQL server every replica writes to), without a router (any thread; the CLI's path)."""
    backend = backend_for(config)
    try:
        summary = backend.summarize(experiment.name, since, PERCENTILES)
        override = backend.overrides(config.experiments_digest).get(experiment.name)
    finally:
        backend.close()
    report = report_of(summary, experiment, since)
    report["rolled_back"] = override is not None and override.rollback  # as the routers' own reports say
    return report


async def live_report(store: Store, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    """The router's report: everything queued is committed first, then the database aggregates it on a worker
    thread while the event loop keeps serving."""
    return report_of(await store.summary(experiment.name, since, PERCENTILES), experiment, since)


def report_of(summary: LogSummary, experiment: Experiment, since: float = 0.0) -> dict[str, Any]:
    """The verdict from the log's aggregates (`Store.summary`, whatever database computed them): the
    experiment's arms in file order, then any other arm the log names; intervals and tests against control."""
    configured = [arm.name for arm in experiment.arms]
    names = configured + sorted(set(summary.arms) - set(configured))
    empty = ArmSummary(0, 0, 0, 0, (), dict.fromkeys(PERCENTILES))
    arms = {name: summary.arms.get(name, empty) for name in names}
    control = arms.get(experiment.control, empty)
    rows = []
    for name, stats in arms.items():
        interval = wilson_interval(stats.correct, stats.feedback)
        test = None if name == experiment.control else two_proportion_test(
            control.correct, control.feedback, stats.correct, stats.feedback)
        rows.append({
            "arm": name,
            "control": name == experiment.control,
            "targets": list(stats.targets),
            "requests": stats.requests,
            "errors": stats.errors,
            "error_rate": stats.errors / stats.requests if stats.requests else None,
            "latency_ms": {f"p{q}": stats.latency_ms.get(q) for q in PERCENTILES},
            "feedback": stats.feedback,
            "accuracy": stats.correct / stats.feedback if stats.feedback else None,
            "accuracy_ci95": list(interval) if interval else None,
            "vs_control": None if test is None else {
                "difference": test.difference, "z": test.z, "p_value": test.p_value,
                "significant": test.significant},
        })
    return {
        "experiment": experiment.name,
        "control": experiment.control,
        "since": since,
        "arms": rows,
        "shadow": [{"target": shadow.target, "compared": shadow.compared, "agree": shadow.agree,
                    "errors": shadow.errors,
                    "agreement": shadow.agree / shadow.compared if shadow.compared else None}
                   for shadow in summary.shadow],
        "events": [{"at": event.at, "kind": event.kind, "detail": event.detail} for event in summary.events],
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
