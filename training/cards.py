"""Model cards: the JSON next to every checkpoint that says what it is, how well it does and how it was made."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from fashion_cnn import load_model, sha256_file
from training.data import Split
from training.engine import evaluate, measure_latency

log = logging.getLogger(__name__)

CARD_SUFFIX = ".card.json"


def card_path(weights_path: str | Path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.stem + CARD_SUFFIX)


def parent_reference(parent_path: str | Path | None) -> dict[str, str] | None:
    if parent_path is None:
        return None
    return {"path": str(parent_path), "sha256": sha256_file(parent_path)}


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    def plain(value: Any) -> Any:  # paths, alone or in a list (several teachers), as JSON strings
        if isinstance(value, list):
            return [plain(item) for item in value]
        return str(value) if isinstance(value, Path) else value

    return {key: plain(value) for key, value in sorted(vars(args).items())}


def write_card(
    weights_path: str | Path,
    *,
    variant: str,
    model_format: str,
    test_split: Split,
    parameters: int,
    args: argparse.Namespace,
    parent: str | Path | None,
    model_args: dict[str, Any],
    history: list[dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
    latency_repeats: int,
) -> dict[str, Any]:
    """Reload the saved file the way a server would, measure it, and write its card beside it.

    Accuracy and latency are measured on the reloaded model, not the in-memory one, so the card describes
    the file that ships (a saved form that reloads wrong is caught here).
    """
    weights_path = Path(weights_path)
    model: nn.Module = load_model(weights_path, model_format)
    evaluation = evaluate(model, test_split)
    card: dict[str, Any] = {
        "variant": variant,
        "file": weights_path.name,
        "format": model_format,
        "dataset": test_split.dataset,
        "model_args": model_args,
        # What a several-seed study (training.study) groups runs by; also in the recipe.
        "seed": args.seed,
        "test_accuracy": evaluation.accuracy,
        "test_images": evaluation.count,
        "per_class_accuracy": evaluation.per_class_accuracy,
        "parameters": parameters,
        "file_bytes": weights_path.stat().st_size,
        "sha256": sha256_file(weights_path),
        "latency_ms": measure_latency(model, repeats=latency_repeats),
        "latency_method": "median of repeated forward passes after warm-up, in-process, random input",
        "recipe": recipe_of(args),
        "parent": parent_reference(parent),
        "history": history or [],
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if extra:
        card.update(extra)
    with open(card_path(weights_path), "w") as handle:
        json.dump(card, handle, indent=2)
        handle.write("\n")
    log.info(
        "%s: accuracy %.4f, %d parameters, %d bytes -> %s",
        variant, card["test_accuracy"], parameters, card["file_bytes"], card_path(weights_path),
    )
    return card
