"""Export a trained variant to ONNX; with --quantize, ONNX Runtime's static int8 quantization of it.

Exporter: `torch.onnx.export` with the legacy TorchScript-based exporter (`dynamo=False`), opset 17, the batch
dimension dynamic ("batch") on input and output. It exports this CNN to plain Conv/Relu/MaxPool/Flatten/Gemm
nodes with no dependency beyond torch and onnx; the torch.export-based exporter (torch's default since 2.9) needs
onnxscript as well. It prints a DeprecationWarning about being the legacy exporter, recorded in the card.

--quantize: the parent's fp32 export, after ONNX Runtime's quantization pre-processing (shape inference and graph
optimisation), quantized by `onnxruntime.quantization.quantize_static`: QDQ format, weights int8 per output
channel, activations int8 (S8S8, ONNX Runtime's recommended first choice for QDQ), activation ranges by MinMax
over training batches. Name: int8-onnx for the full model (the counterpart of the FX int8 variant).

Every file is checked against its PyTorch parent on the test images (all 10,000; with --dry-run the usual subset):
the share of images with the same top-1 class and the largest difference of any class probability. An fp32 export
must agree on at least MIN_FP32_AGREEMENT of them (exit status 1 otherwise; the card still says by how much); an
int8 model's agreement is recorded, not judged. The card's accuracy and latency are measured on the reloaded file
through `fashion_cnn.load_model`, as the handler loads it.

Usage:
    python -m training.export_onnx --parent checkpoints/full.pt              # -> checkpoints/full-onnx.onnx + card
    python -m training.export_onnx --parent checkpoints/pruned.pt            # -> checkpoints/pruned-onnx.onnx
    python -m training.export_onnx --parent checkpoints/full.pt --quantize   # -> checkpoints/int8-onnx.onnx
    python -m training.export_onnx --dry-run --parent /tmp/full.pt --output /tmp/full-onnx.onnx
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from torch import nn

from fashion_cnn import FORMAT_ONNX, FORMAT_STATE_DICT, IMAGE_SIZE, ONNX_SUFFIX, count_parameters, load_model, normalize
from training.cards import card_path, library_versions, write_card
from training.cli import add_common_args, add_parent_arg, load_parent, prepare_run, run_script
from training.data import Split, iterate_batches
from training.engine import measure_latency, predict_logits

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
# The bar for an fp32 export: the same top-1 class as its PyTorch parent on at least 99.9 % of test images.
MIN_FP32_AGREEMENT = 0.999
# The thread counts of every card's latency table (training.engine.measure_latency's default). A session's thread
# count is fixed when it is made, so each count gets a session of its own.
LATENCY_THREADS = (1, 2)


def export_fp32(model: nn.Module, path: Path, opset: int) -> None:
    """The model as an ONNX file whose batch dimension is free, checked by onnx's model checker."""
    example = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
    )
    onnx.checker.check_model(str(path), full_check=True)


class CalibrationImages(CalibrationDataReader):
    """The first `batches` training batches, normalized as the model sees them, one `{input: array}` at a time."""

    def __init__(self, split: Split, batches: int, batch_size: int) -> None:
        self.dataset = split.dataset
        self.batches = itertools.islice(iterate_batches(split, batch_size), batches)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        images, _ = batch
        self.images += len(images)
        return {INPUT_NAME: normalize(images, self.dataset).numpy()}


def quantize_int8(fp32: Path, output: Path, calibration: CalibrationImages) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(output),
            calibration,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    onnx.checker.check_model(str(output), full_check=True)


def default_opset(path: Path) -> int:
    """The ai.onnx opset the saved file declares (read back, so the card states what ships)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def int8_weights(path: Path) -> list[str]:
    """Names and shapes of the weight tensors the file stores as int8 (zero points, 0-d or 1-d, left out)."""
    model = onnx.load(str(path))
    return [f"{tensor.name} {tuple(tensor.dims)}" for tensor in model.graph.initializer
            if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) >= 2]


def compare(parent_logits: torch.Tensor, model: nn.Module, split: Split) -> dict[str, Any]:
    """How closely `model` follows its parent on `split`: same top-1 share, largest probability difference."""
    logits = predict_logits(model, split)
    probabilities, parent_probabilities = torch.softmax(logits, dim=1), torch.softmax(parent_logits, dim=1)
    return {
        "compared_images": len(split),
        "agreement_with_parent": round((logits.argmax(1) == parent_logits.argmax(1)).float().mean().item(), 6),
        "max_probability_difference": float(f"{(probabilities - parent_probabilities).abs().max().item():.3g}"),
        "parent_test_accuracy": round((parent_logits.argmax(1) == split.labels).float().mean().item(), 6),
    }


def latency_by_threads(path: Path, repeats: int) -> dict[str, dict[str, float]]:
    latency: dict[str, dict[str, float]] = {}
    for threads in LATENCY_THREADS:
        latency.update(measure_latency(load_model(path, FORMAT_ONNX, threads), threads=(threads,), repeats=repeats))
    return latency


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a variant to ONNX (or quantize it with ONNX Runtime)",
                                     add_help=add_help)
    add_common_args(parser, output="full-onnx.onnx")
    # Beside the parent, named after it (<variant>-onnx.onnx, int8-onnx.onnx with --quantize), unless given.
    parser.set_defaults(output=None)
    add_parent_arg(parser, "--parent", help="a state_dict variant (full, pruned, distilled) with its card beside it")
    parser.add_argument("--quantize", action="store_true",
                        help="ONNX Runtime static int8 (QDQ, per-channel) of the parent's export, instead of fp32")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--calibration-batches", type=int, default=32,
                        help="training batches (of --batch-size images) observed to set activation ranges")
    return parser


def main(args: argparse.Namespace) -> int:
    parent_card_file = card_path(args.parent)
    if not parent_card_file.is_file():
        log.error("%s has no card (%s): export a variant the training scripts wrote", args.parent, parent_card_file)
        return 2
    parent_card = json.loads(parent_card_file.read_text())
    if parent_card["format"] != FORMAT_STATE_DICT:
        log.error("%s is saved as %s; only %s variants (full, pruned, distilled) are exported",
                  args.parent, parent_card["format"], FORMAT_STATE_DICT)
        return 2
    source = parent_card["variant"]
    variant = ("int8" if source == "full" else f"{source}-int8") if args.quantize else source
    variant += ONNX_SUFFIX
    args.output = args.output or args.parent.with_name(variant + ".onnx")
    run = prepare_run(args)
    parent = load_parent(args.parent)
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as scratch:
        warnings.simplefilter("always")
        if args.quantize:
            fp32 = Path(scratch) / "fp32.onnx"
            export_fp32(parent, fp32, args.opset)
            calibration = CalibrationImages(run.train, args.calibration_batches, args.batch_size)
            quantize_int8(fp32, args.output, calibration)
            extra["quantization"] = {
                "api": "onnxruntime.quantization.quantize_static after quant_pre_process, static post-training",
                "format": "QDQ",
                "per_channel": True,
                "activations": "int8",
                "weights": "int8",
                "calibration": "MinMax",
                "calibration_images": calibration.images,
                "int8_weights": int8_weights(args.output),
            }
        else:
            export_fp32(parent, args.output, args.opset)
    messages = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})
    for message in messages:
        log.info("warning while exporting: %s", message)
    export_seconds = round(time.perf_counter() - started, 1)
    parity = compare(predict_logits(parent, run.test), load_model(args.output, FORMAT_ONNX), run.test)
    write_card(
        args.output,
        variant=variant,
        model_format=FORMAT_ONNX,
        test_split=run.test,
        parameters=count_parameters(parent),
        args=args,
        parent=args.parent,
        model_args=parent.config.as_dict(),
        extra={
            **extra,
            "onnx": {
                "exporter": "torch.onnx.export, legacy TorchScript-based (dynamo=False)",
                "opset": default_opset(args.output),
                "input": INPUT_NAME,
                "output": OUTPUT_NAME,
                "dynamic_axes": [BATCH_AXIS],
                "session": "fashion_cnn.OnnxModel: CPUExecutionProvider, intra-op threads from the model config, "
                "one inter-op thread, sequential execution",
                **parity,
                "warnings": messages,
            },
            "versions": {**library_versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            # write_card times the model under torch.set_num_threads, which an ONNX Runtime session ignores.
            "latency_ms": latency_by_threads(args.output, args.latency_repeats),
            "latency_method": "median of repeated forward passes after warm-up, in-process, random input; "
            "one ONNX Runtime session per thread count",
            "export_seconds": export_seconds,
        },
        latency_repeats=args.latency_repeats,
    )
    log.info("%s: top-1 agreement with %s %.4f on %d images, largest probability difference %.3g",
             variant, args.parent, parity["agreement_with_parent"], parity["compared_images"],
             parity["max_probability_difference"])
    if not args.quantize and parity["agreement_with_parent"] < MIN_FP32_AGREEMENT:
        log.error("%s agrees with its parent on %.4f of the test images, below %.4f: the export is wrong",
                  args.output, parity["agreement_with_parent"], MIN_FP32_AGREEMENT)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser()))
