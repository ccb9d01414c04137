"""Shared fixtures: the whole training chain run once, for real, on small subsets (`--dry-run`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
