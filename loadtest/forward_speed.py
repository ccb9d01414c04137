"""The model's forward pass on this CPU, per variant and runtime, timed interleaved in one run: which form of each
variant to serve (issue "ONNX Runtime and a faster full model", item 3).

Candidates, each loaded from the checkpoints a run of `make train` and `make onnx` leaves:
  * eager fp32 (the state_dict variants; the FX int8 TorchScript for int8) — the reference of its variant;
  * channels-last memory format (state_dict variants);
  * bfloat16 autocast (state_dict variants) — on a CPU without AMX or AVX-512 BF16 (see `cpu_features`) it runs
    emulated, and is measured to show by how much that loses;
  * `torch.jit.freeze` of a trace (oneDNN fusion of conv + relu) (state_dict variants);
  * `torch.compile` (inductor) with `--compile` (its first call compiles for a minute or more);
  * ONNX Runtime, from `<variant>-onnx.onnx` (`training.export_onnx`), one intra-op thread, as the handler runs it.
Every candidate is checked against its variant's reference on `--images` test images (top-1 agreement, accuracy)
before it is timed. Timing (`training.engine.measure_latency_interleaved`): for each batch size, `--rounds` rounds in
which every candidate runs `--repeats` forward passes in turn (so a drift of the machine hits all alike); the median
over rounds is kept. One thread (what one TorchServe worker has in the kit's model configs).

Writes reports/forward_speed.md (and .json). Usage:
    .venv/bin/python -m loadtest.forward_speed [--checkpoints checkpoints] [--rounds 5] [--compile]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fashion_cnn
from serving.project import REPO, VARIANTS
from training.data import load_split
from training.engine import measure_latency_interleaved

log = logging.getLogger("loadtest.forward_speed")

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    variant: str
    runtime: str
    forward: Forward


@dataclass(frozen=True)
class Measured:
    variant: str
    runtime: str
    agreement: float  # top-1 agreement with the variant's reference on the checked images
    accuracy: float
    ms_per_batch: dict[int, float]  # median over rounds

    def images_per_s(self, batch: int) -> float:
        return batch / self.ms_per_batch[batch] * 1000


def cpu_features() -> list[str]:
    """The CPU's flags that decide bfloat16 and int8 speed (AMX, AVX-512 BF16 / VNNI, AVX2)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")
    return [flag for flag in wanted if f" {flag}" in flags]


def candidates(checkpoints: Path, variant: str, compile_too: bool) -> list[Candidate]:
    card = json.loads((checkpoints / f"{variant}.card.json").read_text())
    model = fashion_cnn.load_model(checkpoints / card["file"], card["format"])
    found = [Candidate(variant, "eager fp32" if card["format"] == fashion_cnn.FORMAT_STATE_DICT else card["format"],
                       model)]
    if card["format"] == fashion_cnn.FORMAT_STATE_DICT:
        found.append(Candidate(variant, "channels-last", fashion_cnn.load_model(
            checkpoints / card["file"], card["format"], memory_format=fashion_cnn.CHANNELS_LAST)))

        def bfloat16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x).float()

        found.append(Candidate(variant, "bfloat16 autocast", bfloat16))
        example = torch.zeros(8, 1, fashion_cnn.IMAGE_SIZE, fashion_cnn.IMAGE_SIZE)
        frozen = torch.jit.freeze(torch.jit.trace(model, example).eval())
        found.append(Candidate(variant, "jit freeze (oneDNN fusion)", frozen))
        if compile_too:
            found.append(Candidate(variant, "torch.compile", torch.compile(model, dynamic=True)))
    onnx_card = checkpoints / f"{variant}{fashion_cnn.ONNX_SUFFIX}.card.json"
    if onnx_card.is_file():
        exported = json.loads(onnx_card.read_text())
        found.append(Candidate(variant, "ONNX Runtime", fashion_cnn.load_model(checkpoints / exported["file"],
                                                                              exported["format"], threads=1)))
    return found


def measure(found: list[Candidate], images: torch.Tensor, labels: torch.Tensor, batches: list[int], rounds: int,
            repeats: int, dataset: str) -> list[Measured]:
    inputs = fashion_cnn.normalize(images.float(), dataset)
    with torch.inference_mode():
        reference = {c.variant: c.forward(inputs).argmax(1) for c in found if c.runtime in ("eager fp32",
                                                                                          "torchscript")}
        checks = {}
        for candidate in found:
            predicted = candidate.forward(inputs).argmax(1)
            checks[(candidate.variant, candidate.runtime)] = (
                (predicted == reference[candidate.variant]).float().mean().item(),
                (predicted == labels).float().mean().item())
    timed = measure_latency_interleaved({f"{c.variant}/{c.runtime}": c.forward for c in found}, batch_sizes=batches,
                                        threads=(1,), rounds=rounds, passes=repeats, warmup=1)
    return [Measured(c.variant, c.runtime, *checks[(c.variant, c.runtime)],
                     {batch: timed[f"{c.variant}/{c.runtime}"]["threads_1"][f"batch_{batch}"] for batch in batches})
            for c in found]


def markdown(results: list[Measured], batches: list[int], command: str, features: list[str]) -> str:
    lines = ["# The forward pass, per variant and runtime", "",
             f"`{command}`: one thread, the median of interleaved rounds. CPU features: "
             f"{', '.join(features) or 'none of AMX, AVX-512, AVX2'}.", "",
             "| variant | runtime | agreement with its reference | accuracy | "
             + " | ".join(f"img/s at batch {b}" for b in batches) + " | × its reference at batch "
             f"{batches[-1]} |", "|---|---|---|---|" + "---|" * len(batches) + "---|"]
    for result in results:
        reference = next(r for r in results if r.variant == result.variant)
        speedup = result.images_per_s(batches[-1]) / reference.images_per_s(batches[-1])
        lines.append(f"| {result.variant} | {result.runtime} | {result.agreement:.2%} | {result.accuracy:.2%} | "
                     + " | ".join(f"{result.images_per_s(b):,.0f}" for b in batches) + f" | {speedup:.2f} |")
    best: dict[str, Measured] = {}
    for result in results:
        if result.agreement >= 0.999 and (result.variant not in best or result.images_per_s(batches[-1]) >
                                          best[result.variant].images_per_s(batches[-1])):
            best[result.variant] = result
    lines += ["", f"Fastest at batch {batches[-1]} with ≥ 99.9 % agreement: " + "; ".join(
        f"{variant}: {result.runtime}" for variant, result in best.items()) + "."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dataset", default=fashion_cnn.DEFAULT_DATASET)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=2000, help="test images every candidate is checked on")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes to compile)")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "forward_speed.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    split = load_split(args.dataset, "test", args.data_dir).subset(args.images)
    found = [c for variant in args.variants for c in candidates(args.checkpoints, variant, args.compile)]
    results = measure(found, split.images, split.labels, args.batches, args.rounds, args.repeats, args.dataset)
    command = (f"python -m loadtest.forward_speed --rounds {args.rounds} --repeats {args.repeats} --images "
               f"{args.images}" + (" --compile" if args.compile else ""))
    table = markdown(results, args.batches, command, cpu_features())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    args.output.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    log.info("%s", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
