"""Prometheus metrics of the router, per experiment and arm (TorchServe's own metrics have no latency
histograms and label every request of a default version "default")."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
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
        self.feedback = Counter("router_feedback", "Feedback received, by whether the arm's answer was right",
                                [*arm, "correct"], registry=self.registry)

    def count_log_drops(self, dropped: Mapping[str, int]) -> None:
        """Export the request log's own count of rows it did not log because its queue was full (`Store.dropped`)
        as router_log_rows_dropped_total{table}, read at each scrape: nothing to call on the request path."""
        self.registry.register(_LogDrops(dropped))


class _LogDrops(Collector):
    def __init__(self, dropped: Mapping[str, int]) -> None:
        self.dropped = dropped

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("router_log_rows_dropped", "Request-log rows not logged because the writer's "
                                     "queue was full, by table (shadow and events are shed first)", labels=["table"])
        for table in ("requests", "shadow", "events", "feedback_admin"):
            family.add_metric([table], self.dropped.get(table, 0))
        yield family
