"""What the load tests send and how they judge it, shared by the Locust users, `make loadtest` and `make bench`:
real Fashion-MNIST test images with their true labels, the endpoints and tokens of a running stack, full-
resolution latency samples (Locust rounds its own) with the generator's own lag, and the pass/fail gate.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from router.stats import percentile
from serving.client import prediction_path
from serving.project import REPO

CLASSES = 10
SAMPLE_FIELDS = ("name", "ok", "at", "service_ms", "latency_ms", "correct", "lag_ms", "no_free_user")
# A fixed-rate run measures the system only while the generator sends on time. Its lag (how late a request left
# against its intended send time) is part of every latency figure, so a run whose lag p99 exceeds this is invalid:
# half of the smallest p99 difference the kit claims to resolve (the router may add at most 5 ms at p99 at
# 200 req/s). The lag's floor is the event loop's timer granularity (~0.7 ms at p50, measured); its tail is the
# generator's own work and, on shared cores, the time it waits for one (docs/loadtest.md has the measurements).
MAX_LAG_P99_MS = 2.5
# Little's law sizes the users: in flight = rate × latency. Each closed-loop user holds one request in flight, so
# the users cover the rate × this much latency before a request finds no free user and leaves late: a stall of
# the system shorter than this still meets a free user, as an open-loop client would. Idle users cost little
# (a sleeping greenlet and a connection each).
USER_LATENCY_BUDGET_S = 0.5
MIN_USERS = 8


@dataclass(frozen=True)
class Item:
    """One test image as the two bodies we send (a PNG file, JSON pixels) and its true label."""

    png: bytes
    json: bytes
    label: int


def test_items(count: int = 256, data_dir: Path | None = None) -> list[Item]:
    from training.data import load_split

    split = load_split("fashion-mnist", "test", data_dir).subset(count)
    items = []
    for pixels, label in zip(split.images.numpy(), split.labels.tolist(), strict=True):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        items.append(Item(buffer.getvalue(), json.dumps({"data": pixels.tolist()}).encode(), int(label)))
    return items


@dataclass(frozen=True)
class Endpoint:
    """Where one kind of load goes: TorchServe directly (a model) or the router (an experiment, maybe pinned)."""

    path: str  # "direct" or "router"
    rest_url: str  # base URL
    grpc_target: str
    token: str
    model: str  # model name (direct) or experiment name (router)
    version: str | None = None
    arm: str | None = None  # router only: pin this arm (X-Arm)
    override_header: str = "X-Arm"

    def rest_path(self) -> str:
        return prediction_path(self.model, self.version)

    def headers(self, content_type: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type}
        if self.arm:
            headers[self.override_header] = self.arm
        return headers

    def metadata(self) -> tuple[tuple[str, str], ...]:
        metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self.token}"),)
        if self.arm:
            metadata += ((self.override_header.lower(), self.arm),)
        return metadata


def endpoint(path: str, variant: str, run_dir: Path | None = None, router_config: Path | None = None,
             experiment: str = "fashion", pin: bool = True) -> Endpoint:
    """The endpoint of `variant` in the stack `make serve` started: direct, or through the router's experiment
    (pinned to the arm serving that variant's model when `pin`, else routed by the experiment's weights)."""
    from serving import server
    from serving.project import model_name

    instance = server.Instance.load((run_dir or server.DEFAULT_RUN_DIR).resolve())
    model = model_name(variant)
    if path == "direct":
        return Endpoint("direct", instance.inference_url, instance.grpc_target, instance.token(), model)
    from router.config import load_config
    from router.process import base_url
    from router.tokens import load_tokens

    config = load_config(router_config or REPO / "router" / "experiments.yaml")
    arm = next((a.name for a in config.experiments[experiment].arms if a.target.model == model), None)
    if pin and arm is None:
        raise ValueError(f"experiment {experiment!r} has no arm serving {model}")
    return Endpoint("router", base_url(config),
                    f"{config.listen.host}:{config.listen.grpc_port}", load_tokens(config.tokens_file).client,
                    experiment, arm=arm if pin else None, override_header=config.override_header)


def judge(body: bytes, label: int) -> tuple[str | None, bool]:
    """(what is wrong with an answer, or None; whether it named the true label)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return "answer is not JSON", False
    if not isinstance(answer, dict):
        return "answer is not a JSON object", False
    if "error" in answer:  # gRPC carries handler errors in the body
        return f"error in the answer: {answer['error']}", False
    predicted = answer.get("label")
    if not isinstance(predicted, int) or not 0 <= predicted < CLASSES:
        return f"answer has no known class: {str(answer)[:120]}", False
    return None, predicted == label


def users_for_rate(rate: float) -> int:
    """How many closed-loop users keep a fixed arrival rate on schedule (Little's law, see USER_LATENCY_BUDGET_S)."""
    return max(MIN_USERS, math.ceil(rate * USER_LATENCY_BUDGET_S))


@dataclass(frozen=True)
class Sample:
    name: str
    ok: bool
    at: float  # completion time (epoch seconds)
    service_ms: float  # from sending to the answer
    latency_ms: float  # fixed rate: from the intended send time (= lag_ms + service_ms); else = service_ms
    correct: bool | None
    lag_ms: float | None = None  # fixed rate: how late the request left against its intended send time
    no_free_user: bool = False  # fixed rate: its slot had passed before any user was free to take it


def write_samples(path: Path, samples: Iterable[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SAMPLE_FIELDS)
        for s in samples:
            writer.writerow((s.name, int(s.ok), f"{s.at:.6f}", f"{s.service_ms:.3f}", f"{s.latency_ms:.3f}",
                             "" if s.correct is None else int(s.correct),
                             "" if s.lag_ms is None else f"{s.lag_ms:.3f}", int(s.no_free_user)))


def read_samples(paths: Iterable[Path]) -> list[Sample]:
    samples = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                correct = None if row["correct"] == "" else row["correct"] == "1"
                lag = row.get("lag_ms") or ""  # absent from files written before the lag was measured
                samples.append(Sample(row["name"], row["ok"] == "1", float(row["at"]), float(row["service_ms"]),
                                      float(row["latency_ms"]), correct, float(lag) if lag else None,
                                      row.get("no_free_user") == "1"))
    return samples


def summarize(samples: list[Sample], start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Per request name and in total: count, failures, throughput, latency percentiles from every sample,
    accuracy of the answers that named a class and, in fixed-rate runs, the generator's lag percentiles and the
    share of requests that found no free user (None in closed-loop runs)."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.name].append(sample)
        groups["Aggregated"].append(sample)
    if not samples:
        return {}
    start = min(s.at - s.service_ms / 1000 for s in samples) if start is None else start
    end = max(s.at for s in samples) if end is None else end
    duration = max(end - start, 1e-9)
    summary = {}
    for name, group in groups.items():
        latencies = [s.latency_ms for s in group if s.ok]
        judged = [s.correct for s in group if s.correct is not None]
        summary[name] = {
            "requests": len(group),
            "failures": sum(not s.ok for s in group),
            "failure_ratio": sum(not s.ok for s in group) / len(group),
            "throughput": sum(s.ok for s in group) / duration,
            **{f"p{q}_ms": percentile(latencies, q) for q in (50, 95, 99)},
            "max_ms": max(latencies) if latencies else None,
            "accuracy": sum(judged) / len(judged) if judged else None,
            **lag_figures(group),
        }
    return summary


def lag_figures(samples: list[Sample]) -> dict[str, float | None]:
    """The generator's lag over every request it sent on a schedule, failed ones too (they left late all the same)."""
    lags = [s.lag_ms for s in samples if s.lag_ms is not None]
    scheduled = [s for s in samples if s.lag_ms is not None]
    return {**{f"lag_p{q}_ms": percentile(lags, q) for q in (50, 99)},
            "lag_max_ms": max(lags) if lags else None,
            "no_free_user_ratio": sum(s.no_free_user for s in scheduled) / len(scheduled) if scheduled else None}


@dataclass(frozen=True)
class Gate:
    """What a run must meet (`violations`: the system failed) and what makes it no measurement at all (`invalid`:
    the generator, not the system, shaped the figures)."""

    max_failure_ratio: float = 0.0
    max_p95_ms: float | None = None
    max_p99_ms: float | None = None
    max_lag_p99_ms: float = MAX_LAG_P99_MS

    def violations(self, summary: dict[str, Any]) -> list[str]:
        total = summary.get("Aggregated")
        if total is None:
            return ["no requests were made"]
        problems = []
        if total["failure_ratio"] > self.max_failure_ratio:
            problems.append(f"failure ratio {total['failure_ratio']:.2%} > {self.max_failure_ratio:.2%}")
        for q, limit in ((95, self.max_p95_ms), (99, self.max_p99_ms)):
            value = total[f"p{q}_ms"]
            if limit is not None and (value is None or value > limit):
                problems.append(f"p{q} {value if value is None else round(value, 1)} ms > {limit:g} ms")
        return problems

    def invalid(self, summary: dict[str, Any]) -> list[str]:
        total = summary.get("Aggregated") or {}
        lag = total.get("lag_p99_ms")
        if lag is not None and lag > self.max_lag_p99_ms:
            return [f"generator lag p99 {lag:.1f} ms > {self.max_lag_p99_ms:g} ms "
                    f"({total['no_free_user_ratio']:.1%} of requests found no free user)"]
        return []


def publish(table: str, output: Path | None) -> None:
    """Print a measured table, and write it to `output` too when one is named (a script's --output)."""
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table)
    print(table)


def fmt_pct(value: float | None) -> str:
    """A share as a percentage, or a dash where there is none (no answer named a true label)."""
    return "–" if value is None else f"{value:.2%}"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def resident_mb(pid: int) -> float:
    """Resident memory of a live process in MB. A process that has gone (or a wrong pid) raises
    ProcessLookupError rather than reading as zero: a flat line must mean flat memory."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1 << 20)
    except psutil.NoSuchProcess as error:  # ZombieProcess too: exited, not yet reaped
        raise ProcessLookupError(f"no process {pid}: it has exited (or was never there)") from error


def children(pid: int) -> list[int]:
    """Direct and indirect children of a live process (TorchServe's Python workers under its Java frontend);
    ProcessLookupError if it has gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess as error:
        raise ProcessLookupError(f"no process {pid}: it has exited (or was never there)") from error


def model_workers(frontend: int) -> list[int]:
    """TorchServe's model workers under its frontend: its other children come and go on their own (the metrics
    collector runs every minute), and must not read as a worker restart."""
    workers = []
    for pid in children(frontend):
        try:
            if any("model_service_worker" in part for part in psutil.Process(pid).cmdline()):
                workers.append(pid)
        except psutil.NoSuchProcess:  # a short-lived child that has just exited
            continue
    return workers
