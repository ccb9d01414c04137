"""Knowledge distillation: train a small student on the full model's temperature-softened outputs.

Loss (Hinton et al., 2015): alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE(student, label). The
teacher sees the same augmented batch as the student. To know what distillation itself is worth, train the
same student without a teacher with `training.train --arch student --variant student-baseline`: both take the
student's recipe (training/recipes.py), so they share budget and augmentation unless a flag is given to one
only. `make study` trains both for every seed and compares them; `make attempt` tries other recipes beside it.

`--attention-weight β` adds intermediate-feature matching, attention transfer (training.teaching): each
convolution block's spatial attention map is pulled toward the teacher's. Several `--teacher` checkpoints teach as
one ensemble: the mean of their logits (a stronger teacher than any of them, at the cost of one forward pass of
each per batch).

Usage:
    python -m training.distill --teacher checkpoints/full.pt      # -> checkpoints/distilled.pt + card
    python -m training.distill --temperature 4 --alpha 0.5
    python -m training.distill --teacher checkpoints/full.pt checkpoints/study/seed-{1,2}/full.pt   # an ensemble
    python -m training.distill --dry-run --teacher /tmp/full.pt --output /tmp/distilled.pt
"""

from __future__ import annotations

import argparse
import sys

from fashion_cnn import count_parameters
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
from training.teaching import AttentionTransfer, Ensemble


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
    # Attention transfer made distillation beat its no-teacher twin over three seeds, where logits alone lost
    # (docs/training.md#results; `make attempt NAME=logits-only ATTEMPT_FLAGS="--attention-weight 0"`).
    parser.add_argument("--attention-weight", type=float, default=1000.0,
                        help="β of attention transfer, the intermediate-feature term (0: off; 1000 as in the paper)")
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
