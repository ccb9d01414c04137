"""The guardrail: roll an experiment back to its control arm when a candidate misbehaves over a recent window.

An arm is judged only on its own behaviour: its failed attempts (5xx, connection errors, timeouts) and the
latency of the requests it answered. A client's bad request (a 4xx) is not evidence about the arm, so it is
not counted at all: neither as a success that dilutes the error rate, nor as a latency a client could inflate
with slow-to-refuse bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from router.config import Guardrail, RouterConfig
from router.control import Control
from router.stats import percentile
from router.store import StoreError

log = logging.getLogger(__name__)


@dataclass
class Window:
    """An arm's judged attempts over the guardrail's window: (time, latency ms, ok)."""

    samples: deque[tuple[float, float, bool]] = field(default_factory=deque)

    def add(self, now: float, latency_ms: float, ok: bool, window_s: float) -> None:
        self.samples.append((now, latency_ms, ok))
        self.trim(now, window_s)

    def trim(self, now: float, window_s: float) -> None:
        while self.samples and self.samples[0][0] < now - window_s:
            self.samples.popleft()

    def breach(self, guardrail: Guardrail, now: float) -> str | None:
        """What the arm breached over the window, or None."""
        self.trim(now, guardrail.window_s)
        count = len(self.samples)
        if count < guardrail.min_requests:
            return None
        failures = sum(1 for _, _, ok in self.samples if not ok)
        if guardrail.max_error_rate is not None and failures / count > guardrail.max_error_rate:
            return f"error rate {failures / count:.1%} > {guardrail.max_error_rate:.1%} over {count} requests"
        p99 = percentile([latency for _, latency, ok in self.samples if ok], 99)
        if guardrail.max_p99_ms is not None and p99 is not None and p99 > guardrail.max_p99_ms:
            return f"p99 {p99:.1f} ms > {guardrail.max_p99_ms:g} ms over {count} requests"
        return None


class GuardrailMonitor:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.windows: dict[tuple[str, str], Window] = {}
        control.listeners.append(self._forget)

    def _forget(self, config: RouterConfig, changed: str | None) -> None:
        """A new decision about an experiment starts its guardrail's evidence afresh."""
        if changed is None:
            self.windows.clear()
        else:
            for key in [key for key in self.windows if key[0] == changed]:
                del self.windows[key]

    def answered(self, experiment: str, arm: str, latency_ms: float) -> None:
        self._add(experiment, arm, latency_ms, True)

    def failed(self, experiment: str, arm: str, latency_ms: float) -> None:
        self._add(experiment, arm, latency_ms, False)

    def _add(self, experiment: str, arm: str, latency_ms: float, ok: bool) -> None:
        """Only experiments with a guardrail keep a window, trimmed as it grows."""
        spec = self.control.config.experiments.get(experiment)
        if spec is None or spec.guardrail is None:
            return
        window = self.windows.get((experiment, arm))
        if window is None:
            window = self.windows[(experiment, arm)] = Window()
        window.add(time.monotonic(), latency_ms, ok, spec.guardrail.window_s)

    async def check(self) -> None:
        now = time.monotonic()
        for name, base in self.control.config.experiments.items():
            guardrail = base.guardrail
            experiment = self.control.experiment(name)
            if guardrail is None or experiment is None or self.control.rolled_back(name):
                continue
            for arm in experiment.arms:
                window = self.windows.get((name, arm.name))
                if arm.name == experiment.control or arm.weight <= 0 or window is None:
                    continue
                breach = window.breach(guardrail, now)
                if breach:
                    await self.control.rollback(experiment, f"arm {arm.name} {breach}")
                    break

    async def run_forever(self, period_s: float = 1.0) -> None:
        failing = ""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.check()
                failing = ""
            except StoreError as error:  # a rollback is a shared decision: it waits for the store
                if error.message != failing:
                    log.error("guardrail: a rollback could not be recorded, retrying every %g s: %s", period_s,
                              error.message)
                failing = error.message
            except Exception:  # the guardrail loop must outlive any one bad evaluation
                log.exception("guardrail check failed")
