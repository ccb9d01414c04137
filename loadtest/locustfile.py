"""Locust users for the kit: real Fashion-MNIST test images sent to TorchServe directly or through the A/B
router, over REST (`RestUser`, a FastHttpUser) or gRPC (`GrpcUser`, firing Locust's request events). Every
answer is checked: status, a known class, and the true label (accuracy under load). Every request's latency
is kept at full resolution (Locust's own statistics round it) and, in fixed-arrival-rate mode, measured from
the moment the request was meant to be sent, so a slow server cannot hide its tail by slowing the load
(coordinated omission).

Usage:
    make serve
    # closed loop, 32 users, REST, the full model directly:
    locust -f loadtest/locustfile.py --headless -u 32 -r 32 -t 30s --target direct --variant full RestUser
    # fixed arrival rate of 400 req/s through the router (pinned to the int8 arm), gRPC:
    locust -f loadtest/locustfile.py --headless -u 64 -r 64 -t 30s --rate 400 --target router --variant int8 GrpcUser
    # step the users up to find saturation (see shapes.py):
    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --target direct --variant int8 RestUser
    # the gate: exit code 1 when failures or p95 exceed the limits
    ... --max-failure-ratio 0.001 --max-p95-ms 100
    # distributed: one master, workers on other machines (same files, same options)
    locust -f loadtest/locustfile.py --master --headless --expect-workers 2 -u 64 -r 64 -t 60s RestUser
    locust -f loadtest/locustfile.py --worker --master-host <master address> --target direct --variant full

Options: --target direct|router, --variant full|pruned|int8|distilled, --experiment (router), --no-pin (let the
router pick arms by weight), --body png|json|mixed, --rate N (req/s for the whole run; 0 = closed loop),
--samples PREFIX (writes PREFIX.<pid>.csv and PREFIX.summary.json), --max-failure-ratio, --max-p95-ms,
--run-dir / --router-config (where `make serve` put the stack).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, events, task
from locust.env import Environment

from loadtest.workload import (
    Endpoint,
    Gate,
    Item,
    Sample,
    endpoint,
    fmt_pct,
    judge,
    summarize,
    test_items,
    write_samples,
)
from serving import protos

grpc_gevent.init_gevent()  # gRPC's blocking calls must yield to gevent, or one user would stall all the others

log = logging.getLogger("loadtest")


class Run:
    """What one Locust process sends, set up once when the test starts."""

    endpoint: Endpoint
    # built once, not per request: the generator's CPU is what limits a run on a shared machine
    path: str = ""
    headers: ClassVar[dict[str, dict[str, str]]] = {}  # by content type
    metadata: tuple[tuple[str, str], ...] = ()
    items: list[Item]
    body: str = "png"
    variant: str = "full"
    rate: float = 0.0
    started: float = 0.0
    slots = itertools.count()
    samples: ClassVar[list[Sample]] = []


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--target", choices=["direct", "router"], default="direct")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--no-pin", action="store_true", help="router: let the experiment's weights pick the arm")
    parser.add_argument("--body", choices=["png", "json", "mixed"], default="png")
    parser.add_argument("--rate", type=float, default=0.0, help="fixed arrival rate (req/s in all); 0: closed loop")
    parser.add_argument("--items", type=int, default=256, help="how many test images to cycle through")
    parser.add_argument("--samples", default="", help="prefix of the full-resolution sample files")
    parser.add_argument("--max-failure-ratio", type=float, default=0.0)
    parser.add_argument("--max-p95-ms", type=float, default=None)
    parser.add_argument("--run-dir", default=None, help="TorchServe's run directory (default runs/torchserve)")
    parser.add_argument("--router-config", default=None, help="default router/experiments.yaml")


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    Run.endpoint = endpoint(options.target, options.variant,
                            Path(options.run_dir) if options.run_dir else None,
                            Path(options.router_config) if options.router_config else None,
                            options.experiment, pin=not options.no_pin)
    Run.path, Run.metadata = Run.endpoint.rest_path(), Run.endpoint.metadata()
    Run.headers = {kind: Run.endpoint.headers(kind) for kind in ("image/png", "application/json")}
    Run.items = test_items(options.items)
    Run.body, Run.variant, Run.rate = options.body, options.variant, options.rate
    Run.started, Run.slots, Run.samples = time.time(), itertools.count(), []


@events.request.add_listener
def on_request(name: str, response_time: float, exception: Exception | None, context: dict[str, Any],
               **_: Any) -> None:
    now = time.time()
    intended = context.get("intended")
    latency = (now - intended) * 1000 if intended else response_time
    Run.samples.append(Sample(name, exception is None, now, response_time, latency, context.get("correct")))


@events.quitting.add_listener
def on_quitting(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not Run.samples:
        return
    summary = summarize(Run.samples)
    if options.samples:
        prefix = Path(options.samples)
        write_samples(prefix.with_name(f"{prefix.name}.{os.getpid()}.csv"), Run.samples)
        prefix.with_name(f"{prefix.name}.summary.json").write_text(json.dumps(summary, indent=2))
    problems = Gate(options.max_failure_ratio, options.max_p95_ms).violations(summary)
    total = summary["Aggregated"]
    log.info("full-resolution: %d requests, %.1f req/s, p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, accuracy %s",
             total["requests"], total["throughput"], total["p50_ms"] or 0, total["p95_ms"] or 0,
             total["p99_ms"] or 0, fmt_pct(total["accuracy"]))
    if problems:
        log.error("gate failed: %s", "; ".join(problems))
        environment.process_exit_code = 1


def pace() -> float | None:
    """Fixed-rate mode: wait for this request's slot in the schedule and return its intended send time."""
    if Run.rate <= 0:
        return None
    intended = Run.started + next(Run.slots) / Run.rate
    delay = intended - time.time()
    if delay > 0:
        gevent.sleep(delay)
    return intended


def pick() -> tuple[Item, str, bytes, str]:
    item = random.choice(Run.items)
    kind = Run.body if Run.body != "mixed" else random.choice(("png", "json"))
    return (item, kind, item.png, "image/png") if kind == "png" else (item, kind, item.json, "application/json")


def request_name(protocol: str, kind: str, arm: str | None) -> str:
    where = Run.variant if Run.endpoint.path == "direct" else f"router:{Run.endpoint.model}->{arm or '?'}"
    return f"{where} {protocol} {kind}"


class RestUser(FastHttpUser):
    wait_time = constant(0)
    # A few ms per request at most: bounded so a hung server fails requests instead of stalling the run.
    network_timeout = 30.0
    connection_timeout = 5.0
    host = "http://127.0.0.1"

    def on_start(self) -> None:
        self.client.base_url = Run.endpoint.rest_url

    @task
    def predict(self) -> None:
        intended = pace()
        item, kind, body, content_type = pick()
        # FastHttpSession sends bytes as they are; its annotation only lists str and dict.
        with self.client.post(Run.path, data=body,  # type: ignore[arg-type]
                              headers=Run.headers[content_type],
                              name=request_name("rest", kind, Run.endpoint.arm), context={"intended": intended},
                              catch_response=True) as response:
            if Run.endpoint.path == "router" and not Run.endpoint.arm:
                response.request_meta["name"] = request_name("rest", kind, response.headers.get("X-Arm"))
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            problem, correct = judge(response.content or b"", item.label)
            response.request_meta["context"]["correct"] = correct  # the session copied our context dict
            if problem:
                response.failure(problem)


class GrpcUser(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(Run.endpoint.grpc_target)
        self.stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(self.channel)
        self.pb2 = protos.load("inference_pb2")

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        intended = pace()
        item, kind, body, _ = pick()
        request = self.pb2.PredictionsRequest(model_name=Run.endpoint.model, model_version=Run.endpoint.version or "",
                                              input={"data": body})
        context: dict[str, Any] = {"intended": intended}
        arm = Run.endpoint.arm
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            response, call = self.stub.Predictions.with_call(request, metadata=Run.metadata, timeout=30)
            length = len(response.prediction)
            arm = arm or dict(call.trailing_metadata() or ()).get("x-arm")
            problem, context["correct"] = judge(response.prediction, item.label)
            if problem:
                exception = RuntimeError(problem)
        except grpc.RpcError as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc", name=request_name("grpc", kind, arm),
            response_time=(time.perf_counter() - started) * 1000, response_length=length, exception=exception,
            context=context)
