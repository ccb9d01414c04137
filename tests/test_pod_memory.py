"""loadtest.pod_memory: the proportional set size it adds up, read from the kernel for real processes."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from loadtest.pod_memory import PodMemory, proportional_mb


def test_a_process_pss_is_positive_and_at_most_its_rss() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time, torch; print('ready', flush=True); time.sleep(60)"],
                          stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"  # torch's libraries mapped
            pss, rss = proportional_mb(child.pid), psutil.Process(child.pid).memory_info().rss / (1 << 20)
            assert 0 < pss <= rss + 1
        finally:
            child.kill()


def test_a_gone_process_is_refused() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    with pytest.raises(ProcessLookupError):
        proportional_mb(child.pid)


def test_the_report_adds_the_frontend_to_the_workers() -> None:
    memory = PodMemory(workers=16, workers_pss_mb=5374.0, workers_rss_mb=12046.0, frontend_pss_mb=572.0)
    assert memory.total_mb == pytest.approx(5946.0)
    report = memory.markdown(["a", "b"], 100)
    assert "| the pod's processes | 17 | 5,946 | |" in report and "PSS per worker: 336 MiB" in report
