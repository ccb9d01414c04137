"""The request log (router/store.py) against a real SQLite file and a real PostgreSQL server (each PostgreSQL
test on a database of its own): a row's awaitable resolves once the row is committed, the queue's bound and what
it sheds, retention by age and by rows, the first feedback label standing, the `request_log` config section, and
the report computed in SQL against a Python reference on random data. PostgreSQL alone: two stores ("replicas")
on one database, and outages (a real server stopped and started again under load)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from prometheus_client import generate_latest

from router import store_postgres, store_sqlite, verdict
from router.config import POSTGRESQL, Arm, Experiment, RequestLog, RouterConfig, StoreSettings, Target, parse_config
from router.errors import ConfigError
from router.metrics import Metrics
from router.report import EVENTS, LATENCY_SAMPLE, PERCENTILES, build_report, live_report, to_markdown
from router.stats import wilson_interval
from router.store import (
    PRUNE_EVERY_S,
    RequestRow,
    Row,
    Store,
    StoreError,
    StoreFull,
    StoreUnavailable,
    backend_for,
    open_store,
    sample_cut,
)
from tests.postgres import ScratchPostgres

NO_RETENTION = RequestLog(retention_days=None, max_rows=None)


def request(request_id: str, at: float | None = None, label: int | None = 1, experiment: str = "exp") -> RequestRow:
    return RequestRow(request_id, time.time() if at is None else at, experiment, "a", "model-a", None, "rest", 200,
                      True, 5.0, label, None)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Log:
    """One backend's log under test: its config (for `open_store` and `build_report`), reads and direct writes
    on a connection of the test's own (as another process would), and a way to stall the store's writer."""

    config: RouterConfig
    _connection: Any = field(default=None, repr=False)

    @property
    def postgres(self) -> bool:
        return self.config.store.backend == POSTGRESQL

    def open(self, settings: RequestLog = NO_RETENTION, prune_every_s: float = PRUNE_EVERY_S) -> Store:
        return Store(backend_for(self.config), settings, prune_every_s)

    def connection(self) -> Any:
        if self._connection is None:
            self._connection = (psycopg.connect(self.config.store.database_url(), autocommit=True) if self.postgres
                                else store_sqlite.connect(self.config.database))
        return self._connection

    def rows(self, query: str, *args: Any) -> list[Any]:
        """A query with `?` placeholders, on either database."""
        if self.postgres:
            query = query.replace("%", "%%").replace("?", "%s")
        return list(self.connection().execute(query, args).fetchall())

    def insert(self, requests: Sequence[Row] = (), feedback: Sequence[Row] = (), shadow: Sequence[Row] = (),
               events: Sequence[Row] = ()) -> None:
        """Rows written directly, with the backend's own statements (a log left by an earlier run)."""
        sql = store_postgres if self.postgres else store_sqlite
        db = self.connection()
        with db.transaction() if self.postgres else db:
            for statement, values in ((sql.INSERT_REQUEST, requests), (sql.INSERT_FEEDBACK, feedback),
                                      (sql.INSERT_SHADOW, shadow), (sql.INSERT_EVENT, events)):
                if values:
                    (db.cursor() if self.postgres else db).executemany(statement, values)

    @contextlib.contextmanager
    def stall(self) -> Iterator[None]:
        """The database "stalls" for the block: the writer's next insert waits for a lock the test holds."""
        if self.postgres:
            with psycopg.connect(self.config.store.database_url()) as blocker:
                blocker.execute("LOCK TABLE requests IN EXCLUSIVE MODE")  # inserts wait; reads do not
                try:
                    yield
                finally:
                    blocker.rollback()
        else:
            writer_lock = sqlite3.connect(self.config.database, timeout=0)
            try:
                writer_lock.execute("BEGIN IMMEDIATE")  # holds the write lock
                yield
                writer_lock.rollback()
            finally:
                writer_lock.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Log]:
    """The log of one backend: SQLite in this test's directory, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        sqlite = Log(RouterConfig(experiments={}, state_dir=tmp_path))
        yield sqlite
        sqlite.close()
        return
    postgres: ScratchPostgres = request.getfixturevalue("postgres")
    with postgres.database() as url:
        shared = Log(RouterConfig(experiments={}, state_dir=tmp_path, store=StoreSettings(POSTGRESQL, url)))
        yield shared
        shared.close()


# --- durability ------------------------------------------------------------------------------------------------
def test_a_row_is_committed_when_its_awaitable_resolves(log: Log) -> None:
    async def test() -> None:
        store = open_store(dataclasses.replace(log.config, request_log=NO_RETENTION))
        try:
            for i in range(20):  # each read right after the await, by another connection: it must be there
                await store.record(request(f"r{i}"))
                assert log.rows("SELECT count(*) FROM requests WHERE request_id = ?", f"r{i}") == [(1,)]
            # Concurrent writers share commits and all resolve.
            await asyncio.gather(*(store.record(request(f"c{i}")) for i in range(200)))
            assert log.rows("SELECT count(*) FROM requests WHERE request_id LIKE 'c%'") == [(200,)]
            assert (store.buffered, store.outages, store.degraded) == (0, 0, False)
        finally:
            store.close()

    run(test)


def test_a_failed_commit_raises_and_the_writer_keeps_going(log: Log) -> None:
    async def test() -> None:
        store = log.open()
        try:
            broken = dataclasses.replace(request("bad"), experiment=None)  # type: ignore[arg-type]  # NOT NULL
            with pytest.raises(StoreError, match=r"could not commit: (NOT NULL constraint failed|null value in col)"):
                await store.record(broken)
            await store.record(request("good"))
            assert log.rows("SELECT request_id FROM requests") == [("good",)]
            assert not store.degraded  # a refused row is no outage
        finally:
            store.close()

    run(test)


def test_a_failing_write_is_undone_alone_and_the_rest_of_its_batch_commits(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, NO_RETENTION)
        blocker = sqlite3.connect(path, timeout=0)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # so that all of the below lands in one batch
            first = store.record(request("one"))
            await until(lambda: store.queued == 0)
            second = store.record(request("two"))

            def half_done(db: sqlite3.Connection) -> None:  # writes, then fails: the savepoint undoes the write
                db.execute("INSERT INTO events VALUES (1, 'exp', 'half', 'done')")
                db.execute("INSERT INTO no_such_table VALUES (1)")

            failing = asyncio.ensure_future(store._call(half_done))
            third = store.record(request("three"))
            await asyncio.sleep(0.05)
            blocker.rollback()
            await asyncio.gather(first, second, third)
            with pytest.raises(StoreError, match="refused the write: no such table"):
                await failing
        finally:
            blocker.close()
            store.close()
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert sorted(db.execute("SELECT request_id FROM requests")) == [("one",), ("three",), ("two",)]
            assert db.execute("SELECT count(*) FROM events").fetchall() == [(0,)]

    run(test)


async def wait(store: Store, request_id: str) -> None:
    await store.record(request(request_id))


def test_a_cancelled_wait_does_not_cancel_the_other_rows_of_its_batch(log: Log) -> None:
    async def test() -> None:
        store = log.open()
        try:
            with log.stall():  # both rows wait, in one batch or two
                cancelled = asyncio.create_task(wait(store, "one"))
                kept = asyncio.create_task(wait(store, "two"))
                await asyncio.sleep(0.05)
                cancelled.cancel()
            await kept  # still resolves normally
            assert cancelled.cancelled()
            await store.flush()
            assert sorted(log.rows("SELECT request_id FROM requests")) == [("one",), ("two",)]
        finally:
            store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.record(request("late"))

    run(test)


# --- the queue's bound -------------------------------------------------------------------------------------------
def test_a_full_queue_sheds_shadow_rows_and_events_first_then_refuses_requests(log: Log) -> None:
    async def test() -> None:
        store = log.open(RequestLog(retention_days=None, max_rows=None, queue_limit=6))
        metrics = Metrics()
        metrics.watch_store(store)
        try:
            with log.stall():  # the database "stalls": the writer waits for the lock
                first = store.record(request("r0"))
                await until(lambda: store.queued == 0)  # the writer took r0 and is stuck committing it
                for i in range(5):  # shadow rows and events may fill half the queue (3), no more
                    store.record_shadow(f"r{i}", "exp", "model-b", "ok", True, 1.0)
                store.event("exp", "admin", "shed")
                waiting = [store.record(request(f"r{i}")) for i in range(1, 4)]  # 3 more fill it to 6
                refused = store.record(request("r4"))
                with pytest.raises(StoreFull, match="queue is full"):
                    await refused
                with pytest.raises(StoreFull):
                    await store.feedback("r0", 1)
                assert store.queued == 6
                assert store.dropped == {"shadow": 2, "events": 1, "requests": 1, "feedback_admin": 1}
                exported = generate_latest(metrics.registry).decode()
                assert 'router_log_rows_dropped_total{table="shadow"} 2.0' in exported
                assert 'router_log_rows_dropped_total{table="requests"} 1.0' in exported
            # the database is back: everything accepted is committed
            await first
            await asyncio.gather(*waiting)
            await store.flush()
        finally:
            store.close()
        assert sorted(log.rows("SELECT request_id FROM requests")) == [(f"r{i}",) for i in range(4)]
        assert log.rows("SELECT count(*) FROM shadow") == [(3,)]
        assert log.rows("SELECT count(*) FROM events") == [(0,)]

    run(test)


# --- retention ---------------------------------------------------------------------------------------------------
def test_retention_keeps_the_newest_max_rows_of_each_table_and_drops_feedback_with_its_request(log: Log) -> None:
    async def test() -> None:
        store = log.open(RequestLog(retention_days=None, max_rows=300), prune_every_s=0.05)
        try:
            for start in range(0, 1000, 100):
                await asyncio.gather(*(store.record(request(f"r{i:04d}")) for i in range(start, start + 100)))
                for i in range(start, start + 100):
                    store.record_shadow(f"r{i:04d}", "exp", "model-b", "ok", True, 1.0)
            for i in range(0, 1000, 10):
                feedback = await store.feedback(f"r{i:04d}", 1)
                assert feedback is None or feedback.label == 1  # None: retention already deleted that request
            await until(lambda: log.rows("SELECT count(*) FROM requests") == [(300,)]
                        and log.rows("SELECT count(*) FROM shadow") == [(300,)])
        finally:
            store.close()
        kept = [f"r{i:04d}" for i in range(700, 1000)]
        assert [r for (r,) in log.rows("SELECT request_id FROM requests ORDER BY request_id")] == kept
        assert [r for (r,) in log.rows("SELECT request_id FROM shadow ORDER BY request_id")] == kept
        assert [r for (r,) in log.rows("SELECT request_id FROM feedback ORDER BY request_id")] == kept[::10]
        assert store.deleted["requests"] == 700 and store.deleted["shadow"] == 700

    run(test)


def test_retention_deletes_rows_older_than_retention_days_in_every_table(log: Log) -> None:
    now = time.time()
    old, fresh = now - 31 * 86400, now - 29 * 86400
    requests, feedback, shadow, events = [], [], [], []
    for i in range(1200):  # a log left by an earlier run, with more than one retention step's worth of old rows
        at = old if i % 2 else fresh
        r = request(f"r{i:04d}", at=at)
        requests.append((r.request_id, r.at, r.experiment, r.arm, r.model, r.version, r.protocol, r.status, r.ok,
                         r.latency_ms, r.label, r.retried_from))
        feedback.append((r.request_id, 1, at + 1))
        shadow.append((r.request_id, at, "exp", "b", "ok", True, 1.0))
        events.append((at, "exp", "admin", r.request_id))
    log.open().close()  # the schema
    log.insert(requests, feedback, shadow, events)

    async def test() -> None:
        store = log.open(RequestLog(retention_days=30, max_rows=None), prune_every_s=0.05)
        try:
            await store.record(request("new"))
            await until(lambda: log.rows("SELECT count(*) FROM requests") == [(601,)]
                        and log.rows("SELECT count(*) FROM events") == [(600,)]
                        and log.rows("SELECT count(*) FROM shadow") == [(600,)])
        finally:
            store.close()

    run(test)
    fresh_ids = [(f"r{i:04d}",) for i in range(0, 1200, 2)]
    assert sorted(log.rows("SELECT request_id FROM requests")) == sorted([*fresh_ids, ("new",)])
    assert sorted(log.rows("SELECT request_id FROM feedback")) == fresh_ids
    assert log.rows("SELECT min(at) FROM shadow") == log.rows("SELECT min(at) FROM events") == [(fresh,)]


def test_request_log_settings_default_to_retention_on_and_are_validated() -> None:
    experiments = {"exp": {"arms": {"a": {"model": "m", "weight": 1}}}}
    default = parse_config({"experiments": experiments}).request_log
    assert default == RequestLog() and default.retention_days == 30 and default.max_rows == 2_000_000
    assert default.queue_limit == 10_000
    spec = {"retention_days": 7, "max_rows": None, "queue_limit": 500}
    assert parse_config({"experiments": experiments, "request_log": spec}).request_log == RequestLog(7.0, None, 500)
    for bad, message in (({"max_rows": 0}, "request_log.max_rows: must be a number >= 1, got 0"),
                         ({"retention_days": -1}, "request_log.retention_days: must be a number > 0, got -1"),
                         ({"queue_limit": "many"}, "request_log.queue_limit: must be a number >= 1"),
                         ({"retention": 3}, "request_log: unknown key 'retention'")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"experiments": experiments, "request_log": bad})


# --- feedback ----------------------------------------------------------------------------------------------------
def test_the_first_feedback_label_stands(log: Log) -> None:
    async def test() -> None:
        store = log.open()
        try:
            await store.record(request("r1", label=3))
            first = await store.feedback("r1", 3)
            assert first is not None and (first.label, first.duplicate, first.correct) == (3, False, True)
            second = await store.feedback("r1", 5)  # a later label changes nothing, and says so
            assert second is not None and (second.label, second.duplicate, second.correct) == (3, True, True)
            assert (second.experiment, second.arm, second.predicted) == ("exp", "a", 3)
            assert await store.feedback("nope", 1) is None
        finally:
            store.close()
        assert log.rows("SELECT request_id, label FROM feedback") == [("r1", 3)]

    run(test)


def test_overrides_are_kept_by_the_digest_of_the_file_they_were_made_against(log: Log) -> None:
    async def test() -> None:
        store = log.open()
        try:
            await store.set_override("exp", {"a": 1.0, "b": 0.0}, "admin", "digest-1")
            await store.set_override("other", {"a": 0.5}, "rollback", "digest-1")
            await store.set_override("exp", {"a": 0.0, "b": 1.0}, "admin again", "digest-1")  # replaces the first
            assert store.overrides("digest-2") == {}  # made against another version of the file: stale
            current = store.overrides("digest-1")
            assert {name: (o.weights, o.reason) for name, o in current.items()} == {
                "exp": ({"a": 0.0, "b": 1.0}, "admin again"), "other": ({"a": 0.5}, "rollback")}
            await store.clear_overrides("other")
            assert list(store.overrides("digest-1")) == ["exp"]
            await store.set_override("other", {"a": 0.5}, "made against the next version", "digest-2")
            await store.clear_overrides(except_digest="digest-2")  # a reload of digest-2: older ones go
            assert store.overrides("digest-1") == {} and list(store.overrides("digest-2")) == ["other"]
            await store.clear_overrides()
            assert store.overrides("digest-2") == {}
        finally:
            store.close()

    run(test)


# --- the report in SQL -------------------------------------------------------------------------------------------
EXPERIMENT = Experiment("exp", (Arm("a", Target("model-a", "1.0"), 2), Arm("b", Target("model-b"), 1),
                                Arm("idle", Target("model-c"), 1)), "a", "exp")


@dataclass
class RandomLog:
    requests: list[Row]
    feedback: list[Row]
    shadow: list[Row]
    events: list[Row]
    since: float  # a time inside the log's span


def random_log(seed: int, count: int) -> RandomLog:
    """A log with several targets per arm, an arm the file no longer names, retries (also from an arm that never
    answered), failures, answers without a class, feedback, tied latencies, another experiment's rows, shadow
    rows and events."""
    rng = random.Random(seed)
    start = 1_700_000_000.0
    requests, feedback, shadow, events = [], [], [], []
    for i in range(count):
        experiment = "exp" if rng.random() < 0.9 else "other"
        arm = rng.choice(("a", "a", "b", "legacy"))
        targets: dict[str, list[tuple[str, str | None]]] = {
            "a": [("model-a", "1.0"), ("model-a", "2.0")], "b": [("model-b", None)], "legacy": [("model-z", "1.0")]}
        model, version = rng.choice(targets[arm])
        status = rng.choice((200,) * 8 + (400, 503))
        label = rng.randrange(10) if status == 200 and rng.random() < 0.9 else None
        retried = rng.choice(("b", "ghost")) if rng.random() < 0.05 else None
        latency = round(rng.lognormvariate(2.5, 0.6), 1)  # rounded: many ties
        at = start + i * 0.01
        requests.append((f"r{i}", at, experiment, arm, model, version, "rest", status, status < 500, latency,
                         label, retried))
        if rng.random() < 0.6:
            feedback.append((f"r{i}", rng.randrange(10), at + 1))
        if rng.random() < 0.3:
            outcome = rng.choice(("ok", "ok", "ok", "error", "timeout", "dropped"))
            agree = None if outcome != "ok" else rng.random() < 0.8
            shadow.append((f"r{i}", at, experiment, rng.choice(("model-x", "model-y")), outcome, agree, 1.0))
        if rng.random() < 0.01:
            events.append((at, experiment, rng.choice(("admin", "rollback")), f"event {i}"))
    return RandomLog(requests, feedback, shadow, events, start + count * 0.01 * rng.uniform(0.1, 0.5))


def reference_report(data: RandomLog, experiment: Experiment, since: float) -> dict[str, Any]:
    """The report computed the straightforward way, from the rows in Python, with NumPy's percentiles."""
    truths = {request_id: label for request_id, label, _ in data.feedback}
    arms: dict[str, dict[str, Any]] = {}

    def arm_stats(name: str) -> dict[str, Any]:
        return arms.setdefault(name, {"requests": 0, "errors": 0, "latencies": [], "feedback": 0, "correct": 0,
                                      "targets": set(), "sampled": []})

    for request_id, at, name, arm, model, version, _, status, ok, latency, predicted, retried_from in data.requests:
        if name != experiment.name or at < since:
            continue
        stats = arm_stats(arm)
        stats["requests"] += 1
        stats["errors"] += 0 if ok else 1
        stats["targets"].add(f"{model}/{version}" if version else model)
        if ok and status < 400:  # a client's bad request is no latency of the arm's
            stats["latencies"].append(latency)
            stats["sampled"].append(((request_id[12:], request_id), latency))
        if retried_from:
            arm_stats(retried_from)["requests"] += 1
            arm_stats(retried_from)["errors"] += 1
        truth = truths.get(request_id)
        if truth is not None and predicted is not None:
            stats["feedback"] += 1
            stats["correct"] += int(predicted == truth)
    names = [arm.name for arm in experiment.arms] + sorted(set(arms) - {arm.name for arm in experiment.arms})
    # The latency sample: the answers whose ids sort first after their 12th character, then by the whole id.
    samples = {name: [value for _, value in sorted(arm_stats(name)["sampled"])[:LATENCY_SAMPLE]] for name in names}
    candidates = [arm.name for arm in experiment.arms if arm.name != experiment.control]

    def evidence(name: str) -> verdict.ArmEvidence:
        return verdict.ArmEvidence(name, arm_stats(name)["feedback"], arm_stats(name)["correct"],
                           experiment.weights.get(name, 0.0))

    # The statistics are router.verdict's own (tests/test_sequential.py checks them): this checks their inputs.
    decided = verdict.decide(evidence(experiment.control), [evidence(name) for name in candidates], experiment.decision)
    report_arms = []
    for name in names:
        stats = arm_stats(name)
        interval = wilson_interval(stats["correct"], stats["feedback"])
        report_arms.append({
            "arm": name, "control": name == experiment.control, "weight": experiment.weights.get(name),
            "targets": sorted(stats["targets"]),
            "requests": stats["requests"], "errors": stats["errors"],
            "error_rate": stats["errors"] / stats["requests"] if stats["requests"] else None,
            "latency_ms": {f"p{q}": pytest.approx(float(np.percentile(stats["latencies"], q)), rel=1e-12)
                           if stats["latencies"] else None for q in PERCENTILES},
            "feedback": stats["feedback"],
            "accuracy": stats["correct"] / stats["feedback"] if stats["feedback"] else None,
            "accuracy_ci95": list(interval) if interval else None,
            "vs_control": decided.get(name),
            "latency_vs_control": verdict.latency(samples[experiment.control], samples[name])
            if name in decided else None})
    shadow: dict[str, dict[str, int]] = {}
    for _, at, name, target, outcome, agree, _ in data.shadow:
        if name != experiment.name or at < since:
            continue
        counts = shadow.setdefault(target, {"compared": 0, "agree": 0, "errors": 0})
        counts["compared" if outcome == "ok" else "errors"] += 1
        counts["agree"] += int(bool(agree))
    return {"experiment": experiment.name, "control": experiment.control, "since": since,
            "decision": verdict.method(experiment.decision, len(candidates)), "arms": report_arms,
            "shadow": [{"target": target, **counts,
                        "agreement": counts["agree"] / counts["compared"] if counts["compared"] else None}
                       for target, counts in sorted(shadow.items())],
            "events": [{"at": at, "kind": kind, "detail": detail} for at, name, kind, detail in data.events
                       if name == experiment.name and at >= since][-EVENTS:],
            "rolled_back": False}  # no override in the random log


@pytest.mark.parametrize(("seed", "count"), [(1, 3000), (2, 200), (3, 7)])
def test_the_sql_report_equals_a_python_reference_on_random_logs(log: Log, seed: int, count: int) -> None:
    data = random_log(seed, count)
    log.open().close()  # the schema
    log.insert(data.requests, data.feedback, data.shadow, data.events)
    for start in (0.0, data.since):
        report = build_report(log.config, EXPERIMENT, start)
        assert report == reference_report(data, EXPERIMENT, start)
        to_markdown(report)  # renders
    arms = {row["arm"]: row for row in build_report(log.config, EXPERIMENT, 0.0)["arms"]}
    assert list(arms)[:3] == ["a", "b", "idle"]  # the file's arms first, then the log's others, sorted
    assert list(arms)[3:] == sorted(set(arms) - {"a", "b", "idle"})
    if count > 1000:  # large enough to hold an arm seen only as a retry's origin, and one the file dropped
        assert {"ghost", "legacy"} <= set(arms)
    assert arms["idle"]["requests"] == 0 and arms["idle"]["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert arms["a"]["vs_control"] is None


def test_the_latency_sample_reads_below_a_cut_and_equals_the_first_ids_of_a_full_sort(log: Log) -> None:
    """With the router's ids (12 hex digits of time, then 20 random ones): each arm's sample is the answers
    whose random part sorts first, as a sort of all of them gives; the rows below the arm's cut, the only ones
    the database sorts, number about the sample's size (sample + 8√sample expected), not the arm's thousands."""
    rng = random.Random(5)
    start, sample = 1_700_000_000.0, 100
    rows = [(f"{int((start + i * 0.01) * 1000):012x}{rng.getrandbits(80):020x}", start + i * 0.01, "exp",
             "c" if i % 100 == 0 else "a" if i % 3 else "b", "model-a", None, "rest", 200, True, float(i), None, None)
            for i in range(6000)]
    log.open().close()  # the schema
    log.insert(rows)
    backend = backend_for(log.config)
    try:
        summary = backend.summarize("exp", 0.0, PERCENTILES, sample)
    finally:
        backend.close()
    for arm in ("a", "b"):
        keyed = sorted((row[0][12:], row[0], row[9]) for row in rows if row[3] == arm)
        assert summary.arms[arm].latency_sample_ms == tuple(latency for _, _, latency in keyed[:sample])
        cut = sample_cut(len(keyed), sample)
        assert cut is not None and len(cut) == 8
        below = sum(key[:8] < cut for key, _, _ in keyed)
        assert sample <= below <= sample + 16 * math.sqrt(sample), below
    # Arm c has 60 answers: no cut, all of them, in key order (beside the arms that have one).
    assert summary.arms["c"].latency_sample_ms == tuple(latency for _, _, latency in sorted(
        (row[0][12:], row[0], row[9]) for row in rows if row[3] == "c"))
    assert sample_cut(60, sample) is None and sample_cut(10**6, 0) is None  # few rows, or no sample: read all


def test_a_report_lists_the_latest_events_only(log: Log) -> None:
    """Events pile up over an experiment's life; a report (and the dashboard every few seconds) lists the
    latest EVENTS of this experiment, oldest first."""
    log.open().close()
    events = [(1_700_000_000.0 + i, "exp", "admin", f"event {i}") for i in range(EVENTS + 12)]
    log.insert(events=[*events, (1_700_001_000.0, "other", "admin", "another experiment's")])
    report = build_report(log.config, EXPERIMENT, 0.0)
    assert [event["detail"] for event in report["events"]] == [f"event {i}" for i in range(12, EVENTS + 12)]


def test_the_live_report_includes_rows_still_queued(log: Log) -> None:
    async def test() -> None:
        store = log.open()
        try:
            await asyncio.gather(*(store.record(request(f"r{i}", label=i % 2)) for i in range(10)))
            for i in range(4):
                store.record_shadow(f"r{i}", "exp", "model-x", "ok", i != 0, 2.0)
            store.event("exp", "admin", "weights changed")
            report = await live_report(store, EXPERIMENT, 0.0)
        finally:
            store.close()
        (arm_a,) = [row for row in report["arms"] if row["arm"] == "a"]
        assert arm_a["requests"] == 10 and arm_a["latency_ms"] == {"p50": 5.0, "p95": 5.0, "p99": 5.0}
        assert report["shadow"] == [{"target": "model-x", "compared": 4, "agree": 3, "errors": 0, "agreement": 0.75}]
        assert [event["kind"] for event in report["events"]] == ["admin"]

    run(test)


# --- PostgreSQL: replicas ----------------------------------------------------------------------------------------
@pytest.fixture
def shared(postgres: ScratchPostgres, tmp_path: Path) -> Iterator[Log]:
    """A fresh PostgreSQL database for stores that play several replicas."""
    with postgres.database() as url:
        database = Log(RouterConfig(experiments={}, state_dir=tmp_path, store=StoreSettings(POSTGRESQL, url)))
        yield database
        database.close()


def open_replicas(shared: Log, count: int, settings: RequestLog = NO_RETENTION,
                  prune_every_s: float = PRUNE_EVERY_S) -> list[Store]:
    """`count` stores started at the same moment on one empty database, as replicas start: each creates the
    schema if it is missing."""
    stores: list[Store | None] = [None] * count
    errors: list[BaseException] = []
    gate = threading.Barrier(count)

    def start(index: int) -> None:
        gate.wait()
        try:
            stores[index] = shared.open(settings, prune_every_s)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    opened = [store for store in stores if store is not None]
    if errors or len(opened) != count:
        for store in opened:
            store.close()
        raise AssertionError(f"replicas failed to start: {errors}")
    return opened


def test_replicas_share_requests_feedback_and_overrides(shared: Log) -> None:
    async def test() -> None:
        one, two = open_replicas(shared, 2)
        try:
            await one.record(request("r1", label=4))
            await two.record(request("r2", label=7))
            labelled = await two.feedback("r1", 4)  # the label reaches the replica that did not log the request
            assert labelled is not None and (labelled.arm, labelled.predicted, labelled.duplicate) == ("a", 4, False)
            again = await one.feedback("r1", 9)
            assert again is not None and (again.label, again.duplicate) == (4, True)
            # Two replicas labelling one request at the same moment: one label stands, and both say which.
            racing = await asyncio.gather(one.feedback("r2", 1), two.feedback("r2", 2))
            assert all(result is not None for result in racing)
            assert sorted(result.duplicate for result in racing if result) == [False, True]
            assert len({result.label for result in racing if result}) == 1
            # An override made through one replica is what the other reads when it polls.
            await one.set_override("exp", {"a": 0.0, "b": 1.0}, "admin", "digest")
            seen = await asyncio.to_thread(two.overrides, "digest")
            assert seen["exp"].weights == {"a": 0.0, "b": 1.0}
            await two.clear_overrides("exp")
            assert one.overrides("digest") == {}
            report = await live_report(two, EXPERIMENT, 0.0)  # every replica's rows
            assert [row["requests"] for row in report["arms"] if row["arm"] == "a"] == [2]
        finally:
            one.close()
            two.close()

    run(test)


def test_replicas_prune_concurrently_without_conflict(shared: Log, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        replicas = open_replicas(shared, 2, RequestLog(retention_days=None, max_rows=300), prune_every_s=0.02)
        try:
            for start in range(0, 1000, 100):
                await asyncio.gather(*(replicas[i % 2].record(request(f"r{i:04d}"))
                                       for i in range(start, start + 100)))
                for i in range(start, start + 100, 5):
                    await replicas[(i // 5) % 2].feedback(f"r{i:04d}", 1)  # locks rows retention wants
            await until(lambda: shared.rows("SELECT count(*) FROM requests") == [(300,)])
        finally:
            for store in replicas:
                store.close()
        assert sum(store.deleted["requests"] for store in replicas) == 700
        # The newest 300 by insertion are kept, and no label outlives its request.
        assert shared.rows("SELECT min(id) > max(id) - 300 FROM requests") == [(True,)]
        assert shared.rows("SELECT count(*) FROM feedback f LEFT JOIN requests r USING (request_id) "
                           "WHERE r.request_id IS NULL") == [(0,)]
        assert shared.rows("SELECT count(*) FROM feedback") == [(60,)]

    with caplog.at_level(logging.WARNING, logger="router.store"):
        run(test)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


# --- PostgreSQL: outages -----------------------------------------------------------------------------------------
WRITERS = 8


def test_an_outage_buffers_answered_rows_and_commits_them_when_the_database_returns(
        postgres: ScratchPostgres, shared: Log, caplog: pytest.LogCaptureFixture) -> None:
    """A real server stopped and started again under load: every record() resolves, none is refused, the rows
    answered during the outage are counted as buffered, and every answered row is in the database afterwards."""
    acknowledged: list[str] = []

    async def test() -> None:
        store = shared.open()
        stop = asyncio.Event()

        async def writer(n: int) -> None:
            for i in range(100_000):  # bounded; `stop` ends it within seconds
                if stop.is_set():
                    return
                await store.record(request(f"w{n}-{i}"))
                acknowledged.append(f"w{n}-{i}")
                await asyncio.sleep(0.005)

        writers = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
        try:
            await store.set_override("exp", {"a": 1.0}, "admin", "digest")
            assert store.overrides("digest")["exp"].weights == {"a": 1.0}
            await asyncio.sleep(0.5)
            before = len(acknowledged)
            await asyncio.to_thread(postgres.stop)  # fast shutdown: every connection is cut
            await until(lambda: store.degraded, timeout_s=10)
            # Nothing that needs an acknowledgement from the database is buffered.
            with pytest.raises(StoreUnavailable):
                await store.feedback("w0-0", 1)
            with pytest.raises(StoreUnavailable):
                await store.set_override("exp", {"a": 0.5}, "admin", "digest")
            with pytest.raises(StoreError):
                await asyncio.to_thread(store.overrides, "digest")
            with pytest.raises(StoreError):
                await live_report(store, EXPERIMENT)
            during = len(acknowledged)
            await asyncio.sleep(1.0)
            assert len(acknowledged) > during + WRITERS * 20, "requests stopped being answered during the outage"
            assert store.buffered >= len(acknowledged) - during and store.queued > 0
            await asyncio.to_thread(postgres.start)
            await until(lambda: not store.degraded, timeout_s=20)
            await asyncio.sleep(0.3)  # commit-before-answer again, under the same load
            stop.set()
            await asyncio.gather(*writers)
            # The row of a request answered now is committed before its answer, again.
            await store.record(request("after"))
            assert shared.rows("SELECT count(*) FROM requests WHERE request_id = 'after'") == [(1,)]
            assert store.overrides("digest")["exp"].weights == {"a": 1.0}  # the read connection is back too
            labelled = await store.feedback("w0-0", 1)
            assert labelled is not None and not labelled.duplicate
            assert before > 0 and store.outages == 1 and store.dropped == {}
        finally:
            stop.set()
            await asyncio.gather(*writers, return_exceptions=True)
            store.close()

    with caplog.at_level(logging.WARNING, logger="router.store"):
        run(test)
    stored = {request_id for (request_id,) in shared.rows("SELECT request_id FROM requests")}
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} of {len(acknowledged)} answered rows lost: {sorted(missing)[:5]}"
    assert len(stored) == len(acknowledged) + 1
    begun = [record for record in caplog.records if "database is unreachable" in record.getMessage()]
    ended = [record for record in caplog.records if "database is back" in record.getMessage()]
    assert len(begun) == 1 and len(ended) == 1, caplog.text


def test_a_server_restarted_while_the_router_was_idle_costs_no_outage(postgres: ScratchPostgres,
                                                                       shared: Log) -> None:
    async def test() -> None:
        store = shared.open()
        try:
            await store.record(request("before"))
            await asyncio.to_thread(postgres.restart)  # the writer's connection is dead, and nobody knows yet
            await store.record(request("after"))  # one new connection, one retry: committed before the answer
            assert shared.rows("SELECT count(*) FROM requests") == [(2,)]
            assert (store.outages, store.buffered, store.degraded) == (0, 0, False)
        finally:
            store.close()

    run(test)


def test_closing_during_an_outage_says_what_is_lost_and_does_not_hang(postgres: ScratchPostgres, shared: Log,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        store = shared.open()
        try:
            await store.record(request("kept"))
            await asyncio.to_thread(postgres.stop)
            await asyncio.gather(*(store.record(request(f"r{i}")) for i in range(5)))  # answered, buffered
            assert store.degraded and store.buffered == 5
        finally:
            started = time.monotonic()
            store.close()
            closed_in = time.monotonic() - started
            await asyncio.to_thread(postgres.start)
        assert closed_in < 5
        with pytest.raises(StoreError, match="closed"):
            await store.record(request("late"))

    with caplog.at_level(logging.WARNING, logger="router.store"):
        run(test)
    assert "5 requests, 0 shadow rows and 0 events kept in memory are lost" in caplog.text
    assert shared.rows("SELECT request_id FROM requests") == [("kept",)]


def test_a_store_whose_database_is_unreachable_at_start_says_so(tmp_path: Path) -> None:
    from serving.instance import free_ports

    url = f"postgresql://postgres@127.0.0.1:{free_ports(1)[0]}/nothing"  # nobody listens there
    config = RouterConfig(experiments={}, state_dir=tmp_path, store=StoreSettings(POSTGRESQL, url))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        open_store(config)
    assert time.monotonic() - started < 5
