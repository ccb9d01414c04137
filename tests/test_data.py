from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import run_module
from training import data
from training.data import Augmentation, DatasetNotFoundError, augment, iterate_batches, load_split


def write_idx(directory: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor, gz: bool) -> None:
    """Write IDX files the way the data sets ship them (big-endian header, then raw uint8)."""
    header = struct.pack(">IIII", 2051, images.shape[0], 28, 28)
    payloads = {
        f"{prefix}-images-idx3-ubyte": header + images.numpy().tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, labels.shape[0]) + labels.numpy().tobytes(),
    }
    for name, payload in payloads.items():
        if gz:
            with gzip.open(directory / f"{name}.gz", "wb") as handle:
                handle.write(payload)
        else:
            (directory / name).write_bytes(payload)


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEFAULT_DATA_DIRS", {"fashion-mnist": None, "mnist": None})


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files_gzipped_or_not(tmp_path: Path, no_system_data: None, gz: bool) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 9], dtype=torch.uint8)
    write_idx(tmp_path, "t10k", images, labels, gz)
    split = load_split("fashion-mnist", "test", tmp_path)
    assert torch.equal(split.images, images)
    assert torch.equal(split.labels, labels.long())
    assert len(split.subset(3)) == 3


def test_reads_torchvision_layout(tmp_path: Path, no_system_data: None) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([3, 7], dtype=torch.uint8), False)
    assert load_split("mnist", "train", tmp_path).labels.tolist() == [3, 7]


def test_missing_dataset_is_one_clear_error(tmp_path: Path, no_system_data: None) -> None:
    with pytest.raises(DatasetNotFoundError, match="make data"):
        load_split("fashion-mnist", "train", tmp_path / "nowhere")


def test_missing_dataset_from_a_script_names_the_fix(tmp_path: Path) -> None:
    # MNIST has no system-wide default here, so an empty --data-dir means "not found".
    result = run_module("training.train", "--dry-run", "--dataset", "mnist", "--data-dir", str(tmp_path),
                        "--output", str(tmp_path / "m.pt"), check=False)
    assert result.returncode == 2
    assert "mnist train split not found" in result.stderr
    assert "make data DATASET=mnist" in result.stderr
    assert "Traceback" not in result.stderr


def test_system_fashion_mnist_is_complete() -> None:
    train, test = load_split("fashion-mnist", "train"), load_split("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_augment_shifts_and_flips_within_bounds() -> None:
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 10, 3] = 255
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        out = augment(image, generator, max_shift=2, flip=True)
        assert out.shape == (1, 28, 28) and out.dtype == torch.uint8
        assert int(out.sum()) == 255  # the pixel is moved, never lost or duplicated (it is 3 px from the edge)
        row, col = (out[0] == 255).nonzero()[0].tolist()
        seen.add((row, col))
        assert abs(row - 10) <= 2
        assert abs(col - 3) <= 2 or abs(col - 24) <= 2  # 24 = 27 - 3: the mirrored column
    assert any(col > 14 for _, col in seen) and any(col < 14 for _, col in seen)


def test_batches_are_deterministic_for_a_seed() -> None:
    split = load_split("fashion-mnist", "test").subset(300)

    def first_batch(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        augmentation = Augmentation(erase_probability=0.5)
        return next(iterate_batches(split, 64, generator, shuffle=True, augmentation=augmentation))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_shuffling_without_a_generator_is_refused() -> None:
    split = load_split("fashion-mnist", "test").subset(10)
    with pytest.raises(ValueError, match="seeded generator"):
        next(iterate_batches(split, 4, None, shuffle=True))
