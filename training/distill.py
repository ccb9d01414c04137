"""Knowledge distillation: train a small student on the full model's temperature-softened outputs.

Loss (Hinton et al., 2015): alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE(student, label). The
teacher sees the same augmented batch as the student. To know what distillation itself is worth, train the
same student without a teacher with `training.train --arch student --variant student-baseline`: both take the
student's recipe (training/recipes.py), so they share budget and augmentation unless a flag is given to one
only. `make study` trains both for every seed and compares them; `make attempt` tries other recipes beside it.

`--attention-weight β` adds intermediate-feature matching, attention transfer (Zagoruyko & Komodakis, 2017):
after each convolution block the student's spatial attention map (the channel mean of its squared activations,
L2-normalised over the image) is pulled toward the teacher's, β·mean((a_s − a_t)²) per block. It has no
parameters of its own, so the student's narrower blocks need no adapter to the teacher's widths.

Several `--teacher` checkpoints teach as one ensemble: the mean of their logits (a stronger teacher than any of
them, at the cost of one forward pass of each per batch).

Usage:
    python -m training.distill --teacher checkpoints/full.pt      # -> checkpoints/distilled.pt + card
    python -m training.distill --temperature 4 --alpha 0.5
    python -m training.distill --teacher checkpoints/full.pt checkpoints/study/seed-{1,2}/full.pt   # an ensemble
    python -m training.distill --dry-run --teacher /tmp/full.pt --output /tmp/distilled.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fashion_cnn import FashionCNN, count_parameters
from training.cards import parent_reference
from training.cli import (
    add_common_args,
    add_model_args,
    add_parent_arg,
    add_training_args,
    fit_and_save,
    load_parent,
    model_from_args,
    prepare_run,
    run_script,
)
from training.engine import Criterion, DistillationLoss, evaluate
from training.recipes import RECIPES


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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distil the full model into a small student", add_help=add_help)
    add_common_args(parser, output="distilled.pt")
    add_model_args(parser, arch="student")
    add_training_args(parser, RECIPES)
    add_parent_arg(parser, "--teacher", several=True,
                   help="the trained full model; several checkpoints teach as an ensemble (the mean of their logits)")
    # The settings of the measured run in docs/training.md (with the student recipe's random erasing).
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft (teacher) term")
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="β of attention transfer, the intermediate-feature term (0: off; 1000 in the paper)")
    return parser


def main(args: argparse.Namespace) -> int:
    run = prepare_run(args, RECIPES[args.arch])
    members = [load_parent(path) for path in args.teacher]
    teacher = members[0] if len(members) == 1 else Ensemble(members)
    extra: dict[str, object] = {
        "teacher_parameters": count_parameters(teacher),
        "teacher_test_accuracy": evaluate(teacher, run.test).accuracy,
    }
    if len(members) > 1:  # the card's parent is the first; the others are named here
        extra["teacher_ensemble"] = [parent_reference(path) for path in args.teacher]
    student = model_from_args(args)
    distillation = DistillationLoss(teacher, args.temperature, args.alpha)
    criterion: Criterion = distillation
    if args.attention_weight:
        criterion = AttentionTransfer(distillation, student, args.attention_weight)
    fit_and_save(student, criterion, run, args, variant="distilled", parent=args.teacher[0], extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
