"""Distributed Locust runs judged as one: the master splits `--rate` over the workers it has, every worker sends
its full-resolution samples to the master, and the master merges them and applies the same gate as a single
process (`loadtest/locustfile.py` wires this module into Locust's events).

Why samples and not HDR histograms: the kit's figures come from `workload.summarize` — exact percentiles per
request name and in total, the generator's lag, the no-free-user share, accuracy, throughput from the samples'
own timestamps — and `make loadtest` cuts step runs into steps by those timestamps. Merging the samples keeps one
code path for one process, `--processes` and machines, and the master's `--samples` file is the same file a
single process writes. They are small: eight fields, 55–65 bytes each in msgpack (measured), so 1,000 req/s for ten
minutes is ~40 MB in all. A worker keeps only what it has not sent yet: it sends its samples in chunks every
`FLUSH_S` seconds (each chunk at most `CHUNK_SAMPLES`) and the rest, with its counts, in a final report when the
master ends the run.

The protocol (Locust custom messages, on the connection Locust already has):
- `kit:plan`, master → worker, at the test's start: the run's id, the worker's position among the W workers
  present (0 … W-1, in Locust's own worker order) and W. A worker learns W from the master, not from
  `--expect-workers` (Locust sends that option to workers, but it is what the master waited for, not who
  came) nor from `worker_index` (Locust's index counts every worker that ever connected, so it is not dense).
  A worker that connects mid-run gets no position (`index` None): at a fixed rate it sends nothing, since
  the other workers already share the whole rate.
- `kit:begin`, master → worker, once every worker has spawned its users: the epoch time of the schedule's slot
  0, the same for every worker, so their slots interleave evenly (i/rate apart) rather than at whatever phase
  each worker heard "spawning complete". On several machines this needs synchronized clocks (NTP), as the
  samples' own timestamps do.
- `kit:samples`, worker → master: a chunk of samples.
- `kit:stop`, master → worker, when the master stops the test: stop the users, then send the final report.
  Locust's own headless end (`-t`) stops the master and only then tells the workers to quit, too late for the
  master to hear from them; this message makes the workers stop first.
- `kit:final`, worker → master: how many samples and chunks it sent, its warm-up count, whether Locust
  warned about its CPU, whether the master asked it to stop, and the payloads of `contribute` hooks.

The master waits for every planned worker's final report at most the stop timeout plus `--report-wait-s`, and
less for a worker Locust already counts as gone. A worker without a final report, with samples missing, or
that stopped before the master asked makes the run invalid (exit code 3, and the master says which): the
figures would be a part of the load judged as the whole. Workers no longer judge their share; they log it.

Extra per-worker results (e.g. a user class's record of what it sent and what was acknowledged): `contribute`
adds a JSON-able payload to each worker's final report (and to a single process's own), `on_merged` looks at
them on the judging process, by worker position, and may fail the run. The merge and the verdict are plain
functions; Locust is imported only by the wiring (`MasterSide`, `WorkerSide`), which runs inside Locust —
importing it elsewhere would monkey-patch the standard library with gevent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from loadtest.workload import Gate, Sample, summarize

if TYPE_CHECKING:  # importing Locust monkey-patches the standard library: only the wiring below, inside Locust
    from locust.env import Environment
    from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("loadtest.distributed")

PLAN, BEGIN, SAMPLES, STOP, FINAL = "kit:plan", "kit:begin", "kit:samples", "kit:stop", "kit:final"
CHUNK_SAMPLES = 5000  # ~300 kB a message
FLUSH_S = 2.0
REPORT_WAIT_S = 10.0  # default --report-wait-s: after the stop timeout, for a final report to arrive
BEGIN_MARGIN_S = 0.25  # the schedule's slot 0 is this far after the master says so: time for the message to arrive
INVALID_EXIT_CODE = 3  # the run measured the generator (or a part of the load), not the system

# Extra per-worker results: name → a function each load-making process calls when it ends its run; the value
# (JSON-able) reaches the judging process in `Merged.extras[name][position]`.
_payloads: dict[str, Callable[[], Any]] = {}
# Called where the run is judged (the master, or a single process) with the environment and the merge, before the
# gate: a listener may append to `merged.violations` (exit 1) or `merged.problems` (invalid, exit 3).
merged_listeners: list[Callable[[Environment, Merged], None]] = []


def contribute(name: str, payload: Callable[[], Any]) -> None:
    """Add a JSON-able result to every worker's final report (and to a single process's own), e.g. a user class's
    record of what it sent; read it on the master from `Merged.extras[name]`, by worker position."""
    _payloads[name] = payload


def on_merged(listener: Callable[[Environment, Merged], None]) -> None:
    """Look at (and add to the verdict of) every merged run, e.g. check the extras `contribute` collected."""
    merged_listeners.append(listener)


def payloads() -> dict[str, Any]:
    return {name: payload() for name, payload in _payloads.items()}


@dataclass(frozen=True)
class Plan:
    """One worker's part of one run: its position among the run's workers (None: it joined mid-run)."""

    run: str
    index: int | None
    workers: int


def positions(clients: Iterable[str], order: Callable[[str], int]) -> dict[str, int]:
    """Dense positions 0 … W-1 for the workers present at the start, in Locust's own order (`order`)."""
    return {client: position for position, client in enumerate(sorted(clients, key=order))}


def encode(samples: Iterable[Sample]) -> list[list[Any]]:
    return [[s.name, s.ok, s.at, s.service_ms, s.latency_ms, s.correct, s.lag_ms, s.no_free_user] for s in samples]


def decode(rows: Iterable[list[Any]]) -> list[Sample]:
    return [Sample(*row) for row in rows]


def chunks(rows: list[Any], size: int = CHUNK_SAMPLES) -> Iterator[list[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


@dataclass
class Report:
    """What the judging process has from one worker in one run."""

    client: str
    index: int | None
    samples: list[Sample] = field(default_factory=list)
    chunks: int = 0
    final: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        where = "joined mid-run" if self.index is None else f"position {self.index}"
        return f"worker {self.client} ({where})"


@dataclass
class Merged:
    """Every worker's samples as one run, and what is wrong with the merge."""

    samples: list[Sample]
    warmup_requests: int
    cpu_warning: bool
    problems: list[str]  # the merge is not the whole run: invalid
    workers: list[dict[str, Any]]  # per worker: position, client, samples sent and received, chunks
    extras: dict[str, dict[int | str, Any]]  # contribute() name → worker position (client id if none) → payload
    violations: list[str] = field(default_factory=list)  # added by merged_event listeners: the gate fails


def merge(reports: Iterable[Report]) -> Merged:
    """One run from the workers' reports; a worker whose final report is missing, whose samples did not all
    arrive, or that stopped before it was asked is a problem, and its share is not silently dropped."""
    reports = sorted(reports, key=lambda r: (r.index is None, r.index or 0, r.client))
    samples: list[Sample] = []
    problems, workers = [], []
    extras: dict[str, dict[int | str, Any]] = {}
    warmup, cpu_warning = 0, False
    if not reports:
        problems.append("no worker took part in the run")
    for report in reports:
        samples += report.samples
        final = report.final
        workers.append({"index": report.index, "client": report.client, "received": len(report.samples),
                        "chunks_received": report.chunks, "sent": None if final is None else final["sent"],
                        "chunks_sent": None if final is None else final["chunks"]})
        if final is None:
            problems.append(f"{report.label} sent no final report (it quit, or its data never arrived): "
                            f"its share is missing ({len(report.samples)} samples arrived before)")
            continue
        if final["sent"] != len(report.samples) or final["chunks"] != report.chunks:
            problems.append(f"{report.label}: {len(report.samples)} of its {final['sent']} samples arrived "
                            f"({report.chunks} of {final['chunks']} chunks)")
        if not final["requested"]:
            problems.append(f"{report.label} stopped before the master ended the run: its share is partial")
        warmup += final["warmup_requests"]
        cpu_warning = cpu_warning or final["cpu_warning"]
        for name, payload in final.get("extras", {}).items():
            extras.setdefault(name, {})[report.client if report.index is None else report.index] = payload
    samples.sort(key=lambda s: s.at)
    return Merged(samples, warmup, cpu_warning, problems, workers, extras)


@dataclass(frozen=True)
class Verdict:
    summary: dict[str, Any]
    violations: list[str]  # the system failed the gate: exit 1
    invalid: list[str]  # no measurement of the system: exit 3

    @property
    def exit_code(self) -> int:
        return INVALID_EXIT_CODE if self.invalid else 1 if self.violations else 0


def judge_run(merged: Merged, gate: Gate) -> Verdict:
    """The gate on the whole run: the same figures and limits in one process, `--processes` and machines."""
    summary = summarize(merged.samples)
    invalid = [*merged.problems, *gate.invalid(summary)]
    if merged.cpu_warning:
        invalid.append("the generator's CPU went above 90 % (Locust's warning)")
    return Verdict(summary, [*gate.violations(summary), *merged.violations], invalid)


def local_merge(samples: list[Sample], warmup_requests: int, cpu_warning: bool) -> Merged:
    """A single process's run as a merge of one report, so it is judged (and extended) like a distributed one."""
    final = {"sent": len(samples), "chunks": 0, "warmup_requests": warmup_requests, "cpu_warning": cpu_warning,
             "requested": True, "extras": payloads()}
    return merge([Report("local", 0, samples, 0, final)])


class MasterSide:
    """The master's part: plans each run, collects the workers' samples and final reports, merges them."""

    def __init__(self, environment: Environment, runner: MasterRunner, report_wait_s: Callable[[], float]) -> None:
        self.environment, self.runner, self.report_wait_s = environment, runner, report_wait_s
        self.run = ""
        self.workers = 0
        self.reports: dict[str, Report] = {}
        self.active = self.begun = False
        runner.register_message(SAMPLES, self.on_samples)
        runner.register_message(FINAL, self.on_final)
        environment.events.worker_connect.add_listener(self.on_connect)

    def start(self) -> None:
        """The test starts: give each worker present its position, before Locust sends its users."""
        from locust.runners import STATE_MISSING

        self.run, self.active, self.begun = uuid.uuid4().hex[:12], True, False
        present = [c.id for c in self.runner.clients.all if c.state != STATE_MISSING]
        placed = positions(present, self.runner.get_worker_index)
        self.workers = len(placed)
        self.reports = {client: Report(client, index) for client, index in placed.items()}
        for client, index in placed.items():
            self.runner.send_message(PLAN, {"run": self.run, "index": index, "workers": self.workers}, client)
        log.info("run %s: %d workers take part (at a fixed rate, each sends 1/%d of it)", self.run, self.workers,
                 self.workers)

    def begin(self) -> None:
        """Every worker has spawned its users: slot 0 of the run's schedule, at one instant for all (once: Locust
        says "spawning complete" again when it moves users between workers)."""
        if not self.active or self.begun:
            return
        self.begun = True
        start = time.time() + BEGIN_MARGIN_S
        for client in self.reports:
            if client in self.runner.clients:
                self.runner.send_message(BEGIN, {"run": self.run, "start": start}, client)

    def on_connect(self, client_id: str, **_: Any) -> None:
        if not self.active:
            return
        report = self.reports.get(client_id)
        if report is None:  # Locust gives it users; at a fixed rate it sends nothing, the others have the rate
            log.warning("worker %s joined mid-run: at a fixed rate it sends nothing (the rate stays split over %d)",
                        client_id, self.workers)
            report = self.reports[client_id] = Report(client_id, None)
        self.runner.send_message(PLAN, {"run": self.run, "index": report.index, "workers": self.workers}, client_id)

    def on_samples(self, msg: Any, **_: Any) -> None:
        report = self.reports.get(msg.node_id)
        if report is None or msg.data.get("run") != self.run:
            log.debug("samples from %s for another run: left out", msg.node_id)
            return
        report.samples += decode(msg.data["rows"])
        report.chunks += 1

    def on_final(self, msg: Any, **_: Any) -> None:
        report = self.reports.get(msg.node_id)
        if report is None or msg.data.get("run") != self.run:
            log.debug("final report from %s for another run: left out", msg.node_id)
            return
        report.final = msg.data

    def stopping(self) -> None:
        """The master stops the test: every worker stops its users and sends its final report."""
        if not self.active:
            return
        for client in self.reports:
            if client in self.runner.clients:
                self.runner.send_message(STOP, {"run": self.run}, client)

    def collect(self) -> Merged:
        """Wait (bounded) for every worker's final report, then merge. A worker Locust counts as gone is not
        waited for: its report can no longer come."""
        deadline = time.monotonic() + (self.environment.stop_timeout or 0) + self.report_wait_s()
        while time.monotonic() < deadline and any(self.awaited(report) for report in self.reports.values()):
            gevent.sleep(0.05)
        self.active = False
        merged = merge(self.reports.values())
        log.info("run %s: %d samples from %d workers", self.run, len(merged.samples), len(self.reports))
        return merged

    def awaited(self, report: Report) -> bool:
        from locust.runners import STATE_MISSING

        if report.final is not None:
            return False
        node = self.runner.clients.get(report.client)
        return node is not None and node.state != STATE_MISSING


class WorkerSide:
    """A worker's part: takes its position from the master, sends its samples as they come and its final
    report when the master ends the run (or, as far as it can, when it quits first)."""

    def __init__(self, environment: Environment, runner: WorkerRunner, drain: Callable[[], list[Sample]],
                 facts: Callable[[], dict[str, Any]], begin: Callable[[float], None]) -> None:
        self.environment, self.runner, self.drain, self.facts, self.begin = environment, runner, drain, facts, begin
        self.offered: Plan | None = None  # the master's latest plan, taken at the next test start
        self.plan: Plan | None = None  # this run's
        self.sent = self.chunks = 0
        self.requested = self.finished = False
        self.flusher: gevent.Greenlet | None = None
        self.done = gevent.event.Event()  # ends the flusher between two flushes, never in the middle of one
        runner.register_message(PLAN, self.on_plan)
        runner.register_message(BEGIN, self.on_begin)
        runner.register_message(STOP, self.on_stop)
        # after the runner's own quitting listener, so it runs before it (quitting fires in reverse): the final
        # report leaves before the worker's "quit" message
        environment.events.quitting.add_listener(self.on_quitting)

    def on_plan(self, msg: Any, **_: Any) -> None:
        self.offered = Plan(msg.data["run"], msg.data["index"], msg.data["workers"])
        if self.plan is not None and self.plan.run == self.offered.run:
            self.plan = self.offered  # a reconnection: same run, same part

    def on_begin(self, msg: Any, **_: Any) -> None:
        if self.plan is not None and msg.data.get("run") == self.plan.run:
            self.begin(msg.data["start"])

    def start(self) -> Plan | None:
        """The test starts on this worker (its users are coming): take the master's plan for it."""
        self.plan, self.offered = self.offered, None
        self.sent = self.chunks = 0
        self.requested = self.finished = False
        if self.plan is None:
            log.error("no plan from the master for this run: this worker sends nothing")
            return None
        self.done = gevent.event.Event()
        self.flusher = gevent.spawn(self.flush_periodically, self.done)
        return self.plan

    @property
    def handed_on(self) -> bool:
        """Whether this worker sent the master its whole share of the run, when the master asked."""
        return self.finished and self.requested

    def flush_periodically(self, done: gevent.event.Event) -> None:
        while not done.wait(FLUSH_S):
            self.flush()

    def flush(self) -> None:
        from locust.exception import RPCError

        assert self.plan is not None
        rows = encode(self.drain())
        for chunk in chunks(rows):
            try:
                self.runner.send_message(SAMPLES, {"run": self.plan.run, "rows": chunk})
            except RPCError as error:  # counted as sent: the master's count then says what was lost
                log.error("could not send %d samples to the master: %s", len(chunk), error)
            self.sent += len(chunk)
            self.chunks += 1

    def on_stop(self, msg: Any, **_: Any) -> None:
        """Runs in Locust's message loop, so Locust's own stop or quit that follows finds the users stopped."""
        from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING

        if self.plan is None or msg.data.get("run") != self.plan.run:
            return
        self.requested = True
        if self.runner.state == STATE_STOPPED:
            self.finish()
        elif self.runner.state not in (STATE_CLEANUP, STATE_STOPPING):  # else a stop in progress will finish
            self.runner.stop()  # fires test_stop → finish()

    def finish(self) -> None:
        """Send what is left and the final report, once per run."""
        if self.plan is None or self.finished:
            return
        self.finished = True
        if self.flusher is not None:  # not killed: a flush cut short would lose the samples it had taken
            self.done.set()
            self.flusher.join()
            self.flusher = None
        self.flush()
        from locust.exception import RPCError

        final = {"run": self.plan.run, "sent": self.sent, "chunks": self.chunks, "requested": self.requested,
                 "cpu_warning": self.runner.cpu_warning_emitted, "extras": payloads(), **self.facts()}
        try:
            self.runner.send_message(FINAL, final)
        except RPCError as error:
            log.error("could not send the final report to the master: %s", error)
        log.info("sent %d samples to the master in %d chunks (position %s of %d workers)", self.sent, self.chunks,
                 self.plan.index, self.plan.workers)

    def on_quitting(self, **_: Any) -> None:
        if self.plan is not None and not self.finished:
            log.warning("quitting before the master ended the run: sending a partial report")
            self.finish()
