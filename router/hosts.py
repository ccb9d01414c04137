"""The TorchServe hosts behind every arm: each serves the same model store, so any of them can answer any target.

`TorchServeHosts` is the core's upstream (`router.request.Upstream`): for each attempt it picks a healthy host
(`routing.choose_host`: the less busy of two), and when that host fails it tries the arm's other healthy hosts,
each once, before the core moves to another arm. Circuits keep that rare: a bad host costs at most
`failures` failed tries (each within the stated timeouts) before it is skipped. Circuits are kept per host
and per model on a host:
- a connection that cannot be made or breaks (refused, reset, unreachable, no connection within
  `timeouts.connect_s`) says the host is unreachable (down, cut off): after `circuit_breaker.failures` in a row
  the whole host is out for `reset_s`, then gets one trial request;
- a 5xx or an answer that does not come within the attempt's timeout says one model version on that host is
  failing or stuck (its worker crashed, its queue is full, it has no worker): only that model on that host is
  taken out, and the host keeps serving the others. (A model stuck on every host must not take every host out.)
An arm fails (and the core's arm circuit counts it) only when no host could answer for it.

Hosts are a fixed list, or the addresses a DNS name resolves to (a Kubernetes headless Service), looked up
again every `resolve.every_s`; hosts that disappear are closed once their last attempt is over. Each host has
its own client (keep-alive pool, gRPC channel) and its own key file, or none when its token authorization is
off (see the README's threat model).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.circuits import CircuitBreaker
from router.config import CircuitBreakerSettings, Host, Target, Timeouts, TorchServe
from router.errors import NotFound, UpstreamUnavailable
from router.metrics import Metrics
from router.routing import choose_host
from router.upstream import AttemptFailed, Reply, TorchServeClient

if TYPE_CHECKING:
    from router.request import InferenceRequest

log = logging.getLogger(__name__)

HOST_FAILURES = ("connection",)  # failure kinds that count against the host; "timeout", "server_error": the model


@dataclass
class HostState:
    host: Host
    client: TorchServeClient
    breaker: CircuitBreaker
    models: dict[Target, CircuitBreaker] = field(default_factory=dict)
    in_flight: int = 0
    retired: bool = False  # no longer resolved: closed when its last attempt ends

    def available(self, target: Target, now: float) -> bool:
        model = self.models.get(target)
        return self.breaker.available(now) and (model is None or model.available(now))


class TorchServeHosts:
    def __init__(self, torchserve: TorchServe, timeouts: Timeouts, breakers: CircuitBreakerSettings,
                 metrics: Metrics | None = None, rng: random.Random | None = None) -> None:
        self.torchserve = torchserve
        self.timeouts = timeouts
        self.settings = breakers
        self.metrics = metrics or Metrics()
        self.rng = rng or random.Random()
        self.hosts: dict[str, HostState] = {}
        self._retired: list[HostState] = []  # no longer resolved, maybe still answering an attempt

    # --- lifecycle -----------------------------------------------------------------------------------------------
    async def open(self) -> None:
        for host in self.torchserve.hosts:
            await self._add(host)
        if self.torchserve.resolve is not None:
            await self.resolve()

    async def close(self) -> None:
        for state in [*self.hosts.values(), *self._retired]:
            await state.client.close()
        self.hosts, self._retired = {}, []

    async def _add(self, host: Host) -> None:
        client = TorchServeClient(host, self.timeouts)
        await client.open()
        self.hosts[host.name] = HostState(host, client, self._breaker())
        self.metrics.hosts.set(len(self.hosts))

    def _breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.settings.failures, self.settings.reset_s)

    async def resolve(self) -> None:
        """Look the DNS name up and follow its addresses: new ones become hosts, vanished ones are retired."""
        resolve = self.torchserve.resolve
        assert resolve is not None
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(resolve.name, resolve.inference_port, type=socket.SOCK_STREAM)
        except OSError as error:  # keep the hosts we have: a DNS hiccup must not empty the pool
            log.warning("could not resolve %s (keeping %d hosts): %s", resolve.name, len(self.hosts), error)
            return
        wanted = {host.name: host for host in (resolve.host(str(info[4][0])) for info in infos)}
        for name, host in wanted.items():
            if name not in self.hosts:
                log.warning("TorchServe host %s added (%s resolves to it)", name, resolve.name)
                await self._add(host)
        for name in [name for name in self.hosts if name not in wanted]:
            log.warning("TorchServe host %s retired (%s no longer resolves to it)", name, resolve.name)
            state = self.hosts.pop(name)
            state.retired = True
            if state.in_flight == 0:
                await self._close_retired(state)
            else:
                self._retired.append(state)  # closed by its last attempt, once that is counted
        self.metrics.hosts.set(len(self.hosts))

    async def _close_retired(self, state: HostState) -> None:
        """Close a host no longer resolved and drop its metrics, so hosts that come and go (pods) leave no
        series behind."""
        if state in self._retired:
            self._retired.remove(state)
        if state.host.name not in self.hosts:  # not resolved again meanwhile (the series are the new host's then)
            for metric in (self.metrics.host_circuit_open, self.metrics.host_attempts):
                for labels in [labels for labels in _label_sets(metric) if labels[0] == state.host.name]:
                    metric.remove(*labels)
        await state.client.close()

    async def resolve_forever(self) -> None:
        resolve = self.torchserve.resolve
        if resolve is None:
            return
        while True:
            await asyncio.sleep(resolve.every_s if self.hosts else min(1.0, resolve.every_s))  # none yet: look soon
            await self.resolve()

    async def renew_keys_forever(self, period_s: float = 30.0, margin_s: float = 300.0) -> None:
        """Renew each host's TorchServe keys before they expire (hosts without a key file have none)."""
        while True:
            for state in list(self.hosts.values()):
                try:
                    await state.client.renew_keys(margin_s)
                except Exception as error:  # one host's failure must not stop the others' renewals
                    log.warning("could not check or renew the keys of %s: %s", state.host.name, error)
            await asyncio.sleep(period_s)

    # --- the data plane ------------------------------------------------------------------------------------------
    async def infer(self, target: Target, request: InferenceRequest, timeout_s: float) -> Reply:
        """One attempt of the core's on `target`: a healthy host, then each other healthy host once while they fail.
        Each try gets the router's limit `timeout_s`, shortened to the client's deadline if it has one; once that
        deadline has passed no other host is tried."""
        tried: set[str] = set()
        failure: AttemptFailed | UpstreamUnavailable | None = None
        while request.deadline is None or time.monotonic() < request.deadline:
            now = time.monotonic()
            candidates = {name for name, state in self.hosts.items()
                          if name not in tried and state.available(target, now)}
            name = choose_host(candidates, {n: s.in_flight for n, s in self.hosts.items()}, self.rng)
            if name is None:
                break
            tried.add(name)
            try:
                return await self._attempt(self.hosts[name], target, request, timeout_s, now)
            except (AttemptFailed, UpstreamUnavailable) as error:
                failure = error
        if isinstance(failure, UpstreamUnavailable):  # e.g. every host's key refused: TorchServe unusable
            raise failure
        if failure is None:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise AttemptFailed("connection", f"no TorchServe host is available for {target} (hosts: {known})")
        if len(tried) > 1:
            raise AttemptFailed(failure.kind, f"{len(tried)} hosts failed, the last: {failure.detail}")
        raise failure

    async def _attempt(self, state: HostState, target: Target, request: InferenceRequest, timeout_s: float,
                       now: float) -> Reply:
        state.in_flight += 1
        try:
            return await self._try_host(state, target, request, timeout_s, now)
        finally:
            state.in_flight -= 1
            if state.retired and state.in_flight == 0:
                await self._close_retired(state)

    async def _try_host(self, state: HostState, target: Target, request: InferenceRequest, timeout_s: float,
                        now: float) -> Reply:
        """One try on one host, counted against it (its circuit, the model's circuit on it, its metrics)."""
        state.breaker.attempt(now)
        model = state.models.get(target)
        if model is not None:
            model.attempt(now)
        limit_s = request.timeout_s(timeout_s)
        try:
            reply = await state.client.infer(target, request, limit_s)
            if reply.status == 404:  # every host is to serve every target: this one lacks it (a rolling update?)
                raise AttemptFailed("server_error", f"host {state.host.name} does not serve {target}")
        except AttemptFailed as failure:
            # A timeout the client's own short deadline caused says nothing about the host.
            if failure.kind != "timeout" or limit_s >= timeout_s:
                self._failed(state, target, failure.kind, failure.detail)
            raise
        except NotFound as error:  # gRPC NOT_FOUND: as the 404 above
            self._failed(state, target, "server_error", error.message)
            raise AttemptFailed("server_error", f"host {state.host.name}: {error.message}") from error
        except UpstreamUnavailable as error:  # this host's key file is missing or its key refused
            self._failed(state, target, "connection", error.message)
            raise
        self.metrics.host_attempts.labels(state.host.name, "ok").inc()
        if state.breaker.success():
            self.metrics.host_circuit_open.labels(state.host.name).set(0)
            log.warning("host circuit closed for %s", state.host.name)
        if model is not None and model.success():
            log.warning("circuit closed for %s on host %s", target, state.host.name)
        return reply

    def _failed(self, state: HostState, target: Target, kind: str, detail: str) -> None:
        self.metrics.host_attempts.labels(state.host.name, kind).inc()
        now = time.monotonic()
        if kind in HOST_FAILURES:
            if state.breaker.failure(now):
                self.metrics.host_circuit_open.labels(state.host.name).set(1)
                log.warning("host circuit open for %s after %d failures: %s", state.host.name,
                            state.breaker.consecutive, detail)
            return
        model = state.models.setdefault(target, self._breaker())
        if model.failure(now):
            log.warning("circuit open for %s on host %s after %d failures: %s", target, state.host.name,
                        model.consecutive, detail)

    # --- what the catalog and the health checks need ----------------------------------------------------------------
    async def served_models(self) -> dict[str, set[str]]:
        """{model: {versions}} every reachable host serves (hosts are replicas: a model one of them lacks would
        fail there, so it does not count as served). Hosts are asked at once: one that hangs delays the answer
        by its timeout, not by the sum of all. UpstreamUnavailable when no host answers."""
        states = sorted(self.hosts.items())
        answers = await asyncio.gather(*(state.client.served_models() for _, state in states), return_exceptions=True)
        listings = [answer for answer in answers if isinstance(answer, dict)]
        errors = [f"{name}: {getattr(answer, 'message', answer)}" for (name, _), answer in zip(states, answers,
                                                                                                 strict=True)
                  if not isinstance(answer, dict)]
        if not listings:
            raise UpstreamUnavailable("no TorchServe host listed its models: " + ("; ".join(errors) or "no hosts"),
                                      retry_after_s=5)
        if errors:
            log.warning("TorchServe hosts that did not list their models: %s", "; ".join(errors))
        served = listings[0]
        for listing in listings[1:]:
            served = {model: versions & listing[model] for model, versions in served.items() if model in listing}
        return {model: versions for model, versions in served.items() if versions}

    async def ping(self) -> bool:
        """Ready when at least one host is healthy (all asked at once)."""
        answers = await asyncio.gather(*(state.client.ping() for state in self.hosts.values()))
        return any(answers)

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {name: {"circuit": state.breaker.state(now), "in_flight": state.in_flight,
                       "models_out": sorted(str(target) for target, breaker in state.models.items()
                                            if not breaker.available(now))}
                for name, state in sorted(self.hosts.items())}


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    """The label values a prometheus_client metric has children for (it has no public way to list them)."""
    return list(metric._metrics)
