"""The request log's SQL for SQLite (the standard library's `sqlite3`): one router process, one file in its state
directory. `router.store` drives it (queue, writer thread, group commit); this module is what SQLite does.

Durability: WAL mode with `synchronous=NORMAL`: a commit is a write to the WAL file without fsync: it survives a
crash of the router process (SIGKILL, OOM kill), not of the machine (power loss, kernel panic). Checkpoints, which
do fsync, run on a thread of their own, so no commit waits for one. A local file has no outage to wait out: a
failing disk fails the batch (`is_outage` is always False).

Reads (overrides, report summaries) use connections of their own: WAL lets them run beside the writer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path

from router.stats import rank_positions
from router.store import (
    SAMPLE_CUT_DIGITS,
    SAMPLE_KEY_FROM,
    Feedback,
    Job,
    LogSummary,
    Outcome,
    Override,
    Row,
    SeriesPoint,
    StoreError,
    log_summary,
    override_of,
    override_values,
    sample_cut,
    series_points,
    tally_arms,
)

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
# The statements that add rows (router.store.Row's column order; sqlite3 stores a bool as 0 or 1).
# A batch retried after an unclear failure may hold rows already committed: the first copy stands (as in
# PostgreSQL's ON CONFLICT DO NOTHING).
# (Not INSERT OR IGNORE: that would also skip a row that breaks a NOT NULL constraint, silently.)
INSERT_REQUEST = "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (request_id) DO NOTHING"
INSERT_SHADOW = "INSERT INTO shadow VALUES (?,?,?,?,?,?,?)"
INSERT_EVENT = "INSERT INTO events VALUES (?,?,?,?)"
INSERT_FEEDBACK = "INSERT INTO feedback VALUES (?,?,?) ON CONFLICT (request_id) DO NOTHING"  # the first label stands

# The tables retention trims, each by its own `at`; feedback goes with its request.
RETAINED = ("requests", "shadow", "events")
# The WAL is copied back into the database by a thread of its own at most this often (when something was
# committed): a checkpoint fsyncs, and a commit that ran one itself would wait 10-30 ms for it.
CHECKPOINT_EVERY_S = 1.0


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, timeout=30)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    return connection


class SQLiteBackend:
    """The request log in the SQLite file at `path` (router.store.Backend)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # overrides(), from any thread, one at a time
        self._reader_lock = threading.Lock()
        self._committed = threading.Event()  # set after a commit; the checkpointer waits for it
        self._closed = threading.Event()
        self._checkpointer: threading.Thread | None = None

    # --- the writer ----------------------------------------------------------------------------------------------
    def open_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = connect(self.path)
        self._writer.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it instead
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._checkpoint, args=(connect(self.path),),
                                                  name="router-store-checkpoint", daemon=True)
            self._checkpointer.start()

    def _db(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreError("the request log is not open")
        return self._writer

    def write(self, requests: list[Row], shadow: list[Row], events: list[Row], jobs: list[Job]) -> list[Outcome]:
        db = self._db()
        results: list[Outcome] = []
        with db:  # one transaction for the batch: all of it is committed, or none of it
            db.execute("BEGIN")
            # Rows go first: feedback for a request answered before it was queued always finds the row.
            if requests:
                db.executemany(INSERT_REQUEST, requests)
            if shadow:
                db.executemany(INSERT_SHADOW, shadow)
            if events:
                db.executemany(INSERT_EVENT, events)
            results.extend(_run_job(db, job) for job in jobs)
            if not db.in_transaction:  # SQLite rolled it all back (a full disk, an I/O error)
                raise sqlite3.OperationalError("the transaction was rolled back")
        self._committed.set()
        return results

    def is_outage(self, error: BaseException) -> bool:
        return False

    def prune_step(self, cutoff: float | None, max_rows: int | None, limit: int) -> dict[str, int]:
        db = self._db()
        deleted: dict[str, int] = {}
        with db:
            for table in RETAINED:
                victims = _victims(db, table, cutoff, max_rows, limit)
                if not victims:
                    continue
                if table == "requests":  # a label without its request means nothing
                    db.executemany("DELETE FROM feedback WHERE request_id = "
                                   "(SELECT request_id FROM requests WHERE rowid = ?)", victims)
                db.executemany(f"DELETE FROM {table} WHERE rowid = ?", victims)
                deleted[table] = len(victims)
        self._committed.set()
        return deleted

    # --- jobs (in the writer's transaction) ----------------------------------------------------------------------
    def feedback(self, db: sqlite3.Connection, request_id: str, label: int) -> Feedback | None:
        row = db.execute("SELECT experiment, arm, label FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        inserted = db.execute(INSERT_FEEDBACK,
                              (request_id, label, time.time())).rowcount == 1
        stored = label if inserted else db.execute("SELECT label FROM feedback WHERE request_id = ?",
                                                   (request_id,)).fetchone()[0]
        return Feedback(row[0], row[1], row[2], stored, not inserted)

    def set_override(self, db: sqlite3.Connection, experiment: str, weights: dict[str, float], reason: str,
                     digest: str) -> None:
        db.execute("INSERT OR REPLACE INTO overrides VALUES (?,?,?,?,?)",
                   override_values(experiment, weights, reason, digest))

    def clear_overrides(self, db: sqlite3.Connection, experiment: str | None, except_digest: str | None) -> None:
        conditions = [(column, value) for column, value in (("experiment = ?", experiment),
                                                            ("config_digest <> ?", except_digest)) if value]
        where = " AND ".join(column for column, _ in conditions)
        db.execute("DELETE FROM overrides" + (f" WHERE {where}" if where else ""), [value for _, value in conditions])

    # --- reads ---------------------------------------------------------------------------------------------------
    def overrides(self, digest: str) -> dict[str, Override]:
        with self._reader_lock:
            if self._reader is None:
                self._reader = connect(self.path)
            rows = self._reader.execute("SELECT experiment, weights, reason, at FROM overrides "
                                        "WHERE config_digest = ?", (digest,)).fetchall()
        return {name: override_of(weights, reason, at) for name, weights, reason, at in rows}

    def summarize(self, experiment: str, since: float, percentiles: tuple[float, ...], sample: int = 0,
                  events: int | None = None) -> LogSummary:
        return summarize(self.path, experiment, since, percentiles, sample, events)

    def series(self, experiment: str, since: float, step_s: float, percentiles: tuple[float, ...]) -> list[SeriesPoint]:
        return series(self.path, experiment, since, step_s, percentiles)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed.set()
        self._committed.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

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


def _run_job(db: sqlite3.Connection, job: Job) -> Outcome:
    """Run one job inside the batch's transaction, in a savepoint: a job that fails is undone and reported to
    its caller alone. If undoing it fails too, the transaction itself is broken and the whole batch fails."""
    db.execute("SAVEPOINT job")
    try:
        outcome: Outcome = (job(db), None)
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


# --- the report's queries ----------------------------------------------------------------------------------------
# What one arm's answers were: a success that was no client error (a 4xx is the client's doing, not the arm's).
ANSWERED = "ok = 1 AND status < 400"
# Parameters in one statement: SQLite's limit is 32766 (3.32+); the order statistics' lists are cut below it.
MAX_PARAMETERS = 30_000


def summarize(path: Path, experiment: str, since: float, percentiles: tuple[float, ...],
              sample: int = 0, events: int | None = None) -> LogSummary:
    """Aggregate one experiment's log since `since` in SQL, with a connection of its own (any thread).

    Percentiles need only the order statistics around their ranks: the arms' counts come first, then one
    sorted pass (SQLite's sorter, which spills to disk rather than growing) returns just those rows."""
    with contextlib.closing(connect(path)) as db:
        db.execute("BEGIN")  # one read snapshot: the ranks computed from the counts are ranks in the same rows
        # One pass over the experiment's rows. Only answers that named a class can be right or wrong.
        tallies = tally_arms(db.execute(
            "SELECT r.arm, r.model, r.version, r.retried_from, count(*), total(r.ok = 0), "
            "total(r.ok AND r.status < 400), count(f.label) FILTER (WHERE r.label IS NOT NULL), "
            "total(r.label = f.label) "
            "FROM requests r LEFT JOIN feedback f ON f.request_id = r.request_id "
            "WHERE r.experiment = ? AND r.at >= ? GROUP BY r.arm, r.model, r.version, r.retried_from",
            (experiment, since)))
        by_arm = _percentiles(db, experiment, since, "0", {(arm, 0): t.answered for arm, t in tallies.items()},
                              percentiles)
        latencies = {arm: values for (arm, _), values in by_arm.items()}
        # The window sorts only the rows below each arm's cut (WHERE comes first): about the sample's size.
        cuts = [(arm, cut) for arm, t in tallies.items() if (cut := sample_cut(t.answered, sample)) is not None]
        key = f"substr(request_id, {SAMPLE_KEY_FROM})"
        below = "".join(f" WHEN ? THEN substr(request_id, {SAMPLE_KEY_FROM}, {SAMPLE_CUT_DIGITS}) < ?" for _ in cuts)
        below = f"CASE arm{below} ELSE 1 END" if cuts else "1"  # a CASE needs a WHEN
        samples = db.execute(
            f"SELECT arm, latency_ms FROM (SELECT arm, latency_ms, row_number() OVER (PARTITION BY arm ORDER BY {key}, "
            f"request_id) AS k FROM requests WHERE experiment = ? AND at >= ? AND {ANSWERED} AND {below}) "
            "WHERE k <= ? ORDER BY arm, k",
            (experiment, since, *(value for pair in cuts for value in pair), sample)).fetchall() if sample > 0 else []
        shadow = db.execute("SELECT target, total(outcome = 'ok'), total(coalesce(agree, 0) != 0), "
                            "total(outcome != 'ok') FROM shadow WHERE experiment = ? AND at >= ? "
                            "GROUP BY target ORDER BY target", (experiment, since)).fetchall()
        latest = db.execute("SELECT at, kind, detail FROM events WHERE experiment = ? AND at >= ? ORDER BY at DESC "
                            "LIMIT ?", (experiment, since, -1 if events is None else events)).fetchall()  # -1: all
    return log_summary(tallies, latencies, shadow, reversed(latest), percentiles, samples)


def series(path: Path, experiment: str, since: float, step_s: float,
           percentiles: tuple[float, ...]) -> list[SeriesPoint]:
    """`Backend.series` in SQL: counts per arm and interval, then the order statistics around each interval's
    ranks, as the report finds them per arm."""
    if not (math.isfinite(since) and math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"series: since and step_s must be finite, step_s > 0 (got {since!r}, {step_s!r})")
    # Numbers, not parameters, in the interval's expression: it appears in a window's PARTITION BY as well.
    bucket = f"CAST((at - {float(since)!r}) / {float(step_s)!r} AS INTEGER)"
    with contextlib.closing(connect(path)) as db:
        db.execute("BEGIN")
        groups = db.execute(f"SELECT arm, retried_from, {bucket} AS bucket, count(*), total(ok = 0), total({ANSWERED}) "
                            "FROM requests WHERE experiment = ? AND at >= ? GROUP BY arm, retried_from, bucket",
                            (experiment, since)).fetchall()
        answered: dict[tuple[str, int], int] = collections.Counter()
        for arm, _, index, _, _, good in groups:
            answered[(arm, int(index))] += int(good)
        latencies = _percentiles(db, experiment, since, bucket, answered, percentiles)
    return series_points(((arm, retried, index, requests, errors) for arm, retried, index, requests, errors, _
                          in groups), latencies, percentiles)


def _percentiles(db: sqlite3.Connection, experiment: str, since: float, bucket: str,
                 answered: dict[tuple[str, int], int],
                 percentiles: tuple[float, ...]) -> dict[tuple[str, int], dict[float, float | None]]:
    """The latency percentiles of each (arm, bucket)'s successful attempts, given how many there are, by linear
    interpolation between the two order statistics around each rank (NumPy's default, as
    `router.stats.percentile`). `bucket` is the SQL expression of a row's interval ("0": one per arm)."""
    ranks = {key: {q: rank_positions(n, q) for q in percentiles} for key, n in answered.items() if n}
    wanted = sorted({(arm, index, position) for (arm, index), by_q in ranks.items() for low, high, _ in by_q.values()
                     for position in (low, high)})
    values: dict[tuple[str, int, int], float] = {}
    chunk = (MAX_PARAMETERS - 2) // 3
    for start in range(0, len(wanted), chunk):  # one sorted pass per chunk: one for any report
        part = wanted[start:start + chunk]
        rows = ", ".join("(?, ?, ?)" for _ in part)
        for arm, index, position, latency in db.execute(
                f"WITH wanted (arm, bucket, position) AS (VALUES {rows}) "
                "SELECT ranked.arm, ranked.bucket, ranked.position, ranked.latency_ms FROM (SELECT arm, "
                f"{bucket} AS bucket, latency_ms, row_number() OVER (PARTITION BY arm, {bucket} ORDER BY latency_ms) "
                f"- 1 AS position FROM requests WHERE experiment = ? AND at >= ? AND {ANSWERED}) AS ranked "
                "JOIN wanted ON wanted.arm = ranked.arm AND wanted.bucket = ranked.bucket "
                "AND wanted.position = ranked.position",
                [*(value for triple in part for value in triple), experiment, since]):
            values[(arm, index, position)] = latency
    result: dict[tuple[str, int], dict[float, float | None]] = {}
    for (arm, index), by_q in ranks.items():
        result[(arm, index)] = {}
        for q, (low, high, fraction) in by_q.items():
            lower, upper = values[(arm, index, low)], values[(arm, index, high)]
            result[(arm, index)][q] = lower + (upper - lower) * fraction
    return result
