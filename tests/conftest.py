"""Shared fixtures: the whole training chain run once, for real, on small subsets (`--dry-run`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Handler modules are imported by their bare names, as TorchServe imports them from an unpacked .mar.
sys.path.insert(0, str(REPO / "handlers"))


def run_module(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` from the repository root, as `make` does."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@dataclass(frozen=True)
class Chain:
    directory: Path

    def weights(self, name: str) -> Path:
        return self.directory / f"{name}.pt"

    def card(self, name: str) -> dict[str, Any]:
        card: dict[str, Any] = json.loads((self.directory / f"{name}.card.json").read_text())
        return card


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """full → pruned, int8, distilled, and the student baseline, each from its real script with --dry-run."""
    directory = tmp_path_factory.mktemp("checkpoints")
    full = str(directory / "full.pt")
    run_module("training.train", "--dry-run", "--output", full)
    run_module("training.prune", "--dry-run", "--parent", full, "--output", str(directory / "pruned.pt"))
    run_module("training.quantize", "--dry-run", "--parent", full, "--output", str(directory / "int8.pt"))
    run_module("training.distill", "--dry-run", "--teacher", full, "--output", str(directory / "distilled.pt"))
    run_module("training.train", "--dry-run", "--arch", "student", "--variant", "student-baseline",
               "--output", str(directory / "student_baseline.pt"))
    return Chain(directory)


def encode_image(image: Image.Image | torch.Tensor, fmt: str = "PNG") -> bytes:
    """Image (or a 28×28 uint8 tensor) to the bytes of a PNG/JPEG/... file."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.numpy(), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def in_process_labels(chain: Chain, variant: str, images: torch.Tensor) -> list[int]:
    """What the saved variant answers for uint8 images, in this process: the reference for served answers."""
    from fashion_cnn import load_model, normalize

    model = load_model(chain.weights(variant), chain.card(variant)["format"])
    with torch.inference_mode():
        labels: list[int] = model(normalize(images)).argmax(1).tolist()
    return labels


@pytest.fixture(scope="session")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 16 Fashion-MNIST test images and their labels."""
    from training.data import load_split

    split = load_split("fashion-mnist", "test").subset(16)
    return split.images, split.labels
