"""Knowledge distillation: train a small student on the full model's temperature-softened outputs.

Loss (Hinton et al., 2015): alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE(student, label). The
teacher sees the same augmented batch as the student. To know what distillation itself is worth, train the
same student without a teacher with `training.train --arch student --variant student-baseline`: both take the
student's recipe (training/recipes.py), so they share budget and augmentation unless a flag is given to one
only. `make train` does both and the report shows both.

Usage:
    python -m training.distill --teacher checkpoints/full.pt      # -> checkpoints/distilled.pt + card
    python -m training.distill --temperature 4 --alpha 0.5
    python -m training.distill --dry-run --teacher /tmp/full.pt --output /tmp/distilled.pt
"""

from __future__ import annotations

import argparse
import sys

from fashion_cnn import count_parameters
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
from training.engine import DistillationLoss, evaluate
from training.recipes import RECIPES


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distil the full model into a small student", add_help=add_help)
    add_common_args(parser, output="distilled.pt")
    add_model_args(parser, arch="student")
    add_training_args(parser, RECIPES)
    add_parent_arg(parser, "--teacher", help="the trained full model")
    # The settings of the measured run in docs/training.md (with the student recipe's random erasing).
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft (teacher) term")
    return parser


def main(args: argparse.Namespace) -> int:
    run = prepare_run(args, RECIPES[args.arch])
    teacher = load_parent(args.teacher)
    extra = {
        "teacher_parameters": count_parameters(teacher),
        "teacher_test_accuracy": evaluate(teacher, run.test).accuracy,
    }
    student = model_from_args(args)
    criterion = DistillationLoss(teacher, args.temperature, args.alpha)
    fit_and_save(student, criterion, run, args, variant="distilled", parent=args.teacher, extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
