"""Load shapes for the kit's Locust users; add this file to `-f` to use one:
`-f loadtest/locustfile.py,loadtest/shapes.py`.

`StepShape` doubles the users step by step and holds each step for `LOADTEST_STEP_S` seconds (default 6):
throughput rises until the server saturates, then only latency does. `make loadtest` reads the steps from the
samples' timestamps to draw latency against throughput and to find the saturation throughput.

Usage:
    LOADTEST_STEPS=1,4,16,32,64 LOADTEST_STEP_S=6 \
        locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --target direct --variant full RestUser
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def steps() -> list[int]:
    return [int(users) for users in os.environ.get("LOADTEST_STEPS", "1,4,16,32,64").split(",")]


def step_seconds() -> float:
    return float(os.environ.get("LOADTEST_STEP_S", "6"))


class StepShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        index = int(self.get_run_time() // step_seconds())
        users = steps()
        if index >= len(users):
            return None  # done: stop the run
        return users[index], float(users[index])  # spawn the whole step at once
