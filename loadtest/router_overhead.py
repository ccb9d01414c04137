"""What the A/B router costs: throughput and latency of the same model, direct to TorchServe and through the
router, REST and gRPC, in TorchServe's protocol and in the Open Inference Protocol (v2), measured back to back in
one run on one machine (the ratio is the claim), and the router's own CPU time per request.

The v2 rows send the example image as a UINT8 [1, 28, 28] tensor to the router (the protocol's JSON over REST,
typed contents over gRPC) and compare it with the request the router itself sends upstream for it, made
directly (the tensor as an NPY body to TorchServe's `/predictions`, or in its gRPC `Predictions`): the
difference is what the router adds on v2 — parsing and checking the tensor, converting it, shaping the answer —
beside what it adds on TorchServe's protocol. TorchServe's own v2 endpoints (`/v2/models/{m}/infer`, its
`GRPCInferenceService`, where the handler parses the JSON tensor itself) are measured too, direct only, for
a client choosing between the two.

REST load comes from wrk (C, cheap on the CPU it shares with the servers); gRPC load from a grpc.aio
closed-loop client in this process (there is no ghz in Debian). Each configuration runs `--rounds` times,
direct and router alternating, so drifts of the machine hit both alike; the table gives the median round.
Router requests pin the arm that serves the same model (`X-Arm`), so both paths run the same model.

The router's CPU per request is its process's CPU time (user + system, psutil) over a round divided by the
requests of that round. The fixed-rate tail is measured open-loop at `--rate` req/s: each request is sent at
its scheduled time whatever the earlier ones are doing, and its latency counts from that scheduled time, so a
stall shows up in the tail instead of silently lowering the rate (no coordinated omission); the generator's
own lag (actual minus scheduled send time) is reported beside it.

Usage:
    make serve                                   # TorchServe + router
    .venv/bin/python -m loadtest.router_overhead [--duration-s 8] [--rounds 3] [--connections 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import psutil
from PIL import Image

from loadtest.workload import Endpoint
from router.config import Arm, Experiment, load_config
from router.open_inference import BINARY_HEADER, TensorRequest
from router.process import base_url, running_pid
from router.stats import percentile
from router.tokens import load_tokens
from serving import protos, server
from serving.project import REPO

log = logging.getLogger("loadtest.router_overhead")

WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
{headers}
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


# The router's hot-path targets (issue "Hardening and a cleaner core"): at scale its cores are pure overhead.
TARGET_CPU_US = {"rest": 150.0, "grpc": 250.0}
# The Open Inference Protocol's paths: the router's added latency on each within 10 % of TorchServe's protocol's
# (issue "The Open Inference Protocol through the router").
# v2-rest sends the protocol's JSON; v2-rest-binary Triton's binary extension, tritonclient's default (the
# tensor's raw bytes after a JSON header, and the outputs asked for in binary). v2-grpc sends the tensor in typed
# contents; v2-grpc-raw in raw_input_contents, what tritonclient's gRPC client sends (the answer comes raw too).
V2_OF = {"v2-rest": "rest", "v2-rest-binary": "rest", "v2-grpc": "grpc", "v2-grpc-raw": "grpc"}
V2_REST = ("v2-rest", "v2-rest-binary")
V2_GRPC = ("v2-grpc", "v2-grpc-raw")
V2_ADDED_WITHIN = 0.10
ADDED_FLOOR_MS = 0.1  # a bound on the v2 added latency never below this, whatever TorchServe's protocol measured
TORCHSERVE_V2 = ("torchserve-v2-rest", "torchserve-v2-grpc")  # TorchServe's own v2 endpoints: direct only
PROTOCOLS = ("rest", "grpc", *V2_OF, *TORCHSERVE_V2)
TARGET_ADDED_P50_MS = 1.0  # on one connection
TARGET_ADDED_P99_MS = 5.0  # at the fixed rate


@dataclass(frozen=True)
class Result:
    protocol: str
    path: str  # "direct" or "router"
    connections: int
    round: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    router_cpu_us: float | None = None  # the router's CPU time per request (router rounds only)


@dataclass(frozen=True)
class FixedRate:
    path: str
    round: int
    rate: float
    sent: int
    p50_ms: float
    p99_ms: float
    lag_p99_ms: float  # how late the generator sent its requests (99th percentile)
    errors: int


class CpuMeter:
    """CPU seconds (user + system) a process has used, read before and after a round."""

    def __init__(self, pid: int | None) -> None:
        self.process = psutil.Process(pid) if pid is not None else None
        self.start = self._now()

    def _now(self) -> float:
        if self.process is None:
            return 0.0
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def per_request_us(self, requests: int) -> float | None:
        if self.process is None or requests <= 0:
            return None
        return (self._now() - self.start) / requests * 1e6


def wrk(url: str, headers: dict[str, str], body: Path, connections: int, duration_s: float) -> tuple[float, float,
                                                                                                      float, int]:
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "post.lua"
        lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items())
        script.write_text(WRK_SCRIPT.format(body=body, headers=lines))
        output = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
                                 "--timeout", "10s", "-s", str(script), url],
                                capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]

    def latency(label: str) -> float:
        value, unit = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    count = int(errors.group(1)) if errors else 0
    count += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return rate, latency("50"), latency("99"), count


def v2_pixels(image: Path) -> np.ndarray:
    """The example image as the v2 tensor the bench sends: UINT8 [1, 28, 28]."""
    return np.asarray(Image.open(image).convert("L").resize((28, 28)), dtype=np.uint8)[None]


def v2_json(image: Path) -> bytes:
    pixels = v2_pixels(image)
    return json.dumps({"id": "bench", "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
                                                  "data": pixels.ravel().tolist()}]}).encode()


def v2_binary(image: Path) -> tuple[bytes, int]:
    """The same tensor in Triton's binary extension, as tritonclient builds it by default: (body, JSON length)."""
    from tritonclient.http import InferenceServerClient, InferInput

    tensor = InferInput("images", [1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(v2_pixels(image))
    body, json_length = InferenceServerClient.generate_request_body([tensor], request_id="bench")
    return body, json_length


def v2_npy(image: Path) -> bytes:
    """What the router sends TorchServe for that tensor (router.open_inference.TensorRequest.upstream_body)."""
    return TensorRequest("bench", "UINT8", (1, 28, 28), v2_pixels(image)).upstream_body()


def v2_grpc_request(model: str, version: str, image: Path, raw: bool = False) -> Any:
    """The same tensor as a gRPC ModelInferRequest: in typed contents (TorchServe's own v2 service takes no raw
    contents), or in `raw_input_contents`, the tensor's bytes."""
    pb2 = protos.load("open_inference_grpc_pb2")
    pixels = v2_pixels(image)
    request = pb2.ModelInferRequest(model_name=model, model_version=version, id="bench")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    if raw:
        request.raw_input_contents.append(pixels.tobytes())
    else:
        tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    return request


def grpc_call(channel: grpc.aio.Channel, service: str) -> Callable[..., Any]:
    """The unary call a gRPC load sends: TorchServe's Predictions, or the v2 ModelInfer of the router (the
    protocol's `inference` package) or of TorchServe (its own package; the same messages on the wire)."""
    if service == "torchserve":
        stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(channel)
        return stub.Predictions
    pb2 = protos.load("open_inference_grpc_pb2")
    package = "org.pytorch.serve.grpc.openinference" if service == "torchserve-v2" else "inference"
    return channel.unary_unary(f"/{package}.GRPCInferenceService/ModelInfer",
                               request_serializer=pb2.ModelInferRequest.SerializeToString,
                               response_deserializer=pb2.ModelInferResponse.FromString)


def answered(response: Any) -> bool:
    if hasattr(response, "prediction"):
        return b'"label"' in response.prediction
    return any(output.name == "label" for output in response.outputs)


async def grpc_load(service: str, target: str, request: Any, metadata: tuple[tuple[str, str], ...],
                    connections: int, duration_s: float) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = grpc_call(channel, service)
        await call(request, metadata=metadata, timeout=10)  # connect outside the clock
        deadline = time.perf_counter() + duration_s

        async def user() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await call(request, metadata=metadata, timeout=10)
                    if not answered(response):
                        errors += 1
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 50) or 0.0, percentile(latencies, 99) or 0.0, errors


async def fixed_rate(url: str, headers: dict[str, str], body: bytes, rate: float, duration_s: float,
                     warmup_s: float = 1.0) -> tuple[int, float, float, float, int]:
    """Open-loop REST load at `rate` req/s: (sent, p50 ms, p99 ms, generator lag p99 ms, errors), latencies from
    each request's scheduled send time. The first `warmup_s` (connections opening) is sent but not counted."""
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    total = int(rate * (warmup_s + duration_s))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05

        async def one(index: int) -> None:
            nonlocal errors
            scheduled = start + index / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            sent = loop.time()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.read()
                    ok = response.status == 200 and b'"label"' in answer
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if index >= rate * warmup_s:
                latencies.append((loop.time() - scheduled) * 1000)
                lags.append((sent - scheduled) * 1000)
                errors += 0 if ok else 1

        await asyncio.gather(*(one(index) for index in range(total)))
    return (len(latencies), percentile(latencies, 50) or 0.0, percentile(latencies, 99) or 0.0,
            percentile(lags, 99) or 0.0, errors)


def rest_request(protocol: str, path: str, target: Endpoint, image: Path,
                 folder: Path) -> tuple[str, Path, dict[str, str]]:
    """(URL, body file, headers) of a REST load. v2 direct is the router's own upstream request (the NPY body to
    `/predictions`); TorchServe's own v2 path takes no version."""
    if protocol == "rest":
        return target.rest_url + target.rest_path(), image, target.headers("image/png")
    body = folder / f"{protocol}-{path}.body"
    if protocol in V2_REST and path == "direct":
        body.write_bytes(v2_npy(image))
        return target.rest_url + target.rest_path(), body, target.headers("application/octet-stream")
    url = f"{target.rest_url}/v2/models/{target.model}/infer"
    if protocol == "v2-rest-binary":
        binary, json_length = v2_binary(image)
        body.write_bytes(binary)
        return url, body, {**target.headers("application/octet-stream"), BINARY_HEADER: str(json_length)}
    body.write_bytes(v2_json(image))
    return url, body, target.headers("application/json")


def grpc_request(protocol: str, path: str, target: Endpoint, image: Path, png: bytes) -> tuple[str, Any]:
    """(service, message) of a gRPC load: the same mapping as `rest_request`."""
    version = target.version or ""
    if protocol == "grpc" or (protocol in V2_GRPC and path == "direct"):
        data = png if protocol == "grpc" else v2_npy(image)
        return "torchserve", protos.load("inference_pb2").PredictionsRequest(
            model_name=target.model, model_version=version, input={"data": data})
    service = "torchserve-v2" if protocol == "torchserve-v2-grpc" else "router-v2"
    return service, v2_grpc_request(target.model, "" if service == "torchserve-v2" else version, image,
                                    raw=protocol == "v2-grpc-raw")


def pinned_arm(experiment: Experiment, model: str | None) -> Arm:
    """The arm whose target is `model`, or the experiment's `full` arm (its first, if it has none): whatever form
    `make bench` chose to serve it, ONNX or PyTorch."""
    if model is None:
        return next((arm for arm in experiment.arms if arm.name == "full"), experiment.arms[0])
    for arm in experiment.arms:
        if arm.target.model == model:
            return arm
    raise SystemExit(f"{model} serves no arm of experiment {experiment.name}: its arms serve "
                     + ", ".join(arm.target.model for arm in experiment.arms))


def measure(args: argparse.Namespace) -> tuple[list[Result], list[FixedRate]]:
    instance = server.Instance.load(args.run_dir.resolve())
    config = load_config(args.router_config)
    tokens = load_tokens(config.tokens_file)
    experiment = config.experiments[args.experiment]
    arm = pinned_arm(experiment, args.model)
    endpoints = {
        "direct": Endpoint("direct", instance.inference_url, instance.grpc_target, instance.token(),
                           arm.target.model, arm.target.version),
        "router": Endpoint("router", base_url(config), f"{config.listen.host}:{config.listen.grpc_port}",
                           tokens.client, experiment.name, arm=arm.name, override_header=config.override_header),
    }
    router_pid = running_pid(config)
    body = args.image.read_bytes()

    def fresh(path: str, target: Endpoint) -> Endpoint:
        """TorchServe's key read again for each run: the router renews it (it expires) during a long bench."""
        return dataclasses.replace(target, token=instance.token()) if path == "direct" else target

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for connections in args.connections:
            for index in range(args.rounds):
                for protocol in args.protocols:  # direct and router back to back for each protocol
                    for path, target in endpoints.items():
                        if protocol in TORCHSERVE_V2 and path == "router":
                            continue
                        target = fresh(path, target)
                        meter = CpuMeter(router_pid if path == "router" else None)
                        if protocol in ("rest", *V2_REST, "torchserve-v2-rest"):
                            url, body_file, headers = rest_request(protocol, path, target, args.image, Path(folder))
                            rate, p50, p99, errors = wrk(url, headers, body_file, connections, args.duration_s)
                        else:
                            service, request = grpc_request(protocol, path, target, args.image, body)
                            rate, p50, p99, errors = asyncio.run(grpc_load(
                                service, target.grpc_target, request, target.metadata(), connections,
                                args.duration_s))
                        cpu = meter.per_request_us(round(rate * args.duration_s))
                        results.append(Result(protocol, path, connections, index, rate, p50, p99, errors, cpu))
                        log.info("%s", results[-1])
    fixed = []
    if args.rate > 0:
        for index in range(args.rounds):
            for path, target in endpoints.items():
                target = fresh(path, target)
                sent, p50, p99, lag, errors = asyncio.run(fixed_rate(
                    target.rest_url + target.rest_path(), target.headers("image/png"), body, args.rate,
                    args.duration_s))
                fixed.append(FixedRate(path, index, args.rate, sent, p50, p99, lag, errors))
                log.info("%s", fixed[-1])
    return results, fixed


def summarize(results: list[Result], fixed: list[FixedRate] | None = None) -> str:
    lines = ["| protocol | connections | direct req/s | router req/s | router ÷ direct | direct p50 ms | "
             "router p50 ms | added p50 ms | direct p99 ms | router p99 ms | router CPU µs/request | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.protocol, r.connections) for r in results if r.protocol not in TORCHSERVE_V2},
                  key=lambda k: (PROTOCOLS.index(k[0]), k[1]))
    for protocol, connections in keys:
        def median(path: str, field: str, protocol: str = protocol, connections: int = connections) -> float:
            return statistics.median(getattr(r, field) for r in results
                                     if (r.protocol, r.path, r.connections) == (protocol, path, connections))
        errors = sum(r.errors for r in results if (r.protocol, r.connections) == (protocol, connections))
        direct_rate, router_rate = median("direct", "requests_per_s"), median("router", "requests_per_s")
        cpu = [r.router_cpu_us for r in results if (r.protocol, r.path, r.connections) == (protocol, "router",
                                                                                           connections)]
        cpu_text = f"{statistics.median(c for c in cpu if c is not None):.0f}" if all(cpu) and cpu else "–"
        lines.append(
            f"| {protocol} | {connections} | {direct_rate:.0f} | {router_rate:.0f} | {router_rate / direct_rate:.2f} | "
            f"{median('direct', 'p50_ms'):.2f} | {median('router', 'p50_ms'):.2f} | "
            f"{median('router', 'p50_ms') - median('direct', 'p50_ms'):+.2f} | {median('direct', 'p99_ms'):.1f} | "
            f"{median('router', 'p99_ms'):.1f} | {cpu_text} | {errors} |")
    own = sorted({(r.protocol, r.connections) for r in results if r.protocol in TORCHSERVE_V2},
                 key=lambda k: (PROTOCOLS.index(k[0]), k[1]))
    if own:
        lines += ["", "TorchServe's own v2 endpoints, direct (the same UINT8 tensor as the router's v2 rows; the "
                  "handler parses it from JSON or typed contents):", "",
                  "| endpoint | connections | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for protocol, connections in own:
            measured = [r for r in results if (r.protocol, r.connections) == (protocol, connections)]
            lines.append(f"| {protocol} | {connections} | "
                         f"{statistics.median(r.requests_per_s for r in measured):.0f} | "
                         f"{statistics.median(r.p50_ms for r in measured):.2f} | "
                         f"{statistics.median(r.p99_ms for r in measured):.1f} | {sum(r.errors for r in measured)} |")
    if fixed:
        lines += ["", "| REST at a fixed rate | req/s | sent | p50 ms | p99 ms | generator lag p99 ms | errors |",
                  "|---|---|---|---|---|---|---|"]
        for path in ("direct", "router"):
            rows = [f for f in fixed if f.path == path]
            lines.append(f"| {path} | {rows[0].rate:g} | {sum(f.sent for f in rows)} | "
                         f"{statistics.median(f.p50_ms for f in rows):.2f} | "
                         f"{statistics.median(f.p99_ms for f in rows):.1f} | "
                         f"{statistics.median(f.lag_p99_ms for f in rows):.2f} | {sum(f.errors for f in rows)} |")
    lines += ["", targets(results, fixed or [])]
    return "\n".join(lines) + "\n"


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cpu_per_request(results: list[Result]) -> dict[str, float]:
    """The router's CPU µs per request by protocol, at the most connections measured (where the router is busiest:
    what sizing it for a load needs)."""
    busiest = max((r.connections for r in results), default=0)
    measured = {protocol: median_of([r.router_cpu_us for r in results if r.protocol == protocol
                                     and r.router_cpu_us is not None and r.connections == busiest])
                for protocol in TARGET_CPU_US}
    return {protocol: cpu for protocol, cpu in measured.items() if cpu is not None}


def added_p50(results: list[Result], protocol: str, connections: int) -> float | None:
    """The router's added p50 (router − direct, medians over rounds) for one protocol and connection count."""
    router = median_of([r.p50_ms for r in results if (r.protocol, r.path, r.connections) == (protocol, "router",
                                                                                              connections)])
    direct = median_of([r.p50_ms for r in results if (r.protocol, r.path, r.connections) == (protocol, "direct",
                                                                                              connections)])
    return None if router is None or direct is None else router - direct


def targets(results: list[Result], fixed: list[FixedRate]) -> str:
    """The router's hot-path targets against this run's medians."""
    rows = ["| target | measured | met |", "|---|---|---|"]
    measured = cpu_per_request(results)
    for protocol, limit in TARGET_CPU_US.items():
        cpu = measured.get(protocol)
        if cpu is not None:
            rows.append(f"| router CPU per {protocol.upper()} request ≤ {limit:g} µs | {cpu:.0f} µs | "
                        f"{'yes' if cpu <= limit else 'no'} |")
    single = [r for r in results if r.protocol == "rest" and r.connections == 1]
    if single:
        added = (median_of([r.p50_ms for r in single if r.path == "router"]) or 0.0) - (
            median_of([r.p50_ms for r in single if r.path == "direct"]) or 0.0)
        rows.append(f"| added p50 on one connection ≤ {TARGET_ADDED_P50_MS:g} ms | {added:+.2f} ms | "
                    f"{'yes' if added <= TARGET_ADDED_P50_MS else 'no'} |")
    for v2, plain in V2_OF.items():
        for connections in sorted({r.connections for r in results if r.protocol == v2}):
            added_v2, added_plain = added_p50(results, v2, connections), added_p50(results, plain, connections)
            if added_v2 is None or added_plain is None:
                continue
            bound = max(added_plain, ADDED_FLOOR_MS) * (1 + V2_ADDED_WITHIN)
            rows.append(f"| added p50 on {v2} ≤ {plain}'s {added_plain:+.2f} ms + {V2_ADDED_WITHIN:.0%} "
                        f"({connections} connections) | {added_v2:+.2f} ms | {'yes' if added_v2 <= bound else 'no'} |")
    if fixed:
        added = (median_of([f.p99_ms for f in fixed if f.path == "router"]) or 0.0) - (
            median_of([f.p99_ms for f in fixed if f.path == "direct"]) or 0.0)
        rows.append(f"| added p99 at {fixed[0].rate:g} req/s ≤ {TARGET_ADDED_P99_MS:g} ms | {added:+.2f} ms | "
                    f"{'yes' if added <= TARGET_ADDED_P99_MS else 'no'} |")
    return "\n".join(rows)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    parser.add_argument("--router-config", type=Path, default=REPO / "router" / "experiments.yaml")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--model", default=None,
                        help="the arm serving this model is pinned (default: the experiment's full arm)")
    parser.add_argument("--image", type=Path, default=REPO / "runs" / "examples" / "sneaker.png")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="fixed-rate REST round (0: skip)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "router_overhead.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results, fixed = measure(args)
    table = summarize(results, fixed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m loadtest.router_overhead " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k in ("connections", "duration_s", "rounds", "rate", "protocols"))
    args.output.write_text(f"# Router overhead\n\n`{command}`, median of {args.rounds} alternating rounds.\n\n"
                           f"{table}")
    args.output.with_suffix(".json").write_text(json.dumps(
        {"closed_loop": [asdict(r) for r in results], "fixed_rate": [asdict(f) for f in fixed]}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
