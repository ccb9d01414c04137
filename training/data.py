"""Fashion-MNIST / MNIST as uint8 tensors in memory, read straight from the IDX files.

The whole data set is 55 MB as uint8, so it lives in memory and batches are sliced from it: no DataLoader
workers compete with training for this machine's two cores. Augmentation runs on whole batches.

Where the files are looked for, in order: `--data-dir` (IDX files, gzipped or not, directly in it or under
torchvision's `<root>/<Name>/raw/`), then the data set's default location (Debian's `dataset-fashion-mnist`
package for Fashion-MNIST). With `--download`, torchvision downloads them into `--data-dir` for users with
internet access.

Usage:
    python -m training.data                       # check the data set is readable and print its size
    python -m training.data --dataset mnist --download --data-dir data
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fashion_cnn import DATASETS, DEFAULT_DATASET, IMAGE_SIZE

log = logging.getLogger(__name__)

DEFAULT_DATA_DIRS: dict[str, Path | None] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": None,
}
# Where --download puts a data set when --data-dir is not given (the Makefile's DATA_DIR passes the same folder).
DOWNLOAD_DIR = Path("data")
TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


class DatasetNotFoundError(FileNotFoundError):
    """The IDX files of a data set are nowhere we looked; the message says how to get them."""


def fix_hint(dataset: str) -> str:
    if dataset == "fashion-mnist":
        return (
            "run `make data` (it installs Debian's package: sudo apt-get install -y dataset-fashion-mnist), "
            "or pass --data-dir DIR holding the IDX files, or --download with internet access"
        )
    return "run `make data DATASET=mnist` with internet access, or pass --data-dir DIR holding the IDX files"


@dataclass(frozen=True)
class Split:
    """One split of a data set: images N×28×28 uint8, labels N int64."""

    dataset: str
    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int | None) -> Split:
        if count is None or count >= len(self):
            return self
        return Split(self.dataset, self.name, self.images[:count], self.labels[:count])


def _read_idx(path: Path, expected_magic: int) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {magic}, want {expected_magic})")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8)
    return data.reshape(shape)


def candidate_dirs(dataset: str, data_dir: str | Path | None) -> list[Path]:
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    default = DEFAULT_DATA_DIRS[dataset]
    if default is not None:
        roots.append(default)
    dirs: list[Path] = []
    for root in roots:
        dirs += [root, root / TORCHVISION_FOLDERS[dataset] / "raw"]
    return dirs


def _find_idx(dataset: str, stem: str, data_dir: str | Path | None) -> Path | None:
    for directory in candidate_dirs(dataset, data_dir):
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def download(dataset: str, data_dir: str | Path) -> None:
    """torchvision's download (needs internet); it leaves the IDX files under <data_dir>/<Name>/raw/."""
    from torchvision import datasets

    cls = datasets.FashionMNIST if dataset == "fashion-mnist" else datasets.MNIST
    for train in (True, False):
        cls(str(data_dir), train=train, download=True)


def load_split(dataset: str, split: str, data_dir: str | Path | None = None) -> Split:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    prefix = SPLIT_PREFIX[split]
    images_path = _find_idx(dataset, f"{prefix}-images-idx3-ubyte", data_dir)
    labels_path = _find_idx(dataset, f"{prefix}-labels-idx1-ubyte", data_dir)
    if images_path is None or labels_path is None:
        looked = ", ".join(str(d) for d in candidate_dirs(dataset, data_dir)) or "(no directory given)"
        raise DatasetNotFoundError(
            f"{dataset} {split} split not found (looked in: {looked}); {fix_hint(dataset)}"
        )
    images = _read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC).to(torch.int64)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path}: unexpected shape {tuple(images.shape)} for {labels.shape[0]} labels")
    return Split(dataset, split, images, labels)


@dataclass(frozen=True)
class Augmentation:
    """Per-batch training augmentation: shifts up to `max_shift` px, horizontal flips, random erasing.

    The one home of the augmentation defaults; each recipe (training/recipes.py) starts from them.
    """

    max_shift: int = 2
    # Off: Fashion-MNIST's shoes all face one way, and flips cost the full model accuracy (docs/training.md).
    flip: bool = False
    erase_probability: float = 0.0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = augment(images, generator, max_shift=self.max_shift, flip=self.flip)
        if self.erase_probability > 0:
            images = random_erase(images, generator, self.erase_probability)
        return images


def augment(images: torch.Tensor, generator: torch.Generator, *, max_shift: int, flip: bool) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (zero fill) and, optionally, horizontal flip, per image.

    Both keep a garment a garment of the same class; vertical flips and rotations would not.
    """
    batch = images.shape[0]
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    base = torch.arange(IMAGE_SIZE)
    rows = (base.unsqueeze(0) + shifts[:, :1]).unsqueeze(2)  # B×28×1
    cols = base.unsqueeze(0) + shifts[:, 1:]  # B×28
    flipped = (torch.rand(batch, generator=generator) < 0.5) & flip
    cols = torch.where(flipped.unsqueeze(1), cols.flip(1), cols).unsqueeze(1)  # B×1×28
    return padded[torch.arange(batch).view(-1, 1, 1), rows, cols]


def random_erase(
    images: torch.Tensor, generator: torch.Generator, probability: float, area: tuple[float, float] = (0.02, 0.2)
) -> torch.Tensor:
    """Random erasing (Zhong et al., 2017): blank a random rectangle of some images to background (0).

    The model has to recognise a garment from the parts it still sees, a regulariser that suits the wide fc
    layer of this CNN.
    """
    batch, size = images.shape[0], IMAGE_SIZE
    target_area = torch.empty(batch).uniform_(*area, generator=generator) * size * size
    aspect = torch.exp(torch.empty(batch).uniform_(math.log(0.3), math.log(3.3), generator=generator))
    heights = (target_area * aspect).sqrt().round().clamp(1, size).long()
    widths = (target_area / aspect).sqrt().round().clamp(1, size).long()
    tops = (torch.rand(batch, generator=generator) * (size - heights + 1)).long()
    lefts = (torch.rand(batch, generator=generator) * (size - widths + 1)).long()
    erase = torch.rand(batch, generator=generator) < probability
    index = torch.arange(size)
    rows = (index >= tops[:, None]) & (index < (tops + heights)[:, None])  # B×28
    cols = (index >= lefts[:, None]) & (index < (lefts + widths)[:, None])  # B×28
    mask = rows[:, :, None] & cols[:, None, :] & erase[:, None, None]
    return images.masked_fill(mask, 0)


def iterate_batches(
    split: Split,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    augmentation: Augmentation | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images B×28×28, labels) batches; shuffling and augmentation draw from `generator`."""
    if (shuffle or augmentation) and generator is None:
        raise ValueError("shuffling and augmentation need a seeded generator (determinism)")
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        images = split.images[index]
        if augmentation is not None:
            assert generator is not None
            images = augmentation(images, generator)
        yield images, split.labels[index]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check (or download) a data set", add_help=add_help)
    parser.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS))
    parser.add_argument("--data-dir", default=None,
                        help=f"directory with the IDX files (or torchvision's root; --download: {DOWNLOAD_DIR})")
    parser.add_argument("--download", action="store_true", help="download with torchvision into --data-dir")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.download:
        args.data_dir = args.data_dir or DOWNLOAD_DIR
        download(args.dataset, args.data_dir)
    try:
        splits = [load_split(args.dataset, name, args.data_dir) for name in ("train", "test")]
    except DatasetNotFoundError as error:
        log.error("%s", error)
        return 1
    for split in splits:
        log.info("%s %s: %d images", split.dataset, split.name, len(split))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(get_args_parser().parse_args()))
