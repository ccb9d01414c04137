"""Write a few real Fashion-MNIST test images as PNG and JSON request bodies, for the README's examples.

Usage:
    python -m serving.examples [--output-dir runs/examples]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image

from fashion_cnn import DATASETS
from serving.project import REPO
from training.data import load_split

log = logging.getLogger(__name__)
DEFAULT_DIR = REPO / "runs" / "examples"


def slug(class_name: str) -> str:
    return class_name.lower().replace("/", "-").replace(" ", "-")


def write_examples(output_dir: Path = DEFAULT_DIR) -> list[Path]:
    """One PNG and one JSON body per class, from the first test image of that class."""
    output_dir.mkdir(parents=True, exist_ok=True)
    test = load_split("fashion-mnist", "test")
    written = []
    for label, name in enumerate(DATASETS["fashion-mnist"].classes):
        index = int((test.labels == label).nonzero()[0])
        pixels = test.images[index]
        png = output_dir / f"{slug(name)}.png"
        Image.fromarray(pixels.numpy(), mode="L").save(png)
        body = output_dir / f"{slug(name)}.json"
        body.write_text(json.dumps({"data": pixels.tolist()}))
        written += [png, body]
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_DIR)
    paths = write_examples(parser.parse_args().output_dir)
    log.info("wrote %d example requests to %s", len(paths), paths[0].parent)
    sys.exit(0)
