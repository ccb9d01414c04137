"""`make bench`'s choices and targets (pure functions, on made-up figures), and a short real run of its served
part and of the worker profiler against the test TorchServe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest import bench, profile_worker
from serving import server
from tests.conftest import Chain

pytestmark = pytest.mark.serving  # the last test uses the session's test TorchServe


def write_cards(directory: Path, accuracies: dict[str, float]) -> Path:
    for variant, accuracy in accuracies.items():
        (directory / f"{variant}.card.json").write_text(json.dumps({"test_accuracy": accuracy}))
    return directory


def load(requests_per_s: float, p99_ms: float = 10.0) -> dict[str, float]:
    return {"requests_per_s": requests_per_s, "p50_ms": 1.0, "p99_ms": p99_ms, "errors": 0}


FORMS = [bench.Form(bench.model_name(v), v) for v in ("full", "full-onnx", "int8", "int8-onnx")]


def test_a_faster_form_is_chosen_only_if_it_answers_as_well(tmp_path: Path) -> None:
    served = {"full": load(100), "full-onnx": load(150), "int8": load(300), "int8-onnx": load(400)}
    # full-onnx: 0.05 pt below full, within the 0.1 pt tolerance; int8-onnx: 0.3 pt below the FX int8, outside it
    cards = write_cards(tmp_path, {"full": 0.9000, "full-onnx": 0.8995, "int8": 0.8990, "int8-onnx": 0.8960})
    choices = bench.choose_forms(FORMS, served, cards)
    assert choices["full"]["variant"] == "full-onnx" and choices["full"]["runtime"] == "ONNX Runtime"
    assert choices["int8"]["variant"] == "int8" and choices["int8"]["runtime"] == "PyTorch"
    assert "int8-onnx 400 req/s, 89.60 %" in choices["int8"]["against"]


def test_the_slower_form_is_never_chosen(tmp_path: Path) -> None:
    served = {"full": load(200), "full-onnx": load(150), "int8": load(300), "int8-onnx": load(400)}
    cards = write_cards(tmp_path, {"full": 0.90, "full-onnx": 0.90, "int8": 0.89, "int8-onnx": 0.89})
    choices = bench.choose_forms(FORMS, served, cards)
    assert (choices["full"]["variant"], choices["int8"]["variant"]) == ("full", "int8-onnx")


def test_targets_are_ratios_of_this_runs_figures() -> None:
    results: dict[str, Any] = {
        "choices": {"full": {"variant": "full-onnx", "requests_per_s": 1000.0},
                    "int8": {"variant": "int8", "requests_per_s": 2500.0},
                    "distilled": {"variant": "distilled", "requests_per_s": 2100.0}},
        "served": {"full-onnx": load(1000)}, "in_process": {"full-onnx": {"images_per_s": 1100.0}},
        "handlers": {"variant": "full-onnx", "ours": load(1000, p99_ms=30.0), "stock": load(700, p99_ms=25.0)}}
    rows = bench.targets(results)
    # efficiency 1000/1100, int8 2500/1000, distilled 2100/1000, ours/stock 1000/700, stock p99/ours 25/30
    assert [(round(row["value"], 2), row["met"]) for row in rows] == [
        (0.91, True), (2.5, False), (2.1, True), (1.43, True), (0.83, False)], rows


def test_arms_that_do_not_serve_the_chosen_form_are_named(tmp_path: Path) -> None:
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(yaml.safe_dump({"experiments": {"fashion": {"arms": {
        "full": {"model": "fashion-full", "weight": 1}, "int8": {"model": "fashion-int8", "weight": 1}}}}}))
    choices = {"full": {"model": "fashion-full-onnx"}, "int8": {"model": "fashion-int8"}}
    assert bench.experiment_mismatches(choices, experiments) == [
        "arm `full` serves `fashion-full`, the bench chose `fashion-full-onnx`"]


def test_profile_samples_go_to_the_innermost_category(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "<module> (ts/model_service_worker.py:1);handle (fashion_handler.py:150);forward (fashion_cnn.py:90) 7\n"
        "<module> (ts/model_service_worker.py:1);decode_request (request_decoding.py:92);open (PIL/Image.py:3) 2\n"
        "<module> (ts/model_service_worker.py:1);retrieve_msg (ts/protocol/otf_message_handler.py:38) 3\n"
        "<module> (ts/model_service_worker.py:1);handle (fashion_handler.py:150);add_time (ts/metrics/a.py:1);"
        "info (logging/__init__.py:1) 4\n"
        "postprocess (fashion_handler.py:190);dumps (json/__init__.py:231);encode (json/encoder.py:200) 1\n"
        "decode_request (request_decoding.py:148);loads (json/__init__.py:346);decode (json/decoder.py:337) 5\n"
        "<module> (ts/model_service_worker.py:1);handle (fashion_handler.py:150);inference (fashion_handler.py:180) 6\n"
        "<module> (ts/model_service_worker.py:1);handle (ts/service.py:120);<genexpr> (threading.py:10) 9\n"
        "<module> (site.py:1);run (runpy.py:1) 1\n")
    assert profile_worker.read_raw(raw) == {"model": 7, "decoding": 7, "torchserve": 12, "metrics": 4, "encoding": 1,
                                            "handler": 6, "other": 1}


def test_the_bench_measures_each_served_form_and_the_profiler_a_worker(torchserve: server.Instance, chain: Chain,
                                                                      tmp_path: Path) -> None:
    from serving.examples import write_examples

    image = next(path for path in write_examples(tmp_path / "examples") if path.suffix == ".png")
    output = tmp_path / "bench.md"
    args = bench.get_args_parser().parse_args([
        "--image", str(image),
        "--models", "fashion-full", "fashion-int8", "--skip", "router", "stock", "crosscheck", "tuning",
        "--duration-s", "1", "--rounds", "1", "--run-dir", str(torchserve.run_dir),
        "--checkpoints", str(chain.directory), "--output", str(output)])
    assert bench.main(args) == 0
    results = json.loads(output.with_suffix(".json").read_text())
    assert set(results["served"]) == {"full", "int8"}
    for variant in ("full", "int8"):
        assert results["served"][variant]["requests_per_s"] > 0 and results["served"][variant]["errors"] == 0
        assert results["in_process"][variant]["images_per_s"] > 0
    assert results["choices"]["full"]["variant"] == "full" and results["checkpoints"]["dry_run"] is True
    report = output.read_text()
    assert "| fashion-int8 | PyTorch |" in report and "## Targets" in report and "serving efficiency" in report

    profiled = profile_worker.profile(torchserve, "fashion-int8", image,
                                      duration_s=2.0, connections=4, rate=200)
    rows = profiled["rows"]
    assert isinstance(rows, dict) and profiled["samples"] > 10  # type: ignore[operator]
    assert sum(row["share"] for row in rows.values()) == pytest.approx(1.0)
    assert rows["model"]["share"] > 0 and rows["torchserve"]["share"] > 0
