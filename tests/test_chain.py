"""The real training scripts, run with --dry-run, and what they leave behind."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashion_cnn import ARCHITECTURES, FORMAT_STATE_DICT, load_model, sha256_file
from tests.conftest import REPO, Chain, run_module
from training import distill, prune, quantize, train
from training.cli import DRY_RUN_TEST_IMAGES, apply_recipe
from training.data import load_split
from training.prune import kept_count
from training.quantize import packed_layers
from training.recipes import RECIPES

VARIANTS = ["full", "pruned", "int8", "distilled", "student_baseline"]
CARD_FIELDS = {
    "variant", "dataset", "format", "test_accuracy", "per_class_accuracy", "parameters", "file_bytes",
    "sha256", "latency_ms", "recipe", "parent", "versions", "created", "model_args", "seed",
}

# Runs in a fresh interpreter that can import fashion_cnn (copied beside the weights) and torch, nothing of
# the project's training code: what a .mar carries.
FRESH_PROCESS = """
import json, sys
sys.modules["training"] = None  # any import of the training package fails here
sys.path.insert(0, sys.argv[1])
import torch, fashion_cnn
assert fashion_cnn.__file__.startswith(sys.argv[1]), fashion_cnn.__file__
card = json.load(open(sys.argv[3]))
model = fashion_cnn.load_model(sys.argv[2], card["format"])
subset = torch.load(sys.argv[4], weights_only=True)
with torch.inference_mode():
    predictions = model(fashion_cnn.normalize(subset["images"], card["dataset"])).argmax(1)
print(json.dumps({"accuracy": (predictions == subset["labels"]).float().mean().item()}))
"""


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_has_a_complete_card(chain: Chain, name: str) -> None:
    card = chain.card(name)
    assert set(card) >= CARD_FIELDS
    weights = chain.weights(name)
    assert card["sha256"] == sha256_file(weights)
    assert card["file_bytes"] == weights.stat().st_size
    assert card["test_images"] == DRY_RUN_TEST_IMAGES
    assert len(card["per_class_accuracy"]) == 10
    assert set(card["latency_ms"]) == {"threads_1", "threads_2"}
    assert card["recipe"]["dry_run"] is True and card["seed"] == card["recipe"]["seed"] == 0
    assert card["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("name", ["pruned", "int8", "distilled"])
def test_derived_variants_name_their_parent_by_hash(chain: Chain, name: str) -> None:
    assert chain.card(name)["parent"]["sha256"] == sha256_file(chain.weights("full"))


@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_process_with_only_the_model_module_reproduces_the_card(
    chain: Chain, name: str, tmp_path: Path
) -> None:
    isolated = tmp_path / "mar"
    isolated.mkdir()
    shutil.copy(REPO / "fashion_cnn.py", isolated)
    shutil.copy(chain.weights(name), isolated)
    shutil.copy(chain.directory / f"{name}.card.json", isolated)
    test = load_split("fashion-mnist", "test").subset(DRY_RUN_TEST_IMAGES)
    torch.save({"images": test.images, "labels": test.labels}, tmp_path / "subset.pt")

    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", FRESH_PROCESS, str(isolated), str(isolated / f"{name}.pt"),
         str(isolated / f"{name}.card.json"), str(tmp_path / "subset.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads(result.stdout)["accuracy"]
    assert accuracy == pytest.approx(chain.card(name)["test_accuracy"], abs=1.5 / DRY_RUN_TEST_IMAGES)


def test_pruned_is_physically_smaller(chain: Chain) -> None:
    full, pruned = chain.card("full"), chain.card("pruned")
    assert pruned["parameters"] <= 0.3 * full["parameters"]
    assert pruned["file_bytes"] <= 0.3 * full["file_bytes"]
    model = load_model(chain.weights("pruned"), FORMAT_STATE_DICT)
    assert sum(p.numel() for p in model.parameters()) == pruned["parameters"]
    recipe, full_args = pruned["recipe"], full["model_args"]
    assert pruned["model_args"]["conv1"] == kept_count(full_args["conv1"], recipe["conv1_keep"])
    assert pruned["model_args"]["conv2"] == kept_count(full_args["conv2"], recipe["conv2_keep"])
    assert pruned["model_args"]["hidden"] == kept_count(full_args["hidden"], recipe["fc_keep"])


def test_int8_file_holds_int8_weights_for_every_conv_and_linear(chain: Chain) -> None:
    card = chain.card("int8")
    layers = packed_layers(torch.jit.load(str(chain.weights("int8"))))
    assert sorted(kind for kind, _, _ in layers) == ["conv2d", "conv2d", "linear", "linear"]
    assert all(weight.dtype == torch.qint8 for _, weight, _ in layers)
    assert card["file_bytes"] <= 0.3 * chain.card("full")["file_bytes"]
    assert card["parameters"] == chain.card("full")["parameters"]
    assert "torch.ao.quantization" in card["quantization"]["api"]


# What the distilled student and its no-distillation baseline must share for the comparison to mean something.
SHARED_BUDGET = ("arch", "dropout", "epochs", "lr", "weight_decay", "batch_size", "seed", "bf16", "train_subset",
                 "augment", "max_shift", "flip", "random_erasing")


def test_distilled_student_is_small_and_baseline_shares_its_budget(chain: Chain) -> None:
    distilled, baseline = chain.card("distilled"), chain.card("student_baseline")
    assert distilled["parameters"] <= 0.05 * chain.card("full")["parameters"]
    assert distilled["model_args"] == baseline["model_args"]
    assert baseline["variant"] == "student-baseline" and baseline["parent"] is None
    assert distilled["recipe"]["temperature"] > 0 and 0 <= distilled["recipe"]["alpha"] <= 1
    assert {key: baseline["recipe"][key] for key in SHARED_BUDGET} == {
        key: distilled["recipe"][key] for key in SHARED_BUDGET}
    # The student's recipe reached both scripts (the full model's has no random erasing).
    erasing = RECIPES["student"].augmentation.erase_probability
    assert distilled["recipe"]["random_erasing"] == erasing != chain.card("full")["recipe"]["random_erasing"]


SCRIPTS = {"training.train": train, "training.prune": prune, "training.quantize": quantize,
           "training.distill": distill}
# All `make train` may pass: where the data and the files are, the run's seed, and which model a script trains.
PLACES = {"--dataset", "--data-dir", "--output", "--parent", "--teacher", "--checkpoints", "--output-dir", "--seed"}
MODEL_CHOICE = {"--arch", "--variant"}


def make_train_commands(tmp_path: Path, target: str = "study-run", *settings: str) -> dict[str, list[str]]:
    """The training commands a make target runs (`make -n`: printed, not run), by the checkpoint each writes.
    `study-run`, one seed's run of `make study`: make train's chain and the distilled student's no-teacher twin."""
    env = {key: value for key, value in os.environ.items()
           if not key.endswith("_FLAGS") and key not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SEED"}}
    printed = subprocess.run(["make", "-n", "-B", target, f"CKPT={tmp_path}", f"REPORTS={tmp_path}", *settings],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    commands = {}
    for line in printed.splitlines():
        words = shlex.split(line)
        if len(words) > 2 and words[1] == "-m" and words[2] in SCRIPTS:
            commands[Path(words[words.index("--output") + 1]).stem] = words[2:]
    return commands


def parse(command: list[str]) -> argparse.Namespace:
    return SCRIPTS[command[0]].get_args_parser().parse_args(command[1:])


def test_make_train_trains_the_served_variants_and_the_study_adds_the_twin(tmp_path: Path) -> None:
    assert sorted(make_train_commands(tmp_path, "train")) == sorted(set(VARIANTS) - {"student_baseline"})
    assert sorted(make_train_commands(tmp_path, "study-run")) == sorted(VARIANTS)


def test_every_script_of_a_run_gets_its_seed(tmp_path: Path) -> None:
    for settings, seed in (((), "0"), (("SEED=3",), "3")):
        commands = make_train_commands(tmp_path, "study-run", *settings)
        assert {name: parse(command).seed for name, command in commands.items()} == {
            name: int(seed) for name in VARIANTS}


def test_make_study_runs_each_seed_and_reuses_make_trains_own(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SEED", "STUDY_SEEDS", "STUDY_DIR", "ATTEMPTS_DIR"}}
    printed = subprocess.run(["make", "-n", "study", f"CKPT={tmp_path}", f"REPORTS={tmp_path}", "STUDY_SEEDS=0 4 5",
                              "STAMP=Makefile"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                             check=True).stdout.replace("\\\n", " ")  # one command per line
    runs = {tmp_path, tmp_path / "study" / "seed-4", tmp_path / "study" / "seed-5"}
    study = next(shlex.split(line) for line in printed.splitlines() if "training.study" in line)
    assert {Path(word) for word in study[study.index("--runs") + 1:study.index("--output-dir")]} == runs
    assert Path(study[study.index("--attempts") + 1]) == tmp_path / "attempts"  # make attempt's folder
    assert {(Path(words[words.index("--output") + 1]).parent, parse(words[2:]).seed)
            for words in map(shlex.split, printed.splitlines()) if len(words) > 2 and words[2] in SCRIPTS} == {
        (tmp_path, 0), (tmp_path / "study" / "seed-4", 4), (tmp_path / "study" / "seed-5", 5)}


def make_attempt_commands(tmp_path: Path, *settings: str) -> list[list[str]]:
    """The training commands `make attempt NAME=try` runs over seeds 0 and 4 (`make -n`: printed, not run)."""
    env = {key: value for key, value in os.environ.items()
           if not key.endswith("_FLAGS") and key not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SEED", "STUDY_SEEDS",
                                                          "STUDY_DIR", "ATTEMPT", "ATTEMPTS_DIR", "TEACHERS", "NAME"}}
    printed = subprocess.run(["make", "-n", "attempt", f"CKPT={tmp_path}", "STUDY_SEEDS=0 4", "STAMP=Makefile",
                              "NAME=try", *settings], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                             check=True).stdout
    commands: list[list[str]] = [[]]
    for word in shlex.split(next(line for line in printed.splitlines() if "-m training." in line)):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return [command[2:] for command in commands if len(command) > 2 and command[2] in SCRIPTS]


def test_make_attempt_trains_each_seed_from_that_seeds_full_model(tmp_path: Path) -> None:
    fulls = {0: tmp_path / "full.pt", 4: tmp_path / "study" / "seed-4" / "full.pt"}
    attempts = tmp_path / "attempts" / "try"
    commands = make_attempt_commands(tmp_path, "ATTEMPT_FLAGS=--attention-weight 1000")
    assert [command[0] for command in commands] == ["training.distill"] * 2
    for command, seed in zip(commands, (0, 4), strict=True):
        args = parse(command)
        assert (args.seed, args.teacher) == (seed, [fulls[seed]])
        assert args.output == attempts / f"seed-{seed}" / "distilled.pt"
        assert args.attention_weight == 1000
    ensemble = [parse(command) for command in make_attempt_commands(tmp_path, "TEACHERS=all")]
    assert [args.teacher for args in ensemble] == [[fulls[0], fulls[4]]] * 2
    pruned = [parse(command) for command in make_attempt_commands(tmp_path, "ATTEMPT=prune",
                                                                  "ATTEMPT_FLAGS=--finetune-epochs 3")]
    assert [(args.parent, args.output.name, args.epochs) for args in pruned] == [
        (fulls[0], "pruned.pt", 3), (fulls[4], "pruned.pt", 3)]


def test_make_attempt_retrains_the_twin_when_the_students_budget_changes(tmp_path: Path) -> None:
    # The student's budget unchanged: the study's own twin is the comparison, none is retrained.
    assert [command[0] for command in make_attempt_commands(tmp_path)] == ["training.distill"] * 2
    commands = make_attempt_commands(tmp_path, "STUDENT_FLAGS=--epochs 12")
    students = [(parse(command).output.parent.name, parse(command).arch, parse(command).epochs)
                for command in commands]
    assert students == [("seed-0", "student", 12)] * 2 + [("seed-4", "student", 12)] * 2
    assert [parse(command).output.name for command in commands] == ["distilled.pt", "student_baseline.pt"] * 2


def test_make_train_passes_no_hyperparameters(tmp_path: Path) -> None:
    commands = make_train_commands(tmp_path)
    assert sorted(commands) == sorted(VARIANTS)
    for name, command in commands.items():
        flags = {word for word in command if word.startswith("--")}
        assert flags <= PLACES | MODEL_CHOICE, (name, flags - PLACES - MODEL_CHOICE)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_script_run_directly_trains_what_make_train_trains(tmp_path: Path, name: str) -> None:
    command = make_train_commands(tmp_path)[name]
    script = command[0]
    # The same script with no flags beyond the model choice: every setting at its default.
    arguments = command[1:]
    direct = [script, *(word for index, word in enumerate(arguments)
                        if word in MODEL_CHOICE or (index > 0 and arguments[index - 1] in MODEL_CHOICE))]
    places = {flag.lstrip("-").replace("-", "_") for flag in PLACES}
    by_make, by_hand = vars(parse(command)), vars(parse(direct))
    assert {k: v for k, v in by_make.items() if k not in places} == {
        k: v for k, v in by_hand.items() if k not in places}


def test_baseline_and_distilled_student_resolve_to_the_same_budget(tmp_path: Path) -> None:
    commands = make_train_commands(tmp_path)
    distilled, baseline = parse(commands["distilled"]), parse(commands["student_baseline"])
    assert distilled.arch == baseline.arch == "student"
    for args in (distilled, baseline):
        apply_recipe(args, RECIPES[args.arch])
    assert {key: getattr(baseline, key) for key in SHARED_BUDGET} == {
        key: getattr(distilled, key) for key in SHARED_BUDGET}
    assert distilled.epochs == RECIPES["student"].epochs != RECIPES["full"].epochs


def test_flags_given_win_over_the_recipe_and_unset_ones_take_it() -> None:
    args = train.get_args_parser().parse_args(["--arch", "student", "--epochs", "3", "--flip",
                                               "--random-erasing", "0"])
    apply_recipe(args, RECIPES["student"])
    recipe = RECIPES["student"]
    assert (args.epochs, args.flip, args.random_erasing) == (3, True, 0.0)  # given, even where falsy
    assert (args.lr, args.weight_decay, args.max_shift) == (
        recipe.lr, recipe.weight_decay, recipe.augmentation.max_shift)


def test_every_architecture_has_a_recipe() -> None:
    assert set(RECIPES) == set(ARCHITECTURES)


def test_same_seed_gives_the_same_weights(chain: Chain, tmp_path: Path) -> None:
    again = tmp_path / "full.pt"
    run_module("training.train", "--dry-run", "--output", str(again))
    first = torch.load(chain.weights("full"), weights_only=True)["state_dict"]
    second = torch.load(again, weights_only=True)["state_dict"]
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_report_builds_table_and_plot_from_the_cards(chain: Chain, tmp_path: Path) -> None:
    run_module("training.report", "--checkpoints", str(chain.directory), "--output-dir", str(tmp_path),
               "--rounds", "2")
    table = (tmp_path / "variants.md").read_text()
    assert "timed interleaved" in table
    for variant in ["full", "pruned", "int8", "distilled", "student-baseline"]:
        assert f"| {variant} |" in table
    assert (tmp_path / "variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_cards_says_what_to_run(tmp_path: Path) -> None:
    result = run_module("training.report", "--checkpoints", str(tmp_path), "--output-dir", str(tmp_path),
                        check=False)
    assert result.returncode == 1 and "make train" in result.stderr
