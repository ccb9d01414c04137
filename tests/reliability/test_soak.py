"""Soak: a bounded run at a fixed arrival rate through the router (Locust, `loadtest/locustfile.py`), sampling
the resident memory of TorchServe's frontend, its workers and the router every second. Memory must not keep
growing and the run must pass its gate. `SOAK_S` (default 20 s: the short form in `make test`) and `SOAK_RATE`
(req/s) make it longer or heavier: `SOAK_S=600 make chaos`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loadtest.workload import children, read_samples, resident_mb, summarize
from serving import server
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router

REPO = Path(__file__).resolve().parents[2]


def test_soak_keeps_memory_flat(stack: Stack, tmp_path: Path) -> None:  # noqa: F811
    duration = float(os.environ.get("SOAK_S", "20"))
    rate = float(os.environ.get("SOAK_RATE", "80"))
    frontend = server.running_pid(stack.torchserve)
    assert frontend is not None
    router_pid = int((stack.log_file.parent / "router.pid").read_text())
    roles = {"frontend": [frontend], "workers": children(frontend), "router": [router_pid]}
    series: dict[str, list[float]] = {role: [] for role in roles}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            for role, pids in roles.items():
                series[role].append(sum(resident_mb(pid) for pid in pids))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--only-summary",
             "-u", "16", "-r", "16", "-t", f"{duration:g}s", "--stop-timeout", "5", "--rate", str(rate),
             "--target", "router", "--variant", "int8", "--run-dir", str(stack.torchserve.run_dir),
             "--router-config", str(stack.config_path), "--items", "64", "--samples", str(tmp_path / "soak"),
             "--max-failure-ratio", "0", "RestUser"],
            cwd=REPO, capture_output=True, text=True, timeout=duration + 120)
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stderr[-3000:]
    total = summarize(read_samples(tmp_path.glob("soak.*.csv")))["Aggregated"]
    lines = [f"## Soak\n\n{duration:g} s at {rate:g} req/s through the router (int8 arm): {total['requests']} "
             f"requests, {total['failures']} failures, p50 {total['p50_ms']:.1f} ms, p99 {total['p99_ms']:.1f} ms. "
             "Resident memory (MB), first → last quarter of the run:"]
    for role, values in series.items():
        quarter = max(1, len(values) // 4)
        first, last = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
        lines.append(f"- {role}: {first:.0f} → {last:.0f}")
        # flat: allocator and JIT warm-up may add a little; steady growth over the run would exceed this
        assert last <= first * 1.10 + 30, f"{role} memory grew from {first:.0f} to {last:.0f} MB: {values}"
    report = os.environ.get("CHAOS_REPORT")
    if report:
        with open(report, "a") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")
