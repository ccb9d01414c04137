"""What the request log's durability costs: how long `await Store.record(row)` waits for the group commit that
holds the row, with N concurrent writers in one uvloop event loop (as the router's requests are), and how long
one retention step and one report take on a log of a given size.

    .venv/bin/python -m loadtest.request_log [--writers 8] [--rate 200] [--seconds 5] [--report-rows 1000000]
                                             [--database-url postgresql://...]

Closed loop, each writer builds a row, awaits its commit, records the wait; then a steady run at `--rate` rows/s.
The figures are in-process (no HTTP): the latency a request gains from the promise "its row is committed before
its answer is sent". With `--database-url`, the commit waits are measured against that PostgreSQL database (the
shared store of several replicas) instead of a SQLite file; the report and retention figures stay SQLite's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

from router import store as store_module
from router.config import POSTGRESQL, Arm, Experiment, RequestLog, RouterConfig, StoreSettings, Target
from router.report import build_report
from router.stats import percentile
from router.store import RequestRow, Store, open_store
from router.store_sqlite import INSERT_FEEDBACK, INSERT_REQUEST, connect


def row(experiment: str = "bench", at: float | None = None, rng: random.Random | None = None) -> RequestRow:
    rng = rng or random.Random()
    arm = rng.choice(("a", "b"))
    return RequestRow(uuid.uuid4().hex, time.time() if at is None else at, experiment, arm, f"model-{arm}", "1.0",
                      "rest", 200, True, rng.uniform(2, 40), rng.randrange(10), None)


async def commit_waits(config: RouterConfig, writers: int, seconds: float, rate: float = 0.0) -> dict[str, float]:
    """Closed loop: `writers` tasks each awaiting one row after another. With `rate` > 0, open loop instead:
    one row every 1/rate s, each awaited by a task of its own (a steady request rate, as a load test offers)."""
    store = open_store(config)
    waits: list[float] = []
    deadline = time.monotonic() + seconds

    async def one(rng: random.Random) -> None:
        started = time.perf_counter()
        await store.record(row(rng=rng))
        waits.append((time.perf_counter() - started) * 1000)

    async def writer() -> None:
        rng = random.Random()
        for _ in range(10_000_000):  # bounded in count and in time
            if time.monotonic() > deadline:
                return
            await one(rng)

    async def steady() -> None:
        rng = random.Random()
        tasks = set()
        start = time.monotonic()
        for i in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            task = asyncio.create_task(one(rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    try:
        started = time.perf_counter()
        await (steady() if rate > 0 else asyncio.gather(*(writer() for _ in range(writers))))
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    return {"rows": len(waits), "rows_per_s": len(waits) / elapsed, "p50_ms": percentile(waits, 50) or 0.0,
            "p99_ms": percentile(waits, 99) or 0.0, "max_ms": max(waits), "mean_ms": statistics.fmean(waits)}


def fill(path: Path, rows: int) -> None:
    """`rows` requests (two arms, one in three with feedback) written directly, with the router's schema."""
    rng = random.Random(0)
    first = time.time() - 86400  # a day of traffic, written in time order as the router writes it
    with contextlib.closing(connect(path)) as db:
        for start in range(0, rows, 50_000):
            batch = [row(at=first + 86400 * i / rows, rng=rng) for i in range(start, min(start + 50_000, rows))]
            with db:
                db.executemany(INSERT_REQUEST,
                               [(r.request_id, r.at, r.experiment, r.arm, r.model, r.version, r.protocol, r.status,
                                 r.ok, r.latency_ms, r.label, r.retried_from) for r in batch])
                db.executemany(INSERT_FEEDBACK,
                               [(r.request_id, rng.randrange(10), r.at) for r in batch[::3]])


def report_and_retention(state_dir: Path, rows: int) -> dict[str, float]:
    config = RouterConfig(experiments={}, state_dir=state_dir)  # the SQLite store, at config.database
    path = config.database
    fill(path, rows)
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "-*"))
    experiment = Experiment("bench", (Arm("a", Target("model-a", "1.0"), 1), Arm("b", Target("model-b", "1.0"), 1)),
                            "a", "bench")
    started = time.perf_counter()
    build_report(config, experiment)
    report_s = time.perf_counter() - started
    store = Store(path, RequestLog(retention_days=None, max_rows=rows // 2), prune_every_s=3600)
    try:
        # The store's first retention step runs at start; time the steps it takes to delete half the log.
        started = time.perf_counter()
        for _ in range(100_000):
            if store.deleted["requests"] >= rows - rows // 2:
                break
            time.sleep(0.01)
        prune_s = time.perf_counter() - started
    finally:
        store.close()
    steps = (rows - rows // 2) / store_module.PRUNE_STEP_ROWS
    return {"rows": rows, "bytes_per_row": size / rows, "report_s": report_s,
            "retention_step_ms": prune_s / steps * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0, help="rows per second of the steady run")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--report-rows", type=int, default=1_000_000, help="0: skip the report and retention figures")
    parser.add_argument("--database-url", default=None, help="measure commit waits on this PostgreSQL database")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for label, writers, rate in ((f"{args.writers} concurrent writers", args.writers, 0.0),
                                     (f"a steady {args.rate:g} rows/s", 0, args.rate)):
            store = StoreSettings() if args.database_url is None else StoreSettings(POSTGRESQL, args.database_url)
            config = RouterConfig(experiments={}, state_dir=Path(directory) / f"commit-{writers}", store=store)
            waits = uvloop.run(commit_waits(config, writers, args.seconds, rate))
            print(f"commit wait, {label} for {args.seconds:g} s: {waits['rows']:.0f} rows "
                  f"({waits['rows_per_s']:.0f}/s), p50 {waits['p50_ms']:.3f} ms, p99 {waits['p99_ms']:.3f} ms, "
                  f"max {waits['max_ms']:.2f} ms, mean {waits['mean_ms']:.3f} ms")
        if args.report_rows:
            figures = report_and_retention(Path(directory) / "report", args.report_rows)
            print(f"log of {figures['rows']} requests (1 in 3 with feedback): {figures['bytes_per_row']:.0f} bytes "
                  f"per request on disk; report {figures['report_s']:.2f} s; retention "
                  f"{figures['retention_step_ms']:.1f} ms per step of {store_module.PRUNE_STEP_ROWS} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
