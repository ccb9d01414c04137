"""Facts about this project that every stage shares: where the repository is, which variants it serves, what
their TorchServe models and archives are called.

Standard library only, so the router, the load tests and the tests can import it without torch.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The kit's version as pyproject.toml gives it (tests/test_open_inference.py checks they agree): the router's
# image copies the sources without installing the project, so the installed metadata is not there to ask.
KIT_VERSION = "0.1.0"
MODEL_STORE = REPO / "model_store"
MODEL_CONFIGS = REPO / "handlers" / "model_configs"  # <variant>.yaml: workers and batching per variant
VARIANTS = ("full", "pruned", "int8", "distilled")  # the trained variants (`make train`)
# Their ONNX forms (`make onnx`, training.export_onnx; int8-onnx is ONNX Runtime's own int8 of full): the same
# weights on another runtime, archived and served beside them. The suffix is fashion_cnn.ONNX_SUFFIX (this module
# imports no torch; tests/test_onnx.py checks they agree).
ONNX_SUFFIX = "-onnx"
ONNX_VARIANTS = tuple(variant + ONNX_SUFFIX for variant in VARIANTS)
SERVED_VARIANTS = VARIANTS + ONNX_VARIANTS  # every form `make serve` archives and serves (serving/models.yaml)
MODEL_PREFIX = "fashion-"


def model_name(variant: str) -> str:
    """The TorchServe model that serves `variant` (one model per variant, versions per release)."""
    return MODEL_PREFIX + variant


def mar_file_name(model: str, version: str) -> str:
    """`<model>-v<version>.mar`: several versions of one model side by side in the model store."""
    return f"{model}-v{version}.mar"
