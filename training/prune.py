"""Structured pruning: physically remove conv channels and fc units, then fine-tune.

Filters and units are ranked by the L1 norm of their weights (Li et al., 2017, "Pruning Filters for
Efficient ConvNets"); the kept ones are copied into a new, narrower FashionCNN, so the saved model is truly
smaller and faster. (`torch.nn.utils.prune` masks only zero entries of dense tensors: no gain in size or speed.)

Usage:
    python -m training.prune --parent checkpoints/full.pt          # -> checkpoints/pruned.pt + card
    python -m training.prune --parent checkpoints/full.pt --conv1-keep 0.5 --conv2-keep 0.75 --fc-keep 0.3
    python -m training.prune --dry-run --parent /tmp/full.pt --output /tmp/pruned.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from fashion_cnn import IMAGE_SIZE, FashionCNN, count_parameters
from training.cli import (
    add_common_args,
    add_parent_arg,
    add_training_args,
    fit_and_save,
    load_parent,
    prepare_run,
    run_script,
)
from training.engine import Criterion, CrossEntropy, DistillationLoss, evaluate
from training.recipes import FINETUNE_RECIPE
from training.teaching import AttentionTransfer

log = logging.getLogger(__name__)


def _strongest(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` output slices of `weight` with the largest L1 norm."""
    norms = weight.detach().abs().flatten(1).sum(dim=1)
    return norms.topk(keep).indices.sort().values


# oneDNN's convolution kernels are markedly faster for channel counts that are multiples of 8 (measured on an
# AVX-512 CPU at batch 64: 38/77 channels ran 2.0x faster than the full model, 40/80 ran 2.4x).
CHANNEL_MULTIPLE = 8


def kept_count(total: int, ratio: float, multiple: int = CHANNEL_MULTIPLE) -> int:
    """How many of `total` filters/units to keep: `ratio` of them, rounded to a multiple of `multiple`."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    count = max(1, round(total * ratio))
    if total >= 2 * multiple:
        count = max(multiple, round(count / multiple) * multiple)
    return min(count, total)


@dataclass(frozen=True)
class KeepRatios:
    """The fraction of each layer that survives: conv1's filters, conv2's filters, the hidden fc units."""

    conv1: float
    conv2: float
    hidden: float


@dataclass(frozen=True)
class KeptIndices:
    """Which conv1 filters, conv2 filters and hidden fc units survive, in their original order."""

    conv1: torch.Tensor
    conv2: torch.Tensor
    hidden: torch.Tensor


def _layers(model: FashionCNN) -> tuple[nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]:
    conv1, conv2 = model.features[0], model.features[3]
    fc1, fc2 = model.classifier[2], model.classifier[5]
    assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    return conv1, conv2, fc1, fc2


def _bias(layer: nn.Conv2d) -> torch.Tensor:
    assert layer.bias is not None, "FashionCNN's convolutions have biases"
    return layer.bias


def _fc1_columns(kept_conv2: torch.Tensor) -> torch.Tensor:
    # fc1 sees conv2's output flattened channel-major: channel c owns columns c·49 … c·49+48.
    area = (IMAGE_SIZE // 4) ** 2
    return (kept_conv2.unsqueeze(1) * area + torch.arange(area)).flatten()


@torch.no_grad()
def select_kept(model: FashionCNN, keep: KeepRatios) -> KeptIndices:
    """Rank each layer's filters/units by L1 norm over the inputs that survive the layer before."""
    conv1, conv2, fc1, _ = _layers(model)
    config = model.config
    keep1 = _strongest(conv1.weight, kept_count(config.conv1, keep.conv1))
    keep2 = _strongest(conv2.weight[:, keep1], kept_count(config.conv2, keep.conv2))
    units = _strongest(fc1.weight[:, _fc1_columns(keep2)], kept_count(config.hidden, keep.hidden))
    return KeptIndices(keep1, keep2, units)


@torch.no_grad()
def prune_cnn(model: FashionCNN, keep: KeepRatios, dropout: float | None = None) -> FashionCNN:
    """A new FashionCNN holding the strongest filters and units of each layer, in the fractions `keep` gives, with
    the parent's dropout unless `dropout` is given."""
    kept = select_kept(model, keep)
    conv1, conv2, fc1, fc2 = _layers(model)
    pruned = FashionCNN(replace(model.config, conv1=len(kept.conv1), conv2=len(kept.conv2), hidden=len(kept.hidden),
                                dropout=model.config.dropout if dropout is None else dropout))
    new_conv1, new_conv2, new_fc1, new_fc2 = _layers(pruned)
    new_conv1.weight.copy_(conv1.weight[kept.conv1])
    _bias(new_conv1).copy_(_bias(conv1)[kept.conv1])
    new_conv2.weight.copy_(conv2.weight[kept.conv2][:, kept.conv1])
    _bias(new_conv2).copy_(_bias(conv2)[kept.conv2])
    new_fc1.weight.copy_(fc1.weight[kept.hidden][:, _fc1_columns(kept.conv2)])
    new_fc1.bias.copy_(fc1.bias[kept.hidden])
    new_fc2.weight.copy_(fc2.weight[:, kept.hidden])
    new_fc2.bias.copy_(fc2.bias)
    return pruned


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Structured pruning + fine-tuning", add_help=add_help)
    add_common_args(parser, output="pruned.pt")
    add_training_args(parser, {"fine-tuning": FINETUNE_RECIPE}, epochs_flag="--finetune-epochs")
    add_parent_arg(parser, "--parent", help="the trained full model to prune")
    # 32/96 filters and 320 units: conv1's wide 28×28 output costs the most time per parameter. Over three seeds
    # 32/96/320 lost no more accuracy than 40/80/320, the earlier default, and ran faster: 40/80/320 was just under 2x
    # faster than the full model at batch 64 on one AVX-512 thread (docs/training.md, the pruning attempts).
    parser.add_argument("--conv1-keep", type=float, default=0.5, help="fraction of conv1's filters kept")
    parser.add_argument("--conv2-keep", type=float, default=0.75, help="fraction of conv2's filters kept")
    parser.add_argument("--fc-keep", type=float, default=0.32, help="fraction of the hidden fc units kept")
    # The parent's dropout (0.3) cost the two-epoch fine-tune about half a point: 0.63 against 0.19 pts of loss
    # over three seeds (docs/training.md).
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the pruned model's dropout (it acts only while fine-tuning)")
    parser.add_argument("--kd-alpha", type=float, default=0.8,
                        help="weight of distillation from the unpruned parent while fine-tuning (0: plain CE)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="β of attention transfer from the parent while fine-tuning (training.teaching; 0: off)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.attention_weight and not args.kd_alpha > 0:
        log.error("--attention-weight needs distillation from the parent (--kd-alpha > 0)")
        return 2
    run = prepare_run(args, FINETUNE_RECIPE)
    parent = load_parent(args.parent)
    pruned = prune_cnn(parent, KeepRatios(args.conv1_keep, args.conv2_keep, args.fc_keep), args.dropout)
    before_finetune = evaluate(pruned, run.test).accuracy
    log.info("pruned %d -> %d parameters; accuracy before fine-tuning %.4f",
             count_parameters(parent), count_parameters(pruned), before_finetune)
    criterion: Criterion = CrossEntropy(0.0)
    if args.kd_alpha > 0:
        criterion = distillation = DistillationLoss(parent, args.temperature, args.kd_alpha)
        if args.attention_weight:
            criterion = AttentionTransfer(distillation, pruned, args.attention_weight)
    extra = {
        "parent_parameters": count_parameters(parent),
        "accuracy_before_finetune": before_finetune,
        "method": "structured L1-norm filter/unit pruning; kept channels copied into a narrower model",
    }
    fit_and_save(pruned, criterion, run, args, variant="pruned", parent=args.parent, extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
