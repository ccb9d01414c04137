"""Knowledge distillation: train a small student on the full model's temperature-softened outputs.

Loss (Hinton et al., 2015): alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE(student, label). The
teacher sees the same augmented batch as the student. To know what distillation itself is worth, train the
same student without a teacher on the same budget (same flags) with `training.train --arch student`; `make
train` does both and the report shows both.

Usage:
    python -m training.distill --teacher checkpoints/full.pt      # -> checkpoints/distilled.pt + card
    python -m training.distill --temperature 4 --alpha 0.9 --epochs 12
    python -m training.distill --dry-run --teacher /tmp/full.pt --output /tmp/distilled.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fashion_cnn import (
    FORMAT_STATE_DICT,
    count_parameters,
    load_model,
    save_state_dict_checkpoint,
)
from training.cards import write_card
from training.cli import add_common_args, add_model_args, model_from_args, prepare_run, run_script
from training.engine import DistillationLoss, evaluate, fit


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distil the full model into a small student", add_help=add_help)
    add_common_args(parser, output="checkpoints/distilled.pt")
    parser.add_argument("--teacher", type=Path, default=Path("checkpoints/full.pt"))
    add_model_args(parser, arch="student")
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft (teacher) term")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    return parser


def main(args: argparse.Namespace) -> int:
    run = prepare_run(args)
    teacher = load_model(args.teacher, FORMAT_STATE_DICT)
    teacher_accuracy = evaluate(teacher, run.test).accuracy
    student = model_from_args(args)
    started = time.perf_counter()
    history = fit(
        student,
        DistillationLoss(teacher, args.temperature, args.alpha),
        run.train,
        run.test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        generator=run.generator,
        augmented=args.augment,
        bf16=args.bf16,
    )
    save_state_dict_checkpoint(student, args.output, args.dataset)
    write_card(
        args.output,
        variant="distilled",
        model_format=FORMAT_STATE_DICT,
        test_split=run.test,
        parameters=count_parameters(student),
        args=args,
        parent=args.teacher,
        model_args=student.config.as_dict(),
        history=history,
        extra={
            "teacher_parameters": count_parameters(teacher),
            "teacher_test_accuracy": teacher_accuracy,
            "training_seconds": round(time.perf_counter() - started, 1),
        },
        latency_repeats=args.latency_repeats,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
