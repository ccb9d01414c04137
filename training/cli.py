"""Arguments and set-up that every training script shares."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fashion_cnn import (
    ARCHITECTURES,
    DATASETS,
    DEFAULT_DATASET,
    FORMAT_STATE_DICT,
    FashionCNN,
    count_parameters,
    load_model,
    save_state_dict_checkpoint,
)
from training.cards import write_card
from training.data import Augmentation, DatasetNotFoundError, Split, load_split
from training.engine import LATENCY_REPEATS, Criterion, fit, native_bf16, set_seed
from training.recipes import Recipe

DRY_RUN_TRAIN_IMAGES = 512
DRY_RUN_TEST_IMAGES = 500
CHECKPOINT_DIR = Path("checkpoints")
# The parent of the pruned, int8 and distilled variants.
FULL_CHECKPOINT = CHECKPOINT_DIR / "full.pt"


def add_common_args(parser: argparse.ArgumentParser, output: str) -> None:
    """Data, output (`output` is the file name under checkpoints/), seed, batch size, precision, dry run."""
    parser.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS))
    parser.add_argument("--data-dir", default=None, help="directory with the IDX files (default: the system's)")
    parser.add_argument("--output", type=Path, default=CHECKPOINT_DIR / output,
                        help="checkpoint path (card written beside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="train under bfloat16 autocast (weights stay fp32); default: where the CPU has native "
                             "bfloat16 units (AMX or AVX-512 BF16), since elsewhere it is emulated and far slower")
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--latency-repeats", type=int, default=LATENCY_REPEATS)
    parser.add_argument("--dry-run", action="store_true",
                        help=f"one quick pass on {DRY_RUN_TRAIN_IMAGES} training / {DRY_RUN_TEST_IMAGES} test images")


def add_parent_arg(parser: argparse.ArgumentParser, flag: str, help: str, several: bool = False) -> None:
    if several:  # one or more paths, always a list
        parser.add_argument(flag, type=Path, nargs="+", default=[FULL_CHECKPOINT], help=help)
    else:
        parser.add_argument(flag, type=Path, default=FULL_CHECKPOINT, help=help)


def recipe_values(recipe: Recipe) -> dict[str, object]:
    """A recipe as the values of the optimisation flags, by argparse destination."""
    augmentation = recipe.augmentation
    return {
        "epochs": recipe.epochs,
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "max_shift": augmentation.max_shift,
        "flip": augmentation.flip,
        "random_erasing": augmentation.erase_probability,
    }


def add_training_args(
    parser: argparse.ArgumentParser, recipes: Mapping[str, Recipe], epochs_flag: str = "--epochs"
) -> None:
    """The optimisation flags. They default to None here; `prepare_run` fills the unset ones from the run's recipe,
    so no value is written twice. `recipes` (the ones this script may use, by name) only feed the help text."""
    values = {name: recipe_values(recipe) for name, recipe in recipes.items()}

    def default(dest: str) -> str:
        per_recipe = {name: value[dest] for name, value in values.items()}
        if len(set(per_recipe.values())) == 1:
            return f"default: {next(iter(per_recipe.values()))}"
        return "default: " + ", ".join(f"{value} for {name}" for name, value in per_recipe.items())

    parser.add_argument(epochs_flag, dest="epochs", type=int, default=None, help=default("epochs"))
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate of the one-cycle schedule ({default('lr')})")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help=f"AdamW's decoupled weight decay ({default('weight_decay')})")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="augment training batches (random shifts, flips and erasing as set below)")
    parser.add_argument("--max-shift", type=int, default=None,
                        help=f"largest random translation, in pixels ({default('max_shift')})")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help=f"random horizontal flips ({default('flip')})")
    parser.add_argument("--random-erasing", type=float, default=None,
                        help=f"probability of blanking a random rectangle of each training image "
                        f"({default('random_erasing')})")


def apply_recipe(args: argparse.Namespace, recipe: Recipe) -> None:
    """Give every optimisation flag left unset on the command line its value from `recipe`."""
    for dest, value in recipe_values(recipe).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def add_model_args(parser: argparse.ArgumentParser, arch: str) -> None:
    parser.add_argument("--arch", default=arch, choices=sorted(ARCHITECTURES))
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout before each fc layer (default: the architecture's)")


def model_from_args(args: argparse.Namespace) -> FashionCNN:
    config = ARCHITECTURES[args.arch]
    return FashionCNN(config if args.dropout is None else replace(config, dropout=args.dropout))


@dataclass(frozen=True)
class Run:
    train: Split
    test: Split
    generator: torch.Generator


def prepare_run(args: argparse.Namespace, recipe: Recipe | None = None) -> Run:
    """Logging, the recipe's values for unset flags (scripts that train), seeds, dry-run shrinking and the data."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if recipe is not None:
        apply_recipe(args, recipe)
    if getattr(args, "bf16", False) is None:
        args.bf16 = native_bf16()  # resolved here, so the card's recipe says what ran
    if args.dry_run:
        args.train_subset = min(args.train_subset or DRY_RUN_TRAIN_IMAGES, DRY_RUN_TRAIN_IMAGES)
        args.test_subset = min(args.test_subset or DRY_RUN_TEST_IMAGES, DRY_RUN_TEST_IMAGES)
        args.latency_repeats = min(args.latency_repeats, 3)
        if getattr(args, "epochs", 0):
            args.epochs = 1
    generator = set_seed(args.seed)
    train = load_split(args.dataset, "train", args.data_dir).subset(args.train_subset)
    test = load_split(args.dataset, "test", args.data_dir).subset(args.test_subset)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    return Run(train, test, generator)


def run_script(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> int:
    """Entry point of every training script: a missing data set is one clear line, not a traceback."""
    try:
        return main(parser.parse_args())
    except DatasetNotFoundError as error:
        logging.getLogger("training").error("%s", error)
        return 2


def load_parent(path: Path) -> FashionCNN:
    model = load_model(path, FORMAT_STATE_DICT)
    assert isinstance(model, FashionCNN), f"{path} is not a FashionCNN checkpoint"
    return model


def fit_and_save(
    model: FashionCNN,
    criterion: Criterion,
    run: Run,
    args: argparse.Namespace,
    *,
    variant: str,
    parent: Path | None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Train with the script's optimisation arguments, save the checkpoint, write its card."""
    started = time.perf_counter()
    history = fit(
        model,
        criterion,
        run.train,
        run.test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        generator=run.generator,
        augmentation=Augmentation(args.max_shift, args.flip, args.random_erasing) if args.augment else None,
        bf16=args.bf16,
    )
    save_state_dict_checkpoint(model, args.output, args.dataset)
    return write_card(
        args.output,
        variant=variant,
        model_format=FORMAT_STATE_DICT,
        test_split=run.test,
        parameters=count_parameters(model),
        args=args,
        parent=parent,
        model_args=model.config.as_dict(),
        history=history,
        extra={**(extra or {}), "training_seconds": round(time.perf_counter() - started, 1)},
        latency_repeats=args.latency_repeats,
    )
