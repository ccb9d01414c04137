"""Train a CNN from scratch: the full model, or (with --arch student) the no-distillation student baseline.

Usage:
    python -m training.train                                   # full model -> checkpoints/full.pt + card
    python -m training.train --arch student --epochs 12 --output checkpoints/student_baseline.pt \
        --variant student-baseline
    python -m training.train --dry-run --output /tmp/full.pt   # seconds, on a small subset
"""

from __future__ import annotations

import argparse
import sys
import time

from fashion_cnn import (
    FORMAT_STATE_DICT,
    count_parameters,
    save_state_dict_checkpoint,
)
from training.cards import write_card
from training.cli import add_common_args, add_model_args, model_from_args, prepare_run, run_script
from training.engine import CrossEntropy, fit


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the CNN from scratch", add_help=add_help)
    add_common_args(parser, output="checkpoints/full.pt")
    add_model_args(parser, arch="full")
    parser.add_argument("--variant", default=None, help="name in the card (default: the arch)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random ±2 px shifts and horizontal flips")
    parser.add_argument("--random-erasing", type=float, default=0.0,
                        help="probability of blanking a random rectangle of each training image")
    return parser


def main(args: argparse.Namespace) -> int:
    run = prepare_run(args)
    model = model_from_args(args)
    started = time.perf_counter()
    history = fit(
        model,
        CrossEntropy(args.label_smoothing),
        run.train,
        run.test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        generator=run.generator,
        augmented=args.augment,
        bf16=args.bf16,
        erase_probability=args.random_erasing,
    )
    save_state_dict_checkpoint(model, args.output, args.dataset)
    write_card(
        args.output,
        variant=args.variant or args.arch,
        model_format=FORMAT_STATE_DICT,
        test_split=run.test,
        parameters=count_parameters(model),
        args=args,
        parent=None,
        model_args=model.config.as_dict(),
        history=history,
        extra={"training_seconds": round(time.perf_counter() - started, 1)},
        latency_repeats=args.latency_repeats,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
