"""Capacity on paper (loadtest.capacity): the arithmetic from a bench run to pod counts, worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import capacity
from router.config import Arm, Experiment, Target, load_config
from serving.project import ONNX_SUFFIX, REPO

BENCH = {"cores": 2, "router_cpu_us": {"rest": 600.0, "grpc": 1000.0},
         "served": {"full": {"requests_per_s": 1600.0, "p99_ms": 31.0},
                    "int8": {"requests_per_s": 4800.0, "p99_ms": 140.0}}}
SIZING = capacity.Sizing(pod_cpus=4, router_pod_cpus=2, utilization=0.5, p99_ms=100)


def test_a_pod_serves_the_bench_machines_throughput_per_core_times_its_cores() -> None:
    assert capacity.pod_throughput(BENCH, "full", SIZING) == 3200  # 1600 / 2 cores × 4 cores


def test_an_experiments_cost_is_its_arms_costs_weighted() -> None:
    experiment = Experiment("e", (Arm("a", Target("fashion-full"), 3), Arm("b", Target("fashion-int8"), 1)), "a", "e")
    # per request: 3/4 of 1/3200 s·pod + 1/4 of 1/9600 s·pod = 10/38400 → 3840 req/s per pod
    assert capacity.experiment_throughput(BENCH, experiment, SIZING) == pytest.approx(3840)


def test_pods_are_rounded_up_at_the_utilization_and_routers_never_fewer_than_two() -> None:
    assert capacity.pods(10_000, 3200, 0.5) == 7  # 10,000 / 1,600 = 6.25
    assert capacity.router_pods(1_000, 600, SIZING) == 2  # 1.2 cores: one pod would do, two are the floor
    assert capacity.router_pods(100_000, 600, SIZING) == 60  # 60 / 0.5 = 120 cores in pods of 2


def test_the_table_flags_a_p99_over_the_target_and_uses_the_repositorys_experiment(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    served = {**BENCH["served"], "pruned": {"requests_per_s": 2600.0, "p99_ms": 20.0},
              "distilled": {"requests_per_s": 3000.0, "p99_ms": 24.0}}
    # the repository's experiment serves the ONNX forms (make bench measures every form make serve serves)
    served |= {variant + ONNX_SUFFIX: {**load, "requests_per_s": load["requests_per_s"] * 1.2}
               for variant, load in served.items()}
    bench.write_text(json.dumps({**BENCH, "served": served}))
    output = tmp_path / "capacity.md"
    args = capacity.get_args_parser().parse_args(["--bench", str(bench), "--output", str(output)])
    assert capacity.main(args) == 0
    text = output.read_text()
    assert "| int8 alone | 4,800 | 140.0 (over the 100 ms target) |" in text
    weights = ", ".join(f"{arm.name} {arm.weight:g}" for arm in
                        load_config(REPO / "router" / "experiments.yaml").experiments["fashion"].arms)
    assert f"experiment `fashion` ({weights})" in text


def test_an_old_bench_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"served": BENCH["served"]}))
    args = capacity.get_args_parser().parse_args(["--bench", str(bench), "--output", str(tmp_path / "c.md")])
    assert capacity.main(args) == 1
    assert not (tmp_path / "c.md").exists()


def test_an_experiment_the_bench_did_not_measure_or_does_not_know_is_refused_by_name(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))  # full and int8 only: the repository's experiment routes to ONNX forms
    output = tmp_path / "c.md"
    args = capacity.get_args_parser().parse_args(["--bench", str(bench), "--output", str(output)])
    assert capacity.main(args) == 1
    assert f"has no throughput for fashion-distilled{ONNX_SUFFIX}, fashion-full{ONNX_SUFFIX}" in caplog.text
    args = capacity.get_args_parser().parse_args(["--bench", str(bench), "--output", str(output),
                                                  "--experiment", "nope"])
    assert capacity.main(args) == 1
    assert "no experiment 'nope'" in caplog.text and "fashion" in caplog.text
    assert not output.exists()
