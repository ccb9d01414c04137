"""The request log's promise, tested by killing: a row whose commit was acknowledged is in the SQLite file after
a SIGKILL of the process that wrote it — first the store alone in a child process, then the real router under
load in front of the real TorchServe (every answer that carried an X-Request-Id has its row)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import uvloop

from router import process
from router.config import RequestLog, load_config
from router.store import RequestRow, Store
from serving import server
from tests.conftest import REPO, encode_image
from tests.test_router import EXPERIMENTS, Stack, launch

WRITERS = 8


def stored_ids(database: Path, ids: list[str]) -> set[str]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(r for (r,) in db.execute(
                f"SELECT request_id FROM requests WHERE request_id IN ({','.join('?' * len(chunk))})", chunk))
    return found


def write_until_killed(path: str) -> None:
    """The child: WRITERS tasks in one uvloop loop, each awaiting its row's commit, then acknowledging it on
    stdout (unbuffered) — as the router answers a request only once its row is committed."""

    async def main() -> None:
        store = Store(Path(path), RequestLog(retention_days=None, max_rows=None))

        async def writer(n: int) -> None:
            for i in range(1_000_000):  # bounded; the parent kills this process within seconds
                request_id = f"w{n}-{i}"
                await store.record(RequestRow(request_id, time.time(), "exp", "a", "model-a", None, "rest", 200,
                                              True, 1.0, 1, None))
                os.write(1, f"{request_id}\n".encode())

        await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(WRITERS))), timeout=60)

    uvloop.run(main())


def test_acknowledged_rows_survive_a_sigkill_of_the_writing_process(tmp_path: Path) -> None:
    database = tmp_path / "log.sqlite3"
    errors = tmp_path / "child.log"
    acknowledged: list[str] = []
    with errors.open("wb") as stderr, subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.test_log_durability import write_until_killed; "
                                   "write_until_killed(sys.argv[1])", str(database)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr) as child:

        def read() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                if line.endswith(b"\n"):  # a line cut by the kill was never acknowledged
                    acknowledged.append(line.decode().strip())

        reader = threading.Thread(target=read)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while not acknowledged:
                assert child.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, "the child acknowledged nothing"
                time.sleep(0.05)
            time.sleep(1.5)  # under load: every writer has a row in flight when the kill lands
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
            reader.join(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 500, f"only {len(acknowledged)} rows acknowledged: too few to test anything"
    missing = set(acknowledged) - stored_ids(database, acknowledged)
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged rows lost: {sorted(missing)[:5]}"


@pytest.fixture
def lone_router(torchserve: server.Instance, tmp_path: Path) -> Iterator[tuple[Stack, Path, int]]:
    """A router of this test's own (its own state directory and ports): the test kills it."""
    stack = launch(torchserve, tmp_path, {"fashion": EXPERIMENTS["fashion"]})
    config = load_config(stack.config_path)
    pid = process.running_pid(config)
    assert pid is not None
    try:
        yield stack, config.database, pid
    finally:
        process.stop(stack.config_path)  # nothing left to stop once the test has killed it


@pytest.mark.router
def test_every_answered_request_has_its_row_after_the_router_is_sigkilled(lone_router: tuple[Stack, Path, int],
                                                                         test_images: Any) -> None:
    stack, database, pid = lone_router
    body = encode_image(test_images[0][0])
    answered: list[list[str]] = [[] for _ in range(WRITERS)]
    broken = [0] * WRITERS
    stop = threading.Event()

    def client(n: int) -> None:
        with requests.Session() as session:
            for i in range(20_000):  # bounded in count; `stop` bounds it in time
                if stop.is_set():
                    return
                try:
                    response = session.post(f"{stack.url}/predictions/fashion", data=body, timeout=10,
                                            headers=stack.headers(**{"X-User-Id": f"u{n}-{i}"}))
                except requests.RequestException:  # the router is gone: this request got no answer
                    broken[n] += 1
                    if stop.is_set():
                        return
                    continue
                if "X-Request-Id" in response.headers:
                    answered[n].append(response.headers["X-Request-Id"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.0)
        os.kill(pid, signal.SIGKILL)  # mid-load: requests are in flight on every connection
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).wait(timeout=30)  # gone (and reaped: it is this process's child) before the file is read
    ids = [request_id for ids in answered for request_id in ids]
    assert len(ids) >= 100, f"only {len(ids)} answers in 3 s: too few to test anything"
    missing = set(ids) - stored_ids(database, ids)
    assert not missing, (f"{len(missing)} of {len(ids)} answered requests have no row after the SIGKILL "
                         f"({sum(broken)} requests got no answer): {sorted(missing)[:5]}")
