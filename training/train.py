"""Train a CNN from scratch: the full model, or (with --arch student) the no-distillation student baseline.

The budget and augmentation are the architecture's recipe (training/recipes.py), the same one
training.distill uses for the same --arch: the baseline trains exactly as the distilled student, minus the
teacher.

Usage:
    python -m training.train                                   # full model -> checkpoints/full.pt + card
    python -m training.train --arch student --variant student-baseline --output checkpoints/student_baseline.pt
    python -m training.train --dry-run --output /tmp/full.pt   # seconds, on a small subset
"""

from __future__ import annotations

import argparse
import sys

from training.cli import (
    add_common_args,
    add_model_args,
    add_training_args,
    fit_and_save,
    model_from_args,
    prepare_run,
    run_script,
)
from training.engine import CrossEntropy
from training.recipes import RECIPES


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the CNN from scratch", add_help=add_help)
    add_common_args(parser, output="full.pt")
    add_model_args(parser, arch="full")
    add_training_args(parser, RECIPES)
    parser.add_argument("--variant", default=None, help="name in the card (default: the arch)")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    return parser


def main(args: argparse.Namespace) -> int:
    run = prepare_run(args, RECIPES[args.arch])
    model = model_from_args(args)
    fit_and_save(model, CrossEntropy(args.label_smoothing), run, args, variant=args.variant or args.arch, parent=None)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
