"""The chain over several seeds: does compression hold up beyond one lucky seed?

Reads the cards of one `make train` chain per seed (`make study` trains them) and writes `reports/study/`:
  * every variant's test accuracy, mean ± sample standard deviation over the seeds, beside each seed's figure;
  * the distillation claim: the distilled student against its no-teacher twin (same architecture, budget, augmentation
    and seed; `student-baseline`). It holds when the difference of the two arms' means is larger than the spread of
    either arm over the seeds (the larger of their two standard deviations), the issue's test; the per-seed
    differences are shown beside it;
  * the pruning targets: at least 70 % fewer parameters, at most 0.5 pt below the full model (mean of the per-seed
    losses), at least 2× faster than the full model at batch 64 on one thread;
  * latency of every variant, timed interleaved in this one process (`training.report.time_interleaved`) on the
    first run's models: speed is the architecture's, not the seed's;
  * the attempts (`make attempt`, one folder per attempt under `--attempts`, one `seed-N` folder per seed): other
    recipes for the distilled or the pruned model, trained for the same seeds, each judged as the study's own run of
    that variant is (the distilled one against the same seed's twin, the pruned one against the same seed's full
    model), with what it changed from the study's recipe read from the cards.

Usage:
    make study                                   # STUDY_SEEDS="0 1 2": make train's chain for each, then this
    python -m training.study --runs checkpoints checkpoints/study/seed-1 checkpoints/study/seed-2 \
        --attempts checkpoints/attempts
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.engine import INTERLEAVED_PASSES, INTERLEAVED_ROUNDS
from training.report import LATENCY_METHOD, Latency, load_cards, speedup, time_interleaved

log = logging.getLogger(__name__)

MIN_SEEDS = 3
# The pruning targets (issue "Compression that holds up").
PRUNED_MIN_PARAMETER_REDUCTION = 0.70
PRUNED_MAX_LOSS_PTS = 0.5
PRUNED_MIN_SPEEDUP = 2.0
# The variants an attempt may retrain, and the recipe values that name a run's own files rather than its recipe.
ATTEMPT_VARIANTS = ("distilled", "pruned")
PER_RUN_VALUES = {"output", "seed", "data_dir", "parent", "dry_run", "latency_repeats"}
# What a distillation attempt may change and still be judged against the study's twin: the teaching, not the budget.
DISTILLATION_ONLY = {"teacher", "temperature", "alpha", "attention_weight"}


@dataclass(frozen=True)
class Spread:
    """Values over the seeds (in seed order), their mean and sample standard deviation."""

    values: list[float]
    mean: float
    std: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(values, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    def pts(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class Distillation:
    distilled: Spread  # test accuracy, percent
    twin: Spread
    difference: Spread  # distilled − twin, per seed, in points
    beyond_spread: bool


@dataclass(frozen=True)
class Pruning:
    parameter_reduction: float
    loss: Spread  # full − pruned, per seed, in points
    speedup_b64_1_thread: float
    meets: dict[str, bool]


@dataclass(frozen=True)
class Attempt:
    """Another recipe for the distilled or pruned model over the study's seeds, judged as the study's own run of that
    variant is (`judge_distillation`, `judge_pruning`)."""

    name: str  # its folder under --attempts
    variant: str
    changes: dict[str, list[Any]]  # recipe value: [the study's, the attempt's], where they differ
    parameters: int
    accuracy: Spread  # percent
    judged_against: str  # "the study's twin", "its own twin" (trained beside it, same budget) or "full"
    distillation: Distillation | None
    pruning: Pruning | None
    holds: bool  # distillation: beyond the spread; pruning: every target met


@dataclass(frozen=True)
class Study:
    seeds: list[int]
    dataset: str
    accuracy: dict[str, Spread]  # percent, by variant
    parameters: dict[str, int]
    latency: dict[str, Latency]
    distillation: Distillation | None
    pruning: Pruning | None
    attempts: list[Attempt]


def load_runs(directories: list[Path]) -> tuple[list[int], list[dict[str, dict[str, Any]]]]:
    """Each run's cards by variant, and its seed; refuses runs that cannot be compared."""
    seeds, runs = [], []
    for directory in directories:
        cards = load_cards(directory)
        if not cards:
            raise ValueError(f"no model cards in {directory}; run `make study` (or `make train`) first")
        run_seeds = {card.get("seed") for card in cards}
        seed = next(iter(run_seeds))
        if len(run_seeds) != 1 or seed is None:
            raise ValueError(f"the cards in {directory} do not record one seed: {sorted(map(str, run_seeds))}")
        seeds.append(int(seed))
        runs.append({card["variant"]: card for card in cards})
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two runs have the same seed: {seeds}")
    variant_sets = {tuple(sorted(run)) for run in runs}
    if len(variant_sets) != 1:
        raise ValueError(f"the runs hold different variants: {sorted(variant_sets)}")
    return seeds, runs


def accuracies(cards: list[dict[str, Any]]) -> Spread:
    return Spread.of([card["test_accuracy"] * 100 for card in cards])


def paired(cards: list[dict[str, Any]], references: list[dict[str, Any]]) -> Spread:
    """Per seed, in points: each card's test accuracy minus that of the reference of the same seed."""
    return Spread.of([(card["test_accuracy"] - reference["test_accuracy"]) * 100
                      for card, reference in zip(cards, references, strict=True)])


def judge_distillation(distilled: list[dict[str, Any]], twins: list[dict[str, Any]]) -> Distillation:
    """Distillation pays when the difference of the means is larger than either arm's spread over the seeds."""
    ours, theirs = accuracies(distilled), accuracies(twins)
    return Distillation(ours, theirs, paired(distilled, twins),
                        beyond_spread=ours.mean - theirs.mean > max(ours.std, theirs.std))


def judge_pruning(pruned: list[dict[str, Any]], fulls: list[dict[str, Any]], faster: float) -> Pruning:
    reduction = 1 - pruned[0]["parameters"] / fulls[0]["parameters"]
    loss = paired(fulls, pruned)
    return Pruning(reduction, loss, faster, {
        f"≥ {PRUNED_MIN_PARAMETER_REDUCTION:.0%} fewer parameters": reduction >= PRUNED_MIN_PARAMETER_REDUCTION,
        f"≤ {PRUNED_MAX_LOSS_PTS} pt loss (mean over seeds)": loss.mean <= PRUNED_MAX_LOSS_PTS,
        f"≥ {PRUNED_MIN_SPEEDUP:.0f}× faster at batch 64, 1 thread": faster >= PRUNED_MIN_SPEEDUP,
    })


def load_attempts(directory: Path, seeds: list[int]) -> dict[str, list[dict[str, dict[str, Any]]]]:
    """Each attempt's cards by variant, one dict per study seed (in the study's order), by attempt name: a distilled
    or a pruned card, and the attempt's own no-teacher twin on every seed where it retrained one (a changed student
    budget). An attempt that cannot be paired seed by seed with the study is left out, with a warning."""
    attempts: dict[str, list[dict[str, dict[str, Any]]]] = {}
    if not directory.is_dir():
        return attempts
    for folder in sorted(path for path in directory.iterdir() if path.is_dir()):
        per_seed = [{card["variant"]: card for card in load_cards(folder / f"seed-{seed}")} for seed in seeds]
        variants = {tuple(sorted(run)) for run in per_seed}  # the same on every seed: the twin on all or none
        kinds = [variant for variant in ATTEMPT_VARIANTS if variant in per_seed[0]]
        seeded = all(card.get("seed") == seed for run, seed in zip(per_seed, seeds, strict=True)
                     for card in run.values())
        if (len(variants) == 1 and len(kinds) == 1 and seeded
                and not any(recipe_changes(per_seed[0][kinds[0]], run[kinds[0]]) for run in per_seed)):
            attempts[folder.name] = per_seed
        else:
            log.warning("attempt %s left out: it needs, in %s/seed-N for each seed %s, one distilled or pruned card "
                        "of that seed, all of one recipe (and the twin on every seed or on none)",
                        folder.name, folder, seeds)
    return attempts


def recipe_changes(reference: dict[str, Any], attempt: dict[str, Any]) -> dict[str, list[Any]]:
    """The recipe values where the attempt's card differs from the reference card, and the model's own arguments
    (`model_args.…`: its widths, or a dropout taken from the parent before a flag recorded it). Teachers count as how
    many there are (their paths are each seed's own); a value only one card records (a newer script's flag) is not
    compared."""
    def comparable(card: dict[str, Any]) -> dict[str, Any]:
        values = {key: value for key, value in card["recipe"].items() if key not in PER_RUN_VALUES}
        if "teacher" in values:
            values["teacher"] = len(values["teacher"]) if isinstance(values["teacher"], list) else 1
        return values | {f"model_args.{key}": value for key, value in card.get("model_args", {}).items()}

    ours, theirs = comparable(reference), comparable(attempt)
    return {key: [ours[key], theirs[key]] for key in sorted(ours.keys() & theirs.keys()) if ours[key] != theirs[key]}


def attempt_name(name: str) -> str:
    """The name an attempt's model is timed under, beside the study's variants."""
    return f"attempt {name}"


def needs_timing(attempt: list[dict[str, dict[str, Any]]], runs: list[dict[str, dict[str, Any]]]) -> bool:
    """A pruned attempt of another architecture than the study's pruned model: its speed is its own."""
    return "pruned" in attempt[0] and attempt[0]["pruned"]["model_args"] != runs[0]["pruned"]["model_args"]


def judge_attempt(name: str, attempt: list[dict[str, dict[str, Any]]], runs: list[dict[str, dict[str, Any]]],
                  latency: dict[str, Latency]) -> Attempt | None:
    variant = next(v for v in ATTEMPT_VARIANTS if v in attempt[0])
    reference = "student-baseline" if variant == "distilled" else "full"
    if variant not in runs[0] or reference not in runs[0]:
        log.warning("attempt %s left out: the study's runs hold no %s to judge it by",
                    name, variant if variant not in runs[0] else reference)
        return None
    cards = [seed[variant] for seed in attempt]
    changes = recipe_changes(runs[0][variant], cards[0])
    if variant == "pruned":
        timed = attempt_name(name) if needs_timing(attempt, runs) else "pruned"
        pruning = judge_pruning(cards, [run["full"] for run in runs], speedup(latency, timed))
        return Attempt(name, variant, changes, cards[0]["parameters"], accuracies(cards), "full", None, pruning,
                       holds=all(pruning.meets.values()))
    own_twin = reference in attempt[0]
    if not own_twin and set(changes) - DISTILLATION_ONLY:
        log.warning("attempt %s left out: it changes %s, the student's budget, without a twin trained beside it "
                    "(give budget flags in STUDENT_FLAGS)", name, sorted(set(changes) - DISTILLATION_ONLY))
        return None
    twins = [seed[reference] for seed in attempt] if own_twin else [run[reference] for run in runs]
    distillation = judge_distillation(cards, twins)
    return Attempt(name, variant, changes, cards[0]["parameters"], accuracies(cards),
                   "its own twin" if own_twin else "the study's twin", distillation, None,
                   holds=distillation.beyond_spread)


def summarise(seeds: list[int], runs: list[dict[str, dict[str, Any]]], latency: dict[str, Latency],
              attempts: dict[str, list[dict[str, dict[str, Any]]]] | None = None) -> Study:
    variants = list(runs[0])

    def of(variant: str) -> list[dict[str, Any]]:
        return [run[variant] for run in runs]

    accuracy = {v: accuracies(of(v)) for v in variants}
    parameters = {v: runs[0][v]["parameters"] for v in variants}

    distillation = None
    if {"distilled", "student-baseline"} <= set(variants):
        distillation = judge_distillation(of("distilled"), of("student-baseline"))
    pruning = None
    if {"full", "pruned"} <= set(variants):
        pruning = judge_pruning(of("pruned"), of("full"), speedup(latency, "pruned"))
    judged = [judge_attempt(name, attempt, runs, latency) for name, attempt in (attempts or {}).items()]
    return Study(seeds, runs[0][variants[0]]["dataset"], accuracy, parameters,
                 {name: table for name, table in latency.items() if name in accuracy}, distillation, pruning,
                 [attempt for attempt in judged if attempt is not None])


def markdown(study: Study, rounds: int) -> str:
    seeds = ", ".join(map(str, study.seeds))
    lines = [f"# Compression over {len(study.seeds)} seeds ({study.dataset}; seeds {seeds})", "",
             "| variant | test acc. %, mean ± std | " + " | ".join(f"seed {s}" for s in study.seeds)
             + " | params | ms b1 / b64, 1 thread | b64 speed-up vs full, 1 thread |",
             "|---|---|" + "---|" * len(study.seeds) + "---|---|---|"]
    for variant, spread in study.accuracy.items():
        one_thread = study.latency[variant]["threads_1"]
        faster = f"{speedup(study.latency, variant):.2f}×" if "full" in study.latency else "n/a"
        lines.append(f"| {variant} | {spread.pts()} | " + " | ".join(f"{v:.2f}" for v in spread.values)
                     + f" | {study.parameters[variant]:,} | {one_thread['batch_1']:.2f} / "
                     f"{one_thread['batch_64']:.1f} | {faster} |")
    lines += ["", "Latency: " + LATENCY_METHOD.format(rounds=rounds, passes=INTERLEAVED_PASSES)
              + f" Models of the seed-{study.seeds[0]} run.", ""]
    if study.distillation is not None:
        d = study.distillation
        verdict = "holds" if d.beyond_spread else "does not hold"
        lines += ["## Distillation against its no-teacher twin", "",
                  f"- distilled {d.distilled.pts()} %, twin (student-baseline) {d.twin.pts()} %;",
                  f"- paired by seed, distilled − twin: {d.difference.pts()} pts ("
                  + ", ".join(f"{v:+.2f}" for v in d.difference.values) + ");",
                  f"- the claim *distilled beats its twin by more than the seeds' spread* {verdict}: the difference"
                  f" of the means is {d.distilled.mean - d.twin.mean:+.2f} pts against a spread of "
                  f"{max(d.distilled.std, d.twin.std):.2f}.", ""]
    if study.pruning is not None:
        p = study.pruning
        lines += ["## Pruning against its targets", "",
                  f"- {p.parameter_reduction:.1%} fewer parameters; loss against the full model of the same seed "
                  f"{p.loss.pts()} pts (" + ", ".join(f"{v:+.2f}" for v in p.loss.values) + "); "
                  f"{p.speedup_b64_1_thread:.2f}× faster at batch 64 on one thread (interleaved).", ""]
        lines += [f"- {target}: {'met' if met else 'missed'}" for target, met in p.meets.items()]
        lines.append("")
    if study.attempts:
        lines += attempts_markdown(study)
    lines.append("![accuracy over seeds](study.png)")
    return "\n".join(lines) + "\n"


def attempts_markdown(study: Study) -> list[str]:
    lines = ["## Attempts (`make attempt`), over the same seeds", "",
             "Each is judged as the study's own run of its variant: the distilled student against the same seed's "
             "no-teacher twin (the difference of the means beyond either arm's spread), the pruned model against the "
             "same seed's full model (the three pruning targets; speed from the same interleaved timing).", "",
             "| attempt | variant | changed from the study's recipe | params | test acc. %, mean ± std | "
             "against, pts (per seed) | |",
             "|---|---|---|---|---|---|---|"]
    for attempt in study.attempts:
        changes = "; ".join(f"{key} {old} → {new}" for key, (old, new) in attempt.changes.items()) or "nothing"
        if attempt.distillation is not None:
            difference = attempt.distillation.difference
            against = f"Δ vs {attempt.judged_against} {difference.pts()}"
            verdict = "beats the twin beyond the spread" if attempt.holds else "does not beat the twin"
        else:
            assert attempt.pruning is not None
            pruning = attempt.pruning
            difference = pruning.loss
            against = f"loss vs full {difference.pts()}"
            verdict = (f"{pruning.parameter_reduction:.1%} fewer parameters, {pruning.speedup_b64_1_thread:.2f}× "
                       "faster: " + ("meets the targets" if attempt.holds else "misses " + ", ".join(
                           target for target, met in pruning.meets.items() if not met)))
        lines.append(f"| {attempt.name} | {attempt.variant} | {changes} | {attempt.parameters:,} | "
                     f"{attempt.accuracy.pts()} | {against} (" + ", ".join(f"{v:+.2f}" for v in difference.values)
                     + f") | {verdict} |")
    return [*lines, ""]


def plot(study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(study.accuracy)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for index, variant in enumerate(variants):
        spread = study.accuracy[variant]
        left.scatter([index] * len(spread.values), spread.values, s=18, alpha=0.6, color="tab:blue")
        left.errorbar(index + 0.15, spread.mean, yerr=spread.std, fmt="o", color="black", capsize=4)
    left.set_xticks(range(len(variants)), variants, rotation=20)
    left.set_ylabel(f"test accuracy on {study.dataset} (%)")
    left.set_title(f"Accuracy per seed (dots) and mean ± std, {len(study.seeds)} seeds")
    left.grid(True, axis="y", alpha=0.3)
    if "full" in study.latency:
        right.bar(variants, [speedup(study.latency, v) for v in variants], color="tab:green", alpha=0.7)
        right.axhline(PRUNED_MIN_SPEEDUP, color="gray", linestyle="--", linewidth=1)
        right.set_ylabel("speed-up vs full, batch 64, 1 thread (×)")
        right.set_title("Timed interleaved in one run")
        right.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The compression study over several seeds", add_help=add_help)
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="one checkpoint directory per seed (the first one's models are timed)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports/study"))
    parser.add_argument("--rounds", type=int, default=INTERLEAVED_ROUNDS, help="interleaved timing rounds per cell")
    parser.add_argument("--min-seeds", type=int, default=MIN_SEEDS)
    parser.add_argument("--attempts", type=Path, default=None,
                        help="a folder of attempts (`make attempt`): NAME/seed-N/ per attempt and seed")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(args.runs) < args.min_seeds:
        log.error("the study needs at least %d seeds; got %d runs", args.min_seeds, len(args.runs))
        return 2
    try:
        seeds, runs = load_runs(args.runs)
    except ValueError as error:
        log.error("%s", error)
        return 1
    attempts = load_attempts(args.attempts, seeds) if args.attempts is not None else {}
    others = {attempt_name(name): (args.attempts / name / f"seed-{seeds[0]}", attempt[0]["pruned"])
              for name, attempt in attempts.items() if "pruned" in runs[0] and needs_timing(attempt, runs)}
    latency = time_interleaved(list(runs[0].values()), args.runs[0], rounds=args.rounds, others=others)
    study = summarise(seeds, runs, latency, attempts)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "study.md").write_text(markdown(study, args.rounds))
    (args.output_dir / "study.json").write_text(json.dumps(asdict(study), indent=2) + "\n")
    plot(study, args.output_dir / "study.png")
    log.info("%s", markdown(study, args.rounds))
    log.info("wrote %s", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
