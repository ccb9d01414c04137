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
    first run's models: speed is the architecture's, not the seed's.

Usage:
    make study                                   # STUDY_SEEDS="0 1 2": make train's chain for each, then this
    python -m training.study --runs checkpoints checkpoints/study/seed-1 checkpoints/study/seed-2
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
class Study:
    seeds: list[int]
    dataset: str
    accuracy: dict[str, Spread]  # percent, by variant
    parameters: dict[str, int]
    latency: dict[str, Latency]
    distillation: Distillation | None
    pruning: Pruning | None


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


def summarise(seeds: list[int], runs: list[dict[str, dict[str, Any]]], latency: dict[str, Latency]) -> Study:
    variants = list(runs[0])
    accuracy = {v: Spread.of([run[v]["test_accuracy"] * 100 for run in runs]) for v in variants}
    parameters = {v: runs[0][v]["parameters"] for v in variants}

    def paired(a: str, b: str) -> Spread:
        return Spread.of([(run[a]["test_accuracy"] - run[b]["test_accuracy"]) * 100 for run in runs])

    distillation = None
    if {"distilled", "student-baseline"} <= set(variants):
        distilled, twin = accuracy["distilled"], accuracy["student-baseline"]
        distillation = Distillation(distilled, twin, paired("distilled", "student-baseline"),
                                    beyond_spread=distilled.mean - twin.mean > max(distilled.std, twin.std))
    pruning = None
    if {"full", "pruned"} <= set(variants):
        reduction = 1 - parameters["pruned"] / parameters["full"]
        loss = paired("full", "pruned")
        faster = speedup(latency, "pruned")
        pruning = Pruning(reduction, loss, faster, {
            f"≥ {PRUNED_MIN_PARAMETER_REDUCTION:.0%} fewer parameters": reduction >= PRUNED_MIN_PARAMETER_REDUCTION,
            f"≤ {PRUNED_MAX_LOSS_PTS} pt loss (mean over seeds)": loss.mean <= PRUNED_MAX_LOSS_PTS,
            f"≥ {PRUNED_MIN_SPEEDUP:.0f}× faster at batch 64, 1 thread": faster >= PRUNED_MIN_SPEEDUP,
        })
    return Study(seeds, runs[0][variants[0]]["dataset"], accuracy, parameters, latency, distillation, pruning)


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
    lines.append("![accuracy over seeds](study.png)")
    return "\n".join(lines) + "\n"


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
    latency = time_interleaved(list(runs[0].values()), args.runs[0], rounds=args.rounds)
    study = summarise(seeds, runs, latency)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "study.md").write_text(markdown(study, args.rounds))
    (args.output_dir / "study.json").write_text(json.dumps(asdict(study), indent=2) + "\n")
    plot(study, args.output_dir / "study.png")
    log.info("%s", markdown(study, args.rounds))
    log.info("wrote %s", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
