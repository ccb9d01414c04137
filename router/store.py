"""The router's request log and durable state in SQLite (the standard library's `sqlite3`): one row per routed
request, the true labels reported as feedback, shadow comparisons, runtime weight overrides and an event log.

Durability: a request's row is committed before its answer is sent. `record(row)` returns an awaitable that
resolves once the transaction holding the row has committed (or raises `StoreError` if it could not be): the
caller answers after awaiting it. One thread owns the writing connection and commits whatever is queued as soon
as anything is (group commit): rows that arrive while a commit runs share the next one, so a request waits for
the commit in progress (or one retention step), then its own; never for a timer. In WAL mode with
`synchronous=NORMAL` a commit is a write to the WAL file without fsync: it survives a crash of the router process
(SIGKILL, OOM kill), not of the machine (power loss, kernel panic). Checkpoints, which do fsync, run on a thread
of their own, so no commit waits for one.
Feedback and overrides are jobs that run in the same transactions and are acknowledged after their commit;
shadow rows and events are committed with the next batch but nobody waits for them.

Bounds: at most `queue_limit` rows and jobs wait for the writer. Shadow rows and events are shed first, once
half of that is queued; requests, feedback and overrides are refused (`StoreFull`, the caller answers 503)
only when the queue is full. Every shed row is counted in `Store.dropped` and logged (at most every 10 s).
Retention deletes, per table, rows older than `retention_days` and all but the newest `max_rows`, with the
feedback of every deleted request, at most PRUNE_STEP_ROWS rows per table per step, one step between commits:
no step holds the write lock for long, and a backlog is worked off step by step.

Reads (overrides at start, report summaries) use connections of their own: WAL lets them run beside the writer.
The report is computed in SQL (`summarize`): counts per arm, and latency percentiles from the few order
statistics they need, never an experiment's whole history in Python.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.config import RequestLog, Target
from router.stats import rank_positions

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, at REAL NOT NULL, experiment TEXT NOT NULL, arm TEXT NOT NULL,
    model TEXT NOT NULL, version TEXT, protocol TEXT NOT NULL, status INTEGER NOT NULL, ok INTEGER NOT NULL,
    latency_ms REAL NOT NULL, label INTEGER, retried_from TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_experiment ON requests (experiment, at);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (at);
CREATE TABLE IF NOT EXISTS feedback (request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS shadow (
    request_id TEXT NOT NULL, at REAL NOT NULL, experiment TEXT NOT NULL, target TEXT NOT NULL,
    outcome TEXT NOT NULL, agree INTEGER, latency_ms REAL
);
CREATE INDEX IF NOT EXISTS shadow_by_experiment ON shadow (experiment, at);
CREATE INDEX IF NOT EXISTS shadow_by_time ON shadow (at);
CREATE TABLE IF NOT EXISTS overrides (
    experiment TEXT PRIMARY KEY, weights TEXT NOT NULL, reason TEXT NOT NULL, config_digest TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (at REAL NOT NULL, experiment TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
"""

# The tables retention trims, each by its own `at`; feedback goes with its request.
RETAINED = ("requests", "shadow", "events")
# Rows deleted per table in one retention step: about 5 ms with random request ids (1.5 ms with time-ordered
# ones), so a commit that waits behind a step waits little (loadtest.request_log measures it).
PRUNE_STEP_ROWS = 100
# How often retention looks for rows to delete once it has caught up.
PRUNE_EVERY_S = 5.0
DROP_LOG_EVERY_S = 10.0
# The WAL is copied back into the database by a thread of its own at most this often (when something was
# committed): a checkpoint fsyncs, and a commit that ran one itself would wait 10-30 ms for it.
CHECKPOINT_EVERY_S = 1.0


class StoreError(RuntimeError):
    """A write was not committed (the database failed, or the store is closed): the caller must not claim it."""


class StoreFull(StoreError):
    """The writer's queue is at its limit: refused at once instead of queueing without end."""


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


@dataclass(frozen=True)
class Feedback:
    """The outcome of a feedback: the request it labels, and the label that stands for it.

    The first label reported for a request is kept; a later one is not stored (`duplicate` is True and `label`
    is the first one), so no client can rewrite a verdict already counted."""

    experiment: str
    arm: str
    predicted: int | None  # the class the router's answer named, if any
    label: int  # the stored (first) true label
    duplicate: bool  # True when this request already had a label: this call changed nothing

    @property
    def correct(self) -> bool:
        return self.predicted == self.label


@dataclass(frozen=True)
class ArmSummary:
    """What the log says about one arm since a time: every attempt it got (a failed attempt retried on another
    arm counts here as a request and an error), and the latency of its answers that were no client error (a 4xx
    is the client's doing, not the arm's)."""

    requests: int
    errors: int
    feedback: int  # answers that named a class and got a true label
    correct: int
    targets: tuple[str, ...]
    latency_ms: dict[float, float | None]  # percentile (0-100) -> value by linear interpolation; None: no sample


@dataclass(frozen=True)
class ShadowSummary:
    target: str
    compared: int
    agree: int
    errors: int  # failed, timed out or dropped shadow copies


@dataclass(frozen=True)
class EventRow:
    at: float
    kind: str
    detail: str


@dataclass(frozen=True)
class LogSummary:
    """The raw material of a report, aggregated by the database (see `router.report.report_of`)."""

    arms: dict[str, ArmSummary]
    shadow: tuple[ShadowSummary, ...]
    events: tuple[EventRow, ...]


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, timeout=30)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    return connection


Job = Callable[[sqlite3.Connection], Any]
# Results to hand to an event loop: (future, result, error), settled on that loop's thread.
Settlement = tuple["asyncio.Future[Any]", Any, BaseException | None]


class Store:
    """The writer thread, its bounded queue, retention, and the reads the router needs. `close()` commits
    everything queued, then stops the writer."""

    def __init__(self, path: Path, settings: RequestLog | None = None, prune_every_s: float = PRUNE_EVERY_S) -> None:
        self.path = path
        self.settings = settings or RequestLog()
        # Rows not logged because the queue was full, by table ("requests", "shadow", "events", and
        # "feedback_admin" for feedback and override writes). Exported as router_log_rows_dropped_total, read at
        # scrape time (router.metrics.Metrics.count_log_drops).
        self.dropped: collections.Counter[str] = collections.Counter()
        self.deleted: collections.Counter[str] = collections.Counter()  # rows retention deleted, by table
        self._shed_at = self.settings.queue_limit - self.settings.queue_limit // 2  # shadow and events: half
        self._prune_every_s = prune_every_s
        self._wake = threading.Condition(threading.Lock())  # guards everything below up to the writer's connection
        self._requests: list[tuple[Any, ...]] = []
        self._shadow: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []
        self._jobs: list[tuple[Job, asyncio.Future[Any], asyncio.AbstractEventLoop]] = []
        self._committing: list[asyncio.Future[None]] = []  # one per queued request row, settled per batch
        self._closing = False
        self._last_drop_log = -DROP_LOG_EVERY_S
        self._writer = connect(path)
        self._writer.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it instead
        self._committed = threading.Event()  # set by the writer after a commit; the checkpointer waits for it
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router-store", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(target=self._checkpoint, args=(connect(path),),
                                              name="router-store-checkpoint", daemon=True)
        self._checkpointer.start()

    # --- the request path ----------------------------------------------------------------------------------------
    def record(self, row: RequestRow) -> Awaitable[None]:
        """Queue a request's row; await the result before answering: it resolves when the row is committed and
        raises `StoreError` (`StoreFull` when the queue is full) when it will not be. Awaiting it may be
        cancelled without affecting the other rows of its batch."""
        loop = asyncio.get_running_loop()
        values = (row.request_id, row.at, row.experiment, row.arm, row.model, row.version, row.protocol,
                  row.status, int(row.ok), row.latency_ms, row.label, row.retried_from)
        with self._wake:
            refusal = self._refusal(self.settings.queue_limit)
            if refusal is None:
                # A future per row (settled with its batch, in one call per batch): a request whose wait is
                # cancelled cancels only its own.
                committed: asyncio.Future[None] = loop.create_future()
                self._requests.append(values)
                self._committing.append(committed)
                self._wake.notify()
                return committed
        self._dropped("requests")
        failed: asyncio.Future[None] = loop.create_future()
        failed.set_exception(refusal)
        return failed

    def record_shadow(self, request_id: str, experiment: str, target: str, outcome: str, agree: bool | None,
                      latency_ms: float | None) -> None:
        """Queue a shadow comparison (best effort: committed with the next batch, shed first when the queue fills)."""
        values = (request_id, time.time(), experiment, target, outcome, None if agree is None else int(agree),
                  latency_ms)
        self._enqueue_best_effort(self._shadow, values, "shadow")

    def event(self, experiment: str, kind: str, detail: str) -> None:
        """Queue an event (reload, weight change, rollback); best effort like shadow rows."""
        self._enqueue_best_effort(self._events, (time.time(), experiment, kind, detail), "events")

    async def feedback(self, request_id: str, label: int) -> Feedback | None:
        """Store the true label of a logged request, committed before this returns; None if no such request.

        The first label stands: a second feedback for the same request changes nothing and comes back with
        `duplicate` True and the first label."""

        def job(db: sqlite3.Connection) -> Feedback | None:
            row = db.execute("SELECT experiment, arm, label FROM requests WHERE request_id = ?",
                             (request_id,)).fetchone()
            if row is None:
                return None
            inserted = db.execute("INSERT OR IGNORE INTO feedback VALUES (?,?,?)",
                                  (request_id, label, time.time())).rowcount == 1
            stored = label if inserted else db.execute("SELECT label FROM feedback WHERE request_id = ?",
                                                       (request_id,)).fetchone()[0]
            return Feedback(row[0], row[1], row[2], stored, not inserted)

        result: Feedback | None = await self._call(job)
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
        """Wait until everything queued so far (shadow rows and events included) is committed."""
        await self._call(lambda db: None)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._closed.set()
        self._committed.set()
        self._checkpointer.join(timeout=30)

    # --- reads ---------------------------------------------------------------------------------------------------
    def overrides(self, digest: str) -> dict[str, Override]:
        """Runtime overrides made against the experiment file whose sha256 is `digest` (others are stale)."""
        with contextlib.closing(connect(self.path)) as db:
            rows = db.execute("SELECT experiment, weights, reason, at FROM overrides WHERE config_digest = ?",
                              (digest,)).fetchall()
        return {name: Override(json.loads(weights), reason, at) for name, weights, reason, at in rows}

    async def summary(self, experiment: str, since: float, percentiles: Iterable[float]) -> LogSummary:
        """`summarize` after committing everything queued, read on a worker thread (the loop keeps serving)."""
        await self.flush()
        return await asyncio.to_thread(summarize, self.path, experiment, since, tuple(percentiles))

    # --- the queue -----------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Rows and writes waiting for the writer (not counting the batch it is committing)."""
        with self._wake:
            return self._queued()

    def _queued(self) -> int:
        return len(self._requests) + len(self._shadow) + len(self._events) + len(self._jobs)

    def _refusal(self, limit: int) -> StoreError | None:
        """Why nothing more may be queued (called holding the lock), or None."""
        if self._closing:
            return StoreError("the request log is closed")
        if self._queued() >= limit:
            return StoreFull(f"the request log's queue is full ({self._queued()} rows waiting for the disk)")
        return None

    def _enqueue_best_effort(self, rows: list[tuple[Any, ...]], values: tuple[Any, ...], table: str) -> None:
        with self._wake:
            if self._refusal(self._shed_at) is None:
                rows.append(values)
                self._wake.notify()
                return
        self._dropped(table)

    async def _call(self, job: Job) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._wake:
            refusal = self._refusal(self.settings.queue_limit)
            if refusal is None:
                self._jobs.append((job, future, loop))
                self._wake.notify()
        if refusal is not None:
            self._dropped("feedback_admin")
            raise refusal
        return await future

    def _dropped(self, table: str) -> None:
        self.dropped[table] += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY_S:
            self._last_drop_log = now
            counts = ", ".join(f"{count} {name}" for name, count in sorted(self.dropped.items()))
            log.warning("request log: queue at its limit (%d); rows not logged so far: %s",
                        self.settings.queue_limit, counts)

    # --- the writer thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        retention = self.settings.retention_days is not None or self.settings.max_rows is not None
        next_prune = time.monotonic()  # a first step at start: rows may have aged while the router was down
        while True:
            with self._wake:
                while not (self._queued() or self._closing):
                    wait_s = next_prune - time.monotonic() if retention else None
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._wake.wait(wait_s)
                requests, shadow, events, jobs = self._requests, self._shadow, self._events, self._jobs
                self._requests, self._shadow, self._events, self._jobs = [], [], [], []
                committing, self._committing = self._committing, []
                closing = self._closing
            work = bool(requests or shadow or events or jobs)
            if work:
                self._commit(requests, shadow, events, jobs, committing)
                self._committed.set()
            elif closing:
                break
            # One bounded step between commits, so a backlog never stalls the rows waiting behind it.
            if retention and not closing and time.monotonic() >= next_prune:
                more = self._prune_step()
                self._committed.set()
                next_prune = time.monotonic() + (0.0 if more else self._prune_every_s)
        self._writer.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy committed WAL frames into the database beside the writer (PASSIVE: never blocks it), so that no
        commit pays for the checkpoint's fsync and the WAL stays small."""
        with contextlib.closing(db):  # the last connection to close checkpoints what is left
            while not self._closed.is_set():
                self._committed.wait()
                self._committed.clear()
                if self._closed.is_set():
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:  # a reader held the WAL, the disk hiccuped: retried next time
                    log.warning("request log: checkpoint failed: %s", error)
                self._closed.wait(CHECKPOINT_EVERY_S)

    def _commit(self, requests: list[tuple[Any, ...]], shadow: list[tuple[Any, ...]], events: list[tuple[Any, ...]],
                jobs: list[tuple[Job, asyncio.Future[Any], asyncio.AbstractEventLoop]],
                committing: list[asyncio.Future[None]]) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        failure: StoreError | None = None
        db = self._writer
        try:
            with db:  # one transaction for the batch: all of it is committed, or none of it
                db.execute("BEGIN")
                # Rows go first: feedback for a request answered before it was queued always finds the row.
                if requests:
                    db.executemany("INSERT OR REPLACE INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", requests)
                if shadow:
                    db.executemany("INSERT INTO shadow VALUES (?,?,?,?,?,?,?)", shadow)
                if events:
                    db.executemany("INSERT INTO events VALUES (?,?,?,?)", events)
                for job, _, _ in jobs:
                    results.append(_run_job(db, job))
                if not db.in_transaction:  # SQLite rolled it all back (a full disk, an I/O error)
                    raise sqlite3.OperationalError("the transaction was rolled back")
        except Exception as error:  # a full disk, a locked or broken file: nothing in the batch is committed
            log.error("request log: committing %d requests, %d shadow rows, %d events and %d jobs failed: %s",
                      len(requests), len(shadow), len(events), len(jobs), error)
            failure = StoreError(f"the request log could not commit: {error}")
        by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = collections.defaultdict(list)
        for future in committing:
            by_loop[future.get_loop()].append((future, None, failure))
        for index, (_, future, loop) in enumerate(jobs):
            result, problem = (None, failure) if failure is not None else results[index]
            by_loop[loop].append((future, result, problem))
        for loop, settlements in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, settlements)

    def _prune_step(self) -> bool:
        """Delete at most PRUNE_STEP_ROWS old rows per table; True when some table has more to delete."""
        settings = self.settings
        cutoff = None if settings.retention_days is None else time.time() - settings.retention_days * 86400
        more = False
        try:
            with self._writer:
                for table in RETAINED:
                    victims = _victims(self._writer, table, cutoff, settings.max_rows, PRUNE_STEP_ROWS)
                    if not victims:
                        continue
                    if table == "requests":  # a label without its request means nothing
                        self._writer.executemany(
                            "DELETE FROM feedback WHERE request_id = (SELECT request_id FROM requests WHERE rowid = ?)",
                            victims)
                    self._writer.executemany(f"DELETE FROM {table} WHERE rowid = ?", victims)
                    self.deleted[table] += len(victims)
                    more = more or len(victims) >= PRUNE_STEP_ROWS
        except Exception as error:  # retention retries at its next period; the log itself keeps working
            log.error("request log: retention failed: %s", error)
            return False
        return more


def _run_job(db: sqlite3.Connection, job: Job) -> tuple[Any, BaseException | None]:
    """Run one job inside the batch's transaction, in a savepoint: a job that fails is undone and reported to
    its caller alone. If undoing it fails too, the transaction itself is broken and the whole batch fails."""
    db.execute("SAVEPOINT job")
    try:
        outcome: tuple[Any, BaseException | None] = (job(db), None)
    except Exception as error:
        db.execute("ROLLBACK TO job")
        outcome = (None, StoreError(f"the request log refused the write: {error}")
                   if isinstance(error, sqlite3.Error) else error)
    db.execute("RELEASE job")
    return outcome


def _victims(db: sqlite3.Connection, table: str, cutoff: float | None, max_rows: int | None,
             limit: int) -> list[tuple[int]]:
    """Rowids of up to `limit` rows older than `cutoff`, and up to `limit` rows beyond the newest `max_rows`.

    Rows are only ever appended and deleted oldest first, so rowids are dense and increasing: the newest
    `max_rows` rowids are the newest `max_rows` rows (at most that many), found without counting the table."""
    victims: set[int] = set()
    if cutoff is not None:
        victims.update(rowid for (rowid,) in db.execute(
            f"SELECT rowid FROM {table} WHERE at < ? ORDER BY at LIMIT ?", (cutoff, limit)))
    if max_rows is not None:
        (newest,) = db.execute(f"SELECT max(rowid) FROM {table}").fetchone()
        if newest is not None and newest > max_rows:
            victims.update(rowid for (rowid,) in db.execute(
                f"SELECT rowid FROM {table} WHERE rowid <= ? ORDER BY rowid LIMIT ?",
                (newest - max_rows, limit)))
    return [(rowid,) for rowid in sorted(victims)]


def _settle(settlements: list[Settlement]) -> None:
    for future, result, error in settlements:
        if future.done():  # a job's caller was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


# --- the report's queries ----------------------------------------------------------------------------------------
def summarize(path: Path, experiment: str, since: float, percentiles: tuple[float, ...]) -> LogSummary:
    """Aggregate one experiment's log since `since` in SQL, with a connection of its own (any thread).

    Percentiles need only the order statistics around their ranks: the arms' counts come first, then one
    sorted pass (SQLite's sorter, which spills to disk rather than growing) returns just those rows."""
    with contextlib.closing(connect(path)) as db:
        db.execute("BEGIN")  # one read snapshot: the ranks computed from the counts are ranks in the same rows
        tallies: dict[str, _Tally] = collections.defaultdict(_Tally)
        # One pass over the experiment's rows. Only answers that named a class can be right or wrong.
        for arm, model, version, retried_from, requests, errors, answered, feedback, correct in db.execute(
                "SELECT r.arm, r.model, r.version, r.retried_from, count(*), total(r.ok = 0), "
                "total(r.ok AND r.status < 400), count(f.label) FILTER (WHERE r.label IS NOT NULL), "
                "total(r.label = f.label) "
                "FROM requests r LEFT JOIN feedback f ON f.request_id = r.request_id "
                "WHERE r.experiment = ? AND r.at >= ? GROUP BY r.arm, r.model, r.version, r.retried_from",
                (experiment, since)):
            tally = tallies[arm]
            tally.requests += requests
            tally.errors += int(errors)
            tally.answered += int(answered)
            tally.feedback += feedback
            tally.correct += int(correct)
            tally.targets.add(str(Target(model, version)))
            if retried_from:  # a failed attempt retried elsewhere counts against the arm that failed
                tallies[retried_from].requests += requests
                tallies[retried_from].errors += requests
        latencies = _percentiles(db, experiment, since, {arm: t.answered for arm, t in tallies.items()}, percentiles)
        shadow = tuple(ShadowSummary(target, int(compared), int(agree), int(errors)) for target, compared, agree, errors
                       in db.execute("SELECT target, total(outcome = 'ok'), total(coalesce(agree, 0) != 0), "
                                     "total(outcome != 'ok') FROM shadow WHERE experiment = ? AND at >= ? "
                                     "GROUP BY target ORDER BY target", (experiment, since)))
        events = tuple(EventRow(at, kind, detail) for at, kind, detail in db.execute(
            "SELECT at, kind, detail FROM events WHERE experiment = ? AND at >= ? ORDER BY at", (experiment, since)))
    arms = {arm: ArmSummary(t.requests, t.errors, t.feedback, t.correct, tuple(sorted(t.targets)),
                            latencies.get(arm, dict.fromkeys(percentiles))) for arm, t in tallies.items()}
    return LogSummary(arms, shadow, events)


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    answered: int = 0  # successful attempts that were no client error: the latency percentiles' samples
    feedback: int = 0
    correct: int = 0
    targets: set[str] = field(default_factory=set)


def _percentiles(db: sqlite3.Connection, experiment: str, since: float, answered: dict[str, int],
                 percentiles: tuple[float, ...]) -> dict[str, dict[float, float | None]]:
    """Each arm's latency percentiles over its successful attempts, by linear interpolation between the two
    order statistics around each rank (NumPy's default, as `router.stats.percentile`)."""
    ranks = {arm: {q: rank_positions(n, q) for q in percentiles} for arm, n in answered.items() if n}
    wanted = sorted({(arm, position) for arm, by_q in ranks.items() for low, high, _ in by_q.values()
                     for position in (low, high)})
    values: dict[tuple[str, int], float] = {}
    if wanted:
        rows = ", ".join("(?, ?)" for _ in wanted)
        for arm, position, latency in db.execute(
                f"WITH wanted (arm, position) AS (VALUES {rows}) "
                "SELECT ranked.arm, ranked.position, ranked.latency_ms FROM (SELECT arm, latency_ms, "
                "row_number() OVER (PARTITION BY arm ORDER BY latency_ms) - 1 AS position FROM requests "
                "WHERE experiment = ? AND at >= ? AND ok = 1 AND status < 400) AS ranked "
                "JOIN wanted ON wanted.arm = ranked.arm AND wanted.position = ranked.position",
                [*(value for pair in wanted for value in pair), experiment, since]):
            values[(arm, position)] = latency
    result: dict[str, dict[float, float | None]] = {}
    for arm, by_q in ranks.items():
        result[arm] = {}
        for q, (low, high, fraction) in by_q.items():
            lower, upper = values[(arm, low)], values[(arm, high)]
            result[arm][q] = lower + (upper - lower) * fraction
    return result
