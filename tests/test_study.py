"""The several-seed study (training.study) and the interleaved timing it and the report rest on."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import Chain, run_module
from training.engine import measure_latency_interleaved
from training.study import Spread, load_runs, summarise

CHAIN_FILES = ("full", "pruned", "int8", "distilled", "student_baseline")


def copy_run(chain: Chain, directory: Path, seed: int, accuracy: dict[str, float]) -> Path:
    """The dry-run chain's files, its cards saying they came from `seed` with the given test accuracies."""
    directory.mkdir(parents=True)
    for name in CHAIN_FILES:
        card = dict(chain.card(name))
        shutil.copy(chain.weights(name), directory / card["file"])
        card["seed"] = seed
        card["test_accuracy"] = accuracy[card["variant"]]
        (directory / f"{name}.card.json").write_text(json.dumps(card))
    return directory


def accuracies(full: float, pruned: float, distilled: float, twin: float) -> dict[str, float]:
    return {"full": full, "pruned": pruned, "int8": full - 0.001, "distilled": distilled, "student-baseline": twin}


def latency(full_b64: float, pruned_b64: float) -> dict[str, dict[str, dict[str, float]]]:
    def table(b64: float) -> dict[str, dict[str, float]]:
        return {"threads_1": {"batch_1": 1.0, "batch_64": b64}, "threads_2": {"batch_1": 1.0, "batch_64": b64 / 2}}

    return {"full": table(full_b64), "pruned": table(pruned_b64), "int8": table(10.0), "distilled": table(20.0),
            "student-baseline": table(20.0)}


def cards(seed: int, accuracy: dict[str, float], pruned_parameters: int = 250) -> dict[str, dict[str, Any]]:
    parameters = {"full": 1000, "pruned": pruned_parameters, "int8": 1000, "distilled": 35, "student-baseline": 35}
    return {variant: {"variant": variant, "seed": seed, "test_accuracy": value, "parameters": parameters[variant],
                      "dataset": "fashion-mnist"} for variant, value in accuracy.items()}


def test_the_study_reads_its_runs_and_writes_table_json_and_plot(chain: Chain, tmp_path: Path) -> None:
    figures = [accuracies(0.93, 0.926, 0.921, 0.917), accuracies(0.932, 0.929, 0.922, 0.919),
               accuracies(0.929, 0.924, 0.924, 0.918)]
    runs = [copy_run(chain, tmp_path / f"seed-{seed}", seed, figure)
            for seed, figure in zip((0, 7, 8), figures, strict=True)]
    output = tmp_path / "report"
    run_module("training.study", "--runs", *map(str, runs), "--output-dir", str(output), "--rounds", "2")
    study = json.loads((output / "study.json").read_text())
    assert study["seeds"] == [0, 7, 8]
    for variant in ("full", "pruned", "int8", "distilled", "student-baseline"):
        values = [figure[variant] * 100 for figure in figures]
        assert study["accuracy"][variant]["values"] == pytest.approx(values)
        assert study["accuracy"][variant]["mean"] == pytest.approx(statistics.fmean(values))
        assert study["accuracy"][variant]["std"] == pytest.approx(statistics.stdev(values))
    differences = [(f["distilled"] - f["student-baseline"]) * 100 for f in figures]
    assert study["distillation"]["difference"]["values"] == pytest.approx(differences)
    assert study["distillation"]["beyond_spread"] is True  # +0.43 pts against a spread of 0.15
    pruning = study["pruning"]
    assert pruning["loss"]["mean"] == pytest.approx(statistics.fmean((f["full"] - f["pruned"]) * 100 for f in figures))
    # The speed-up is the real models' (the dry-run chain's), timed interleaved here; the targets read it.
    timed = study["latency"]
    assert pruning["speedup_b64_1_thread"] == pytest.approx(
        timed["full"]["threads_1"]["batch_64"] / timed["pruned"]["threads_1"]["batch_64"])
    assert set(timed) == set(study["accuracy"]) and all(
        set(table) == {"threads_1", "threads_2"} for table in timed.values())
    table = (output / "study.md").read_text()
    assert "| distilled | 92.23 ± 0.15 | 92.10 | 92.20 | 92.40 |" in table
    assert "distilled beats its twin by more than the seeds' spread* holds" in table
    assert (output / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distillation_holds_only_beyond_the_spread_of_the_seeds() -> None:
    # Distillation wins every seed by 0.2 pts: beyond seeds that spread 0.1 pts, not beyond seeds that spread 0.3.
    tight = [cards(s, accuracies(0.93, 0.927, d, d - 0.002)) for s, d in enumerate((0.920, 0.921, 0.922))]
    loose = [cards(s, accuracies(0.93, 0.927, d, d - 0.002)) for s, d in enumerate((0.917, 0.921, 0.923))]
    held = summarise([0, 1, 2], tight, latency(80.0, 30.0)).distillation
    assert held is not None and held.beyond_spread
    verdict = summarise([0, 1, 2], loose, latency(80.0, 30.0)).distillation
    assert verdict is not None and not verdict.beyond_spread
    assert verdict.difference.values == pytest.approx([0.2, 0.2, 0.2])
    assert verdict.distilled.std == pytest.approx(statistics.stdev([91.7, 92.1, 92.3]))


@pytest.mark.parametrize(("pruned_parameters", "pruned_accuracy", "pruned_ms", "missed"), [
    (250, 0.926, 30.0, set()),
    (310, 0.926, 30.0, {"parameters"}),
    (250, 0.924, 30.0, {"loss"}),
    (250, 0.926, 41.0, {"faster"}),
])
def test_pruning_targets(pruned_parameters: int, pruned_accuracy: float, pruned_ms: float, missed: set[str]) -> None:
    runs = [cards(seed, accuracies(0.93, pruned_accuracy, 0.92, 0.91), pruned_parameters) for seed in range(3)]
    pruning = summarise([0, 1, 2], runs, latency(80.0, pruned_ms)).pruning
    assert pruning is not None
    assert {word for target, met in pruning.meets.items() if not met
            for word in ("parameters", "loss", "faster") if word in target} == missed


def test_runs_that_cannot_be_compared_are_refused(chain: Chain, tmp_path: Path) -> None:
    figure = accuracies(0.93, 0.926, 0.921, 0.917)
    first = copy_run(chain, tmp_path / "a", 1, figure)
    same_seed = copy_run(chain, tmp_path / "b", 1, figure)
    with pytest.raises(ValueError, match="same seed"):
        load_runs([first, same_seed])
    fewer = copy_run(chain, tmp_path / "c", 2, figure)
    (fewer / "student_baseline.card.json").unlink()
    with pytest.raises(ValueError, match="different variants"):
        load_runs([first, fewer])
    unseeded = copy_run(chain, tmp_path / "d", 3, figure)
    card = json.loads((unseeded / "full.card.json").read_text())
    del card["seed"]
    (unseeded / "full.card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="one seed"):
        load_runs([first, unseeded])
    result = run_module("training.study", "--runs", str(first), "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "at least 3 seeds" in result.stderr


def test_spread_is_the_mean_and_sample_standard_deviation() -> None:
    spread = Spread.of([92.0, 93.0, 94.0])
    assert (spread.mean, spread.std, spread.pts()) == (93.0, 1.0, "93.00 ± 1.00")


class Recorder(nn.Module):
    """Sleeps `seconds` per call and notes its name in a shared log."""

    def __init__(self, name: str, seconds: float, calls: list[str]) -> None:
        super().__init__()
        self.name, self.seconds, self.calls = name, seconds, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        time.sleep(self.seconds)
        return x


def test_interleaved_timing_alternates_the_models_and_tells_them_apart() -> None:
    calls: list[str] = []
    models = {"fast": Recorder("fast", 0.001, calls), "slow": Recorder("slow", 0.004, calls)}
    timed = measure_latency_interleaved(models, batch_sizes=(1,), threads=(1,), rounds=4, passes=2, warmup=1)
    # After one warm-up call each: rounds of two passes, the models taking turns.
    assert calls == ["fast", "slow"] + ["fast", "fast", "slow", "slow"] * 4
    assert timed["slow"]["threads_1"]["batch_1"] > 2 * timed["fast"]["threads_1"]["batch_1"]
