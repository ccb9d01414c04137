"""Faults under bounded load, through the router: workers killed with SIGKILL, one arm's target taken away (its
workers scaled to zero) and the arm removed from the experiment file, TorchServe stopped and started again.

What each fault may cost, decided per fault and asserted exactly:
- a serving worker killed, an arm's target without workers, an arm removed: the experiment has another arm, so
  every request gets the right label — the router retries a failed attempt once on another arm. Each test also
  shows the fault bit (requests retried away from the faulty arm, or moved off it), or it would prove nothing.
- TorchServe stopped: no arm can answer, so requests get an explicit 503/504 with Retry-After — only while it is
  down (and for the circuit's reset time after it is back); every request before and after gets the right label.
Never a hang (every call has a timeout), never a wrong answer. Recovery is timed."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

from loadtest.workload import children
from serving import server
from tests.conftest import Chain, encode_image, in_process_labels
from tests.reliability.conftest import ChaosReport
from tests.test_router import Stack, scale, stack, until  # noqa: F401 (the real router before the test TorchServe)

pytestmark = pytest.mark.router

EXPERIMENT = "failover"  # arms pruned and int8 (see tests/test_router.py)


class Load:
    """`threads` clients sending `count` requests each through the router, recording every outcome."""

    def __init__(self, live: Stack, bodies: list[tuple[bytes, dict[str, int]]], threads: int, count: int) -> None:
        self.live, self.bodies, self.threads, self.count = live, bodies, threads, count
        self.outcomes: list[tuple[float, str, str]] = []  # (time, "ok" | "wrong" | "503 (explicit)" | ..., arm)
        self.retried_from: list[str] = []  # X-Retried-From of the answers a retry saved
        self.answered: list[tuple[float, float, str]] = []  # (sent, answered, arm) of every correct answer
        self.stop = threading.Event()  # ends the load early; `count` bounds it in any case
        self._lock = threading.Lock()

    def client(self, index: int) -> None:
        for n in range(self.count):
            if self.stop.is_set():
                return
            body, expected = self.bodies[(index + n) % len(self.bodies)]
            arm = ""
            sent = time.monotonic()
            try:
                response = self.live.predict(EXPERIMENT, body, **{"X-User-Id": f"fault-{index}-{n}"})
                if response.status_code == 200:
                    arm = response.headers["X-Arm"]
                    outcome = "ok" if response.json()["label"] == expected[arm] else "wrong"
                    if "X-Retried-From" in response.headers:
                        with self._lock:
                            self.retried_from.append(response.headers["X-Retried-From"])
                elif response.status_code in (503, 504) and "Retry-After" in response.headers:
                    outcome = f"{response.status_code} (explicit)"
                    time.sleep(0.1)  # a client honouring Retry-After would wait; this one only slows down
                else:
                    outcome = f"HTTP {response.status_code}"
            except requests.RequestException as error:
                outcome = f"client error {type(error).__name__}"
            with self._lock:
                self.outcomes.append((time.monotonic(), outcome, arm))
                if outcome == "ok":
                    self.answered.append((sent, self.outcomes[-1][0], arm))

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


@pytest.fixture(autouse=True)
def every_worker_ready(stack: Stack) -> None:  # noqa: F811
    """Each fault starts from a healthy stack: a worker an earlier test killed is back first. (On a busy machine
    TorchServe takes seconds to restart one; a fault meanwhile found the healthy arm without a worker too.)"""
    server.wait_until_ready(stack.torchserve, timeout=120)


def counts(outcomes: list[tuple[float, str, str]]) -> dict[str, int]:
    tally: dict[str, int] = {}
    for _, outcome, _ in outcomes:
        tally[outcome] = tally.get(outcome, 0) + 1
    return tally


def first_ok_after(outcomes: list[tuple[float, str, str]], since: float, arm: str | None = None) -> float | None:
    """Seconds from `since` to the first correct answer (from `arm`, if given) after it."""
    times = [t for t, outcome, answered_by in outcomes
             if outcome == "ok" and t > since and arm in (None, answered_by)]
    return min(times) - since if times else None


def warnings_in(log_file: Path, limit: int = 40) -> list[str]:
    """The router log's last warnings and errors: why an unexpected answer was given, in the assertion message."""
    lines = [line for line in log_file.read_text().splitlines() if " WARNING " in line or " ERROR " in line]
    return lines[-limit:]


def test_workers_killed_under_load_lose_no_request(stack: Stack, bodies: Any,  # noqa: F811
                                                   chaos_report: ChaosReport) -> None:
    load = Load(stack, bodies, threads=4, count=60)
    pool = load.run()
    kills = []
    for answered in (30, 120):  # SIGKILL a serving worker twice while the load runs (mid-load, not by the clock)
        deadline = time.monotonic() + 30
        while len(load.outcomes) < answered and time.monotonic() < deadline:
            time.sleep(0.01)
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
    rescued = load.retried_from.count("int8")
    chaos_report.add("Faults under load", f"**Workers killed.** {len(kills)} SIGKILL(s) of `fashion-int8`'s "
                     f"serving worker, after 30 and 120 answers, during {len(load.outcomes)} requests through the "
                     f"router (experiment `{EXPERIMENT}`, 4 clients): outcomes {tally}; {rescued} of them failed on "
                     "the killed worker and were answered by the other arm on the router's retry.")
    # A killed worker takes a while to come back, and TorchServe lists its pid until then: 1 or 2 kills.
    assert len(load.outcomes) == 4 * 60 and kills
    # The other arm is healthy, so the router's one retry saves every request the kills hit.
    assert tally == {"ok": 4 * 60}, tally
    assert rescued >= 1, "no request was in flight on a killed worker: the fault was not exercised"


def test_an_arm_whose_target_is_taken_away_under_load_loses_no_request(stack: Stack, bodies: Any,  # noqa: F811
                                                                     chaos_report: ChaosReport) -> None:
    load = Load(stack, bodies, threads=4, count=3000)
    pool = load.run()
    try:
        time.sleep(1.0)
        taken_at = time.monotonic()
        scale(stack.torchserve, "fashion-pruned", 0)  # the pruned arm's target has no worker left
        gone_s = time.monotonic() - taken_at
        time.sleep(3.0)
    finally:
        # The gone window ends when the scale-up starts: its worker may answer before the call (and the wait for
        # TorchServe to list it) returns.
        restoring_at = time.monotonic()
        scale(stack.torchserve, "fashion-pruned", 1)
    restored_at = time.monotonic()
    try:
        until(lambda: first_ok_after(load.outcomes, restored_at, "pruned") is not None, timeout_s=30)
        time.sleep(1.0)
    finally:
        load.stop.set()
        pool.shutdown(wait=True)
    tally = counts(load.outcomes)
    gone = [o for o in load.outcomes if taken_at + gone_s + 0.5 < o[0] < restoring_at]
    during, arms_during = counts(gone), {arm for _, _, arm in gone}
    back = first_ok_after(load.outcomes, restored_at, "pruned")
    # The fault bit: requests did reach the arm without workers. TorchServe either refused them (503: the router
    # retried them on int8) or held them in the model's queue until its worker was back (answered by pruned only
    # after the scale-up began, seconds after they were sent); which one depends on when the scale-down lands. A
    # request may be held from the moment the scale-down starts (the synchronous call returns only once the worker
    # has stopped), or a moment before: one sent 0.5 s before it would otherwise have been answered long before.
    retried = load.retried_from.count("pruned")
    held = [sent for sent, answered, arm in load.answered
            if arm == "pruned" and taken_at - 0.5 < sent < restoring_at < answered]
    chaos_report.add("Faults under load", f"**An arm's target taken away.** `fashion-pruned` scaled to 0 workers "
                     f"for {restored_at - taken_at:.1f} s and back to 1 while 4 clients sent {len(load.outcomes)} "
                     f"requests through the router (experiment `{EXPERIMENT}`, arms pruned and int8): outcomes "
                     f"{tally}; while it was gone {during} (answered by {sorted(arms_during)}); of the requests "
                     f"routed to it then, {retried} were refused and retried on int8, {len(held)} were held by "
                     f"TorchServe until its worker was back; the pruned arm answered again {back:.2f} s after its "
                     "worker was back (the circuit's half-open probe).")
    # The other arm is healthy: the requests routed to the missing one are retried on it, so every one is answered.
    assert tally == {"ok": len(load.outcomes)}, (tally, warnings_in(stack.log_file))
    # Nothing was answered by the missing arm while it was gone. (The window may hold no answer at all: TorchServe
    # can queue requests for a model scaled to 0 until its worker is back, and the clients wait on those.)
    assert arms_during <= {"int8"}, arms_during
    assert retried + len(held) >= 1, (load.retried_from, during)  # the fault bit (above)
    assert back is not None


def test_an_arm_removed_from_the_experiment_file_under_load_loses_no_request(
        stack: Stack, bodies: Any, chaos_report: ChaosReport) -> None:  # noqa: F811
    original = stack.config_path.read_text()
    document = yaml.safe_load(original)
    del document["experiments"][EXPERIMENT]["arms"]["pruned"]
    load = Load(stack, bodies, threads=4, count=3000)
    pool = load.run()
    try:
        time.sleep(1.0)
        stack.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        reload = requests.post(f"{stack.url}/admin/reload", headers=stack.admin(), timeout=10)
        removed_at = time.monotonic()
        assert reload.status_code == 200, reload.text
        time.sleep(2.0)
    finally:
        stack.config_path.write_text(original)
        restored = requests.post(f"{stack.url}/admin/reload", headers=stack.admin(), timeout=10)
    restored_at = time.monotonic()
    try:
        until(lambda: first_ok_after(load.outcomes, restored_at, "pruned") is not None, timeout_s=30)
    finally:
        load.stop.set()
        pool.shutdown(wait=True)
    tally = counts(load.outcomes)
    # a request already on its way to pruned when the reload landed may still finish there: allow 0.5 s
    arms_after_removal = {arm for t, _, arm in load.outcomes if removed_at + 0.5 < t < restored_at}
    chaos_report.add("Faults under load", f"**An arm removed from the experiment file.** `pruned` deleted from "
                     f"`{EXPERIMENT}` and `POST /admin/reload`ed, restored 2 s later, while 4 clients sent "
                     f"{len(load.outcomes)} requests: outcomes {tally}; answered by {sorted(arms_after_removal)} "
                     "while it was gone; its users came back to it after the restore (sticky assignment).")
    assert restored.status_code == 200, restored.text
    assert set(tally) == {"ok"}, tally
    assert arms_after_removal == {"int8"}


def test_torchserve_restart_under_load_recovers_with_its_state(stack: Stack, bodies: Any,  # noqa: F811
                                                                chaos_report: ChaosReport) -> None:
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
    recovered = first_ok_after(load.outcomes, started_at)
    assert recovered is not None, tally
    # A request that was on its way when the stop began may fail: allow its timeout (connect_s) before the
    # stop; after the start, the circuits may still be open for reset_s and a half-open probe may meet a
    # worker that is not ready yet.
    grace_s = 2.0
    late = [(round(t - started_at, 2), outcome) for t, outcome, _ in load.outcomes
            if outcome != "ok" and not stopped_at - grace_s < t < started_at + grace_s]
    refused = sum(n for outcome, n in tally.items() if outcome != "ok")
    chaos_report.add("Faults under load", f"**TorchServe stopped and started.** {len(load.outcomes)} requests "
                     f"through the router (2 clients): outcomes {tally}; TorchServe down for "
                     f"{started_at - stopped_at:.1f} s (stop + start + workers ready); first correct answer "
                     f"{recovered:.2f} s after it was ready; every refusal was explicit and fell while it was down "
                     f"(± {grace_s:g} s). Versions, defaults and the router's experiments were the same afterwards.")
    assert set(tally) <= {"ok", "503 (explicit)", "504 (explicit)"}, tally  # nothing wrong, nothing unexplained
    assert refused >= 1, "no request met the stopped TorchServe: the fault was not exercised"
    assert not late, f"refusals outside the time TorchServe was down: {late[:10]}"
    assert tally["ok"] >= 1 and recovered < grace_s
    after_models = server.model_status(instance)
    assert after_models.keys() == before_models.keys()
    assert {key: value["default"] for key, value in after_models.items()} == \
        {key: value["default"] for key, value in before_models.items()}
    assert stack.describe() == before_router
    assert psutil.pid_exists(server.running_pid(instance) or 0) and children(server.running_pid(instance) or 0)
