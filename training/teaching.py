"""What a teacher passes on beyond its logits, for training.distill and training.prune's fine-tuning.

* `Ensemble`: several checkpoints teaching as one, the mean of their logits.
* `AttentionTransfer` (Zagoruyko & Komodakis, 2017): after each convolution block the student's spatial attention
  map (the channel mean of its squared activations, L2-normalised over the image) is pulled toward the teacher's,
  β·mean((a_s − a_t)²) per block, on top of the distillation loss (training.engine.DistillationLoss). It has no
  parameters of its own, so a narrower student needs no adapter to the teacher's widths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fashion_cnn import FashionCNN
from training.engine import DistillationLoss


class Ensemble(nn.Module):
    """Several trained models answering as one: the mean of their logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] activations → [N, H·W]: the channel mean of their squares, L2-normalised per image."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


class BlockOutputs:
    """The outputs of each convolution block (after its pooling) of a FashionCNN in its latest forward pass, kept by
    forward hooks: what attention transfer compares, without changing the model's forward. With `training_only`
    nothing is kept from passes in eval mode (the student's evaluation and latency passes)."""

    def __init__(self, model: FashionCNN, training_only: bool = False) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        pools = [index for index, layer in enumerate(model.features) if isinstance(layer, nn.MaxPool2d)]
        for block, index in enumerate(pools):
            model.features[index].register_forward_hook(self._keeper(block, training_only))

    def _keeper(self, block: int, training_only: bool) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            if module.training or not training_only:
                self.outputs[block] = output
        return keep

    def take_attention_maps(self) -> list[torch.Tensor]:
        """The kept blocks' attention maps; the blocks are let go (the next pass keeps its own)."""
        if not self.outputs:
            raise RuntimeError("no block outputs kept: the model made no forward pass since the last loss")
        maps = [attention_map(self.outputs[block]) for block in sorted(self.outputs)]
        self.outputs.clear()
        return maps


def members_of(teacher: nn.Module) -> list[FashionCNN]:
    """The FashionCNN checkpoints a teacher is made of: itself, or its ensemble's members."""
    if isinstance(teacher, Ensemble):
        return [member for model in teacher.members for member in members_of(model)]
    if not isinstance(teacher, FashionCNN):
        raise TypeError(f"attention transfer needs FashionCNN teachers, got {type(teacher).__name__}")
    return [teacher]


class AttentionTransfer:
    """The distillation loss plus β·mean((a_s − a_t)²) for each convolution block's attention maps, the teacher's
    being the mean over its ensemble's members. The teacher's blocks come from the forward pass the distillation
    loss makes on the same images, the student's from its training pass that gave the logits."""

    def __init__(self, distillation: DistillationLoss, student: FashionCNN, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the attention weight must be >= 0, got {weight}")
        self.distillation, self.weight = distillation, weight
        self.student = BlockOutputs(student, training_only=True)
        self.teachers = [BlockOutputs(member) for member in members_of(distillation.teacher.model)]

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.distillation(logits, images, targets)  # runs the teacher: its block outputs are fresh
        teacher_maps = [torch.stack(maps).mean(dim=0)
                        for maps in zip(*(teacher.take_attention_maps() for teacher in self.teachers), strict=True)]
        for student_map, teacher_map in zip(self.student.take_attention_maps(), teacher_maps, strict=True):
            loss = loss + self.weight * (student_map - teacher_map).pow(2).mean()
        return loss
