"""Short, bounded headless Locust runs against the test TorchServe: zero failures, reports written and
parseable, and the gate failing when given an impossible limit; `make loadtest`'s driver end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.workload import read_samples, summarize
from serving import server
from tests.conftest import Chain

pytestmark = pytest.mark.serving

REPO = Path(__file__).resolve().parents[1]


def locust(instance: server.Instance, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--only-summary",
               "-u", "4", "-r", "4", "-t", "3s", "--stop-timeout", "5", "--run-dir", str(instance.run_dir),
               "--target", "direct", "--variant", "int8", "--items", "32", "--samples", str(out / "samples"), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("user", ["RestUser", "GrpcUser"])
def test_a_short_run_has_no_failures_and_writes_its_reports(torchserve: server.Instance, tmp_path: Path,
                                                           user: str) -> None:
    result = locust(torchserve, tmp_path, "--body", "mixed", "--csv", str(tmp_path / "locust"),
                    "--html", str(tmp_path / "locust.html"), user)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "samples.summary.json").read_text())
    total = summary["Aggregated"]
    assert total["requests"] > 10 and total["failures"] == 0
    assert total["accuracy"] is not None and total["p99_ms"] >= total["p50_ms"] > 0
    protocol = "rest" if user == "RestUser" else "grpc"
    assert {f"int8 {protocol} png", f"int8 {protocol} json"} <= set(summary)  # request names per variant and body
    samples = read_samples(tmp_path.glob("samples.*.csv"))
    assert len(samples) == total["requests"] and summarize(samples)["Aggregated"]["failures"] == 0
    with open(tmp_path / "locust_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    # Locust's CSV is its own periodic snapshot (it may miss the last seconds); ours counts every request
    aggregated = rows["Aggregated"]
    assert int(aggregated["Request Count"]) <= total["requests"] and "Average Response Time" in aggregated
    assert "<html" in (tmp_path / "locust.html").read_text()[:2000].lower()


def test_the_gate_fails_the_run_on_an_impossible_limit(torchserve: server.Instance, tmp_path: Path) -> None:
    result = locust(torchserve, tmp_path, "--max-p95-ms", "0.001", "RestUser")
    assert result.returncode == 1
    assert "gate failed: p95" in result.stderr


def test_fixed_rate_mode_holds_the_offered_rate(torchserve: server.Instance, tmp_path: Path) -> None:
    result = locust(torchserve, tmp_path, "--rate", "40", "RestUser")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = read_samples(tmp_path.glob("samples.*.csv"))
    assert len(samples) >= 40
    assert 32 <= summarize(samples)["Aggregated"]["throughput"] <= 44  # the schedule's 40 req/s, not the server's max
    assert all(sample.latency_ms >= sample.service_ms - 1 for sample in samples)  # measured from intended time


def test_the_loadtest_driver_writes_the_summary_and_plots(torchserve: server.Instance, chain: Chain,
                                                          tmp_path: Path) -> None:
    from loadtest import run

    args = run.get_args_parser().parse_args([
        "--variants", "int8", "--rates", "30", "--step-s", "1.5", "--steps", "1,2", "--quick",
        "--output", str(tmp_path), "--run-dir", str(torchserve.run_dir), "--checkpoints", str(chain.directory)])
    assert run.main(args) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| int8 | rest | direct |" in summary and "| int8 | direct | 30 |" in summary
    assert (tmp_path / "latency_vs_throughput.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_p99_size.png").stat().st_size > 1000
    outcome = json.loads((tmp_path / "step-int8-rest-direct" / "outcome.json").read_text())
    assert outcome["exit_code"] == 0 and len(outcome["steps"]) >= 2
