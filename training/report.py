"""Compare the variants: a Markdown table and an accuracy-vs-latency plot.

Accuracy, size and parameters come from the model cards; latency is measured here, every variant in one
process, interleaved (`training.engine.measure_latency_interleaved`), because timings taken minutes apart, as
each card's own are, do not compare: the machine is not the same machine from one minute to the next.

Usage:
    python -m training.report                                   # checkpoints/*.card.json -> reports/
    python -m training.report --checkpoints DIR --output-dir DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fashion_cnn import FORMAT_ONNX, load_model
from training.cards import CARD_SUFFIX
from training.cli import CHECKPOINT_DIR
from training.engine import INTERLEAVED_PASSES, INTERLEAVED_ROUNDS, measure_latency_interleaved

Latency = dict[str, dict[str, float]]  # {"threads_1": {"batch_1": ms, "batch_64": ms}, "threads_2": {...}}

log = logging.getLogger(__name__)

# Served variants first, in the order of the chain; any other card (the no-KD baseline) after them.
VARIANT_ORDER = ("full", "pruned", "int8", "distilled", "student-baseline")


LATENCY_METHOD = ("milliseconds per forward pass, the median over {rounds} rounds of {passes} passes, all variants "
                  "timed interleaved in this one process (random input, after warm-up); not the cards' own "
                  "figures, which were timed minutes apart.")


def load_cards(directory: Path) -> list[dict[str, Any]]:
    """The cards of the variants `make train` (and `make study`) train. The ONNX forms' cards (`make onnx`) are left
    out: they are other runtimes of the same weights, compared by `loadtest.forward_speed` and `make bench`, and an
    ONNX Runtime session's threads are fixed when it is made, so the interleaved timing here cannot vary them."""
    paths = sorted(directory.glob(f"*{CARD_SUFFIX}"))
    cards = [card for card in map(json.loads, (path.read_text() for path in paths)) if card["format"] != FORMAT_ONNX]

    def rank(card: dict[str, Any]) -> tuple[int, str]:
        name = card["variant"]
        return (VARIANT_ORDER.index(name) if name in VARIANT_ORDER else len(VARIANT_ORDER), name)

    return sorted(cards, key=rank)


def _reference(cards: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((card for card in cards if card["variant"] == "full"), None)


def time_interleaved(cards: list[dict[str, Any]], directory: Path, rounds: int = INTERLEAVED_ROUNDS,
                     passes: int = INTERLEAVED_PASSES,
                     others: Mapping[str, tuple[Path, dict[str, Any]]] | None = None) -> dict[str, Latency]:
    """Every card's saved model, loaded as a server loads it and timed interleaved with the others, by variant;
    `others` (name: (directory, card)) join the same rounds under their own names."""
    named = {card["variant"]: (directory, card) for card in cards} | dict(others or {})
    models = {name: load_model(folder / card["file"], card["format"]) for name, (folder, card) in named.items()}
    log.info("timing %s interleaved (%d rounds of %d passes per cell)", ", ".join(models), rounds, passes)
    return measure_latency_interleaved(models, rounds=rounds, passes=passes)


def speedup(latency: dict[str, Latency], variant: str, reference: str = "full", threads: int = 1,
            batch: int = 64) -> float:
    """How many times faster `variant` ran than `reference` in the same interleaved timing."""
    row, column = f"threads_{threads}", f"batch_{batch}"
    return latency[reference][row][column] / latency[variant][row][column]


def markdown_table(cards: list[dict[str, Any]], latency: dict[str, Latency]) -> str:
    full = _reference(cards)
    header = (
        "| variant | test acc. | Δ vs full (pts) | params | params vs full | file | file vs full "
        "| ms b1 / b64, 1 thread | ms b1 / b64, 2 threads | b64 speed-up vs full, 1 thread |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for card in cards:
        lat1, lat2 = latency[card["variant"]]["threads_1"], latency[card["variant"]]["threads_2"]
        if full is not None:
            delta = f"{(card['test_accuracy'] - full['test_accuracy']) * 100:+.2f}"
            params_ratio = f"{card['parameters'] / full['parameters']:.1%}"
            file_ratio = f"{card['file_bytes'] / full['file_bytes']:.1%}"
            faster = f"{speedup(latency, card['variant']):.2f}×"
        else:
            delta = params_ratio = file_ratio = faster = "n/a"
        rows.append(
            f"| {card['variant']} | {card['test_accuracy']:.2%} | {delta} | {card['parameters']:,} "
            f"| {params_ratio} | {card['file_bytes'] / 1e6:.2f} MB | {file_ratio} "
            f"| {lat1['batch_1']:.2f} / {lat1['batch_64']:.1f} | {lat2['batch_1']:.2f} / {lat2['batch_64']:.1f} "
            f"| {faster} |"
        )
    return header + "\n".join(rows) + "\n"


def plot(cards: list[dict[str, Any]], latency: dict[str, Latency], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    largest = max(card["file_bytes"] for card in cards)
    for card in cards:
        milliseconds = latency[card["variant"]]["threads_1"]["batch_64"]
        size = 60 + 1400 * card["file_bytes"] / largest
        axis.scatter(milliseconds, card["test_accuracy"] * 100, s=size, alpha=0.6)
        axis.annotate(
            f"{card['variant']}\n{card['file_bytes'] / 1e6:.2f} MB",
            (milliseconds, card["test_accuracy"] * 100),
            textcoords="offset points", xytext=(8, 6), fontsize=8,
        )
    axis.set_xscale("log")
    axis.set_xlabel("latency, batch 64, 1 thread (ms, log scale)")
    axis.set_ylabel(f"test accuracy on {cards[0]['dataset']} (%)")
    axis.set_title("Variants: accuracy against latency (marker area ∝ file size)")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Report on the variants' model cards", add_help=add_help)
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--output-dir", type=Path, default=Path("reports"))
    parser.add_argument("--rounds", type=int, default=INTERLEAVED_ROUNDS, help="interleaved timing rounds per cell")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cards = load_cards(args.checkpoints)
    if not cards:
        log.error("no model cards (*%s) in %s; run `make train` first", CARD_SUFFIX, args.checkpoints)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    latency = time_interleaved(cards, args.checkpoints, rounds=args.rounds)
    table = markdown_table(cards, latency)
    markdown = args.output_dir / "variants.md"
    image = args.output_dir / "variants.png"
    markdown.write_text(
        f"# Variants ({cards[0]['dataset']}, {cards[0]['test_images']} test images, seed "
        f"{cards[0].get('seed', 'not recorded')})\n\n{table}\n"
        f"Latency: {LATENCY_METHOD.format(rounds=args.rounds, passes=INTERLEAVED_PASSES)}\n\n"
        f"![accuracy against latency]({image.name})\n"
    )
    plot(cards, latency, image)
    log.info("%s", table)
    log.info("wrote %s and %s", markdown, image)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
