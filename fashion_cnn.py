"""What training and serving share: preprocessing constants, the CNN, and how a saved variant is loaded.

Every `.mar` carries this one file next to its handler, so it imports nothing from the project and nothing
beyond torch and the standard library (and onnxruntime, only when an ONNX file is loaded). Change a constant here
and both sides change together.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE_SIZE = 28
NUM_CLASSES = 10
# What every script trains on and what `normalize` assumes when not told.
DEFAULT_DATASET = "fashion-mnist"

# Saved forms of a variant (the card's "format" field).
FORMAT_STATE_DICT = "state_dict"  # torch.save({"model_args": ..., "state_dict": ...}); needs FashionCNN
FORMAT_TORCHSCRIPT = "torchscript"  # torch.jit.save of a traced module; needs no Python class
FORMAT_ONNX = "onnx"  # an ONNX file run by ONNX Runtime; needs no Python class, and runs without torch elsewhere
# An ONNX variant is named after the PyTorch variant it stands in for: full -> full-onnx, int8 -> int8-onnx.
ONNX_SUFFIX = "-onnx"


@dataclass(frozen=True)
class DatasetSpec:
    """Pixel statistics of a data set's training split (on the [0, 1] scale) and its class names."""

    name: str
    mean: float
    std: float
    classes: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mean=0.2860,
        std=0.3530,
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "mnist": DatasetSpec(
        name="mnist", mean=0.1307, std=0.3081, classes=tuple(str(digit) for digit in range(10))
    ),
}


def normalize(images: torch.Tensor, dataset: str = DEFAULT_DATASET) -> torch.Tensor:
    """uint8 images (N×28×28 or N×1×28×28, white object on black as in the data sets) to the model's input."""
    spec = DATASETS[dataset]
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return (images.to(torch.float32) / 255.0 - spec.mean) / spec.std


@dataclass(frozen=True)
class CNNConfig:
    """The constructor arguments of FashionCNN, saved as a checkpoint's `model_args`: the one place they live.

    The full model and every smaller variant are instances of the same design; the widths of each named
    architecture are in ARCHITECTURES, not here.
    """

    conv1: int
    conv2: int
    hidden: int
    num_classes: int = NUM_CLASSES
    dropout: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Dropout before each fully connected layer is part of the design: the wide fc layer overfits without it, the
# small student underfits with it.
FULL_CONFIG = CNNConfig(conv1=64, conv2=128, hidden=1000, dropout=0.3)
# The distillation student: about 3.5 % of the full model's parameters.
STUDENT_CONFIG = CNNConfig(conv1=32, conv2=64, hidden=64, dropout=0.0)
ARCHITECTURES: dict[str, CNNConfig] = {"full": FULL_CONFIG, "student": STUDENT_CONFIG}


class FashionCNN(nn.Module):
    """conv(1→c1,3×3,pad 1)-ReLU-pool-conv(c1→c2,3×3,pad 1)-ReLU-pool-fc(c2·7·7→hidden)-ReLU-fc(hidden→10)."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        conv1, conv2, hidden, dropout = config.conv1, config.conv2, config.hidden, config.dropout
        self.features = nn.Sequential(
            nn.Conv2d(1, conv1, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        pooled = IMAGE_SIZE // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(conv2 * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, config.num_classes),
        )

    @classmethod
    def from_model_args(cls, model_args: dict[str, Any]) -> FashionCNN:
        """The model a checkpoint's `model_args` (CNNConfig.as_dict()) describe."""
        return cls(CNNConfig(**model_args))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_state_dict_checkpoint(model: FashionCNN, path: str | Path, dataset: str) -> None:
    """Weights plus the config's fields (as nanoGPT saves `model_args`): loadable with weights_only=True."""
    payload = {
        "model_args": model.config.as_dict(),
        "dataset": dataset,
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    torch.save(payload, path)


# How a torch variant's tensors are laid out (the model config's `handler.memory_format`).
CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"
MEMORY_FORMATS = (CONTIGUOUS, CHANNELS_LAST)


class ChannelsLast(nn.Module):
    """A torch variant run in channels-last memory format: its weights converted once, each batch on its way in.
    oneDNN's convolutions then read NHWC without reordering (`python -m loadtest.forward_speed` measures it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


class OnnxModel(nn.Module):
    """An ONNX Runtime session that takes and returns torch tensors, so callers treat it like the other variants.

    Its threads are fixed when the session is made: `threads` intra-op threads, one inter-op thread, sequential
    execution. (TorchServe's own ONNX path gives every session all logical CPUs, which oversubscribes the CPU as
    soon as two workers share it; torch.set_num_threads does not reach ONNX Runtime.)
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        super().__init__()
        # Imported here, not at the top: training and the torch variants' workers never need onnxruntime.
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name: str = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().to(torch.float32).contiguous().numpy()})
        return torch.from_numpy(logits)


def load_model(path: str | Path, model_format: str, threads: int = 1, memory_format: str = CONTIGUOUS) -> nn.Module:
    """Load a saved variant for inference, in eval mode, without unpickling code.

    state_dict checkpoints go through `torch.load(weights_only=True)`; TorchScript archives hold no pickled
    Python objects of ours and are loaded with `torch.jit.load`; ONNX files become an `OnnxModel` with `threads`
    intra-op threads. (torch's thread count is process-wide, so for the torch formats the caller sets it with
    torch.set_num_threads and `threads` is not used.) `memory_format` channels_last applies to state_dict
    variants; the saved forms that fix their own layout (TorchScript, ONNX) ignore it, so an ONNX export can
    share the model config of the variant it stands in for.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if model_format == FORMAT_STATE_DICT:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = FashionCNN.from_model_args(payload["model_args"])
        model.load_state_dict(payload["state_dict"])
        return (ChannelsLast(model) if memory_format == CHANNELS_LAST else model).eval()
    if model_format == FORMAT_TORCHSCRIPT:
        return torch.jit.load(str(path), map_location="cpu").eval()
    if model_format == FORMAT_ONNX:
        return OnnxModel(path, threads).eval()
    raise ValueError(f"unknown model format {model_format!r}; expected {FORMAT_STATE_DICT!r}, "
                     f"{FORMAT_TORCHSCRIPT!r} or {FORMAT_ONNX!r}")
