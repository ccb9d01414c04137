"""Pack each variant into a versioned `.mar` for TorchServe with torch-model-archiver.

Naming scheme: one TorchServe model per variant and runtime (`fashion-full`, `fashion-pruned`, `fashion-int8`,
`fashion-distilled` in PyTorch; their ONNX exports from `training.export_onnx` as `fashion-full-onnx`,
`fashion-pruned-onnx`, `fashion-distilled-onnx`, and ONNX Runtime's int8 of full as `fashion-int8-onnx`),
versions per release (`--version 1.0`, `2.0`, ...). The file is `model_store/<model>-v<version>.mar`, so several
versions of one model sit side by side; TorchServe reads name and version from the archive's manifest, not from
the file name.

Each archive holds: the handler and the modules it imports (HANDLER_MODULES), `fashion_cnn.py` (the shared
definitions), the weights (the file the card names), the model card as `card.json` (the handler checks the
weights' sha256 against it), `index_to_name.json` (TorchServe's label mapping: the handler's class names come from
it), `signature.json` (the models' Open Inference Protocol signature, read by the handler and by the router), and
`model-config.yaml` (handlers/model_configs/<variant>.yaml: workers, batch size, max batch delay, response
timeout, threads per worker — each variant and runtime tuned on its own by `make bench`).

Usage:
    python -m serving.archive --version 1.0                    # every variant and ONNX form in checkpoints/
    python -m serving.archive --version 2.0 --variants full int8 --checkpoints DIR --model-store DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fashion_cnn import DATASETS

# Where these live, and what models and archives are called, is shared with every stage (and re-exported here
# for the callers that build archives).
from serving.project import (
    MODEL_CONFIGS,
    MODEL_PREFIX,
    MODEL_STORE,
    ONNX_SUFFIX,
    ONNX_VARIANTS,
    REPO,
    SERVED_VARIANTS,
    VARIANTS,
    mar_file_name,
    model_name,
)

__all__ = ["MODEL_CONFIGS", "MODEL_PREFIX", "ONNX_VARIANTS", "REPO", "SERVED_VARIANTS", "VARIANTS", "build_archive",
           "mar_file_name", "model_name"]

log = logging.getLogger(__name__)

HANDLER = REPO / "handlers" / "fashion_handler.py"
HANDLER_MODULES = [REPO / "handlers" / f"{module}.py"
                   for module in ("request_decoding", "image_decoding", "open_inference", "invalid_input")]
SHARED_MODULE = REPO / "fashion_cnn.py"
SIGNATURE = REPO / "handlers" / "signature.json"


def label_mapping(dataset: str) -> dict[str, str]:
    """index_to_name.json: class index (as a string, TorchServe's convention) to class name."""
    return {str(index): name for index, name in enumerate(DATASETS[dataset].classes)}


def build_archive(
    variant: str,
    version: str,
    checkpoints: Path,
    model_store: Path,
    model_config: Path | None = None,
) -> Path:
    """Build one .mar and return its path; replaces an existing archive of the same model and version."""
    card = checkpoints / f"{variant}.card.json"
    hint = "run `make onnx` first" if variant.endswith(ONNX_SUFFIX) else "run `make train` first"
    if not card.is_file():
        raise FileNotFoundError(f"{card} is missing; {hint}")
    card_fields = json.loads(card.read_text())
    weights = checkpoints / card_fields["file"]  # <variant>.pt, or <variant>.onnx for an ONNX export
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; {hint}")
    model_config = model_config or MODEL_CONFIGS / f"{variant}.yaml"
    dataset = card_fields["dataset"]
    model_store.mkdir(parents=True, exist_ok=True)
    name = model_name(variant)
    with tempfile.TemporaryDirectory() as staging_dir:
        staging = Path(staging_dir)
        shutil.copy(card, staging / "card.json")
        (staging / "index_to_name.json").write_text(json.dumps(label_mapping(dataset)))
        extra_files = [staging / "card.json", staging / "index_to_name.json", SIGNATURE, SHARED_MODULE,
                       *HANDLER_MODULES]
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", version,
            "--serialized-file", str(weights),
            "--handler", str(HANDLER),
            "--extra-files", ",".join(str(path) for path in extra_files),
            "--config-file", str(model_config),
            "--export-path", str(staging),
            "--force",
        ]
        subprocess.run(command, check=True, capture_output=True, text=True)
        target = model_store / mar_file_name(name, version)
        shutil.move(staging / f"{name}.mar", target)
    log.info("archived %s version %s -> %s", name, version, target)
    return target


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build versioned .mar archives", add_help=add_help)
    parser.add_argument("--version", required=True, help="release version of the archives, e.g. 1.0")
    parser.add_argument("--variants", nargs="+", default=list(SERVED_VARIANTS), choices=SERVED_VARIANTS)
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for variant in args.variants:
            build_archive(variant, args.version, args.checkpoints, args.model_store)
    except FileNotFoundError as error:
        log.error("%s", error)
        return 1
    except subprocess.CalledProcessError as error:
        log.error("torch-model-archiver failed:\n%s", error.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
