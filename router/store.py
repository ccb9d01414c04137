"""The router's request log and durable state: one row per routed request, the true labels reported as feedback,
shadow comparisons, runtime weight overrides and an event log. This module is the part every database shares
(the queue, the writer thread, group commit, shedding, retention's pace, outages); the SQL lives in a backend:
`router.store_sqlite` (one router process, a file in its state directory: the default) or
`router.store_postgres` (one PostgreSQL server that several router replicas share). `open_store(config)` picks.

Durability: a request's row is committed before its answer is sent. `record(row)` returns an awaitable that
resolves once the transaction holding the row has committed (or raises `StoreError` if it could not be): the
caller answers after awaiting it. One thread owns the writing connection and commits whatever is queued as soon
as anything is (group commit): rows that arrive while a commit runs share the next one, so a request waits for
the commit in progress (or one retention step), then its own; never for a timer. What a commit survives is the
backend's: SQLite's (WAL, `synchronous=NORMAL`) survives a crash of the router process, not of the machine;
PostgreSQL's is durable on the server (`synchronous_commit` on) and survives the loss of any router.
Feedback and overrides are jobs that run in the same transactions and are acknowledged after their commit;
shadow rows and events are committed with the next batch but nobody waits for them.

Outages (PostgreSQL; a local SQLite file has none to wait out: a failing disk fails the batch, as it always did):
when the database becomes unreachable (connection lost, server restarting or refusing connections), the writer
first reconnects once at once (a server restarted while the router was idle costs nothing more); failing that,
the store is *degraded*: the batch's rows go back to the head of the queue, every request waiting for a commit is
answered as if committed ("buffered", counted in `Store.buffered`), new requests are answered at once, and the
writer reconnects every RECONNECT_EVERY_S. Once it is back, the backlog is committed oldest first, in chunks of
RECOVERY_CHUNK_ROWS (a request row twice is harmless: its primary key), and commit-before-answer resumes.
The promise during an outage is weaker, and deliberately so: an answered request's row lives only in this
router's memory, and is lost if this router stops or dies before the database returns. Feedback, overrides and
reports are never buffered: during an outage they fail with `StoreError` (the client gets 503, nothing
unacknowledged is claimed). Each outage is logged once when it starts and once when it ends (`Store.outages`
counts them, `Store.degraded` says whether one is under way). A batch retried after a lost connection may have
been committed already: its shadow rows and events can then appear twice, a feedback can come back `duplicate`.

Bounds: at most `queue_limit` rows and jobs wait for the writer. Shadow rows and events are shed first, once
half of that is queued; requests, feedback and overrides are refused (`StoreFull`, the caller answers 503)
only when the queue is full, outage or not: a backlog never grows without end (the batch that was being committed
when an outage began goes back into the queue on top, so at that moment it may hold up to twice `queue_limit`).
Every shed row is counted in `Store.dropped` and logged (at most every 10 s).
Retention deletes, per table, rows older than `retention_days` and all but the newest `max_rows`, with the
feedback of every deleted request, at most PRUNE_STEP_ROWS rows per table per step, one step between commits:
no step holds the write lock for long, and a backlog is worked off step by step.

Reads (overrides, report summaries) use connections of their own, beside the writer. The report is computed in
SQL (`Backend.summarize`): counts per arm, and latency percentiles from the few order statistics they need,
never an experiment's whole history in Python.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from router.config import POSTGRESQL, RequestLog, RouterConfig, Target
from router.errors import RouterError

log = logging.getLogger(__name__)

# Rows deleted per table in one retention step: about 5 ms with random request ids (1.5 ms with time-ordered
# ones), so a commit that waits behind a step waits little (loadtest.request_log measures it).
PRUNE_STEP_ROWS = 100
# How often retention looks for rows to delete once it has caught up.
PRUNE_EVERY_S = 5.0
DROP_LOG_EVERY_S = 10.0
# During an outage: how often the writer tries to reconnect, and how often it logs that it still cannot.
RECONNECT_EVERY_S = 0.5
RECONNECT_LOG_EVERY_S = 10.0
# Rows per table per transaction when the backlog of an outage is committed: a database that fails again
# mid-way costs at most one chunk's work, and the requests that wait behind the backlog wait for one chunk.
RECOVERY_CHUNK_ROWS = 1000


class StoreError(RouterError):
    """A write was not committed (the database failed, or the store is closed): the caller must not claim it.
    Clients get 503 / UNAVAILABLE and may retry shortly."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message, retry_after_s)


class StoreFull(StoreError):
    """The writer's queue is at its limit: refused at once instead of queueing without end."""


class StoreUnavailable(StoreError):
    """The database is unreachable (an outage): feedback, overrides and reports are refused, never buffered."""


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


ROLLBACK = "rollback"  # how a guardrail's override's reason begins


@dataclass(frozen=True)
class Override:
    """Runtime weights of one experiment: an admin's change, or a guardrail rollback (reason "rollback: ...")."""

    weights: dict[str, float]
    reason: str
    at: float

    @property
    def rollback(self) -> bool:
        return self.reason.startswith(ROLLBACK)


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
    def correct(self) -> bool | None:
        """None when the answer named no single class (an error, or a batch of images): nothing to judge."""
        return None if self.predicted is None else self.predicted == self.label


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
    # Up to the `sample` asked for of the same latencies, chosen by request id (see `Backend.summarize`).
    latency_sample_ms: tuple[float, ...] = ()


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


@dataclass(frozen=True)
class SeriesPoint:
    """One arm over one interval of a time series (`Backend.series`): its attempts, counted as in `ArmSummary`,
    and the latency percentiles of its answers that were no client error."""

    arm: str
    bucket: int  # the interval's index: it starts at since + bucket × step_s
    requests: int
    errors: int
    latency_ms: dict[float, float | None]


@dataclass
class Tally:
    """One arm's counts while a backend adds up its rows for `LogSummary` (the same rules for every backend)."""

    requests: int = 0
    errors: int = 0
    answered: int = 0  # successful attempts that were no client error: the latency percentiles' samples
    feedback: int = 0
    correct: int = 0
    targets: set[str] = field(default_factory=set)


# A row as the backends insert it, its values in the tables' column order: requests (request_id, at, experiment,
# arm, model, version, protocol, status, ok, latency_ms, label, retried_from), shadow (request_id, at, experiment,
# target, outcome, agree, latency_ms), events (at, experiment, kind, detail). `ok` and `agree` are bools.
Row = tuple[Any, ...]
# A write run inside a batch's transaction, given the backend's connection (its own savepoint: a job that fails is
# undone and reported to its caller alone).
Job = Callable[[Any], Any]
# What a job gave: its result, or the error its caller gets.
Outcome = tuple[Any, BaseException | None]
# Results to hand to an event loop: (future, result, error), settled on that loop's thread.
Settlement = tuple["asyncio.Future[Any]", Any, BaseException | None]


class Backend(Protocol):
    """The SQL of one database. The writer thread alone calls `open_writer`, `write`, `prune_step` and the job
    bodies (`feedback`, `set_override`, `clear_overrides`, each given the connection `write` hands its jobs);
    `overrides` and `summarize` may be called from any thread, at the same time as the writer works."""

    @property
    def path(self) -> Path | None:
        """The SQLite file; None for a database server."""

    def open_writer(self) -> None:
        """(Re)open the writer's connection and create the schema if it is missing."""

    def write(self, requests: list[Row], shadow: list[Row], events: list[Row], jobs: list[Job]) -> list[Outcome]:
        """Insert the rows and run the jobs in one transaction; raises if it was not committed (then nothing
        of it was, unless the connection was lost after the commit was sent: see the outage notes above)."""

    def is_outage(self, error: BaseException) -> bool:
        """Whether `error` (from `write`, `prune_step` or `open_writer`) means the database is unreachable: a
        reason to keep the rows and reconnect, rather than to fail the batch."""

    def prune_step(self, cutoff: float | None, max_rows: int | None, limit: int) -> dict[str, int]:
        """Delete up to `limit` rows per table older than `cutoff` or beyond the newest `max_rows`, with the
        feedback of deleted requests; returns the rows deleted per table."""

    def feedback(self, db: Any, request_id: str, label: int) -> Feedback | None:
        """The feedback job (see `Store.feedback`)."""

    def set_override(self, db: Any, experiment: str, weights: dict[str, float], reason: str, digest: str) -> None:
        """Insert or replace an experiment's override."""

    def clear_overrides(self, db: Any, experiment: str | None, except_digest: str | None) -> None:
        """Delete one experiment's override (or every experiment's: None), except those made against the
        experiments whose digest is `except_digest`."""

    def overrides(self, digest: str) -> dict[str, Override]:
        """Every override made against the experiment file whose sha256 is `digest`."""

    def summarize(self, experiment: str, since: float, percentiles: tuple[float, ...], sample: int = 0,
                  events: int | None = None) -> LogSummary:
        """One experiment's log since `since`, aggregated in SQL, from one snapshot; with up to `sample`
        latencies per arm (`ArmSummary.latency_sample_ms`): those of the answers whose request ids sort first
        from their 13th character on (after the 12 hex digits of time: the random part), then by the whole id,
        read below the arm's `sample_cut` (only about `sample` rows are sorted); and the latest `events` events
        (None: all), in time order. A sample spread over the whole period, the same for the same rows."""

    def series(self, experiment: str, since: float, step_s: float, percentiles: tuple[float, ...]) -> list[SeriesPoint]:
        """One experiment's log since `since` in intervals of `step_s` seconds: each arm's attempts, failures and
        latency percentiles per interval that has any (a dashboard's time series)."""

    def close(self) -> None:
        """Close every connection (the writer thread has stopped)."""


def backend_for(config: RouterConfig) -> Backend:
    """The backend `config.store` names; it opens no connection until used."""
    if config.store.backend == POSTGRESQL:
        from router.store_postgres import PostgresBackend  # imported here: it imports this module

        return PostgresBackend(config.store.database_url())
    from router.store_sqlite import SQLiteBackend

    return SQLiteBackend(config.database)


def open_store(config: RouterConfig) -> Store:
    """The router's store: SQLite at `config.database`, or the PostgreSQL server `config.store` names."""
    return Store(backend_for(config), config.request_log)


@dataclass
class _Batch:
    """What the writer took from the queue for one transaction."""

    requests: list[tuple[Row, asyncio.Future[None] | None]]  # future None: already answered (buffered)
    shadow: list[Row]
    events: list[Row]
    jobs: list[tuple[Job, asyncio.Future[Any], asyncio.AbstractEventLoop]]
    ends_outage: bool = False  # it holds the last rows buffered during an outage

    def __bool__(self) -> bool:
        return bool(self.requests or self.shadow or self.events or self.jobs)


class Store:
    """The writer thread, its bounded queue, retention, and the reads the router needs. `close()` commits
    everything queued, then stops the writer. `backend` may be a path: a SQLite file."""

    def __init__(self, backend: Backend | Path, settings: RequestLog | None = None,
                 prune_every_s: float = PRUNE_EVERY_S) -> None:
        if isinstance(backend, Path):
            from router.store_sqlite import SQLiteBackend  # imported here: it imports this module

            backend = SQLiteBackend(backend)
        self.backend = backend
        self.settings = settings or RequestLog()
        # Rows not logged because the queue was full, by table ("requests", "shadow", "events", and
        # "feedback_admin" for feedback and override writes). Exported as router_log_rows_dropped_total, read at
        # scrape time (router.metrics.Metrics.watch_store).
        self.dropped: collections.Counter[str] = collections.Counter()
        self.deleted: collections.Counter[str] = collections.Counter()  # rows retention deleted, by table
        self.buffered = 0  # requests answered before their row was committed, because of an outage
        self.outages = 0  # outages that began (each one logged when it begins and when it ends)
        self._shed_at = self.settings.queue_limit - self.settings.queue_limit // 2  # shadow and events: half
        self._prune_every_s = prune_every_s
        self._wake = threading.Condition(threading.Lock())  # guards the queue and `_buffering`
        self._requests: list[tuple[Row, asyncio.Future[None] | None]] = []
        self._shadow: list[Row] = []
        self._events: list[Row] = []
        self._jobs: list[tuple[Job, asyncio.Future[Any], asyncio.AbstractEventLoop]] = []
        self._closing = False
        # From an outage's start until the writer has taken the last row buffered: requests are answered at once.
        self._buffering = False
        # From an outage's start until that last row is committed (only the writer thread sets it).
        self._outage_since: float | None = None
        self._buffered_at_outage = 0
        self._stop = threading.Event()  # set by close(): ends the writer's reconnection attempts
        self._last_attempt_made = False  # the one reconnection attempt made once closing
        self._last_drop_log = -DROP_LOG_EVERY_S
        try:
            self.backend.open_writer()
        except Exception as error:
            if self.backend.is_outage(error):
                raise StoreUnavailable(f"the request log's database is unreachable: {error}") from error
            raise
        self._thread = threading.Thread(target=self._run, name="router-store", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path | None:
        """The SQLite file (None for a database server)."""
        return self.backend.path

    @property
    def degraded(self) -> bool:
        """Whether an outage is under way: answered requests' rows wait in memory, uncommitted."""
        return self._outage_since is not None

    # --- the request path ----------------------------------------------------------------------------------------
    def record(self, row: RequestRow) -> Awaitable[None]:
        """Queue a request's row; await the result before answering: it resolves when the row is committed and
        raises `StoreError` (`StoreFull` when the queue is full) when it will not be. During an outage it
        resolves at once, the row kept in the queue (see above). Awaiting it may be cancelled without affecting
        the other rows of its batch."""
        loop = asyncio.get_running_loop()
        values = (row.request_id, row.at, row.experiment, row.arm, row.model, row.version, row.protocol,
                  row.status, row.ok, row.latency_ms, row.label, row.retried_from)
        with self._wake:
            refusal = self._refusal(self.settings.queue_limit)
            if refusal is None:
                # A future per row (settled with its batch, in one call per batch): a request whose wait is
                # cancelled cancels only its own.
                committed: asyncio.Future[None] = loop.create_future()
                if self._buffering:
                    committed.set_result(None)
                    self.buffered += 1
                    self._requests.append((values, None))
                else:
                    self._requests.append((values, committed))
                self._wake.notify()
                return committed
        self._dropped("requests")
        failed: asyncio.Future[None] = loop.create_future()
        failed.set_exception(refusal)
        return failed

    def record_shadow(self, request_id: str, experiment: str, target: str, outcome: str, agree: bool | None,
                      latency_ms: float | None) -> None:
        """Queue a shadow comparison (best effort: committed with the next batch, shed first when the queue fills)."""
        self._enqueue_best_effort(self._shadow, (request_id, time.time(), experiment, target, outcome, agree,
                                                 latency_ms), "shadow")

    def event(self, experiment: str, kind: str, detail: str) -> None:
        """Queue an event (reload, weight change, rollback); best effort like shadow rows."""
        self._enqueue_best_effort(self._events, (time.time(), experiment, kind, detail), "events")

    async def feedback(self, request_id: str, label: int) -> Feedback | None:
        """Store the true label of a logged request, committed before this returns; None if no such request.

        The first label stands: a second feedback for the same request changes nothing and comes back with
        `duplicate` True and the first label."""
        result: Feedback | None = await self._call(lambda db: self.backend.feedback(db, request_id, label))
        return result

    async def set_override(self, experiment: str, weights: dict[str, float], reason: str, digest: str) -> None:
        await self._call(lambda db: self.backend.set_override(db, experiment, weights, reason, digest))

    async def clear_overrides(self, experiment: str | None = None, except_digest: str | None = None) -> None:
        """Delete one experiment's override, or all; `except_digest` keeps those made against that version of
        the experiments (replicas that reloaded an edited file first may already have made some)."""
        await self._call(lambda db: self.backend.clear_overrides(db, experiment, except_digest))

    async def flush(self) -> None:
        """Wait until everything queued so far (shadow rows and events included) is committed."""
        await self._call(lambda db: None)

    def close(self) -> None:
        """Commit what is queued and stop the writer. During an outage, what waits in memory is lost (logged)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._stop.set()
        self._thread.join(timeout=30)
        self.backend.close()

    # --- reads ---------------------------------------------------------------------------------------------------
    def overrides(self, digest: str) -> dict[str, Override]:
        """Runtime overrides made against the experiment file whose sha256 is `digest` (others are stale); those
        another replica made too. Any thread, on a read connection of its own (cheap enough to poll); raises
        `StoreError` while the database is unreachable."""
        return self.backend.overrides(digest)

    async def summary(self, experiment: str, since: float, percentiles: Iterable[float], sample: int = 0,
                      events: int | None = None) -> LogSummary:
        """`Backend.summarize` after committing everything queued, read on a worker thread (the loop keeps
        serving)."""
        await self.flush()
        return await asyncio.to_thread(self.backend.summarize, experiment, since, tuple(percentiles), sample, events)

    async def series(self, experiment: str, since: float, step_s: float,
                     percentiles: Iterable[float]) -> list[SeriesPoint]:
        """`Backend.series` after committing everything queued, read on a worker thread."""
        await self.flush()
        return await asyncio.to_thread(self.backend.series, experiment, since, step_s, tuple(percentiles))

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
            return StoreFull(f"the request log's queue is full ({self._queued()} rows waiting for the database)")
        return None

    def _enqueue_best_effort(self, rows: list[Row], values: Row, table: str) -> None:
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
            if refusal is None and self._buffering:  # never buffered: nothing unacknowledged is claimed
                raise StoreUnavailable("the request log's database is unreachable: nothing was written")
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
                batch = self._take()
                closing = self._closing
            if batch:
                if not self._commit(batch):  # an outage: the rows are back in the queue
                    if not self._reconnect():
                        break  # closed during the outage
                    continue
            elif closing:
                break
            # One bounded step between commits, so a backlog never stalls the rows waiting behind it; none while
            # an outage's backlog is being committed.
            if retention and not closing and not self.degraded and time.monotonic() >= next_prune:
                try:
                    more = self._prune_step()
                except Exception as error:  # only an outage comes out of it
                    self._begin_outage(_Batch([], [], [], []), error)
                    if not self._reconnect():
                        break
                    continue
                next_prune = time.monotonic() + (0.0 if more else self._prune_every_s)
        self._abandon()

    def _take(self) -> _Batch:
        """Everything queued (called holding the lock); after an outage, the backlog a chunk at a time, and once
        the last of it is taken requests wait for their commits again."""
        if not self._buffering:
            return self._take_all()
        n = RECOVERY_CHUNK_ROWS
        batch = _Batch(self._requests[:n], self._shadow[:n], self._events[:n], self._jobs)
        del self._requests[:n], self._shadow[:n], self._events[:n]
        self._jobs = []
        if not (self._requests or self._shadow or self._events):
            self._buffering = False
            batch.ends_outage = True
        return batch

    def _commit(self, batch: _Batch) -> bool:
        """Commit one batch and settle its futures; False when the database is unreachable (then the batch is
        back in the queue and the store is degraded)."""
        rows = [values for values, _ in batch.requests]
        jobs = [job for job, _, _ in batch.jobs]
        results: list[Outcome] = []
        failure: StoreError | None = None
        try:
            try:
                results = self.backend.write(rows, batch.shadow, batch.events, jobs)
            except Exception as error:
                if not self.backend.is_outage(error):
                    raise
                # The connection broke (perhaps long ago, while the router was idle): one new one, one retry.
                log.warning("request log: lost the database connection (%s); reconnecting", error)
                self.backend.open_writer()
                results = self.backend.write(rows, batch.shadow, batch.events, jobs)
        except Exception as error:  # a full disk, a broken constraint, an unreachable server
            if self.backend.is_outage(error):
                self._begin_outage(batch, error)
                return False
            answered = sum(future is None for _, future in batch.requests)  # buffered during an outage: lost
            log.error("request log: committing %d requests (%d of them answered already), %d shadow rows, %d events "
                      "and %d jobs failed: %s", len(rows), answered, len(batch.shadow), len(batch.events), len(jobs),
                      error)
            failure = StoreError(f"the request log could not commit: {error}")
        by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = collections.defaultdict(list)
        for _, future in batch.requests:
            if future is not None:
                by_loop[future.get_loop()].append((future, None, failure))
        for index, (_, future, loop) in enumerate(batch.jobs):
            result, problem = (None, failure) if failure is not None else results[index]
            by_loop[loop].append((future, result, problem))
        _hand_over(by_loop)
        if batch.ends_outage:
            self._end_outage(committed=failure is None)
        return True

    def _prune_step(self) -> bool:
        """One retention step; True when some table has more to delete. An outage is raised, anything else
        logged (retention retries at its next period; the log itself keeps working)."""
        settings = self.settings
        cutoff = None if settings.retention_days is None else time.time() - settings.retention_days * 86400
        try:
            try:
                deleted = self.backend.prune_step(cutoff, settings.max_rows, PRUNE_STEP_ROWS)
            except Exception as error:
                if not self.backend.is_outage(error):
                    raise
                self.backend.open_writer()  # one new connection, one retry, as for a batch
                deleted = self.backend.prune_step(cutoff, settings.max_rows, PRUNE_STEP_ROWS)
        except Exception as error:
            if self.backend.is_outage(error):
                raise
            log.error("request log: retention failed: %s", error)
            return False
        self.deleted.update(deleted)
        return any(count >= PRUNE_STEP_ROWS for count in deleted.values())

    # --- outages -------------------------------------------------------------------------------------------------
    def _begin_outage(self, batch: _Batch, error: BaseException) -> None:
        """Put the batch back at the head of the queue, answer every request waiting for a commit, fail every
        job, and buffer from now on."""
        unavailable = StoreUnavailable(f"the request log's database is unreachable: {error}")
        by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = collections.defaultdict(list)
        with self._wake:
            waiting = [future for _, future in batch.requests + self._requests if future is not None]
            self._requests = [(values, None) for values, _ in batch.requests + self._requests]
            self._shadow[:0] = batch.shadow
            self._events[:0] = batch.events
            jobs, self._jobs = batch.jobs + self._jobs, []
            self._buffering = True
            begins = self._outage_since is None
            if begins:  # before anyone is answered: whoever sees a buffered answer sees `degraded` too
                self._outage_since = time.monotonic()
                self._buffered_at_outage = self.buffered
                self.outages += 1
            self.buffered += len(waiting)
            kept = len(self._requests)
        for future in waiting:
            by_loop[future.get_loop()].append((future, None, None))
        for _, future, loop in jobs:
            by_loop[loop].append((future, None, unavailable))
        _hand_over(by_loop)
        if begins:
            log.error("request log: the database is unreachable (%s); answering without waiting for commits, "
                      "keeping up to %d rows in memory until it is back (%d requests so far)", error,
                      self.settings.queue_limit, kept)

    def _reconnect(self) -> bool:
        """Try to reconnect every RECONNECT_EVERY_S until it works (True), or until the store closes: then one
        last attempt, so that what is kept is committed if the database is back by then (else False)."""
        last_log = time.monotonic()
        while True:
            closing = self._stop.wait(RECONNECT_EVERY_S)
            if closing and self._last_attempt_made:  # the database failed again after the last attempt
                return False
            self._last_attempt_made = closing
            try:
                self.backend.open_writer()
            except Exception as error:  # whatever it is, the rows stay kept and the writer keeps trying
                if closing:
                    return False
                if time.monotonic() - last_log >= RECONNECT_LOG_EVERY_S:
                    last_log = time.monotonic()
                    log.warning("request log: still no database (%s); %d rows waiting", error, self.queued)
                continue
            with self._wake:
                drained = not (self._requests or self._shadow or self._events)
                if drained:
                    self._buffering = False
            if drained:  # nothing was kept (nobody wrote during the outage): it is over now
                self._end_outage()
            return True

    def _end_outage(self, committed: bool = True) -> None:
        if self._outage_since is None:
            return
        lasted = time.monotonic() - self._outage_since
        self._outage_since = None
        # loadtest.rehearsal reads this line (its count of answers whose rows waited in memory): keep its words.
        log.warning("request log: the database is back after %.1f s; the %d requests answered meanwhile %s",
                    lasted, self.buffered - self._buffered_at_outage,
                    "are committed" if committed else "could not all be committed (see the error above)")

    def _abandon(self) -> None:
        """The writer stops: whatever is still queued (closed during an outage) is lost; say so."""
        with self._wake:
            batch = self._take_all()
        if batch:
            log.error("request log: closed while the database is unreachable: %d requests, %d shadow rows and %d "
                      "events kept in memory are lost", len(batch.requests), len(batch.shadow), len(batch.events))
        closed = StoreError("the request log is closed")
        by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = collections.defaultdict(list)
        for _, future in batch.requests:
            if future is not None:
                by_loop[future.get_loop()].append((future, None, closed))
        for _, future, loop in batch.jobs:
            by_loop[loop].append((future, None, closed))
        _hand_over(by_loop)

    def _take_all(self) -> _Batch:
        batch = _Batch(self._requests, self._shadow, self._events, self._jobs)
        self._requests, self._shadow, self._events, self._jobs = [], [], [], []
        return batch


def _hand_over(by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]]) -> None:
    for loop, settlements in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, settlements)


def _settle(settlements: list[Settlement]) -> None:
    for future, result, error in settlements:
        if future.done():  # a job's caller was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def tally_arms(groups: Iterable[Row]) -> dict[str, Tally]:
    """Each arm's counts from the counting query's rows: (arm, model, version, retried_from, requests, errors,
    answered, feedback, correct) per group. A failed attempt retried elsewhere counts against the arm that failed
    (as a request and an error), even an arm the log has no other row of."""
    tallies: dict[str, Tally] = collections.defaultdict(Tally)
    for arm, model, version, retried_from, requests, errors, answered, feedback, correct in groups:
        tally = tallies[arm]
        tally.requests += int(requests)
        tally.errors += int(errors)
        tally.answered += int(answered)
        tally.feedback += int(feedback)
        tally.correct += int(correct)
        tally.targets.add(str(Target(model, version)))
        if retried_from:
            tallies[retried_from].requests += int(requests)
            tallies[retried_from].errors += int(requests)
    return dict(tallies)


# The latency sample's key: the request id from its 13th character (after 12 hex digits of time, the random part).
# The cut compares the key's first SAMPLE_CUT_DIGITS hex digits (32 random bits).
SAMPLE_KEY_FROM = 13
SAMPLE_CUT_DIGITS = 8


def sample_cut(answered: int, sample: int) -> str | None:
    """The bound an arm's sample keys are read below (their first SAMPLE_CUT_DIGITS hex digits, compared
    bytewise), so that the database sorts about sample + 8√sample of the arm's `answered` rows for its sample,
    not all of them: random digits put each row below it with probability (sample + 8√sample)/answered. Fewer
    than `sample` rows fall below it only more than 7 standard deviations below that mean (for a sample of 1,000
    or more); the sample is then all of them. None: the arm has so few rows that all are read. (Ids that are not
    the router's, without hex digits there, sort below any bound: all of them are read.)"""
    wanted = sample + 8 * math.sqrt(sample)
    if sample <= 0 or wanted >= answered:
        return None
    largest = 16**SAMPLE_CUT_DIGITS - 1  # the bound keeps SAMPLE_CUT_DIGITS digits, or it would compare wrongly
    return f"{min(math.ceil(wanted / answered * 16**SAMPLE_CUT_DIGITS), largest):0{SAMPLE_CUT_DIGITS}x}"


def log_summary(tallies: dict[str, Tally], latencies: dict[str, dict[float, float | None]],
                shadow: Iterable[Row], events: Iterable[Row], percentiles: tuple[float, ...],
                samples: Iterable[tuple[str, float]] = ()) -> LogSummary:
    """The summary from a backend's aggregates: tallies, latency percentiles per arm that had samples, shadow
    (target, compared, agree, errors) per target in order, events (at, kind, detail) in time order, and the
    latency sample as (arm, latency) rows in each arm's sample order."""
    sampled: dict[str, list[float]] = collections.defaultdict(list)
    for arm, latency in samples:
        sampled[arm].append(float(latency))
    arms = {arm: ArmSummary(t.requests, t.errors, t.feedback, t.correct, tuple(sorted(t.targets)),
                            latencies.get(arm, dict.fromkeys(percentiles)), tuple(sampled.get(arm, ())))
            for arm, t in tallies.items()}
    return LogSummary(arms, tuple(ShadowSummary(target, int(compared), int(agree), int(errors))
                                  for target, compared, agree, errors in shadow),
                      tuple(EventRow(at, kind, detail) for at, kind, detail in events))


def series_points(groups: Iterable[Row], latencies: dict[tuple[str, int], dict[float, float | None]],
                  percentiles: tuple[float, ...]) -> list[SeriesPoint]:
    """A time series from a backend's counting rows, (arm, retried_from, bucket, requests, errors) per group, with
    `tally_arms`' rule (a failed attempt retried elsewhere counts against the arm that failed), and the latency
    percentiles per (arm, bucket); in order of arm, then bucket."""
    counts: dict[tuple[str, int], list[int]] = collections.defaultdict(lambda: [0, 0])
    for arm, retried_from, bucket, requests, errors in groups:
        counts[(arm, int(bucket))][0] += int(requests)
        counts[(arm, int(bucket))][1] += int(errors)
        if retried_from:
            counts[(retried_from, int(bucket))][0] += int(requests)
            counts[(retried_from, int(bucket))][1] += int(requests)
    return [SeriesPoint(arm, bucket, requests, errors, latencies.get((arm, bucket), dict.fromkeys(percentiles)))
            for (arm, bucket), (requests, errors) in sorted(counts.items())]


def override_values(experiment: str, weights: dict[str, float], reason: str, digest: str) -> Row:
    """An overrides row (experiment, weights as JSON, reason, config_digest, at), the same in every backend."""
    return experiment, json.dumps(weights), reason, digest, time.time()


def override_of(weights: str, reason: str, at: float) -> Override:
    return Override(json.loads(weights), reason, at)
