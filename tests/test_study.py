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
from training.study import Spread, load_attempts, load_runs, recipe_changes, summarise

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


def attempt_run(chain: Chain, directory: Path, seed: int, accuracy: dict[str, float],
                names: tuple[str, ...] = ("distilled",), **recipe: Any) -> None:
    """One seed of an attempt (as `make attempt` writes it): the chain's cards of `names`, with `recipe` changed."""
    directory.mkdir(parents=True)
    for name in names:
        card = dict(chain.card(name))
        card.update(seed=seed, test_accuracy=accuracy[card["variant"]], recipe={**card["recipe"], **recipe})
        (directory / f"{name}.card.json").write_text(json.dumps(card))


def test_the_study_judges_each_attempt_as_its_own_run_of_the_variant_is(chain: Chain, tmp_path: Path) -> None:
    seeds, twins = (0, 7, 8), (0.917, 0.919, 0.918)
    runs = [copy_run(chain, tmp_path / f"seed-{seed}", seed, accuracies(0.93, 0.924, 0.915, twin))
            for seed, twin in zip(seeds, twins, strict=True)]
    attempts = tmp_path / "attempts"
    for seed, gain in zip(seeds, (0.004, 0.005, 0.006), strict=True):  # +0.5 pt over the twin, spread 0.1
        twin = twins[seeds.index(seed)]
        attempt_run(chain, attempts / "alpha" / f"seed-{seed}", seed, {"distilled": twin + gain}, alpha=0.25)
        # A longer budget for both students: judged against its own twin (here 0.5 pt better), not the study's.
        attempt_run(chain, attempts / "longer" / f"seed-{seed}", seed,
                    {"distilled": twin + gain, "student-baseline": twin + 0.005}, ("distilled", "student_baseline"),
                    epochs=12)
        attempt_run(chain, attempts / "finetune" / f"seed-{seed}", seed, {"pruned": 0.926}, ("pruned",),
                    epochs=3)  # --finetune-epochs 3; 0.4 pt below full: within the 0.5 pt target
    attempt_run(chain, attempts / "unfinished" / "seed-0", 0, {"distilled": 0.99})  # one seed of three
    output = tmp_path / "report"
    run_module("training.study", "--runs", *map(str, runs), "--output-dir", str(output), "--rounds", "1",
               "--attempts", str(attempts))
    judged = {attempt["name"]: attempt for attempt in json.loads((output / "study.json").read_text())["attempts"]}
    assert set(judged) == {"alpha", "longer", "finetune"}  # the unfinished one cannot be paired by seed
    alpha, longer, finetune = judged["alpha"], judged["longer"], judged["finetune"]
    assert alpha["changes"] == {"alpha": [chain.card("distilled")["recipe"]["alpha"], 0.25]}
    assert alpha["distillation"]["difference"]["values"] == pytest.approx([0.4, 0.5, 0.6])
    assert alpha["judged_against"] == "the study's twin" and alpha["holds"] is True
    assert longer["changes"] == {"epochs": [chain.card("distilled")["recipe"]["epochs"], 12]}
    assert longer["judged_against"] == "its own twin" and longer["holds"] is False  # level with its own twin
    assert longer["distillation"]["difference"]["values"] == pytest.approx([-0.1, 0.0, 0.1])
    assert finetune["variant"] == "pruned" and finetune["pruning"]["loss"]["mean"] == pytest.approx(0.4)
    # The dry-run chain's pruned model, timed in the same rounds as its full model: its speed-up is the study's.
    assert finetune["pruning"]["speedup_b64_1_thread"] == json.loads(
        (output / "study.json").read_text())["pruning"]["speedup_b64_1_thread"]
    assert finetune["changes"] == {"epochs": [chain.card("pruned")["recipe"]["epochs"], 3]}
    assert finetune["holds"] is all(finetune["pruning"]["meets"].values())
    table = (output / "study.md").read_text()
    assert f"| alpha | distilled | alpha {chain.card('distilled')['recipe']['alpha']} → 0.25 |" in table
    assert "Δ vs the study's twin 0.50 ± 0.10 (+0.40, +0.50, +0.60) | beats the twin beyond the spread |" in table
    assert "| longer | distilled | epochs" in table
    assert "Δ vs its own twin 0.00 ± 0.10 (-0.10, +0.00, +0.10) | does not beat the twin |" in table


def recipe_cards(seed: int, accuracy: dict[str, float]) -> dict[str, dict[str, Any]]:
    """cards() with the recipes and architectures the attempts are compared by."""
    made = cards(seed, accuracy)
    for variant, card in made.items():
        card["recipe"] = {"epochs": 6, "alpha": 0.9, "teacher": [f"seed-{seed}/full.pt"], "seed": seed}
        card["model_args"] = {"conv1": 40 if variant == "pruned" else 64}
    return made


def test_a_budget_change_without_its_own_twin_is_not_judged_and_another_pruned_shape_is_timed() -> None:
    runs = [recipe_cards(s, accuracies(0.93, 0.926, 0.92, 0.91)) for s in range(3)]
    longer = [{"distilled": {**run["distilled"], "recipe": {**run["distilled"]["recipe"], "epochs": 12},
                             "test_accuracy": 0.95}} for run in runs]
    narrower = [{"pruned": {**run["pruned"], "model_args": {"conv1": 24}, "parameters": 100}} for run in runs]
    timing = latency(80.0, 30.0) | {"attempt narrower": latency(80.0, 20.0)["pruned"]}
    study = summarise([0, 1, 2], runs, timing, {"longer": longer, "narrower": narrower})
    # 12 epochs against the study's 6-epoch twin would measure the budget, not distillation: left out.
    assert [attempt.name for attempt in study.attempts] == ["narrower"]
    pruning = study.attempts[0].pruning
    assert pruning is not None and pruning.speedup_b64_1_thread == pytest.approx(4.0)  # its own timing, not 80/30
    assert pruning.parameter_reduction == pytest.approx(0.9) and study.attempts[0].holds
    assert set(study.latency) == set(study.accuracy)  # the attempt's timing stays out of the variants' table


def test_recipe_changes_count_teachers_and_ignore_each_runs_own_paths() -> None:
    study = {"recipe": {"teacher": ["a/full.pt"], "alpha": 0.9, "output": "a/distilled.pt", "seed": 0}}
    ensemble = {"recipe": {"teacher": ["b/full.pt", "c/full.pt", "d/full.pt"], "alpha": 0.9,
                           "output": "b/distilled.pt", "seed": 1}}
    assert recipe_changes(study, ensemble) == {"teacher": [1, 3]}
    assert recipe_changes(study, {"recipe": {**study["recipe"], "teacher": ["z/full.pt"], "seed": 4}}) == {}


def test_recipe_changes_name_what_the_model_itself_changed() -> None:
    """A pruned card from before --dropout existed records no dropout in its recipe, only in its model_args."""
    study = {"recipe": {"conv1_keep": 0.5, "dropout": 0.0}, "model_args": {"conv1": 32, "dropout": 0.0}}
    older = {"recipe": {"conv1_keep": 0.625}, "model_args": {"conv1": 40, "dropout": 0.3}}
    assert recipe_changes(study, older) == {"conv1_keep": [0.5, 0.625], "model_args.conv1": [32, 40],
                                            "model_args.dropout": [0.0, 0.3]}


def test_an_attempt_missing_a_seed_or_holding_two_variants_is_left_out(chain: Chain, tmp_path: Path) -> None:
    for seed in (0, 1):
        attempt_run(chain, tmp_path / "both" / f"seed-{seed}", seed, {"distilled": 0.9, "pruned": 0.9},
                    ("distilled", "pruned"))
        attempt_run(chain, tmp_path / "good" / f"seed-{seed}", seed, {"distilled": 0.9})
    attempt_run(chain, tmp_path / "missing" / "seed-0", 0, {"distilled": 0.9})
    attempt_run(chain, tmp_path / "reseeded" / "seed-0", 0, {"distilled": 0.9})
    attempt_run(chain, tmp_path / "reseeded" / "seed-1", 5, {"distilled": 0.9})  # its card says another seed
    assert set(load_attempts(tmp_path, [0, 1])) == {"good"}
    assert load_attempts(tmp_path / "nowhere", [0, 1]) == {}


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
