"""Locust users for the kit: real Fashion-MNIST test images sent to TorchServe directly or through the A/B
router, over REST (`RestUser`, a FastHttpUser) or gRPC (`GrpcUser`, firing Locust's request events). Every
answer is checked: status, a known class, and the true label (accuracy under load). Every request's latency
is kept at full resolution (Locust's own statistics round it).

Fixed arrival rate (`--rate`): request k of the run is due at a fixed time on a schedule that starts once every
user has been spawned (the ramp-up is never part of it; `--warmup-s` more seconds are left out of the figures).
Its latency is measured from that intended send time, so a slow server cannot hide its tail by slowing the load
(coordinated omission), and the generator's own lag — how late the request actually left — is recorded too.
A run whose lag p99 exceeds `--max-lag-ms` measured the generator, not the system: it exits with code 3
("invalid"); give it more users (`-u`, see `loadtest.workload.users_for_rate`) or less work per process.

Usage (pyproject.toml's [tool.locust] gives `-f loadtest/locustfile.py` and `--headless`; options on the command
line win, and `--headful` brings the web UI back):
    make serve
    # closed loop, 32 users, REST, the full model directly:
    locust -u 32 -r 32 -t 30s --target direct --variant full RestUser
    # fixed arrival rate of 400 req/s through the router (pinned to the int8 arm), gRPC:
    locust -u 200 -r 200 -t 30s --rate 400 --target router --variant int8 GrpcUser
    # step the users up to find saturation (see shapes.py):
    locust -f loadtest/locustfile.py,loadtest/shapes.py --target direct --variant int8 RestUser
    # the gate: exit code 1 when failures or p95/p99 exceed the limits, 3 when the run is invalid
    ... --max-failure-ratio 0.001 --max-p95-ms 100 --max-p99-ms 200 --max-lag-ms 2
    # distributed (loadtest/distributed.py): one master, W workers on this or other machines. Every option but
    # Locust's own goes on the master: Locust sends it to the workers, replacing theirs (so --run-dir must name
    # the stack's run directory on the workers' machines too). --rate is the total.
    locust --master --expect-workers 2 -u 200 -r 200 -t 60s --rate 400 --target direct --variant full \
        --samples reports/dist/samples --max-p99-ms 200 RestUser
    locust --worker --master-host <master address>     # on each worker machine, from a checkout of the kit
    # the same on one machine, Locust's master and W worker processes in one command:
    locust --processes 4 -u 200 -r 200 -t 60s --rate 400 --target direct --variant full RestUser

Options: --target direct|router, --variant full|pruned|int8|distilled, --experiment (router), --no-pin (let the
router pick arms by weight), --body png|json|mixed, --rate N (req/s for the whole run, over all workers; 0 =
closed loop), --warmup-s, --samples PREFIX (writes PREFIX.<pid>.csv and PREFIX.summary.json, and on a master
PREFIX.workers.json: what each worker sent and what arrived), --max-failure-ratio, --max-p95-ms, --max-p99-ms,
--max-lag-ms, --report-wait-s (distributed), --run-dir / --router-config (where `make serve` put the stack).

Where the gate runs: where the whole run is. A single process judges its own samples. In a distributed run (and
with `--processes`, which is one) the master gives each worker its position in the rate's schedule, and each
worker sends it every sample and a final report; the master merges them, writes `--samples`, applies the gate
and exits 1 or 3 when it fails — also when a worker's report never arrived. Workers do not judge their share:
their exit code says only whether they handed it on.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import gevent
import gevent.event
import grpc
import grpc.experimental.gevent as grpc_gevent
import locust.log
from locust import FastHttpUser, User, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

# Imported now, before Locust connects a worker to its master, not when `init` loads the test images: importing
# torch takes seconds, during which a worker sends no heartbeat and its master counts it as gone.
import training.data  # noqa: F401
from loadtest.distributed import (
    REPORT_WAIT_S,
    MasterSide,
    Merged,
    Verdict,
    WorkerSide,
    judge_run,
    local_merge,
    merged_listeners,
)
from loadtest.workload import (
    MAX_LAG_P99_MS,
    Endpoint,
    Gate,
    Item,
    Sample,
    endpoint,
    fmt_pct,
    judge,
    test_items,
    write_samples,
)
from serving import protos

# Locust imports a -f file under its bare name ("locustfile"). A locustfile beside this one that imports it as
# `loadtest.locustfile` (to reuse its users' set-up and schedule) must get this same module, not a second copy whose
# options, listeners and custom messages would all be registered twice.
if __name__ != "loadtest.locustfile":
    if "loadtest.locustfile" in sys.modules:
        raise ImportError("loadtest.locustfile is imported already: list loadtest/locustfile.py first in -f")
    sys.modules["loadtest.locustfile"] = sys.modules[__name__]

grpc_gevent.init_gevent()  # gRPC's blocking calls must yield to gevent, or one user would stall all the others

log = logging.getLogger("loadtest")


class Schedule:
    """Fixed arrival rate for this process: its k-th slot is due at start + (index + k × processes) / rate, so
    W processes at rate/W each interleave into one schedule (the master tells each worker its index and W). It
    starts when every user is spawned. An idle process (no part in the run) never starts: its users wait."""

    def __init__(self, rate: float = 0.0, index: int = 0, processes: int = 1, warmup_s: float = 0.0,
                 idle: bool = False) -> None:
        self.rate, self.index, self.processes, self.warmup_s, self.idle = rate, index, processes, warmup_s, idle
        self.start = 0.0
        self.started = gevent.event.Event()
        self.slots = itertools.count()
        self.warmup_requests = 0

    def begin(self, start: float | None = None) -> None:
        """Slot 0 is due at `start` (a distributed run's, from the master), or now. Once: Locust says "spawning
        complete" again when it moves users between workers (one joined or left), and the schedule runs on."""
        if self.idle or self.started.is_set():
            return
        self.start = time.time() if start is None else start
        self.started.set()

    def next_slot(self) -> dict[str, Any] | None:
        """Wait for this request's slot; return the context to send it with (None in closed-loop mode)."""
        if self.rate <= 0 and not self.idle:
            return None
        self.started.wait()  # an idle process's users wait here until they are stopped
        intended = self.start + (self.index + next(self.slots) * self.processes) / self.rate
        claimed = time.time()
        if intended > claimed:
            gevent.sleep(intended - claimed)
        return {"intended": intended, "no_free_user": claimed > intended}

    def stamp(self, slot: dict[str, Any]) -> dict[str, Any]:
        """The moment the request leaves. Requests that leave in the first `warmup_s` are left out of the figures
        (by send time: a generator that falls behind still shows its lag after the warm-up)."""
        slot["sent"] = time.time()
        slot["warmup"] = slot["sent"] < self.start + self.warmup_s
        return slot


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
    schedule = Schedule()
    samples: ClassVar[list[Sample]] = []  # not yet handed on (a worker sends them to the master as it goes)
    master: ClassVar[MasterSide | None] = None  # this process's part in a distributed run, if any
    worker: ClassVar[WorkerSide | None] = None
    verdict: ClassVar[Verdict | None] = None  # the last run's, where it is judged


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--target", choices=["direct", "router"], default="direct")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--no-pin", action="store_true", help="router: let the experiment's weights pick the arm")
    parser.add_argument("--body", choices=["png", "json", "mixed"], default="png")
    parser.add_argument("--rate", type=float, default=0.0, help="fixed arrival rate (req/s in all); 0: closed loop")
    parser.add_argument("--warmup-s", type=float, default=1.0,
                        help="fixed rate: requests sent in the schedule's first seconds are left out")
    parser.add_argument("--items", type=int, default=256, help="how many test images to cycle through")
    parser.add_argument("--samples", default="", help="prefix of the full-resolution sample files")
    parser.add_argument("--max-failure-ratio", type=float, default=0.0)
    parser.add_argument("--max-p95-ms", type=float, default=None)
    parser.add_argument("--max-p99-ms", type=float, default=None)
    parser.add_argument("--max-lag-ms", type=float, default=MAX_LAG_P99_MS,
                        help="fixed rate: a run whose generator lag p99 exceeds this is invalid (exit code 3)")
    parser.add_argument("--run-dir", default=None, help="TorchServe's run directory (default runs/torchserve)")
    parser.add_argument("--router-config", default=None, help="default router/experiments.yaml")
    parser.add_argument("--report-wait-s", type=float, default=REPORT_WAIT_S,
                        help="distributed: how long the master waits, after the stop timeout, for every worker's "
                             "final report before it declares the run invalid")


@functools.cache
def items(count: int) -> list[Item]:
    return test_items(count)


@events.init.add_listener
def on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):  # it sends nothing: it plans, merges and judges
        Run.master = MasterSide(environment, runner, functools.partial(report_wait_s, environment))
        return
    if isinstance(runner, WorkerRunner):
        Run.worker = WorkerSide(environment, runner, drain, lambda: {"warmup_requests": Run.schedule.warmup_requests},
                                lambda start: Run.schedule.begin(start))
    # Seconds of decoding and PNG encoding: done before the run, whose clock (-t) starts with test_start.
    if environment.parsed_options is not None:
        items(environment.parsed_options.items)


def report_wait_s(environment: Environment) -> float:
    options = environment.parsed_options
    return float(options.report_wait_s) if options is not None else REPORT_WAIT_S


def drain() -> list[Sample]:
    """This process's samples not yet handed on (a worker sends them to the master as it goes)."""
    samples, Run.samples = Run.samples, []
    return samples


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    if options.rate > 0 and environment.shape_class is not None:
        raise ValueError("--rate sets the load itself: run it without a load shape")
    Run.verdict = None
    if Run.master is not None:
        Run.master.start()  # before Locust sends the workers their users
        return
    Run.endpoint = endpoint(options.target, options.variant,
                            Path(options.run_dir) if options.run_dir else None,
                            Path(options.router_config) if options.router_config else None,
                            options.experiment, pin=not options.no_pin)
    Run.path, Run.metadata = Run.endpoint.rest_path(), Run.endpoint.metadata()
    Run.headers = {kind: Run.endpoint.headers(kind) for kind in ("image/png", "application/json")}
    Run.items = items(options.items)
    Run.body, Run.variant, Run.samples = options.body, options.variant, []
    index, processes, idle = 0, 1, False
    if Run.worker is not None:  # its share of the rate, interleaved with the other workers'
        plan = Run.worker.start()
        if plan is None or plan.index is None:  # no part in the run, or (at a fixed rate) joined mid-run
            idle = plan is None or options.rate > 0
        else:
            index, processes = plan.index, plan.workers
    Run.schedule = Schedule(options.rate, index, processes, options.warmup_s, idle)


@events.spawning_complete.add_listener
def on_spawning_complete(**_: Any) -> None:
    # The ramp-up is over: slot 0 is due now, or in a distributed run when the master says, for every worker at once.
    if Run.master is not None:
        Run.master.begin()
    elif Run.worker is None:
        Run.schedule.begin()


@events.request.add_listener
def on_request(name: str, response_time: float, exception: Exception | None, context: dict[str, Any],
               **_: Any) -> None:
    now = time.time()
    lag_ms = None
    latency = response_time
    if "sent" in context:
        if context["warmup"]:
            Run.schedule.warmup_requests += 1
            return
        lag_ms = (context["sent"] - context["intended"]) * 1000
        latency = lag_ms + response_time  # from the intended send time: what an open-loop client would see
    Run.samples.append(Sample(name, exception is None, now, response_time, latency, context.get("correct"),
                              lag_ms, context.get("no_free_user", False)))


@events.test_stopping.add_listener
def on_test_stopping(**_: Any) -> None:
    if Run.master is not None:
        Run.master.stopping()  # the workers stop their users and send their final reports


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_: Any) -> None:
    if Run.worker is not None:
        Run.worker.finish()  # the master judges: a worker does not judge its share
    elif Run.master is not None:
        merged = Run.master.collect()
        if isinstance(environment.runner, MasterRunner) and environment.runner.worker_cpu_warning_emitted:
            merged.cpu_warning = True
        conclude(environment, merged)
    elif environment.parsed_options is not None:
        conclude(environment, this_process(environment))


def this_process(environment: Environment) -> Merged:
    cpu_warning = environment.runner is not None and environment.runner.cpu_warning_emitted
    return local_merge(Run.samples, Run.schedule.warmup_requests, cpu_warning)


def conclude(environment: Environment, merged: Merged) -> None:
    """Judge the whole run where it is whole: a single process, or the master with every worker's samples."""
    options = environment.parsed_options
    assert options is not None
    for listener in merged_listeners:  # extra results of the run (distributed.contribute), checked
        listener(environment, merged)
    gate = Gate(options.max_failure_ratio, options.max_p95_ms, options.max_p99_ms, options.max_lag_ms)
    verdict = Run.verdict = judge_run(merged, gate)
    if options.samples and merged.samples:
        prefix = Path(options.samples)
        write_samples(prefix.with_name(f"{prefix.name}.{os.getpid()}.csv"), merged.samples)
        prefix.with_name(f"{prefix.name}.summary.json").write_text(json.dumps(verdict.summary, indent=2))
        if Run.master is not None:
            prefix.with_name(f"{prefix.name}.workers.json").write_text(json.dumps(merged.workers, indent=2))
    total = verdict.summary.get("Aggregated")
    if total is not None:
        log.info("full-resolution: %d requests, %.1f req/s, p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, accuracy %s",
                 total["requests"], total["throughput"], total["p50_ms"] or 0, total["p95_ms"] or 0,
                 total["p99_ms"] or 0, fmt_pct(total["accuracy"]))
        if total["lag_p99_ms"] is not None:
            log.info("generator lag: p50 %.2f ms, p99 %.2f ms, max %.1f ms; %.2f%% of requests found no free "
                     "user; %d warm-up requests left out", total["lag_p50_ms"], total["lag_p99_ms"],
                     total["lag_max_ms"], 100 * total["no_free_user_ratio"], merged.warmup_requests)
    if verdict.violations:
        log.error("gate failed: %s", "; ".join(verdict.violations))
    if verdict.invalid:
        log.error("run invalid: %s", "; ".join(verdict.invalid))


@events.quitting.add_listener
def on_quitting(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    errors = bool(runner is not None and runner.exceptions) or locust.log.unhandled_greenlet_exception
    if Run.worker is not None:
        # A worker's exit code says whether it handed its share on, not how the system did (the master's does).
        if Run.worker.plan is not None and not Run.worker.handed_on:
            environment.process_exit_code = 1
        elif Run.worker.handed_on and not errors:
            environment.process_exit_code = 0
        return
    if Run.verdict is None and Run.master is None and environment.parsed_options is not None:
        conclude(environment, this_process(environment))  # quitting before the test stopped (SIGTERM)
    if Run.verdict is None:
        log.error("gate failed: no run was judged")
        environment.process_exit_code = 1
        return
    # The gate decides, failures it tolerates included; errors in our own code keep Locust's exit code.
    if Run.verdict.exit_code or not errors:
        environment.process_exit_code = Run.verdict.exit_code


def pace() -> dict[str, Any]:
    """The context a request is sent with: in fixed-rate mode, its slot's timing, stamped just before it leaves."""
    slot = Run.schedule.next_slot()
    return {} if slot is None else Run.schedule.stamp(slot)


def pick() -> tuple[Item, str, bytes, str]:
    item = random.choice(Run.items)
    kind = Run.body if Run.body != "mixed" else random.choice(("png", "json"))
    return (item, kind, item.png, "image/png") if kind == "png" else (item, kind, item.json, "application/json")


def request_name(protocol: str, kind: str, arm: str | None) -> str:
    where = Run.variant if Run.endpoint.path == "direct" else f"router:{Run.endpoint.model}->{arm or '?'}"
    return f"{where} {protocol} {kind}"


class KitHttpUser(FastHttpUser):
    """What every REST user of the kit shares: no think time (the schedule paces), bounded timeouts, the run's
    endpoint."""

    abstract = True
    wait_time = constant(0)
    # A few ms per request at most: bounded so a hung server fails requests instead of stalling the run.
    network_timeout = 30.0
    connection_timeout = 5.0
    host = "http://127.0.0.1"

    def on_start(self) -> None:
        self.client.base_url = Run.endpoint.rest_url


class RestUser(KitHttpUser):

    @task
    def predict(self) -> None:
        item, kind, body, content_type = pick()
        context = pace()
        # FastHttpSession sends bytes as they are; its annotation only lists str and dict.
        with self.client.post(Run.path, data=body,  # type: ignore[arg-type]
                              headers=Run.headers[content_type],
                              name=request_name("rest", kind, Run.endpoint.arm), context=context,
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
        item, kind, body, _ = pick()
        request = self.pb2.PredictionsRequest(model_name=Run.endpoint.model, model_version=Run.endpoint.version or "",
                                              input={"data": body})
        arm = Run.endpoint.arm
        context = pace()
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
