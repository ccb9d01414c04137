"""The request log's SQL for PostgreSQL (psycopg 3): one server that several router replicas share, so feedback
may reach a replica other than the one that logged the request, and an override made through one is followed by
all (each polls `overrides()`). `router.store` drives it (queue, writer thread, group commit, outages); this
module is what PostgreSQL does.

- Durability: a commit is acknowledged once the server has flushed it (`synchronous_commit` on, its default; a
  server configured otherwise is logged at connect): it survives the loss of any router.
- Several replicas start at once: the schema is created under a transaction-scoped advisory lock, so they never
  race on CREATE ... IF NOT EXISTS.
- A request row sent twice (a batch retried after its connection broke) is inserted once: ON CONFLICT
  (request_id) DO NOTHING. Tables have a bigserial `id` where SQLite has its rowid.
- Retention runs in one replica at a time (`pg_try_advisory_xact_lock`: the others skip the step), with SQLite's
  rules: rows older than `retention_days`, and all rows but the newest `max_rows` by `id`. Ids come from one
  sequence, so they follow insertion order across replicas; a sequence leaves gaps (rolled-back batches,
  retried rows), and a gap only makes `max_rows` keep a few rows fewer. Feedback goes with its request through
  its foreign key (ON DELETE CASCADE). Retention skips rows a feedback job has locked (SKIP LOCKED; they go in a
  later step), and a feedback job waits for a retention step holding its row, then finds it gone: neither
  ever waits for the other in a cycle.
- A dead server is noticed within seconds: connect_timeout, TCP keepalives and `tcp_user_timeout` (a URL's own
  parameters take precedence).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict, make_conninfo

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
    StoreUnavailable,
    log_summary,
    override_of,
    override_values,
    sample_cut,
    series_points,
    tally_arms,
)

log = logging.getLogger(__name__)

# libpq connection parameters (https://www.postgresql.org/docs/15/libpq-connect.html), unless the URL sets them:
# a server that does not answer is given up on within about 3-4 s, connecting or connected.
CONNECT_DEFAULTS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "2",
    "keepalives_interval": "1",
    "keepalives_count": "2",
    "tcp_user_timeout": "4000",  # ms: unacknowledged data on a dead connection
    "application_name": "router",
}
# Advisory lock keys (any bigint: these spell "router" + a number), one for the schema, one for retention.
SCHEMA_LOCK = 0x726F75746572_01
RETENTION_LOCK = 0x726F75746572_02
# SQLSTATEs that mean the server cannot be talked to right now, rather than that a statement was wrong:
# connection exceptions (08...), a shutdown, crash or start-up in progress (57P01-57P03), too many connections.
OUTAGE_STATES = ("08", "57P", "53300")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id bigserial PRIMARY KEY, request_id text NOT NULL UNIQUE, at double precision NOT NULL,
    experiment text NOT NULL, arm text NOT NULL, model text NOT NULL, version text, protocol text NOT NULL,
    status integer NOT NULL, ok boolean NOT NULL, latency_ms double precision NOT NULL, label integer,
    retried_from text
);
CREATE INDEX IF NOT EXISTS requests_by_experiment ON requests (experiment, at);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (at);
CREATE TABLE IF NOT EXISTS feedback (
    request_id text PRIMARY KEY REFERENCES requests (request_id) ON DELETE CASCADE, label integer NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS shadow (
    id bigserial PRIMARY KEY, request_id text NOT NULL, at double precision NOT NULL, experiment text NOT NULL,
    target text NOT NULL, outcome text NOT NULL, agree boolean, latency_ms double precision
);
CREATE INDEX IF NOT EXISTS shadow_by_experiment ON shadow (experiment, at);
CREATE INDEX IF NOT EXISTS shadow_by_time ON shadow (at);
CREATE TABLE IF NOT EXISTS overrides (
    experiment text PRIMARY KEY, weights text NOT NULL, reason text NOT NULL, config_digest text NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id bigserial PRIMARY KEY, at double precision NOT NULL, experiment text NOT NULL, kind text NOT NULL, detail text
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
"""
# The statements that add rows (router.store.Row's column order).
INSERT_REQUEST = ("INSERT INTO requests (request_id, at, experiment, arm, model, version, protocol, status, ok, "
                  "latency_ms, label, retried_from) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                  "ON CONFLICT (request_id) DO NOTHING")
INSERT_SHADOW = ("INSERT INTO shadow (request_id, at, experiment, target, outcome, agree, latency_ms) "
                 "VALUES (%s, %s, %s, %s, %s, %s, %s)")
INSERT_EVENT = "INSERT INTO events (at, experiment, kind, detail) VALUES (%s, %s, %s, %s)"
INSERT_FEEDBACK = "INSERT INTO feedback (request_id, label, at) VALUES (%s, %s, %s) ON CONFLICT (request_id) DO NOTHING"

# The tables retention trims, each by its own `at` and `id`; feedback goes with its request (the foreign key).
RETAINED = ("requests", "shadow", "events")

Connection = psycopg.Connection[tuple[Any, ...]]


def connect(url: str) -> Connection:
    """A connection in autocommit mode (transactions are explicit: `Connection.transaction()`), with
    CONNECT_DEFAULTS under whatever the URL sets."""
    return psycopg.connect(make_conninfo("", **{**CONNECT_DEFAULTS, **conninfo_to_dict(url)}), autocommit=True)


def create_schema(db: Connection) -> None:
    """Create what is missing, one replica at a time. A database that has it all (the last object the schema
    creates exists) is left alone: no DDL, no lock on a table the other replicas are writing to."""
    created = db.execute("SELECT to_regclass('events_by_time') IS NOT NULL").fetchone()
    if created and created[0]:
        return
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        db.execute(SCHEMA)


class PostgresBackend:
    """The request log in the PostgreSQL database at `url` (router.store.Backend)."""

    path = None  # no file: a server

    def __init__(self, url: str) -> None:
        self.url = url
        self._writer: Connection | None = None
        self._reader: Connection | None = None  # overrides(), from any thread, one at a time
        self._reader_lock = threading.Lock()
        self._warned_synchronous_commit = False

    # --- the writer ----------------------------------------------------------------------------------------------
    def open_writer(self) -> None:
        self._close_writer()
        db = connect(self.url)
        try:
            create_schema(db)
            (synchronous_commit,) = db.execute("SHOW synchronous_commit").fetchone() or ("on",)
        except BaseException:
            db.close()
            raise
        if synchronous_commit == "off" and not self._warned_synchronous_commit:
            self._warned_synchronous_commit = True
            log.warning("request log: the server runs with synchronous_commit off: an acknowledged commit can be "
                        "lost if the server crashes")
        self._writer = db

    def _db(self) -> Connection:
        if self._writer is None or self._writer.closed:
            raise psycopg.OperationalError("the request log has no connection to its database")
        return self._writer

    def write(self, requests: list[Row], shadow: list[Row], events: list[Row], jobs: list[Job]) -> list[Outcome]:
        db = self._db()
        with db.transaction():  # one transaction for the batch: all of it is committed, or none of it
            with db.cursor() as cursor:
                # Rows go first: feedback for a request answered before it was queued always finds the row.
                if requests:
                    cursor.executemany(INSERT_REQUEST, requests)
                if shadow:
                    cursor.executemany(INSERT_SHADOW, shadow)
                if events:
                    cursor.executemany(INSERT_EVENT, events)
            return [self._run_job(db, job) for job in jobs]

    def _run_job(self, db: Connection, job: Job) -> Outcome:
        """One job in a savepoint: a job that fails is undone and reported to its caller alone; if the connection
        itself broke, the whole batch fails."""
        try:
            with db.transaction():
                return job(db), None
        except Exception as error:
            if db.broken or db.closed or self.is_outage(error):
                raise
            return None, (StoreError(f"the request log refused the write: {error}")
                          if isinstance(error, psycopg.Error) else error)

    def is_outage(self, error: BaseException) -> bool:
        """The database is unreachable (worth waiting for), as opposed to refusing what we asked (a privilege,
        a constraint: retrying would not help). Decided by the error's SQLSTATE class, or by the connection
        having broken under the statement."""
        if isinstance(error, psycopg.InterfaceError):  # the connection is closed
            return True
        if isinstance(error, psycopg.OperationalError) and (error.sqlstate is None
                                                            or error.sqlstate.startswith(OUTAGE_STATES)):
            return True
        writer = self._writer
        return isinstance(error, psycopg.Error) and writer is not None and (writer.closed or writer.broken)

    def prune_step(self, cutoff: float | None, max_rows: int | None, limit: int) -> dict[str, int]:
        db = self._db()
        deleted: dict[str, int] = {}
        with db.transaction():
            locked = db.execute("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK,)).fetchone()
            if not (locked and locked[0]):  # another replica is pruning: its step is this one's too
                return deleted
            for table in RETAINED:
                victims: set[int] = set()
                if cutoff is not None:
                    victims.update(id_ for (id_,) in db.execute(
                        f"SELECT id FROM {table} WHERE at < %s ORDER BY at LIMIT %s FOR UPDATE SKIP LOCKED",
                        (cutoff, limit)))
                if max_rows is not None:
                    newest = db.execute(f"SELECT max(id) FROM {table}").fetchone()
                    if newest and newest[0] is not None and newest[0] > max_rows:
                        victims.update(id_ for (id_,) in db.execute(
                            f"SELECT id FROM {table} WHERE id <= %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                            (newest[0] - max_rows, limit)))
                if victims:  # a request's feedback goes with it (ON DELETE CASCADE)
                    db.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (sorted(victims),))
                    deleted[table] = len(victims)
        return deleted

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- jobs (in the writer's transaction) ----------------------------------------------------------------------
    def feedback(self, db: Connection, request_id: str, label: int) -> Feedback | None:
        # FOR KEY SHARE: no replica's retention deletes the row under this job (it waits, or skips the row).
        row = db.execute("SELECT experiment, arm, label FROM requests WHERE request_id = %s FOR KEY SHARE",
                         (request_id,)).fetchone()
        if row is None:
            return None
        # Two replicas labelling one request at once: the second waits for the first's commit, then inserts
        # nothing, and reads the label that stands.
        if db.execute(INSERT_FEEDBACK, (request_id, label, time.time())).rowcount == 1:
            return Feedback(row[0], row[1], row[2], label, False)
        (stored,) = db.execute("SELECT label FROM feedback WHERE request_id = %s", (request_id,)).fetchone() or (None,)
        if stored is None:  # cannot be: the request is locked, and its feedback goes only with it
            raise StoreError(f"the feedback of request {request_id} vanished")
        return Feedback(row[0], row[1], row[2], stored, True)

    def set_override(self, db: Connection, experiment: str, weights: dict[str, float], reason: str,
                     digest: str) -> None:
        db.execute("INSERT INTO overrides (experiment, weights, reason, config_digest, at) "
                   "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (experiment) DO UPDATE SET weights = excluded.weights, "
                   "reason = excluded.reason, config_digest = excluded.config_digest, at = excluded.at",
                   override_values(experiment, weights, reason, digest))

    def clear_overrides(self, db: Connection, experiment: str | None, except_digest: str | None) -> None:
        conditions = [(column, value) for column, value in (("experiment = %s", experiment),
                                                            ("config_digest <> %s", except_digest)) if value]
        where = " AND ".join(column for column, _ in conditions)
        db.execute("DELETE FROM overrides" + (f" WHERE {where}" if where else ""), [value for _, value in conditions])

    # --- reads ---------------------------------------------------------------------------------------------------
    def overrides(self, digest: str) -> dict[str, Override]:
        """On one long-lived read connection (the router polls this twice a second: a new connection each time
        would cost the server a process each time), reopened after a failure."""
        with self._reader_lock:
            for attempt in range(2):  # a connection left over from before a server restart fails once
                fresh = self._reader is None or self._reader.closed
                try:
                    if self._reader is None or self._reader.closed:
                        self._reader = connect(self.url)
                    rows = self._reader.execute("SELECT experiment, weights, reason, at FROM overrides "
                                                "WHERE config_digest = %s", (digest,)).fetchall()
                    break
                except psycopg.Error as error:
                    self._close_reader()
                    if fresh or attempt:
                        raise StoreUnavailable(f"the request log's database is unreachable: {error}") from error
        return {name: override_of(weights, reason, at) for name, weights, reason, at in rows}

    def summarize(self, experiment: str, since: float, percentiles: tuple[float, ...], sample: int = 0,
                  events: int | None = None) -> LogSummary:
        try:
            return summarize(self.url, experiment, since, percentiles, sample, events)
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"the request log's database is unreachable: {error}") from error

    def series(self, experiment: str, since: float, step_s: float, percentiles: tuple[float, ...]) -> list[SeriesPoint]:
        try:
            return series(self.url, experiment, since, step_s, percentiles)
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"the request log's database is unreachable: {error}") from error

    def close(self) -> None:
        self._close_writer()
        with self._reader_lock:
            self._close_reader()

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# --- the report's queries ----------------------------------------------------------------------------------------
def summarize(url: str, experiment: str, since: float, percentiles: tuple[float, ...], sample: int = 0,
              events: int | None = None) -> LogSummary:
    """Aggregate one experiment's log since `since` in SQL, on a connection of its own (any thread), in one
    read-only snapshot. Percentiles by `percentile_cont`: linear interpolation between the order statistics
    around each rank, NumPy's default (as `router.stats.percentile` and the SQLite store)."""
    with connect(url) as db:
        create_schema(db)  # a report before any router wrote: empty, not an error
        db.isolation_level = IsolationLevel.REPEATABLE_READ
        db.read_only = True
        with db.transaction():
            # One pass over the experiment's rows. Only answers that named a class can be right or wrong.
            tallies = tally_arms(db.execute(
                "SELECT r.arm, r.model, r.version, r.retried_from, count(*), count(*) FILTER (WHERE NOT r.ok), "
                "count(*) FILTER (WHERE r.ok AND r.status < 400), count(f.label) FILTER (WHERE r.label IS NOT NULL), "
                "count(*) FILTER (WHERE r.label = f.label) "
                "FROM requests r LEFT JOIN feedback f ON f.request_id = r.request_id "
                "WHERE r.experiment = %s AND r.at >= %s GROUP BY r.arm, r.model, r.version, r.retried_from",
                (experiment, since)))
            latencies: dict[str, dict[float, float | None]] = {
                arm: dict(zip(percentiles, values, strict=True)) for arm, values in db.execute(
                    "SELECT arm, percentile_cont(%s::double precision[]) WITHIN GROUP (ORDER BY latency_ms) "
                    "FROM requests WHERE experiment = %s AND at >= %s AND ok AND status < 400 GROUP BY arm",
                    ([q / 100.0 for q in percentiles], experiment, since))}
            # The sample's order is bytewise ("C"), as SQLite's and Python's: every store picks the same rows. The
            # window sorts only the rows below each arm's cut (WHERE comes first): about the sample's size.
            cuts = [(arm, cut) for arm, t in tallies.items() if (cut := sample_cut(t.answered, sample)) is not None]
            key = f'substr(request_id, {SAMPLE_KEY_FROM}) COLLATE "C"'
            below = "".join(f" WHEN %s THEN substr(request_id, {SAMPLE_KEY_FROM}, {SAMPLE_CUT_DIGITS}) "
                            'COLLATE "C" < %s' for _ in cuts)
            below = f"CASE arm{below} ELSE true END" if cuts else "true"  # a CASE needs a WHEN
            samples = db.execute(
                f"SELECT arm, latency_ms FROM (SELECT arm, latency_ms, row_number() OVER (PARTITION BY arm ORDER BY "
                f'{key}, request_id COLLATE "C") AS k FROM requests WHERE experiment = %s AND at >= %s AND ok '
                f"AND status < 400 AND {below}) AS sampled WHERE k <= %s ORDER BY arm, k",
                (experiment, since, *(value for pair in cuts for value in pair), sample),
            ).fetchall() if sample > 0 else []
            shadow = db.execute(
                "SELECT target, count(*) FILTER (WHERE outcome = 'ok'), count(*) FILTER (WHERE agree), "
                "count(*) FILTER (WHERE outcome <> 'ok') FROM shadow WHERE experiment = %s AND at >= %s "
                'GROUP BY target ORDER BY target COLLATE "C"', (experiment, since)).fetchall()
            latest = db.execute("SELECT at, kind, detail FROM events WHERE experiment = %s AND at >= %s "
                                "ORDER BY at DESC LIMIT %s", (experiment, since, events)).fetchall()  # NULL: all
    return log_summary(tallies, latencies, shadow, reversed(latest), percentiles, samples)


def series(url: str, experiment: str, since: float, step_s: float,
           percentiles: tuple[float, ...]) -> list[SeriesPoint]:
    """`Backend.series` in SQL, one read-only snapshot: counts per arm and interval, percentiles by
    `percentile_cont` per arm and interval. The interval of a row is computed as SQLite computes it (the
    quotient truncated), so both stores put a row on a boundary in the same one."""
    bucket = "trunc((at - %(since)s) / %(step)s)::bigint"
    where = "experiment = %(experiment)s AND at >= %(since)s"
    params = {"experiment": experiment, "since": since, "step": step_s, "qs": [q / 100.0 for q in percentiles]}
    with connect(url) as db:
        create_schema(db)
        db.isolation_level = IsolationLevel.REPEATABLE_READ
        db.read_only = True
        with db.transaction():
            groups = db.execute(f"SELECT arm, retried_from, {bucket} AS bucket, count(*), count(*) FILTER "
                                f"(WHERE NOT ok) FROM requests WHERE {where} GROUP BY arm, retried_from, bucket",
                                params).fetchall()
            latencies: dict[tuple[str, int], dict[float, float | None]] = {
                (arm, int(index)): dict(zip(percentiles, values, strict=True)) for arm, index, values in db.execute(
                    f"SELECT arm, {bucket} AS bucket, percentile_cont(%(qs)s::double precision[]) WITHIN GROUP "
                    f"(ORDER BY latency_ms) FROM requests WHERE {where} AND ok AND status < 400 GROUP BY arm, bucket",
                    params)}
    return series_points(groups, latencies, percentiles)
