"""Judging the arms: true labels reported as feedback, joined to the request the router logged, and the
per-arm report (traffic, errors, latency, online accuracy, shadow agreement, events) built from the log."""

from __future__ import annotations

from typing import Any

from router.control import Control
from router.errors import NotFound, quoted
from router.metrics import Metrics
from router.report import live_report
from router.store import Store


class Evaluation:
    def __init__(self, control: Control, store: Store, metrics: Metrics) -> None:
        self.control = control
        self.store = store
        self.metrics = metrics

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

    async def report(self, name: str, since: float = 0.0) -> dict[str, Any]:
        experiment = self.control.experiment(name)
        if experiment is None:
            raise NotFound(f"no experiment {quoted(name)} (experiments: {', '.join(self.control.names())})")
        report = await live_report(self.store, experiment, since)
        report["rolled_back"] = self.control.rolled_back(name)
        return report
