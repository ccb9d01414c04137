"""The router, independent of protocol: pick an arm, call it, retry once elsewhere, record, shadow, guard.

The REST and gRPC front ends hand `Router.route` a function that sends their request to one target; everything
else — assignment, circuit breakers, retries, metrics, the request log, shadow copies, the guardrail and live
changes of weights — happens here, once, for both protocols.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from router.config import Arm, Experiment, RouterConfig, Target, check_targets, load_config, with_weights
from router.errors import (
    WHERE_HEADERS,
    BadRequest,
    ConfigError,
    NotFound,
    RouterError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from router.metrics import Metrics
from router.report import build_report
from router.routing import choose_arm
from router.stats import percentile
from router.store import Override, RequestRow, Store
from router.upstream import AttemptFailed, Reply, TorchServeClient

log = logging.getLogger(__name__)

DIRECT = "direct"  # the arm name of requests for a plain TorchServe model (no experiment)
ROLLBACK = "rollback"
SERVED_REFRESH_S = 5.0
Call = Callable[[Target, float], Awaitable[Reply]]


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


@dataclass
class Window:
    """An arm's attempts over the guardrail's window: (time, latency ms, ok)."""

    samples: deque[tuple[float, float, bool]] = field(default_factory=deque)

    def add(self, now: float, latency_ms: float, ok: bool, window_s: float) -> None:
        self.samples.append((now, latency_ms, ok))
        self.trim(now, window_s)

    def trim(self, now: float, window_s: float) -> None:
        while self.samples and self.samples[0][0] < now - window_s:
            self.samples.popleft()


@dataclass(frozen=True)
class Routed:
    """A request's answer and where it came from."""

    reply: Reply
    request_id: str
    experiment: str
    arm: str
    target: Target
    retried_from: str | None = None

    def answer_headers(self) -> list[tuple[str, str]]:
        headers = list(zip(WHERE_HEADERS, (self.request_id, self.experiment, self.arm, str(self.target)),
                           strict=True))
        if self.retried_from:
            headers.append(("X-Retried-From", self.retried_from))
        return headers


def label_of(body: bytes) -> int | None:
    """The predicted class in one of our handler's answers, or None for anything else (an error, another format)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    label = answer.get("label") if isinstance(answer, dict) else None
    return label if isinstance(label, int) and not isinstance(label, bool) else None


class Router:
    def __init__(self, config: RouterConfig, client: TorchServeClient, store: Store,
                 metrics: Metrics | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.client = client
        self.store = store
        self.metrics = metrics or Metrics()
        self.rng = rng or random.Random()
        self.overrides: dict[str, Override] = {}
        self._effective: dict[str, Experiment] = {}
        self.breakers: dict[Target, CircuitBreaker] = {}
        self.windows: dict[tuple[str, str], Window] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        # TorchServe's models (checked at start and on reload): plain names pass through only to these, so a
        # client cannot mint metric labels or log rows for models that do not exist.
        self.served: dict[str, set[str]] = {}
        self._served_at = 0.0
        self._last_reload_error = ""  # an invalid edit is reported once, not every second
        # Reloads, admin changes and rollbacks each await the store between reading and replacing the state:
        # one at a time, so none installs an override built for a config another has just replaced.
        self._changes = asyncio.Lock()
        self._apply(config, store.overrides(config.digest))

    # --- configuration -----------------------------------------------------------------------------------------
    def experiment(self, name: str) -> Experiment | None:
        """The experiment as it routes now: the file's arms with any runtime override of their weights."""
        return self._effective.get(name)

    def _apply(self, config: RouterConfig, overrides: dict[str, Override]) -> None:
        self.config = config
        self.overrides = {name: o for name, o in overrides.items() if name in config.experiments}
        # Weights with overrides applied, once per change rather than on every request.
        self._effective = {name: with_weights(experiment, self.overrides[name].weights)
                           if name in self.overrides else experiment
                           for name, experiment in config.experiments.items()}
        self.breakers = {target: self._breaker(target) for target in config.targets()}
        for name, experiment in self._effective.items():
            for arm in experiment.arms:
                self.metrics.weight.labels(name, arm.name).set(arm.weight)
            self.metrics.rolled_back.labels(name).set(int(self.rolled_back(name)))

    def rolled_back(self, name: str) -> bool:
        override = self.overrides.get(name)
        return override is not None and override.reason.startswith(ROLLBACK)

    async def validate_targets(self, config: RouterConfig) -> None:
        """Every arm and shadow must be a model version TorchServe serves (ConfigError names the one that isn't)."""
        served = await self.client.served_models()
        check_targets(config, served)
        self.served = served

    async def reload(self, reason: str = "reload") -> bool:
        """Read the experiment file again; True if it changed and was applied. A bad file changes nothing."""
        assert self.config.source is not None
        async with self._changes:
            config = load_config(self.config.source)
            if config.digest == self.config.digest:
                return False
            await self.validate_targets(config)
            await self.store.clear_overrides()  # the edited file is the operator's new decision
            self._apply(config, {})
            self.windows.clear()
        for name, experiment in config.experiments.items():
            weights = ", ".join(f"{arm.name}={arm.weight:g}" for arm in experiment.arms)
            self.store.event(name, reason, f"experiment file applied: {weights}")
        log.warning("%s: applied %s (%s)", reason, config.source, ", ".join(config.experiments))
        return True

    async def watch_config(self, period_s: float = 1.0) -> None:
        """Apply edits of the experiment file without a restart; an invalid edit is logged (once) and ignored."""
        assert self.config.source is not None
        seen: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(period_s)
            try:
                stat = self.config.source.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp == seen:  # parse the file only when it changed
                    continue
                await self.reload("file-reload")
                seen, self._last_reload_error = stamp, ""
            except Exception as error:  # the watcher must outlive a bad file or an unreachable TorchServe
                if isinstance(error, ConfigError):
                    seen = stamp  # an invalid file stays invalid until it is edited again; TorchServe may return
                message = error.message if isinstance(error, RouterError) else repr(error)
                if message != self._last_reload_error:
                    log.error("experiment file not applied, keeping the running experiments: %s", message)
                    self._last_reload_error = message

    async def set_weights(self, name: str, weights: dict[str, float], reason: str) -> Experiment:
        reason = " ".join(reason.split())  # one line in the log and the report, whatever the client sent
        async with self._changes:
            current = self.experiment(name)
            if current is None:
                raise NotFound(f"no experiment {name!r} (experiments: {', '.join(self.config.experiments)})")
            changed = with_weights(current, weights)  # validates
            await self.store.set_override(name, changed.weights, reason, self.config.digest)
            self.overrides[name] = Override(changed.weights, reason, time.time())
            self._apply(self.config, self.overrides)
            self._clear_windows(name)
        detail = ", ".join(f"{arm}={weight:g}" for arm, weight in changed.weights.items())
        self.store.event(name, reason.split(":", 1)[0], f"{reason}; weights {detail}")
        log.warning("experiment %s: weights %s (%s)", name, detail, reason)
        return changed

    async def clear_override(self, name: str) -> None:
        async with self._changes:
            if name not in self.config.experiments:
                raise NotFound(f"no experiment {name!r}")
            await self.store.clear_overrides(name)
            self.overrides.pop(name, None)
            self._apply(self.config, self.overrides)
            self._clear_windows(name)
        self.store.event(name, "reset", "weights back to the experiment file")
        log.warning("experiment %s: weights back to the experiment file", name)

    def _clear_windows(self, name: str) -> None:
        """A new decision about an experiment starts its guardrail's evidence afresh."""
        for key in [key for key in self.windows if key[0] == name]:
            del self.windows[key]

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        described = {}
        for name in self.config.experiments:
            experiment = self.experiment(name)
            assert experiment is not None
            override = self.overrides.get(name)
            described[name] = {
                "control": experiment.control,
                "arms": {arm.name: {"model": arm.target.model, "version": arm.target.version, "weight": arm.weight,
                                    "circuit": self.breakers[arm.target].state(now)}
                         for arm in experiment.arms},
                "shadow": None if experiment.shadow is None else {
                    "model": experiment.shadow.target.model, "version": experiment.shadow.target.version,
                    "sample": experiment.shadow.sample},
                "override": None if override is None else {"reason": override.reason, "at": override.at},
                "rolled_back": self.rolled_back(name),
            }
        return {"experiments": described, "config": str(self.config.source), "digest": self.config.digest}

    # --- requests ----------------------------------------------------------------------------------------------
    async def route(self, name: str, version: str | None, key: str | None, override: str | None, protocol: str,
                    call: Call) -> Routed:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        experiment = self.experiment(name)
        if experiment is None:  # a plain TorchServe model: pass through, still measured and logged
            await self._check_served(name, version)
            arm = Arm(DIRECT, Target(name, version), 1.0)
            experiment_name = name
        else:
            if version is not None:
                raise BadRequest(f"{name!r} is an experiment: it picks the version itself; pin an arm with the "
                                 f"{self.config.override_header} header instead of a version in the path")
            try:
                arm = choose_arm(experiment, experiment.weights, key, override, self._unavailable(experiment),
                                 self.rng)
            except UpstreamUnavailable as error:  # every arm's circuit is open: say when to come back
                self.metrics.requests.labels(experiment.name, "none", protocol, "503").inc()
                error.retry_after_s = self.config.circuit_breaker.reset_s
                raise
            experiment_name = experiment.name
        retried_from = None
        try:
            while True:
                try:
                    reply = await self._attempt(experiment_name, arm, protocol, call)
                    break
                except AttemptFailed as failure:
                    retry = None
                    if experiment is not None and override is None and retried_from is None:
                        try:
                            retry = choose_arm(experiment, experiment.weights, key, None,
                                               self._unavailable(experiment) | {arm.name}, self.rng)
                        except UpstreamUnavailable:
                            retry = None
                    if retry is None:
                        error_type = UpstreamTimeout if failure.kind == "timeout" else UpstreamUnavailable
                        where = f"arm {arm.name!r} ({arm.target})" if arm.name != DIRECT else str(arm.target)
                        tried = f" after {retried_from!r} failed too" if retried_from else ""
                        raise error_type(f"{where} failed{tried}: {failure.detail}",
                                         retry_after_s=self.config.circuit_breaker.reset_s) from failure
                    self.metrics.retries.labels(experiment_name, arm.name).inc()
                    retried_from, arm = arm.name, retry
        except RouterError as error:  # every outcome is counted and logged, and names where it happened
            self._finish(request_id, experiment_name, arm, protocol, started, None, retried_from, error.http_status)
            error.where = (request_id, experiment_name, arm.name, str(arm.target))
            raise
        label = self._finish(request_id, experiment_name, arm, protocol, started, reply, retried_from)
        if experiment is not None and experiment.shadow is not None and reply.status == 200:
            self._maybe_shadow(request_id, experiment, label, call)
        return Routed(reply, request_id, experiment_name, arm.name, arm.target, retried_from)

    async def _check_served(self, name: str, version: str | None) -> None:
        """Pass-through goes only to model versions TorchServe serves (re-read at most every few seconds), so a
        client can neither reach other paths through a crafted version nor mint metric labels and breakers."""
        if (name not in self.served or (version is not None and version not in self.served[name])) \
                and time.monotonic() - self._served_at > SERVED_REFRESH_S:
            self._served_at = time.monotonic()
            try:
                self.served = await self.client.served_models()
            except RouterError as error:
                log.warning("could not refresh TorchServe's model list: %s", error.message)
        if name not in self.served:
            raise NotFound(f"no experiment or TorchServe model {name!r} (experiments: "
                           f"{', '.join(self.config.experiments)}; models: {', '.join(sorted(self.served))})")
        if version is not None and version not in self.served[name]:
            raise NotFound(f"TorchServe serves no version {version!r} of {name!r} "
                           f"(versions: {', '.join(sorted(self.served[name]))})")

    def _breaker(self, target: Target) -> CircuitBreaker:
        breaker = self.breakers.get(target)
        if breaker is None:
            settings = self.config.circuit_breaker
            breaker = self.breakers[target] = CircuitBreaker(settings.failures, settings.reset_s)
        return breaker

    def _unavailable(self, experiment: Experiment) -> set[str]:
        now = time.monotonic()
        return {arm.name for arm in experiment.arms if not self._breaker(arm.target).available(now)}

    async def _attempt(self, experiment: str, arm: Arm, protocol: str, call: Call) -> Reply:
        started = time.perf_counter()
        breaker = self._breaker(arm.target)
        breaker.attempt(time.monotonic())
        try:
            reply = await call(arm.target, self.config.timeouts.request_s)
        except AttemptFailed as failure:
            elapsed = time.perf_counter() - started
            self.metrics.upstream_failures.labels(experiment, arm.name, failure.kind).inc()
            self._observe(experiment, arm.name, elapsed * 1000, False)
            if breaker.failure(time.monotonic()):
                self.metrics.circuit_open.labels(experiment, arm.name).set(1)
                log.warning("circuit open for %s (%s) after %d failures: %s", arm.name, arm.target,
                            breaker.consecutive, failure.detail)
            raise
        elapsed = time.perf_counter() - started
        self.metrics.upstream_duration.labels(experiment, arm.name, protocol).observe(elapsed)
        # The guardrail judges an arm by its own answers: not by time another arm spent failing first.
        self._observe(experiment, arm.name, elapsed * 1000, reply.status < 500)
        if breaker.success():
            self.metrics.circuit_open.labels(experiment, arm.name).set(0)
            log.warning("circuit closed for %s (%s)", arm.name, arm.target)
        return reply

    def _observe(self, experiment: str, arm: str, latency_ms: float, ok: bool) -> None:
        """Feed the guardrail's window; only experiments with a guardrail keep one, trimmed as it grows."""
        spec = self.config.experiments.get(experiment)
        if spec is not None and spec.guardrail is not None:
            self._window(experiment, arm).add(time.monotonic(), latency_ms, ok, spec.guardrail.window_s)

    def _window(self, experiment: str, arm: str) -> Window:
        window = self.windows.get((experiment, arm))
        if window is None:
            window = self.windows[(experiment, arm)] = Window()
        return window

    def _finish(self, request_id: str, experiment: str, arm: Arm, protocol: str, started: float,
                reply: Reply | None, retried_from: str | None, failed_status: int = 503) -> int | None:
        """Count and log one routed request; the class its answer named, if any."""
        elapsed = time.perf_counter() - started
        status = reply.status if reply is not None else failed_status
        ok = reply is not None and reply.status < 500
        self.metrics.requests.labels(experiment, arm.name, protocol, str(status)).inc()
        self.metrics.duration.labels(experiment, arm.name, protocol).observe(elapsed)
        label = label_of(reply.body) if reply is not None and reply.status == 200 else None
        self.store.record(RequestRow(request_id, time.time(), experiment, arm.name, arm.target.model,
                                     arm.target.version, protocol, status, ok, elapsed * 1000, label, retried_from))
        return label

    # --- shadow ------------------------------------------------------------------------------------------------
    def _maybe_shadow(self, request_id: str, experiment: Experiment, live_label: int | None, call: Call) -> None:
        shadow = experiment.shadow
        assert shadow is not None
        if self.rng.random() >= shadow.sample:
            return
        target = str(shadow.target)
        if len(self._shadow_tasks) >= self.config.max_shadow_in_flight:  # a slow shadow must not pile up
            self.metrics.shadow.labels(experiment.name, target, "dropped").inc()
            self.store.record_shadow(request_id, experiment.name, target, "dropped", None, None)
            return
        task = asyncio.get_running_loop().create_task(self._shadow(request_id, experiment.name, shadow.target,
                                                                   live_label, call))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, request_id: str, experiment: str, target: Target, live_label: int | None,
                      call: Call) -> None:
        started = time.perf_counter()
        name = str(target)
        try:
            reply = await call(target, self.config.timeouts.shadow_s)
        except AttemptFailed as failure:
            outcome = "timeout" if failure.kind == "timeout" else "error"
            self.metrics.shadow.labels(experiment, name, outcome).inc()
            self.store.record_shadow(request_id, experiment, name, outcome, None, None)
            return
        except Exception as error:  # whatever happens to a shadow copy stays here
            log.debug("shadow request to %s failed: %s", name, error)
            self.metrics.shadow.labels(experiment, name, "error").inc()
            self.store.record_shadow(request_id, experiment, name, "error", None, None)
            return
        latency_ms = (time.perf_counter() - started) * 1000
        shadow_label = label_of(reply.body) if reply.status == 200 else None
        if shadow_label is None:
            self.metrics.shadow.labels(experiment, name, "error").inc()
            self.store.record_shadow(request_id, experiment, name, "error", None, latency_ms)
            return
        agree = shadow_label == live_label
        self.metrics.shadow.labels(experiment, name, "ok").inc()
        self.metrics.shadow_agreement.labels(experiment, name, str(agree).lower()).inc()
        self.store.record_shadow(request_id, experiment, name, "ok", agree, latency_ms)

    async def drain_shadows(self) -> None:
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

    # --- feedback, report, guardrail ---------------------------------------------------------------------------
    async def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        found = await self.store.feedback(request_id, label)
        if found is None:
            raise NotFound(f"no routed request has the id {request_id!r}")
        experiment, arm, predicted = found
        correct = predicted == label
        self.metrics.feedback.labels(experiment, arm, str(correct).lower()).inc()
        return {"request_id": request_id, "experiment": experiment, "arm": arm, "predicted": predicted,
                "label": label, "correct": correct}

    async def report(self, name: str, since: float = 0.0) -> dict[str, Any]:
        experiment = self.experiment(name)
        if experiment is None:
            raise NotFound(f"no experiment {name!r} (experiments: {', '.join(self.config.experiments)})")
        await self.store.flush()
        report = await asyncio.to_thread(build_report, self.store.path, experiment, since)
        report["rolled_back"] = self.rolled_back(name)
        return report

    async def check_guardrails(self) -> None:
        now = time.monotonic()
        for name, base in self.config.experiments.items():
            guardrail = base.guardrail
            if guardrail is None or self.rolled_back(name):
                continue
            experiment = self.experiment(name)
            assert experiment is not None
            for arm in experiment.arms:
                if arm.name == experiment.control or arm.weight <= 0:
                    continue
                breach = self._breach(name, arm.name, guardrail.max_error_rate, guardrail.max_p99_ms,
                                      guardrail.min_requests, guardrail.window_s, now)
                if breach:
                    await self.rollback(experiment, f"{ROLLBACK}: arm {arm.name} {breach}")
                    break

    def _breach(self, experiment: str, arm: str, max_error_rate: float | None, max_p99_ms: float | None,
                min_requests: int, window_s: float, now: float) -> str | None:
        window = self._window(experiment, arm)
        window.trim(now, window_s)
        count = len(window.samples)
        if count < min_requests:
            return None
        failures = sum(1 for _, _, ok in window.samples if not ok)
        if max_error_rate is not None and failures / count > max_error_rate:
            return f"error rate {failures / count:.1%} > {max_error_rate:.1%} over {count} requests"
        p99 = percentile([latency for _, latency, ok in window.samples if ok], 99)
        if max_p99_ms is not None and p99 is not None and p99 > max_p99_ms:
            return f"p99 {p99:.1f} ms > {max_p99_ms:g} ms over {count} requests"
        return None

    async def rollback(self, experiment: Experiment, reason: str) -> None:
        """Send all traffic to control (sticky keys included) until an operator resets or edits the weights."""
        control = experiment.arm(experiment.control)
        weights = {arm.name: (control.weight or 1.0) if arm.name == control.name else 0.0 for arm in experiment.arms}
        await self.set_weights(experiment.name, weights, reason)

    async def guard_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.check_guardrails()
            except Exception:  # the guardrail loop must outlive any one bad evaluation
                log.exception("guardrail check failed")

