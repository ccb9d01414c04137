"""Prometheus metrics of the router, per experiment and arm (TorchServe's own metrics have no latency
histograms and label every request of a default version "default")."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Milliseconds-scale buckets: a request to these models takes ~3-100 ms; the tail goes to the 10 s timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
           5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        arm = ["experiment", "arm"]
        self.requests = Counter("router_requests", "Requests answered, by the arm that answered and status code",
                                [*arm, "protocol", "code"], registry=self.registry)
        self.upstream_failures = Counter("router_upstream_failures",
                                         "Failed attempts on an arm (5xx, connection error, timeout)",
                                         [*arm, "kind"], registry=self.registry)
        self.retries = Counter("router_retries", "Requests retried on another arm after this arm failed",
                               arm, registry=self.registry)
        self.duration = Histogram("router_request_duration_seconds", "Time from request to answer, in the router",
                                  [*arm, "protocol"], buckets=BUCKETS, registry=self.registry)
        self.upstream_duration = Histogram("router_upstream_duration_seconds", "Time TorchServe took per attempt",
                                           [*arm, "protocol"], buckets=BUCKETS, registry=self.registry)
        self.shadow = Counter("router_shadow_requests", "Shadow copies by outcome (ok, error, timeout, dropped)",
                              ["experiment", "target", "outcome"], registry=self.registry)
        self.shadow_agreement = Counter("router_shadow_agreements",
                                        "Shadow answers compared with the live answer, by agreement",
                                        ["experiment", "target", "agree"], registry=self.registry)
        self.circuit_open = Gauge("router_circuit_open", "1 while an arm's circuit breaker is open", arm,
                                  registry=self.registry)
        self.weight = Gauge("router_arm_weight", "Effective weight of each arm", arm, registry=self.registry)
        self.rolled_back = Gauge("router_rolled_back", "1 while the guardrail has rolled an experiment back",
                                 ["experiment"], registry=self.registry)
        self.host_attempts = Counter("router_host_attempts", "Attempts on each TorchServe host, by outcome (ok, "
                                     "connection, timeout, server_error)", ["host", "outcome"], registry=self.registry)
        self.host_circuit_open = Gauge("router_host_circuit_open", "1 while a TorchServe host's circuit is open "
                                       "(connection errors and timeouts take the whole host out)", ["host"],
                                       registry=self.registry)
        self.hosts = Gauge("router_hosts", "TorchServe hosts the router knows (listed, or resolved from DNS)",
                           registry=self.registry)
        self.feedback = Counter("router_feedback", "Feedback received, by whether the arm's answer was right",
                                [*arm, "correct"], registry=self.registry)

    def watch_store(self, store: StoreCounters) -> None:
        """Export the request log's own counters, read at each scrape (nothing to call on the request path):
        router_log_rows_dropped_total{table} (rows not logged because the writer's queue was full),
        router_log_rows_buffered_total and router_log_outages_total (answers sent while the database was
        unreachable, their rows held in memory until it returned), router_log_degraded and router_log_queued."""
        self.registry.register(_StoreCollector(store))


class StoreCounters(Protocol):
    """What `router.store.Store` counts."""

    @property
    def dropped(self) -> Mapping[str, int]: ...

    @property
    def buffered(self) -> int: ...

    @property
    def outages(self) -> int: ...

    @property
    def degraded(self) -> bool: ...

    @property
    def queued(self) -> int: ...


class _StoreCollector(Collector):
    def __init__(self, store: StoreCounters) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("router_log_rows_dropped", "Request-log rows not logged because the writer's "
                                     "queue was full, by table (shadow and events are shed first)", labels=["table"])
        for table in ("requests", "shadow", "events", "feedback_admin"):
            family.add_metric([table], self.store.dropped.get(table, 0))
        yield family
        yield CounterMetricFamily("router_log_rows_buffered", "Requests answered while the database was unreachable: "
                                  "their rows waited in memory instead of being committed first",
                                  value=self.store.buffered)
        yield CounterMetricFamily("router_log_outages", "Times the database became unreachable",
                                  value=self.store.outages)
        yield GaugeMetricFamily("router_log_degraded", "1 while the database is unreachable", value=int(
            self.store.degraded))
        yield GaugeMetricFamily("router_log_queued", "Rows and writes waiting for the writer", value=self.store.queued)
