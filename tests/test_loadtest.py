"""Short, bounded headless Locust runs against the test TorchServe: zero failures, reports written and
parseable, the gate failing when given an impossible limit, the fixed-rate mode holding its rate and measuring
the generator's own lag, a run whose generator cannot keep the schedule declared invalid; `make loadtest`'s
driver end to end."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest.router_overhead import pinned_arm, v2_grpc_request, v2_pixels
from loadtest.workload import read_samples, summarize, users_for_rate
from router.config import load_config
from router.open_inference import parse_grpc
from serving import server
from serving.project import REPO
from tests.conftest import Chain

pytestmark = pytest.mark.serving



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


# This machine's cores are shared with other work: these tests check the mechanism, not the machine's quietness,
# so they allow a generous lag. `make loadtest` applies the real bound (loadtest.workload.MAX_LAG_P99_MS).
LENIENT_LAG = ("--max-lag-ms", "100")


def test_fixed_rate_mode_holds_the_offered_rate_and_measures_the_generator_lag(torchserve: server.Instance,
                                                                              tmp_path: Path) -> None:
    users = str(users_for_rate(40))
    result = locust(torchserve, tmp_path, "--rate", "40", "-u", users, "-r", "100", "-t", "5s", *LENIENT_LAG,
                    "RestUser")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = read_samples(tmp_path.glob("samples.*.csv"))
    assert len(samples) >= 80
    total = summarize(samples)["Aggregated"]
    assert 32 <= total["throughput"] <= 44  # the schedule's 40 req/s, not the server's max
    for sample in samples:  # latency from the intended send time = how late it left + how long it took
        assert sample.lag_ms is not None and sample.lag_ms >= 0
        assert sample.latency_ms == pytest.approx(sample.lag_ms + sample.service_ms, abs=0.01)
    assert 0 <= total["lag_p50_ms"] <= total["lag_p99_ms"] <= total["lag_max_ms"]
    assert total["no_free_user_ratio"] <= 0.02  # users sized for the rate: a free one for (nearly) every slot
    # the first second of the schedule (after every user was spawned) is left out of the figures
    left_out = re.search(r"(\d+) warm-up requests left out", result.stderr)
    assert left_out and 30 <= int(left_out.group(1)) <= 50, result.stderr[-2000:]


def test_a_run_whose_generator_cannot_keep_the_schedule_is_invalid(torchserve: server.Instance,
                                                                  tmp_path: Path) -> None:
    # One user for 200 req/s of requests that take milliseconds each: most requests leave late.
    result = locust(torchserve, tmp_path, "--rate", "200", "-u", "1", "-r", "1", *LENIENT_LAG, "RestUser")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "run invalid: generator lag p99" in result.stderr and "found no free user" in result.stderr
    total = summarize(read_samples(tmp_path.glob("samples.*.csv")))["Aggregated"]
    assert total["failures"] == 0 and total["lag_p99_ms"] > 100 and total["no_free_user_ratio"] > 0.5


def test_the_loadtest_driver_writes_the_summary_and_plots(torchserve: server.Instance, chain: Chain,
                                                          tmp_path: Path) -> None:
    from loadtest import run

    args = run.get_args_parser().parse_args([
        "--variants", "int8", "--rates", "30", "--step-s", "1.5", "--steps", "1,2", "--quick", "--rate-s", "2",
        *LENIENT_LAG, "--output", str(tmp_path), "--run-dir", str(torchserve.run_dir),
        "--checkpoints", str(chain.directory)])
    assert run.main(args) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| int8 | rest | direct |" in summary and "| int8 | direct | 30 | 15 × 1 |" in summary
    assert "Generator lag: how late each request left" in summary
    assert (tmp_path / "latency_vs_throughput.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_p99_size.png").stat().st_size > 1000
    outcome = json.loads((tmp_path / "step-int8-rest-direct" / "outcome.json").read_text())
    assert outcome["exit_code"] == 0 and len(outcome["steps"]) >= 2


def test_the_router_overhead_pins_the_full_arm_whatever_form_serves_it() -> None:
    """`make bench` chooses each arm's form (ONNX or PyTorch): the overhead's pinned arm follows the choice."""
    fashion = load_config(REPO / "router" / "experiments.yaml").experiments["fashion"]
    assert pinned_arm(fashion, None).name == "full"
    assert pinned_arm(fashion, fashion.arms[1].target.model) == fashion.arms[1]
    with pytest.raises(SystemExit, match="serves no arm of experiment fashion"):
        pinned_arm(fashion, "fashion-nothing")


def test_the_router_overhead_sends_one_tensor_in_typed_and_in_raw_grpc_contents(tmp_path: Path) -> None:
    """v2-grpc and v2-grpc-raw load the router with the same image: the router reads the same pixels from both,
    and answers the raw request in raw contents (as tritonclient's gRPC client expects)."""
    image = tmp_path / "gradient.png"
    Image.fromarray(np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8), mode="L").save(image)
    typed = parse_grpc(v2_grpc_request("fashion", "", image))
    raw = parse_grpc(v2_grpc_request("fashion", "", image, raw=True))
    assert typed.array is not None and raw.array is not None
    assert raw.array.tobytes() == typed.array.tobytes() == v2_pixels(image).tobytes()
    assert raw.shape == typed.shape == (1, 28, 28) and raw.datatype == typed.datatype == "UINT8"
    assert raw.raw_outputs and not typed.raw_outputs
