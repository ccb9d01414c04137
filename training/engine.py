"""The one training core that train, prune, distill and quantize share.

Losses are callables `criterion(logits, images, targets)`, so distillation plugs in a loss that also asks the
teacher about the same (augmented) images, and everything else stays the same loop.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fashion_cnn import DATASETS, IMAGE_SIZE, ChannelsLast, normalize
from training.data import Augmentation, Split, iterate_batches

log = logging.getLogger(__name__)

Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Images per forward pass when evaluating: large batches, as nothing is kept for backward.
EVAL_BATCH_SIZE = 500
# Timed forward passes per cell of a card's latency table (after warm-up).
LATENCY_REPEATS = 50
# Interleaved timing of several models (measure_latency_interleaved): rounds per cell, forward passes per round.
INTERLEAVED_ROUNDS = 15
INTERLEAVED_PASSES = 4


def set_seed(seed: int) -> torch.Generator:
    """Seed every RNG a run touches; the returned generator drives shuffling and augmentation."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class CrossEntropy:
    def __init__(self, label_smoothing: float) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al. (2015): alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha)·CE(s, y).

    T² keeps the soft term's gradients on the scale of the hard term's as T grows.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return alpha * temperature * temperature * soft + (1.0 - alpha) * hard


class DistillationLoss:
    """Asks the frozen teacher about the very images the student sees (augmentation included)."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        # Channels-last, as the student trains (fit): oneDNN's convolutions are faster on that layout.
        self.teacher = ChannelsLast(teacher).eval()
        self.temperature = temperature
        self.alpha = alpha

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            teacher_logits = self.teacher(images)
        return distillation_loss(logits, teacher_logits.float(), targets, self.temperature, self.alpha)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX tiles or AVX-512 BF16). On an AVX2-only CPU autocast
    emulates it: a batch of 128 through the full model took 2.3 s here against 0.25 s in fp32 (AVX2 only)."""
    # torch's own checks are private: a torch without them counts as no native bfloat16 (fp32, always correct).
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast_context(enabled: bool) -> torch.autocast | nullcontext[None]:
    # bfloat16 autocast uses the CPU's AMX/AVX-512 BF16 units where present: ~2x faster training there.
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def train_one_epoch(
    model: nn.Module,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    split: Split,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    augmentation: Augmentation | None,
    bf16: bool,
) -> float:
    """One pass over `split` in shuffled batches; returns the mean training loss."""
    model.train()
    total_loss, seen = 0.0, 0
    batches = iterate_batches(split, batch_size, generator, shuffle=True, augmentation=augmentation)
    steps = (len(split) + batch_size - 1) // batch_size
    progress = tqdm(batches, total=steps, desc=f"epoch {epoch}", leave=False, unit="batch", mininterval=1.0)
    for raw_images, targets in progress:
        images = normalize(raw_images, split.dataset).contiguous(memory_format=torch.channels_last)
        with autocast_context(bf16):
            logits = model(images)
            loss = criterion(logits.float(), images, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        total_loss += loss.item() * targets.shape[0]
        seen += targets.shape[0]
        progress.set_postfix(loss=f"{total_loss / seen:.4f}")
    return total_loss / max(seen, 1)


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    per_class_accuracy: dict[str, float]
    loss: float
    count: int


@torch.inference_mode()
def predict_logits(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    model.eval()
    outputs = [model(normalize(images, split.dataset)) for images, _ in iterate_batches(split, batch_size)]
    return torch.cat(outputs).float()


def evaluate(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> Evaluation:
    logits = predict_logits(model, split, batch_size)
    labels = split.labels
    predictions = logits.argmax(dim=1)
    correct = predictions == labels
    classes = DATASETS[split.dataset].classes
    per_class = {
        name: round(correct[labels == index].float().mean().item(), 6)
        for index, name in enumerate(classes)
        if bool((labels == index).any())
    }
    return Evaluation(
        accuracy=round(correct.float().mean().item(), 6),
        per_class_accuracy=per_class,
        loss=round(F.cross_entropy(logits, labels).item(), 6),
        count=len(split),
    )


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle schedule (warm-up, then cosine annealing to ~0), stepped per batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=max(epochs, 1), steps_per_epoch=max(steps_per_epoch, 1), pct_start=0.2
    )
    return optimizer, scheduler


def fit(
    model: nn.Module,
    criterion: Criterion,
    train_split: Split,
    test_split: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    generator: torch.Generator,
    augmentation: Augmentation | None,
    bf16: bool,
) -> list[dict[str, float]]:
    """Train for `epochs` and return a per-epoch history (loss, test accuracy, seconds).

    The model trains in channels-last memory format (oneDNN's convolutions run faster on that layout; a full-model
    epoch takes about 90 s on this project's 2-core AVX2 CPU) and is handed back contiguous, as it is saved and
    served.
    """
    model.to(memory_format=torch.channels_last)
    steps = (len(train_split) + batch_size - 1) // batch_size
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, epochs, steps)
    history = []
    for epoch in tqdm(range(1, epochs + 1), desc="epochs", unit="epoch"):
        started = time.perf_counter()
        loss = train_one_epoch(
            model, criterion, optimizer, train_split, batch_size, generator, epoch, scheduler, augmentation, bf16
        )
        seconds = time.perf_counter() - started
        accuracy = evaluate(model, test_split).accuracy
        log.info("epoch %d: train loss %.4f, test accuracy %.4f, %.0f s", epoch, loss, accuracy, seconds)
        history.append({"epoch": epoch, "train_loss": round(loss, 6), "test_accuracy": accuracy,
                        "seconds": round(seconds, 1)})
    model.to(memory_format=torch.contiguous_format)
    return history


def measure_latency(
    model: nn.Module,
    batch_sizes: Iterable[int] = (1, 64),
    threads: Iterable[int] = (1, 2),
    repeats: int = LATENCY_REPEATS,
    warmup: int = 10,
) -> dict[str, dict[str, float]]:
    """Median wall-clock milliseconds per forward pass of one model, by thread count and batch size.

    Returns {"threads_1": {"batch_1": ms, "batch_64": ms}, "threads_2": {...}}.
    """
    timed = measure_latency_interleaved({"model": model}, batch_sizes, threads, rounds=repeats, passes=1,
                                        warmup=warmup)
    return timed["model"]


def measure_latency_interleaved(
    models: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    batch_sizes: Iterable[int] = (1, 64),
    threads: Iterable[int] = (1, 2),
    rounds: int = INTERLEAVED_ROUNDS,
    passes: int = INTERLEAVED_PASSES,
    warmup: int = 10,
) -> dict[str, dict[str, dict[str, float]]]:
    """Milliseconds per forward pass of several models, timed interleaved so that they can be compared.

    For each thread count and batch size, every model runs `rounds` times in turn, `passes` forward passes each
    time; a model's figure is the median over its rounds of the mean pass. A machine that slows down or speeds
    up during the run (another process, the CPU's clock) then weighs on every model alike, which timing each
    model on its own, minutes apart, does not. Returns {name: {"threads_1": {"batch_1": ms, ...}, ...}}.
    """
    previous_threads = torch.get_num_threads()
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for model in models.values():
        if isinstance(model, nn.Module):
            model.eval()
    try:
        for thread_count in threads:
            torch.set_num_threads(thread_count)
            for batch in batch_sizes:
                x = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE)
                samples: dict[str, list[float]] = {name: [] for name in models}
                with torch.inference_mode():
                    for model in models.values():
                        for _ in range(warmup):
                            model(x)
                    for _ in range(rounds):
                        for name, model in models.items():
                            started = time.perf_counter()
                            for _ in range(passes):
                                model(x)
                            samples[name].append((time.perf_counter() - started) * 1000.0 / passes)
                for name, timings in samples.items():
                    results[name].setdefault(f"threads_{thread_count}", {})[f"batch_{batch}"] = round(
                        statistics.median(timings), 4)
    finally:
        torch.set_num_threads(previous_threads)
    return results
