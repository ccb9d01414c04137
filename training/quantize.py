"""Static int8 post-training quantization (x86 backend), saved as TorchScript.

API: `torch.ao.quantization.quantize_fx` (`prepare_fx` → calibrate → `convert_fx`), then `torch.jit.trace`
and `torch.jit.freeze`. Why this one, measured on torch 2.14.1 (see docs/training.md):
  * It quantizes both convolutions and both linear layers (weights per-channel int8, activations uint8)
    with the 'x86' qconfig (fbgemm/onednn kernels), and is ~5x faster than fp32 at batch 64 on one thread.
  * TorchScript is a saved form a fresh process (the TorchServe worker) loads with `torch.jit.load`,
    without our Python classes and without unpickling code, at any batch size.
  * torchao's PT2E flow is the successor, but its int8 model is 20-30x slower than fp32 unless compiled,
    and its AOTInductor package answers garbage when built with a dynamic batch.
It prints a DeprecationWarning (torch.ao.quantization is deprecated in favour of torchao) and a
FutureWarning for every torch.jit call; both are recorded in the card. Accuracy is re-measured on the
reloaded file.

Usage:
    python -m training.quantize --parent checkpoints/full.pt     # -> checkpoints/int8.pt + card
    python -m training.quantize --dry-run --parent /tmp/full.pt --output /tmp/int8.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from fashion_cnn import FORMAT_TORCHSCRIPT, IMAGE_SIZE, load_model, normalize
from training.cards import write_card
from training.cli import add_common_args, add_parent_arg, load_parent, prepare_run, run_script
from training.data import Split, iterate_batches
from training.engine import evaluate

log = logging.getLogger(__name__)

QUANTIZATION_BACKEND = "x86"


@torch.inference_mode()
def quantize_static_int8(model: nn.Module, calibration: Split, batches: int, batch_size: int) -> nn.Module:
    """Observe activation ranges on `batches` shuffled-free training batches, then convert to int8."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = QUANTIZATION_BACKEND
    model = model.eval()
    example = (torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE),)
    prepared = prepare_fx(model, get_default_qconfig_mapping(QUANTIZATION_BACKEND), example)
    for index, (images, _) in enumerate(iterate_batches(calibration, batch_size)):
        if index >= batches:
            break
        prepared(normalize(images, calibration.dataset))
    return convert_fx(prepared)


def save_torchscript(model: nn.Module, path: Path) -> None:
    example = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        traced = torch.jit.trace(model, example)
    frozen = torch.jit.freeze(traced.eval())
    torch.jit.save(frozen, str(path))


def packed_layers(scripted: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(layer kind, weight, bias) of every quantized conv/linear inside a frozen TorchScript int8 model.

    Freezing folds the layers' packed parameters into graph constants; unpacking them shows the weights
    really are stored as int8.
    """
    if not isinstance(scripted, torch.jit.ScriptModule):
        raise TypeError(f"expected a TorchScript module, got {type(scripted).__name__}")
    layers = []
    for node in scripted.graph.nodes():
        if node.kind() != "prim::Constant":
            continue
        type_name = str(node.output().type())
        if "Conv2dPackedParamsBase" in type_name:
            weight, bias = torch.ops.quantized.conv2d_unpack(node.output().toIValue())
            layers.append(("conv2d", weight, bias))
        elif "LinearPackedParamsBase" in type_name:
            weight, bias = torch.ops.quantized.linear_unpack(node.output().toIValue())
            layers.append(("linear", weight, bias))
    return layers


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Static int8 post-training quantization", add_help=add_help)
    add_common_args(parser, output="int8.pt")
    add_parent_arg(parser, "--parent", help="the trained full model to quantize")
    parser.add_argument("--calibration-batches", type=int, default=32,
                        help="training batches (of --batch-size images) observed to set activation ranges")
    return parser


def main(args: argparse.Namespace) -> int:
    run = prepare_run(args)
    parent = load_parent(args.parent)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize_static_int8(parent, run.train, args.calibration_batches, args.batch_size)
        in_memory_accuracy = evaluate(quantized, run.test).accuracy
        save_torchscript(quantized, args.output)
    messages = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})
    for message in messages:
        log.info("warning while quantizing: %s", message)
    layers = packed_layers(load_model(args.output, FORMAT_TORCHSCRIPT))
    parameters = sum(w.numel() + (b.numel() if b is not None else 0) for _, w, b in layers)
    write_card(
        args.output,
        variant="int8",
        model_format=FORMAT_TORCHSCRIPT,
        test_split=run.test,
        parameters=parameters,
        args=args,
        parent=args.parent,
        model_args=parent.config.as_dict(),
        extra={
            "quantization": {
                "api": "torch.ao.quantization.quantize_fx (prepare_fx / convert_fx), static post-training",
                "backend": QUANTIZATION_BACKEND,
                "qconfig": f"get_default_qconfig_mapping('{QUANTIZATION_BACKEND}')",
                "saved_form": "TorchScript (torch.jit.trace + torch.jit.freeze), loaded with torch.jit.load",
                "why": "quantizes conv and linear layers to int8, fastest measured on x86 eager CPU, and "
                "reloads in a fresh process without our classes at any batch size; torchao PT2E needs "
                "compilation to be fast and its dynamic-batch AOTInductor package answered garbage here",
                "calibration_images": min(args.calibration_batches * args.batch_size, len(run.train)),
                "accuracy_before_save": in_memory_accuracy,
                "int8_layers": [f"{kind} {tuple(w.shape)} {w.dtype}" for kind, w, _ in layers],
                "warnings": messages,
            },
            "training_seconds": round(time.perf_counter() - started, 1),
        },
        latency_repeats=args.latency_repeats,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
