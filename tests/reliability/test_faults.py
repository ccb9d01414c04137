"""Faults under bounded load, through the router: workers killed with SIGKILL, TorchServe stopped and started
again. No request may be lost or answered wrongly: each gets the right label, or an explicit 503/504 with
Retry-After — never a hang (every call has a timeout) and never a wrong answer. Recovery is timed."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from loadtest.workload import children
from serving import server
from tests.conftest import Chain, encode_image, in_process_labels
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router

EXPERIMENT = "failover"  # arms pruned and int8 (see tests/test_router.py)


class Load:
    """`threads` clients sending `count` requests each through the router, recording every outcome."""

    def __init__(self, live: Stack, bodies: list[tuple[bytes, dict[str, int]]], threads: int, count: int) -> None:
        self.live, self.bodies, self.threads, self.count = live, bodies, threads, count
        self.outcomes: list[tuple[float, str]] = []  # (time, "ok" | "wrong" | "503" | ...)
        self.stop = threading.Event()  # ends the load early; `count` bounds it in any case
        self._lock = threading.Lock()

    def client(self, index: int) -> None:
        for n in range(self.count):
            if self.stop.is_set():
                return
            body, expected = self.bodies[(index + n) % len(self.bodies)]
            try:
                response = self.live.predict(EXPERIMENT, body, **{"X-User-Id": f"fault-{index}-{n}"})
                if response.status_code == 200:
                    arm = response.headers["X-Arm"]
                    outcome = "ok" if response.json()["label"] == expected[arm] else "wrong"
                elif response.status_code in (503, 504) and "Retry-After" in response.headers:
                    outcome = f"{response.status_code} (explicit)"
                    time.sleep(0.1)  # a client honouring Retry-After would wait; this one only slows down
                else:
                    outcome = f"HTTP {response.status_code}"
            except requests.RequestException as error:
                outcome = f"client error {type(error).__name__}"
            with self._lock:
                self.outcomes.append((time.monotonic(), outcome))

    def run(self) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(self.threads)
        for index in range(self.threads):
            pool.submit(self.client, index)
        return pool


@pytest.fixture(scope="module")
def bodies(test_images: Any, chain: Chain) -> list[tuple[bytes, dict[str, int]]]:
    images, _ = test_images
    expected = {arm: in_process_labels(chain, arm, images[:8]) for arm in ("pruned", "int8")}
    return [(encode_image(images[i]), {arm: expected[arm][i] for arm in expected}) for i in range(8)]


def report(section: str) -> None:
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as handle:
            handle.write("\n" + section + "\n")


def counts(outcomes: list[tuple[float, str]]) -> dict[str, int]:
    tally: dict[str, int] = {}
    for _, outcome in outcomes:
        tally[outcome] = tally.get(outcome, 0) + 1
    return tally


def test_workers_killed_under_load_lose_no_request(stack: Stack, bodies: Any) -> None:  # noqa: F811
    load = Load(stack, bodies, threads=4, count=60)
    pool = load.run()
    kills = []
    for _ in range(3):  # SIGKILL a serving worker every 1.5 s while the load runs
        time.sleep(1.5)
        described = requests.get(f"{stack.torchserve.management_url}/models/fashion-int8",
                                 headers=stack.torchserve.headers("management"), timeout=10).json()
        pids = [worker["pid"] for worker in described[0]["workers"] if worker.get("pid")]
        if pids and pids[0] not in kills:
            try:
                os.kill(pids[0], signal.SIGKILL)
                kills.append(pids[0])
            except ProcessLookupError:  # TorchServe still lists a worker that is already gone
                pass
    pool.shutdown(wait=True)
    tally = counts(load.outcomes)
    report(f"## Workers killed under load\n\n{len(kills)} SIGKILLs of a serving worker, 1.5 s apart, during "
           f"{len(load.outcomes)} requests through the router (4 clients): outcomes {tally}.")
    assert len(load.outcomes) == 4 * 60 and kills
    assert set(tally) <= {"ok", "503 (explicit)", "504 (explicit)"}, tally  # nothing wrong, nothing unexplained
    assert tally.get("ok", 0) >= 0.9 * len(load.outcomes)


def test_torchserve_restart_under_load_recovers_with_its_state(stack: Stack, bodies: Any) -> None:  # noqa: F811
    instance = stack.torchserve
    before_models = server.model_status(instance)
    before_router = stack.describe()
    load = Load(stack, bodies, threads=2, count=2000)
    pool = load.run()
    time.sleep(1.0)
    stopped_at = time.monotonic()
    server.stop(instance)
    server.start(instance, timeout=240)
    started_at = time.monotonic()
    time.sleep(3.0)  # the load goes on after the restart
    load.stop.set()
    pool.shutdown(wait=True)
    tally = counts(load.outcomes)
    recovered = min((t for t, outcome in load.outcomes if outcome == "ok" and t > started_at), default=None)
    assert recovered is not None, tally
    report(f"## TorchServe stopped and started under load\n\n{len(load.outcomes)} requests through the router "
           f"(2 clients): outcomes {tally}; TorchServe down for {started_at - stopped_at:.1f} s (stop + start + "
           f"workers ready); first correct answer {recovered - started_at:.2f} s after it was ready. Versions, "
           "defaults and the router's experiments were the same afterwards.")
    assert set(tally) <= {"ok", "503 (explicit)", "504 (explicit)"}, tally
    assert server.model_status(instance).keys() == before_models.keys()
    assert {key: value["default"] for key, value in server.model_status(instance).items()} == \
        {key: value["default"] for key, value in before_models.items()}
    assert stack.describe() == before_router
    assert Path(f"/proc/{server.running_pid(instance)}").exists() and children(server.running_pid(instance) or 0)
