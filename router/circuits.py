"""Circuit breakers, one per TorchServe target: a target that keeps failing is taken out of routing for a while,
then given one trial request."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from router.config import CircuitBreakerSettings, Experiment, Target
from router.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class CircuitBreaker:
    """Closed until `failures` consecutive failures; then open for `reset_s`; then half-open: exactly one probe
    request goes through (another only if that probe has not finished within `reset_s`). The probe's success
    closes the circuit, its failure opens it for another `reset_s`."""

    failures: int
    reset_s: float
    consecutive: int = 0
    opened_at: float | None = None
    probe_started: float | None = None

    def state(self, now: float) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if now - self.opened_at < self.reset_s else "half-open"

    def available(self, now: float) -> bool:
        """Whether routing may pick this target now: closed, or half-open with no probe under way."""
        state = self.state(now)
        if state == "half-open":
            return self.probe_started is None or now - self.probe_started >= self.reset_s
        return state == "closed"

    def attempt(self, now: float) -> None:
        """A request is being sent: in the half-open state it is the probe."""
        if self.state(now) == "half-open":
            self.probe_started = now

    def success(self) -> bool:
        """Record a success; True if this closed an open (or half-open) circuit."""
        was_open = self.opened_at is not None
        self.consecutive, self.opened_at, self.probe_started = 0, None, None
        return was_open

    def failure(self, now: float) -> bool:
        """Record a failure; True if this opened the circuit (again)."""
        self.consecutive += 1
        if self.consecutive >= self.failures and self.state(now) != "open":
            self.opened_at, self.probe_started = now, None
            return True
        return False


class Circuits:
    """The breakers of every target the experiments (and pass-through requests) use."""

    def __init__(self, settings: CircuitBreakerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.breakers: dict[Target, CircuitBreaker] = {}

    def keep_only(self, targets: Iterable[Target]) -> None:
        """After a configuration change: targets still in use keep their state, the others are forgotten."""
        self.breakers = {target: self.breaker(target) for target in targets}

    def breaker(self, target: Target) -> CircuitBreaker:
        breaker = self.breakers.get(target)
        if breaker is None:
            breaker = self.breakers[target] = CircuitBreaker(self.settings.failures, self.settings.reset_s)
        return breaker

    def state(self, target: Target) -> str:
        return self.breaker(target).state(time.monotonic())

    def unavailable(self, experiment: Experiment) -> set[str]:
        """The arms of `experiment` routing must skip now."""
        now = time.monotonic()
        return {arm.name for arm in experiment.arms if not self.breaker(arm.target).available(now)}

    def attempt(self, target: Target) -> None:
        self.breaker(target).attempt(time.monotonic())

    def failed(self, experiment: str, arm: str, target: Target, detail: str) -> None:
        breaker = self.breaker(target)
        if breaker.failure(time.monotonic()):
            self.metrics.circuit_open.labels(experiment, arm).set(1)
            log.warning("circuit open for %s (%s) after %d failures: %s", arm, target, breaker.consecutive, detail)

    def succeeded(self, experiment: str, arm: str, target: Target) -> None:
        if self.breaker(target).success():
            self.metrics.circuit_open.labels(experiment, arm).set(0)
            log.warning("circuit closed for %s (%s)", arm, target)
