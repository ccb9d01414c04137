"""The cluster rehearsal's Locust user (`python -m loadtest.rehearsal`; load it beside `loadtest/locustfile.py`,
whose options, fixed-rate schedule and distributed gate it uses).

Each task is what an application does: ask the router for a prediction (a sticky user key, a real test image),
then report the true label as feedback for the request id it got. The user keeps a ledger of what the clients
saw — every prediction's send time, status, request id and whether the answer came from the model the router
named, every feedback's status — which each worker hands to the master with its final report
(`loadtest.distributed.contribute`); the master writes the merged ledger to `--ledger`. The rehearsal then
checks it against the database: every answered request must have its row, every acknowledged feedback its label.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, ClassVar

from locust import events, task
from locust.env import Environment

from loadtest.distributed import Merged, contribute, on_merged
from loadtest.locustfile import KitHttpUser, Run, pace

PREDICT, FEEDBACK = "predict", "feedback"
USERS = 1000  # distinct sticky keys


class Ledger:
    # [sent (epoch s), kind, status (0: no answer), request id, latency ms, consistent answer]
    entries: ClassVar[list[list[Any]]] = []


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--ledger", default="", help="rehearsal: where the master writes what the clients saw")


@events.test_start.add_listener
def reset(**_: Any) -> None:
    Ledger.entries = []


contribute("ledger", lambda: Ledger.entries)


def write_ledger(environment: Environment, merged: Merged) -> None:
    options = environment.parsed_options
    if options is None or not options.ledger:
        return
    entries = [entry for ledger in merged.extras.get("ledger", {}).values() for entry in ledger or []]
    Path(options.ledger).parent.mkdir(parents=True, exist_ok=True)
    Path(options.ledger).write_text(json.dumps(sorted(entries)))


on_merged(write_ledger)


def consistent(body: bytes, target: str | None) -> bool:
    """Whether an answer came from the model the router says answered (X-Target "model/version")."""
    try:
        answer = json.loads(body)
        return bool(target) and answer["model"]["name"] == str(target).split("/", 1)[0]
    except (ValueError, KeyError, TypeError):
        return False


class RehearsalUser(KitHttpUser):
    def on_start(self) -> None:
        super().on_start()
        self.feedback_headers = {"Authorization": f"Bearer {Run.endpoint.token}"}

    @task
    def predict_then_label(self) -> None:
        item = random.choice(Run.items)
        headers = {**Run.headers["image/png"], "X-User-Id": f"user-{random.randrange(USERS)}"}
        context = pace()
        sent = time.time()
        with self.client.post(Run.path, data=item.png,  # type: ignore[arg-type]
                              headers=headers, name="router rest predict", context=context,
                              catch_response=True) as response:
            status = response.status_code or 0
            request_id = response.headers.get("X-Request-Id", "") if status else ""
            right = status == 200 and consistent(response.content or b"", response.headers.get("X-Target"))
            Ledger.entries.append([sent, PREDICT, status, request_id, (time.time() - sent) * 1000, right])
            if status != 200:
                response.failure(f"HTTP {status}: {(response.text or '')[:200]}")
                return
            if not right:
                response.failure("the answer did not come from the model the router named")
                return
        sent = time.time()
        with self.client.post("/feedback", json={"request_id": request_id, "label": item.label},
                              headers=self.feedback_headers, name="router rest feedback",
                              catch_response=True) as response:
            status = response.status_code or 0
            Ledger.entries.append([sent, FEEDBACK, status, request_id, (time.time() - sent) * 1000, status == 200])
            if status != 200:
                response.failure(f"HTTP {status}: {(response.text or '')[:200]}")
