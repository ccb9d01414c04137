"""Durable state in SQLite (the standard library's `sqlite3`): one row per routed request, the true labels
reported as feedback, shadow comparisons, runtime weight overrides and an event log.

Writes go through one thread that owns the writing connection. The request path only appends a row to an
in-memory buffer (no lock, no wake-up, no disk wait per request); the writer inserts the buffer with one
`executemany` per `flush_s` or before any other job. Feedback and overrides are jobs that wait for their commit
before they are acknowledged; since the buffer is written first, feedback for a request that was just answered
always finds the request's row. Reports read through their own connection (WAL lets reads run beside the
writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, at REAL NOT NULL, experiment TEXT NOT NULL, arm TEXT NOT NULL,
    model TEXT NOT NULL, version TEXT, protocol TEXT NOT NULL, status INTEGER NOT NULL, ok INTEGER NOT NULL,
    latency_ms REAL NOT NULL, label INTEGER, retried_from TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_experiment ON requests (experiment, at);
CREATE TABLE IF NOT EXISTS feedback (request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS shadow (
    request_id TEXT NOT NULL, at REAL NOT NULL, experiment TEXT NOT NULL, target TEXT NOT NULL,
    outcome TEXT NOT NULL, agree INTEGER, latency_ms REAL
);
CREATE INDEX IF NOT EXISTS shadow_by_experiment ON shadow (experiment, at);
CREATE TABLE IF NOT EXISTS overrides (
    experiment TEXT PRIMARY KEY, weights TEXT NOT NULL, reason TEXT NOT NULL, config_digest TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (at REAL NOT NULL, experiment TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT);
"""

_STOP = object()


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    at: float
    experiment: str
    arm: str
    model: str
    version: str | None
    protocol: str
    status: int
    ok: bool
    latency_ms: float
    label: int | None
    retried_from: str | None


@dataclass(frozen=True)
class Override:
    weights: dict[str, float]
    reason: str
    at: float


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, timeout=30)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    return connection


Job = Callable[[sqlite3.Connection], Any]


class Store:
    """The writer thread and the queries the router needs. `close()` flushes everything queued."""

    def __init__(self, path: Path, batch: int = 1000, flush_s: float = 0.2) -> None:
        self.path = path
        self._batch = batch
        self._flush_s = flush_s
        self._rows: deque[tuple[Any, ...]] = deque()  # appended by the event loop, drained by the writer
        self._queue: queue.Queue[Any] = queue.Queue()
        self._writer = connect(path)
        self._thread = threading.Thread(target=self._run, name="router-store", daemon=True)
        self._thread.start()

    # --- the writer thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                items = [self._queue.get(timeout=self._flush_s)]
            except queue.Empty:
                items = []
            while items and len(items) < self._batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # Rows are drained after the jobs are taken: a job (feedback) queued after its request was answered
            # always finds that request's row written.
            rows = [self._rows.popleft() for _ in range(len(self._rows))]  # deque ends are thread-safe
            stop = any(item is _STOP for item in items)
            jobs = [item for item in items if item is not _STOP]
            try:
                self._write(rows, jobs)
            except Exception as error:  # a full disk, a locked file: report it, fail the waiters, keep going
                log.error("router store: writing %d rows and %d jobs failed: %s", len(rows), len(jobs), error)
                for _, future, loop in jobs:
                    if future is not None:
                        loop.call_soon_threadsafe(_settle, future, None, error)
        self._writer.close()

    def _write(self, rows: list[tuple[Any, ...]], jobs: list[tuple[Job, Any, Any]]) -> None:
        results: list[tuple[Any, Any, Any, Exception | None]] = []
        with self._writer:  # one transaction for the batch
            if rows:
                self._writer.executemany("INSERT OR REPLACE INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            for job, future, loop in jobs:
                try:
                    results.append((future, loop, job(self._writer), None))
                except sqlite3.Error as error:  # this job's own mistake: reported to its caller, or logged
                    results.append((future, loop, None, error))
        for future, loop, result, failure in results:
            if future is None:
                if failure is not None:
                    log.error("router store: write failed: %s", failure)
                continue
            loop.call_soon_threadsafe(_settle, future, result, failure)

    def _submit(self, job: Job) -> None:
        self._queue.put((job, None, None))

    async def _call(self, job: Job) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((job, future, loop))
        return await future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    # --- writes ------------------------------------------------------------------------------------------------
    def record(self, row: RequestRow) -> None:
        self._rows.append((row.request_id, row.at, row.experiment, row.arm, row.model, row.version, row.protocol,
                           row.status, int(row.ok), row.latency_ms, row.label, row.retried_from))

    def record_shadow(self, request_id: str, experiment: str, target: str, outcome: str, agree: bool | None,
                      latency_ms: float | None) -> None:
        values = (request_id, time.time(), experiment, target, outcome, None if agree is None else int(agree),
                  latency_ms)
        self._submit(lambda db: db.execute("INSERT INTO shadow VALUES (?,?,?,?,?,?,?)", values))

    def event(self, experiment: str, kind: str, detail: str) -> None:
        values = (time.time(), experiment, kind, detail)
        self._submit(lambda db: db.execute("INSERT INTO events VALUES (?,?,?,?)", values))

    async def feedback(self, request_id: str, label: int) -> tuple[str, str, int | None] | None:
        """Store the true label of a routed request; (experiment, arm, predicted label), or None if unknown."""

        def job(db: sqlite3.Connection) -> tuple[str, str, int | None] | None:
            row = db.execute("SELECT experiment, arm, label FROM requests WHERE request_id = ?",
                             (request_id,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR REPLACE INTO feedback VALUES (?,?,?)", (request_id, label, time.time()))
            return row[0], row[1], row[2]

        result: tuple[str, str, int | None] | None = await self._call(job)
        return result

    async def set_override(self, experiment: str, weights: dict[str, float], reason: str, digest: str) -> None:
        values = (experiment, json.dumps(weights), reason, digest, time.time())
        await self._call(lambda db: db.execute("INSERT OR REPLACE INTO overrides VALUES (?,?,?,?,?)", values))

    async def clear_overrides(self, experiment: str | None = None) -> None:
        if experiment is None:
            await self._call(lambda db: db.execute("DELETE FROM overrides"))
        else:
            await self._call(lambda db: db.execute("DELETE FROM overrides WHERE experiment = ?", (experiment,)))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self._call(lambda db: None)

    # --- reads -------------------------------------------------------------------------------------------------
    def overrides(self, digest: str) -> dict[str, Override]:
        """Runtime overrides made against the experiment file whose sha256 is `digest` (others are stale)."""
        with contextlib.closing(connect(self.path)) as db:
            rows = db.execute("SELECT experiment, weights, reason, at FROM overrides WHERE config_digest = ?",
                              (digest,)).fetchall()
        return {name: Override(json.loads(weights), reason, at) for name, weights, reason, at in rows}


def read_experiment(path: Path, experiment: str, since: float = 0.0) -> dict[str, Any]:
    """Raw material of a report, read with a connection of its own: per-arm rows, feedback, shadow, events."""
    with contextlib.closing(connect(path)) as db:
        requests = db.execute(
            "SELECT r.arm, r.ok, r.latency_ms, r.label, r.retried_from, r.model, r.version, f.label "
            "FROM requests r LEFT JOIN feedback f ON f.request_id = r.request_id "
            "WHERE r.experiment = ? AND r.at >= ?", (experiment, since)).fetchall()
        shadow = db.execute("SELECT target, outcome, agree FROM shadow WHERE experiment = ? AND at >= ?",
                            (experiment, since)).fetchall()
        events = db.execute("SELECT at, kind, detail FROM events WHERE experiment = ? AND at >= ? ORDER BY at",
                            (experiment, since)).fetchall()
    return {"requests": requests, "shadow": shadow, "events": events}


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
