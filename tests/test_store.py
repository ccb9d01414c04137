"""The request log (router/store.py) against a real SQLite file: a row's awaitable resolves once the row is
committed, the queue's bound and what it sheds, retention by age and by rows, the first feedback label standing,
the `request_log` config section, and the report computed in SQL against a Python reference on random data."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from router.config import Arm, Experiment, RequestLog, Target, parse_config
from router.errors import ConfigError
from router.metrics import Metrics
from router.report import PERCENTILES, build_report, live_report, to_markdown
from router.stats import two_proportion_test, wilson_interval
from router.store import RequestRow, Store, StoreError, StoreFull, connect

NO_RETENTION = RequestLog(retention_days=None, max_rows=None)


def request(request_id: str, at: float | None = None, label: int | None = 1, experiment: str = "exp") -> RequestRow:
    return RequestRow(request_id, time.time() if at is None else at, experiment, "a", "model-a", None, "rest", 200,
                      True, 5.0, label, None)


def rows(path: Path, query: str, *args: Any) -> list[Any]:
    """Read with a connection of its own, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(query, args).fetchall()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- durability ------------------------------------------------------------------------------------------------
def test_a_row_is_committed_when_its_awaitable_resolves(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, NO_RETENTION)
        try:
            for i in range(20):  # each read right after the await, by another connection: it must be there
                await store.record(request(f"r{i}"))
                assert rows(path, "SELECT count(*) FROM requests WHERE request_id = ?", f"r{i}") == [(1,)]
            # Concurrent writers share commits and all resolve.
            await asyncio.gather(*(store.record(request(f"c{i}")) for i in range(200)))
            assert rows(path, "SELECT count(*) FROM requests WHERE request_id LIKE 'c%'") == [(200,)]
        finally:
            store.close()

    run(test)


def test_a_failed_commit_raises_and_the_writer_keeps_going(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, NO_RETENTION)
        try:
            broken = dataclasses.replace(request("bad"), experiment=None)  # type: ignore[arg-type]  # NOT NULL
            with pytest.raises(StoreError, match="could not commit: NOT NULL constraint failed"):
                await store.record(broken)
            await store.record(request("good"))
            assert rows(path, "SELECT request_id FROM requests") == [("good",)]
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
        assert sorted(rows(path, "SELECT request_id FROM requests")) == [("one",), ("three",), ("two",)]
        assert rows(path, "SELECT count(*) FROM events") == [(0,)]

    run(test)


async def wait(store: Store, request_id: str) -> None:
    await store.record(request(request_id))


def test_a_cancelled_wait_does_not_cancel_the_other_rows_of_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, NO_RETENTION)
        try:
            blocker = sqlite3.connect(path, timeout=0)
            blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: both rows wait in one batch or two
            cancelled = asyncio.create_task(wait(store, "one"))
            kept = asyncio.create_task(wait(store, "two"))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            blocker.rollback()
            await kept  # still resolves normally
            assert cancelled.cancelled()
            await store.flush()
            assert sorted(rows(path, "SELECT request_id FROM requests")) == [("one",), ("two",)]
            blocker.close()
        finally:
            store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.record(request("late"))

    run(test)


# --- the queue's bound -------------------------------------------------------------------------------------------
def test_a_full_queue_sheds_shadow_rows_and_events_first_then_refuses_requests(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, RequestLog(retention_days=None, max_rows=None, queue_limit=6))
        metrics = Metrics()
        metrics.count_log_drops(store.dropped)
        blocker = sqlite3.connect(path, timeout=0)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # the disk "stalls": the writer waits for the lock
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
            blocker.rollback()  # the disk is back: everything accepted is committed
            await first
            await asyncio.gather(*waiting)
            await store.flush()
        finally:
            blocker.close()
            store.close()
        assert sorted(rows(path, "SELECT request_id FROM requests")) == [(f"r{i}",) for i in range(4)]
        assert rows(path, "SELECT count(*) FROM shadow") == [(3,)]
        assert rows(path, "SELECT count(*) FROM events") == [(0,)]

    run(test)


# --- retention ---------------------------------------------------------------------------------------------------
def test_retention_keeps_the_newest_max_rows_of_each_table_and_drops_feedback_with_its_request(
        tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, RequestLog(retention_days=None, max_rows=300), prune_every_s=0.05)
        try:
            for start in range(0, 1000, 100):
                await asyncio.gather(*(store.record(request(f"r{i:04d}")) for i in range(start, start + 100)))
                for i in range(start, start + 100):
                    store.record_shadow(f"r{i:04d}", "exp", "model-b", "ok", True, 1.0)
            for i in range(0, 1000, 10):
                feedback = await store.feedback(f"r{i:04d}", 1)
                assert feedback is None or feedback.label == 1  # None: retention already deleted that request
            await until(lambda: rows(path, "SELECT count(*) FROM requests") == [(300,)]
                        and rows(path, "SELECT count(*) FROM shadow") == [(300,)])
        finally:
            store.close()
        kept = [f"r{i:04d}" for i in range(700, 1000)]
        assert [r for (r,) in rows(path, "SELECT request_id FROM requests ORDER BY request_id")] == kept
        assert [r for (r,) in rows(path, "SELECT request_id FROM shadow ORDER BY request_id")] == kept
        assert [r for (r,) in rows(path, "SELECT request_id FROM feedback ORDER BY request_id")] == kept[::10]
        assert store.deleted["requests"] == 700 and store.deleted["shadow"] == 700

    run(test)


def test_retention_deletes_rows_older_than_retention_days_in_every_table(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"
    now = time.time()
    old, fresh = now - 31 * 86400, now - 29 * 86400
    with contextlib.closing(connect(path)) as db, db:  # a log left by an earlier run, with old and fresh rows
        for i in range(1200):  # more than one retention step's worth of old rows
            at = old if i % 2 else fresh
            r = request(f"r{i:04d}", at=at)
            db.execute("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (r.request_id, r.at, r.experiment, r.arm, r.model, r.version, r.protocol, r.status, int(r.ok),
                        r.latency_ms, r.label, r.retried_from))
            db.execute("INSERT INTO feedback VALUES (?,?,?)", (r.request_id, 1, at + 1))
            db.execute("INSERT INTO shadow VALUES (?,?,?,?,?,?,?)", (r.request_id, at, "exp", "b", "ok", 1, 1.0))
            db.execute("INSERT INTO events VALUES (?,?,?,?)", (at, "exp", "admin", r.request_id))

    async def test() -> None:
        store = Store(path, RequestLog(retention_days=30, max_rows=None), prune_every_s=0.05)
        try:
            await store.record(request("new"))
            await until(lambda: rows(path, "SELECT count(*) FROM requests") == [(601,)]
                        and rows(path, "SELECT count(*) FROM events") == [(600,)]
                        and rows(path, "SELECT count(*) FROM shadow") == [(600,)])
        finally:
            store.close()

    run(test)
    fresh_ids = [(f"r{i:04d}",) for i in range(0, 1200, 2)]
    assert sorted(rows(path, "SELECT request_id FROM requests")) == sorted([*fresh_ids, ("new",)])
    assert sorted(rows(path, "SELECT request_id FROM feedback")) == fresh_ids
    assert rows(path, "SELECT min(at) FROM shadow") == rows(path, "SELECT min(at) FROM events") == [(fresh,)]


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
def test_the_first_feedback_label_stands(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, NO_RETENTION)
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
        assert rows(path, "SELECT request_id, label FROM feedback") == [("r1", 3)]

    run(test)


# --- the report in SQL -------------------------------------------------------------------------------------------
EXPERIMENT = Experiment("exp", (Arm("a", Target("model-a", "1.0"), 2), Arm("b", Target("model-b"), 1),
                                Arm("idle", Target("model-c"), 1)), "a", "exp")


def random_log(path: Path, seed: int, count: int) -> float:
    """A log with several targets per arm, an arm the file no longer names, retries (also from an arm that never
    answered), failures, answers without a class, feedback, tied latencies, another experiment's rows, shadow
    rows and events; returns a `since` inside its time span."""
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
        requests.append((f"r{i}", at, experiment, arm, model, version, "rest", status, int(status < 500), latency,
                         label, retried))
        if rng.random() < 0.6:
            feedback.append((f"r{i}", rng.randrange(10), at + 1))
        if rng.random() < 0.3:
            outcome = rng.choice(("ok", "ok", "ok", "error", "timeout", "dropped"))
            agree = None if outcome != "ok" else int(rng.random() < 0.8)
            shadow.append((f"r{i}", at, experiment, rng.choice(("model-x", "model-y")), outcome, agree, 1.0))
        if rng.random() < 0.01:
            events.append((at, experiment, rng.choice(("admin", "rollback")), f"event {i}"))
    with contextlib.closing(connect(path)) as db, db:
        db.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", requests)
        db.executemany("INSERT INTO feedback VALUES (?,?,?)", feedback)
        db.executemany("INSERT INTO shadow VALUES (?,?,?,?,?,?,?)", shadow)
        db.executemany("INSERT INTO events VALUES (?,?,?,?)", events)
    return start + count * 0.01 * rng.uniform(0.1, 0.5)


def reference_report(path: Path, experiment: Experiment, since: float) -> dict[str, Any]:
    """The report computed the straightforward way: every row into Python, NumPy's percentiles."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        requests = db.execute(
            "SELECT r.arm, r.ok, r.latency_ms, r.label, r.retried_from, r.model, r.version, f.label, r.status "
            "FROM requests r "
            "LEFT JOIN feedback f ON f.request_id = r.request_id WHERE r.experiment = ? AND r.at >= ?",
            (experiment.name, since)).fetchall()
        shadow_rows = db.execute("SELECT target, outcome, agree FROM shadow WHERE experiment = ? AND at >= ?",
                                 (experiment.name, since)).fetchall()
        events = db.execute("SELECT at, kind, detail FROM events WHERE experiment = ? AND at >= ? ORDER BY at",
                            (experiment.name, since)).fetchall()
    arms: dict[str, dict[str, Any]] = {}

    def arm_stats(name: str) -> dict[str, Any]:
        return arms.setdefault(name, {"requests": 0, "errors": 0, "latencies": [], "feedback": 0, "correct": 0,
                                      "targets": set()})

    for arm, ok, latency, predicted, retried_from, model, version, truth, status in requests:
        stats = arm_stats(arm)
        stats["requests"] += 1
        stats["errors"] += 0 if ok else 1
        stats["targets"].add(f"{model}/{version}" if version else model)
        if ok and status < 400:  # a client's bad request is no latency of the arm's
            stats["latencies"].append(latency)
        if retried_from:
            arm_stats(retried_from)["requests"] += 1
            arm_stats(retried_from)["errors"] += 1
        if truth is not None and predicted is not None:
            stats["feedback"] += 1
            stats["correct"] += int(predicted == truth)
    names = [arm.name for arm in experiment.arms] + sorted(set(arms) - {arm.name for arm in experiment.arms})
    control = arm_stats(experiment.control)
    report_arms = []
    for name in names:
        stats = arm_stats(name)
        test = None if name == experiment.control else two_proportion_test(
            control["correct"], control["feedback"], stats["correct"], stats["feedback"])
        interval = wilson_interval(stats["correct"], stats["feedback"])
        report_arms.append({
            "arm": name, "control": name == experiment.control, "targets": sorted(stats["targets"]),
            "requests": stats["requests"], "errors": stats["errors"],
            "error_rate": stats["errors"] / stats["requests"] if stats["requests"] else None,
            "latency_ms": {f"p{q}": pytest.approx(float(np.percentile(stats["latencies"], q)), rel=1e-12)
                           if stats["latencies"] else None for q in PERCENTILES},
            "feedback": stats["feedback"],
            "accuracy": stats["correct"] / stats["feedback"] if stats["feedback"] else None,
            "accuracy_ci95": list(interval) if interval else None,
            "vs_control": None if test is None else {"difference": test.difference, "z": test.z,
                                                     "p_value": test.p_value, "significant": test.significant}})
    shadow: dict[str, dict[str, int]] = {}
    for target, outcome, agree in shadow_rows:
        counts = shadow.setdefault(target, {"compared": 0, "agree": 0, "errors": 0})
        counts["compared" if outcome == "ok" else "errors"] += 1
        counts["agree"] += int(bool(agree))
    return {"experiment": experiment.name, "control": experiment.control, "since": since, "arms": report_arms,
            "shadow": [{"target": target, **counts,
                        "agreement": counts["agree"] / counts["compared"] if counts["compared"] else None}
                       for target, counts in sorted(shadow.items())],
            "events": [{"at": at, "kind": kind, "detail": detail} for at, kind, detail in events]}


@pytest.mark.parametrize(("seed", "count"), [(1, 3000), (2, 200), (3, 7)])
def test_the_sql_report_equals_a_python_reference_on_random_logs(tmp_path: Path, seed: int, count: int) -> None:
    path = tmp_path / "log.sqlite3"
    since = random_log(path, seed, count)
    for start in (0.0, since):
        report = build_report(path, EXPERIMENT, start)
        assert report == reference_report(path, EXPERIMENT, start)
        to_markdown(report)  # renders
    arms = {row["arm"]: row for row in build_report(path, EXPERIMENT, 0.0)["arms"]}
    assert list(arms)[:3] == ["a", "b", "idle"]  # the file's arms first, then the log's others, sorted
    assert list(arms)[3:] == sorted(set(arms) - {"a", "b", "idle"})
    if count > 1000:  # large enough to hold an arm seen only as a retry's origin, and one the file dropped
        assert {"ghost", "legacy"} <= set(arms)
    assert arms["idle"]["requests"] == 0 and arms["idle"]["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert arms["a"]["vs_control"] is None


def test_the_live_report_includes_rows_still_queued(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"

    async def test() -> None:
        store = Store(path, NO_RETENTION)
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
