"""Router replicas on a shared PostgreSQL: two real router processes in front of the real TorchServe, each with its
own ports and state directory, one database and one tokens file. What one replica logs, the other joins feedback
to; a weight change or reset made on one holds on the other within 2 s; both give the same report, as does
`python -m router report`; sticky keys land on the same arm in both."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from router import process
from router.config import POSTGRESQL, StoreSettings, load_config
from router.upstream import Reply
from serving.instance import free_ports
from serving.project import REPO
from tests.conftest import encode_image
from tests.postgres import ScratchPostgres
from tests.test_router import Stack, launch

pytestmark = pytest.mark.router

EXPERIMENTS = {"fashion": {"control": "full", "salt": "replicas",
                           "arms": {"full": {"model": "fashion-full", "version": "1.0", "weight": 1},
                                    "int8": {"model": "fashion-int8", "version": "1.0", "weight": 1}}}}
PROPAGATION_LIMIT_S = 2.0  # the bound for a change made on one replica to hold on all


@dataclass
class Replica:
    stack: Stack

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def client(self) -> str:
        return self.stack.client_token

    @property
    def admin(self) -> str:
        return self.stack.admin_token

    @property
    def config_path(self) -> Path:
        return self.stack.config_path

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.url}{path}", timeout=30, **kwargs)

    def predict(self, body: bytes, user: str | None = None) -> requests.Response:
        return self.stack.predict("fashion", body, **({"X-User-Id": user} if user is not None else {}))

    def admin_get(self, path: str) -> Any:
        response = requests.get(f"{self.url}{path}", headers=self.stack.admin(), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def weights(self) -> dict[str, float]:
        arms = self.admin_get("/admin/experiments")["experiments"]["fashion"]["arms"]
        return {name: arm["weight"] for name, arm in arms.items()}


@pytest.fixture(scope="module")
def replicas(torchserve: Any, postgres: ScratchPostgres, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Replica, Replica]]:
    """Two routers, each with its own file (its own ports) and state directory, one database, one tokens file."""
    root = tmp_path_factory.mktemp("replicas")
    url = postgres.create_database()
    started: list[Stack] = []
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            started.append(launch(torchserve, root / name, EXPERIMENTS, tokens_file=str(root / "tokens.json"),
                                  store={"backend": "postgresql", "url": url}))
        yield Replica(started[0]), Replica(started[1])
    finally:
        for stack in started:
            process.stop(stack.config_path)
        postgres.drop_database(url)


def test_feedback_joins_the_request_another_replica_logged(replicas: tuple[Replica, Replica],
                                                           test_images: Any) -> None:
    a, b = replicas
    images, labels = test_images
    answered = a.predict(encode_image(images[0]))
    assert answered.status_code == 200, answered.text
    request_id, predicted = answered.headers["X-Request-Id"], answered.json()["label"]
    first = b.post("/feedback", json={"request_id": request_id, "label": int(labels[0])},
                   headers={"Authorization": f"Bearer {b.client}"})
    assert first.status_code == 200, first.text
    assert first.json()["arm"] == answered.headers["X-Arm"] and first.json()["duplicate"] is False
    assert first.json()["correct"] == (predicted == int(labels[0]))
    again = a.post("/feedback", json={"request_id": request_id, "label": (int(labels[0]) + 1) % 10},
                   headers={"Authorization": f"Bearer {a.client}"})
    assert again.status_code == 200 and again.json()["duplicate"] is True  # the first label stands, everywhere


def test_sticky_keys_land_on_the_same_arm_in_both(replicas: tuple[Replica, Replica], test_images: Any) -> None:
    a, b = replicas
    body = encode_image(test_images[0][1])
    arms = {}
    for user in (f"user-{n}" for n in range(12)):
        on_a, on_b = a.predict(body, user), b.predict(body, user)
        assert on_a.status_code == on_b.status_code == 200
        assert on_a.headers["X-Arm"] == on_b.headers["X-Arm"], user
        arms[user] = on_a.headers["X-Arm"]
    assert set(arms.values()) == {"full", "int8"}  # the keys really spread: the check above is not vacuous


def until_both(replicas: tuple[Replica, Replica], expected: dict[str, float], limit_s: float) -> float:
    """Seconds until both replicas route with `expected` weights (fails after `limit_s`)."""
    started = time.monotonic()
    while True:
        seen = [replica.weights() for replica in replicas]
        elapsed = time.monotonic() - started
        if all(weights == expected for weights in seen):
            return elapsed
        assert elapsed < limit_s, f"after {elapsed:.1f} s the replicas route with {seen}, not {expected}"
        time.sleep(0.05)


def test_a_weight_change_and_its_reset_hold_on_every_replica_within_2_s(replicas: tuple[Replica, Replica]
                                                                          ) -> None:
    a, b = replicas
    admin_a, admin_b = ({"Authorization": f"Bearer {r.admin}"} for r in (a, b))
    changed = requests.put(f"{a.url}/admin/experiments/fashion/weights", headers=admin_a, timeout=30,
                           json={"weights": {"int8": 0}, "reason": "drained by hand"})
    assert changed.status_code == 200, changed.text
    assert until_both((a, b), {"full": 1.0, "int8": 0.0}, PROPAGATION_LIMIT_S) < PROPAGATION_LIMIT_S
    described = b.admin_get("/admin/experiments")["experiments"]["fashion"]
    assert described["override"]["reason"] == "admin: drained by hand"
    # B now refuses a client's pin to the drained arm, as A does: the override is B's too.
    pinned = b.post("/predictions/fashion", data=b"x", headers={"Authorization": f"Bearer {b.client}",
                                                                   "X-Arm": "int8", "Content-Type": "image/png"})
    assert pinned.status_code == 403, pinned.text
    reset = requests.delete(f"{b.url}/admin/experiments/fashion/override", headers=admin_b, timeout=30)
    assert reset.status_code == 200, reset.text
    assert until_both((a, b), {"full": 1.0, "int8": 1.0}, PROPAGATION_LIMIT_S) < PROPAGATION_LIMIT_S


def test_every_replica_and_the_cli_give_the_same_report(replicas: tuple[Replica, Replica],
                                                        test_images: Any) -> None:
    a, b = replicas
    images, labels = test_images
    for index in range(8):  # traffic and feedback through both, each request labelled through the other
        source, other = (a, b) if index % 2 else (b, a)
        answered = source.predict(encode_image(images[index]))
        assert answered.status_code == 200
        labelled = other.post("/feedback", json={"request_id": answered.headers["X-Request-Id"],
                                                 "label": int(labels[index])},
                              headers={"Authorization": f"Bearer {other.client}"})
        assert labelled.status_code == 200
    since = f"?since_s={3600}"
    report_a, report_b = (replica.admin_get(f"/admin/report/fashion{since}") for replica in (a, b))
    cli = subprocess.run([sys.executable, "-m", "router", "--config", str(a.config_path), "report", "--json",
                          "--since-s", "3600"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    report_cli = json.loads(cli.stdout)
    for report in (report_b, report_cli):
        assert _stable(report) == _stable(report_a)
    arms = {row["arm"]: row for row in report_a["arms"]}
    assert sum(row["requests"] for row in arms.values()) >= 8 and sum(row["feedback"] for row in arms.values()) >= 8


def _stable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what depends on the moment it was computed."""
    return {key: value for key, value in report.items() if key not in ("generated_at", "since")}



def test_a_guardrail_rollback_on_one_replica_holds_on_the_other(postgres: ScratchPostgres, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Two routers' cores on one database, both following the store: the guardrail of one rolls back (a real
    breach of its p99 limit); the other follows within its period, and the one that decided does not take its
    own decision for another replica's (which would throw its guardrail windows away a second time)."""
    from router.control import FOLLOW_STORE_S
    from router.core import Router
    from router.store import open_store
    from tests.test_router_core import Upstream, make_config, ok, req

    async def slow() -> Reply:
        await asyncio.sleep(0.05)
        return await ok()

    async def main(url: str) -> tuple[bool, float, dict[str, float]]:
        config = dataclasses.replace(
            make_config(tmp_path, guardrail={"max_p99_ms": 20, "min_requests": 5, "window_s": 60}),
            store=StoreSettings(POSTGRESQL, url))
        stores = [open_store(config) for _ in range(2)]
        first, second = (Router(config, Upstream({"model-a": ok, "model-b": slow}), store) for store in stores)
        followers = [asyncio.create_task(router.control.follow_store()) for router in (first, second)]
        try:
            for _ in range(6):
                await first.route(req(pin="b"))
            await first.guardrail.check()  # arm b's p99 of 50 ms breaches 20 ms: roll back
            assert first.control.rolled_back("exp")
            started = time.monotonic()
            while not second.control.rolled_back("exp") and time.monotonic() - started < 5:
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - started
            await asyncio.sleep(3 * FOLLOW_STORE_S)  # the decider reads its own override back meanwhile
            followed = second.control.experiment("exp")
            assert followed is not None
            return second.control.rolled_back("exp"), elapsed, followed.weights
        finally:
            for follower in followers:
                follower.cancel()
            for store in stores:
                store.close()

    with postgres.database() as url, caplog.at_level(logging.WARNING, logger="router.control"):
        rolled_back, elapsed, weights = asyncio.run(main(url))
    assert rolled_back and weights == {"a": 1.0, "b": 0.0}
    assert elapsed < FOLLOW_STORE_S + 1.0 < PROPAGATION_LIMIT_S
    followed = [record for record in caplog.records if "made by another replica" in record.getMessage()]
    assert len(followed) == 1  # the follower's, once; never the decider's own


def test_replicas_on_one_machine_share_one_address_only_when_they_say_so(torchserve: Any, tmp_path: Path,
                                                                          test_images: Any) -> None:
    """`listen.reuse_port`: two routers on the same ports both listen and both answer (the kernel spreads
    connections); a router without it cannot take ports another holds."""
    rest_port, grpc_port = free_ports(2)
    listen = {"host": "127.0.0.1", "rest_port": rest_port, "grpc_port": grpc_port}
    experiments = {"fashion": EXPERIMENTS["fashion"]}
    stacks = []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            stacks.append(launch(torchserve, tmp_path / name, experiments, listen={**listen, "reuse_port": True},
                                 tokens_file=str(tmp_path / "tokens.json")))
        pids = {process.running_pid(load_config(stack.config_path)) for stack in stacks}
        assert len(pids) == 2 and None not in pids
        body = encode_image(test_images[0][0])
        for _ in range(40):  # a new connection each time: each may land on either replica
            response = requests.post(f"http://127.0.0.1:{rest_port}/predictions/fashion", data=body, timeout=30,
                                     headers={**stacks[0].headers(), "Connection": "close"})
            assert response.status_code == 200
        for stack in stacks:  # each replica logs what it answered in its own SQLite file: both answered some
            with contextlib.closing(sqlite3.connect(load_config(stack.config_path).database)) as db:
                (count,) = db.execute("SELECT count(*) FROM requests").fetchone()
            assert 0 < count < 40, f"{stack.config_path.parent.name} answered {count} of 40"
        (tmp_path / "three").mkdir()
        with pytest.raises(process.LaunchError):
            launch(torchserve, tmp_path / "three", experiments, listen=listen)
    finally:
        for stack in stacks:
            process.stop(stack.config_path)
