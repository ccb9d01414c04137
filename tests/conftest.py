"""Shared fixtures: the whole training chain run once, for real, on small subsets (`--dry-run`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from fashion_cnn import ONNX_SUFFIX
from serving.project import REPO
from tests.postgres import ScratchPostgres, missing_reason

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


# Each ONNX form and the PyTorch variant it is exported from (training.export_onnx): fp32 exports of the state_dict
# variants, and ONNX Runtime's static int8 of full (--quantize).
ONNX_PARENTS = {**{parent + ONNX_SUFFIX: parent for parent in ("full", "pruned", "distilled")},
                "int8" + ONNX_SUFFIX: "full"}
QUANTIZED_ONNX = "int8" + ONNX_SUFFIX


@dataclass(frozen=True)
class Chain:
    directory: Path

    def weights(self, name: str) -> Path:
        """The file the variant's card names: <name>.pt, or <name>.onnx for an ONNX form."""
        return self.directory / self.card(name)["file"]

    def card(self, name: str) -> dict[str, Any]:
        path = self.directory / f"{name}.card.json"
        if not path.is_file() and name in ONNX_PARENTS:
            self._export_onnx(name)
        card: dict[str, Any] = json.loads(path.read_text())
        return card

    def _export_onnx(self, name: str) -> None:
        """An ONNX form is exported on first use, by its real script with --dry-run and its default name (beside
        its parent, in this directory): each takes seconds, and most test files need one or none of them."""
        parent = str(self.directory / f"{ONNX_PARENTS[name]}.pt")
        run_module("training.export_onnx", "--dry-run", "--parent", parent,
                   *(["--quantize"] if name == QUANTIZED_ONNX else []))


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """full → pruned, int8, distilled, and the student baseline, each from its real script with --dry-run; their
    ONNX forms (ONNX_PARENTS) when first asked for."""
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
    """What the saved variant (an ONNX form: its ONNX Runtime session) answers for uint8 images, in this process:
    the reference for served answers."""
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[ScratchPostgres]:
    """A real PostgreSQL on a free loopback port for the whole session (tests.postgres); each test takes a
    database of its own (`postgres.database()`). Skipped, saying why, only where PostgreSQL is not installed."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with ScratchPostgres() as server:
        yield server


# One worker per version. The distilled model and its ONNX form get a long batch window, so concurrent test requests
# share a batch (the bad-request-in-a-batch tests); the others a short one, so sequential requests stay fast.
TEST_MODEL_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 10,
                     "responseTimeout": 60, "handler": {"threads": 1}}
SLOW_BATCH_VARIANTS = ("distilled", "distilled" + ONNX_SUFFIX)
SLOW_BATCH_DELAY_MS = 300


@pytest.fixture(scope="session")
def torchserve(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real TorchServe from real .mar files of the dry-run checkpoints, as `make serve` serves them: every variant
    and its ONNX form at version 1.0, the full model also at 2.0, on free loopback ports in its own run directory."""
    from serving import server
    from serving.archive import SERVED_VARIANTS, build_archive, model_name
    from serving.instance import free_ports

    root = tmp_path_factory.mktemp("serve")
    configs = root / "model_configs"
    configs.mkdir()
    store = root / "model_store"
    models: dict[str, Any] = {}
    for variant in SERVED_VARIANTS:
        config = configs / f"{variant}.yaml"
        delay = SLOW_BATCH_DELAY_MS if variant in SLOW_BATCH_VARIANTS else TEST_MODEL_CONFIG["maxBatchDelay"]
        config.write_text(yaml.safe_dump({**TEST_MODEL_CONFIG, "maxBatchDelay": delay}))
        chain.card(variant)  # an ONNX form is exported here, on first use
        versions = ["1.0", "2.0"] if variant == "full" else ["1.0"]
        for version in versions:
            build_archive(variant, version, chain.directory, store, model_config=config)
        models[model_name(variant)] = {"variant": variant, "versions": versions, "default": "1.0"}
    models_file = root / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": models}))
    ports = server.Ports(*free_ports(6))
    running = server.Instance(root / "run", store, models_file, ports, model_configs=configs)
    server.start(running, timeout=240)
    try:
        yield running
    finally:
        server.stop(running)
