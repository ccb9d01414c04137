"""The router's data plane, independent of protocol: choose an arm, attempt it, retry once elsewhere, finish.

A front end hands `Router.route` one `InferenceRequest`; the router picks a target, gives the request to the
upstream client, and returns a `Routed` answer. Everything around a request has its own collaborator, built
here and shared with the front ends: the experiments as they route now (`control`), the circuit breakers
(`circuits`), the guardrail (`guardrail`), shadow copies (`shadows`), the model catalog (`catalog`) and the
feedback and reports (`evaluation`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

from router.catalog import Catalog
from router.circuits import Circuits
from router.config import Arm, Experiment, RouterConfig, Target
from router.control import Control
from router.errors import BadRequest, Forbidden, RouterError, UpstreamTimeout, UpstreamUnavailable, quoted
from router.evaluation import Evaluation
from router.guardrail import GuardrailMonitor
from router.metrics import Metrics
from router.request import InferenceRequest, Routed, Upstream, labels_of, single_label
from router.routing import choose_arm
from router.shadow import Shadows
from router.store import RequestRow, Store, StoreError
from router.upstream import AttemptFailed, Reply

log = logging.getLogger(__name__)

DIRECT = "direct"  # the arm name of requests for a plain TorchServe model (no experiment)


def new_request_id() -> str:
    """32 hex digits: milliseconds since the epoch, then 80 random bits. Time-ordered ids keep the request log's
    primary-key inserts and retention's deletes at the end of the index (about 3x cheaper deletes than random
    ids, loadtest.request_log), and remain unguessable."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class Router:
    def __init__(self, config: RouterConfig, client: Upstream, store: Store, metrics: Metrics | None = None,
                 rng: random.Random | None = None) -> None:
        self.client = client
        self.store = store
        self.metrics = metrics or Metrics()
        self.rng = rng or random.Random()
        self.catalog = Catalog(client.served_models)
        self.circuits = Circuits(config.circuit_breaker, self.metrics)
        self.control = Control(config, store, self.catalog, self.metrics)
        self.control.listeners.append(lambda changed, _: self.circuits.keep_only(changed.targets()))
        self.circuits.keep_only(config.targets())
        self.guardrail = GuardrailMonitor(self.control)
        self.shadows = Shadows(client, store, self.metrics, config.timeouts, config.max_shadow_in_flight, self.rng)
        self.evaluation = Evaluation(self.control, store, self.metrics)

    @property
    def config(self) -> RouterConfig:
        return self.control.config

    def describe(self) -> dict[str, Any]:
        return {**self.control.describe(self.circuits.state), "hosts": self.client.describe()}

    async def route(self, request: InferenceRequest) -> Routed:
        started = time.perf_counter()
        request_id = new_request_id()
        experiment = self.control.experiment(request.name)
        if experiment is None:  # a plain TorchServe model: pass through, still measured and logged
            await self.catalog.check(request.name, request.version, self.control.names())
            arm = Arm(DIRECT, Target(request.name, request.version), 1.0)
        else:
            arm = self._choose(request, experiment)
        name = request.name
        retried_from = None
        try:
            while True:
                try:
                    reply = await self._attempt(name, arm, request)
                    break
                except AttemptFailed as failure:
                    retry = None
                    if experiment is not None and request.pin is None and retried_from is None:
                        try:
                            retry = choose_arm(experiment, experiment.weights, request.key, None,
                                               self.circuits.unavailable(experiment) | {arm.name}, self.rng)
                        except UpstreamUnavailable:
                            retry = None
                    if retry is None:
                        error_type = UpstreamTimeout if failure.kind == "timeout" else UpstreamUnavailable
                        where = f"arm {arm.name!r} ({arm.target})" if arm.name != DIRECT else str(arm.target)
                        tried = f" after {retried_from!r} failed too" if retried_from else ""
                        raise error_type(f"{where} failed{tried}: {failure.detail}",
                                         retry_after_s=self.config.circuit_breaker.reset_s) from failure
                    self.metrics.retries.labels(name, arm.name).inc()
                    retried_from, arm = arm.name, retry
        except RouterError as error:  # every outcome is counted and logged, and names where it happened
            error.where = (request_id, name, arm.name, str(arm.target))
            if not await self._finish(request_id, name, arm, request.protocol, started, None, retried_from,
                                      error.http_status):
                error.where = None  # the error is still the answer, but names no request id that has no row
            raise
        labels = labels_of(reply) if reply.status == 200 else None
        if not await self._finish(request_id, name, arm, request.protocol, started, reply, retried_from,
                                  label=single_label(labels)):
            raise UpstreamUnavailable("the request log could not record this request; it was not answered: retry",
                                      retry_after_s=1)
        if experiment is not None and reply.status == 200:  # after the answer is final: a copy never competes
            self.shadows.maybe_copy(request_id, experiment, labels, request)
        return Routed(reply, request_id, name, arm.name, arm.target, retried_from)

    def _choose(self, request: InferenceRequest, experiment: Experiment) -> Arm:
        if request.version is not None:
            raise BadRequest(f"{request.name!r} is an experiment: it picks the version itself; pin an arm with the "
                             f"{self.config.override_header} header instead of a version in the path")
        if request.pin is not None and not request.privileged and self.control.drained(experiment.name, request.pin):
            # A drained or rolled-back arm gets no traffic a client chose: only an operator may still probe it.
            raise Forbidden(f"arm {quoted(request.pin)} of {experiment.name!r} is drained (weight 0, by an admin or "
                            "a guardrail rollback): only the admin token may pin it")
        try:
            return choose_arm(experiment, experiment.weights, request.key, request.pin,
                              self.circuits.unavailable(experiment), self.rng)
        except UpstreamUnavailable as error:  # every arm's circuit is open: say when to come back
            self.metrics.requests.labels(experiment.name, "none", request.protocol, "503").inc()
            error.retry_after_s = self.config.circuit_breaker.reset_s
            raise

    async def _attempt(self, experiment: str, arm: Arm, request: InferenceRequest) -> Reply:
        started = time.perf_counter()
        self.circuits.attempt(arm.target)
        try:
            reply = await self.client.infer(arm.target, request, self.config.timeouts.request_s)
        except AttemptFailed as failure:
            self.metrics.upstream_failures.labels(experiment, arm.name, failure.kind).inc()
            self.guardrail.failed(experiment, arm.name, (time.perf_counter() - started) * 1000)
            self.circuits.failed(experiment, arm.name, arm.target, failure.detail)
            raise
        elapsed = time.perf_counter() - started
        self.metrics.upstream_duration.labels(experiment, arm.name, request.protocol).observe(elapsed)
        if reply.status < 400:  # a client's bad request says nothing about the arm (see router.guardrail)
            self.guardrail.answered(experiment, arm.name, elapsed * 1000)
        self.circuits.succeeded(experiment, arm.name, arm.target)
        return reply

    async def _finish(self, request_id: str, experiment: str, arm: Arm, protocol: str, started: float,
                      reply: Reply | None, retried_from: str | None, failed_status: int = 503,
                      label: int | None = None) -> bool:
        """Log one routed request, wait until its row is committed (router.store: durability), then count it with
        the status its client gets. False if the row could not be committed (the client then gets a 503)."""
        elapsed = time.perf_counter() - started
        status = reply.status if reply is not None else failed_status
        ok = reply is not None and reply.status < 500
        try:
            await self.store.record(RequestRow(request_id, time.time(), experiment, arm.name, arm.target.model,
                                               arm.target.version, protocol, status, ok, elapsed * 1000, label,
                                               retried_from))
            logged = True
        except StoreError as error:
            log.error("request %s not logged: %s", request_id, error)
            status, logged = UpstreamUnavailable.http_status, False
        self.metrics.requests.labels(experiment, arm.name, protocol, str(status)).inc()
        self.metrics.duration.labels(experiment, arm.name, protocol).observe(elapsed)
        return logged
