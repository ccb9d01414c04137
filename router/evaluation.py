"""Judging the arms: true labels reported as feedback, joined to the request the router logged, the per-arm
report (traffic, errors, latency, online accuracy, decisions, shadow agreement, events) built from the log, and
its time series (the dashboard's)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from router.config import Experiment
from router.control import Control
from router.errors import BadRequest, NotFound, quoted
from router.metrics import Metrics
from router.report import PERCENTILES, live_report
from router.store import Store

# The time series' bounds: intervals of at least a second, at most this many per series, over at most a day (the
# query reads every row of the window: 4 times the dashboard's longest, whatever the interval).
MIN_STEP_S = 1.0
MAX_INTERVALS = 720
MAX_WINDOW_S = 86_400.0
# The oldest report a caller may ask to be given (`max_age_s`) instead of a new one.
MAX_REPORT_AGE_S = 60.0


@dataclass
class _Report:
    """The latest report of one experiment, or its computation still under way: what callers that accept a report
    `max_age_s` old share (a report reads every row since `since`; each dashboard tab asks every few seconds)."""

    started: float  # time.monotonic() when it began: its figures are at least this recent
    since: float
    experiment: Experiment  # as it routed then (the weights are in the report)
    task: asyncio.Future[dict[str, Any]]


class Evaluation:
    def __init__(self, control: Control, store: Store, metrics: Metrics) -> None:
        self.control = control
        self.store = store
        self.metrics = metrics
        self._reports: dict[str, _Report] = {}  # by experiment: one entry each, whatever `since` callers ask for

    async def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        """Store the true label of a routed request. The first label stands: a repeat changes nothing and says so
        (`duplicate`, with the label that stands), and is not counted again. A request whose answer named no
        single class (an error, an Open Inference Protocol batch) keeps the label but is not judged: `correct`
        is null, and neither the metric nor the report counts it."""
        found = await self.store.feedback(request_id, label)
        if found is None:
            raise NotFound(f"no routed request has the id {quoted(request_id)}")
        if not found.duplicate and found.correct is not None:
            self.metrics.feedback.labels(found.experiment, found.arm, str(found.correct).lower()).inc()
        return {"request_id": request_id, "experiment": found.experiment, "arm": found.arm,
                "predicted": found.predicted, "label": found.label, "correct": found.correct,
                "duplicate": found.duplicate}

    def _experiment(self, name: str) -> Experiment:
        experiment = self.control.experiment(name)
        if experiment is None:
            raise NotFound(f"no experiment {quoted(name)} (experiments: {', '.join(self.control.names())})")
        return experiment

    async def report(self, name: str, since: float = 0.0, max_age_s: float = 0.0) -> dict[str, Any]:
        """The report of the log since `since`; with `max_age_s` > 0, one begun at most that long ago for the
        same `since` and weights may be given instead (or one still under way shared): any number of callers
        then cost one report per `max_age_s`. 0: a new one, with every row committed so far."""
        experiment = self._experiment(name)
        if not 0 <= max_age_s <= MAX_REPORT_AGE_S:  # nan fails this too
            raise BadRequest(f"max_age_s must be from 0 to {MAX_REPORT_AGE_S:g} seconds, got {max_age_s:g}")
        latest = self._reports.get(name)
        if (latest is None or latest.since != since or latest.experiment != experiment
                or time.monotonic() - latest.started >= max_age_s):
            latest = _Report(time.monotonic(), since, experiment,
                             asyncio.ensure_future(live_report(self.store, experiment, since)))
            self._reports[name] = latest
        try:
            # Shielded: a caller that goes away does not cancel what the others are waiting for.
            report = await asyncio.shield(latest.task)
        except Exception:
            if self._reports.get(name) is latest:  # a failure is not handed to the next caller
                del self._reports[name]
            raise
        return {**report, "rolled_back": self.control.rolled_back(name)}

    async def series(self, name: str, window_s: float, step_s: float) -> dict[str, Any]:
        """Each arm's attempts, failures and latency percentiles in intervals of `step_s` over the last
        `window_s` seconds: intervals aligned to multiples of `step_s` since the epoch, the last one still
        filling (its end is `until`)."""
        experiment = self._experiment(name)
        # Checked before `count` is computed: a huge window would otherwise name a huge count in the message.
        if (not (math.isfinite(step_s) and math.isfinite(window_s)) or step_s < MIN_STEP_S or window_s < step_s
                or window_s > MAX_WINDOW_S):
            raise BadRequest(f"step_s must be at least {MIN_STEP_S:g} and window_s from step_s to {MAX_WINDOW_S:g} "
                             f"(got step_s {step_s:g}, window_s {window_s:g})")
        count = math.ceil(window_s / step_s)
        if count > MAX_INTERVALS:
            raise BadRequest(f"window_s / step_s is {count} intervals; at most {MAX_INTERVALS}: widen step_s")
        until = time.time()
        since = (math.floor(until / step_s) - count + 1) * step_s
        points = await self.store.series(name, since, step_s, PERCENTILES)
        names = [arm.name for arm in experiment.arms]
        names += sorted({point.arm for point in points} - set(names))
        arms: dict[str, dict[str, list[Any]]] = {
            arm: {"requests": [0] * count, "errors": [0] * count, **{f"p{q}": [None] * count for q in PERCENTILES}}
            for arm in names}
        for point in points:
            if 0 <= point.bucket < count:  # a row logged after `until`, while the query ran, waits for the next
                series = arms[point.arm]
                series["requests"][point.bucket] = point.requests
                series["errors"][point.bucket] = point.errors
                for q in PERCENTILES:
                    series[f"p{q}"][point.bucket] = point.latency_ms.get(q)
        return {"experiment": name, "since": since, "until": until, "step_s": step_s,
                "starts": [since + index * step_s for index in range(count)], "arms": arms}
