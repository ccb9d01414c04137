"""The latency a lone request sees: one client, one request at a time, per model, over REST and gRPC, directly
to TorchServe. Each request opens a new connection (REST: no session; gRPC: a new channel), sends a 28×28 PNG
of a real test image and checks the answer; `--requests` are timed after `--warmup` untimed ones. A lone
request always waits its model's whole batch window (`maxBatchDelay`), which is part of the figure.

Usage:
    make serve
    .venv/bin/python -m loadtest.single_client [--requests 200] [--warmup 20] [--variants full int8]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import requests

from loadtest.workload import REPO, Endpoint, endpoint, judge, publish, test_items
from router.stats import percentile
from serving import protos
from serving.archive import VARIANTS

log = logging.getLogger("loadtest.single_client")


def rest_once(target: Endpoint, body: bytes, label: int) -> float:
    started = time.perf_counter()
    response = requests.post(target.rest_url + target.rest_path(), data=body, headers=target.headers("image/png"),
                             timeout=10)
    elapsed = time.perf_counter() - started
    problem, _ = judge(response.content, label) if response.status_code == 200 else (f"HTTP {response.status_code}",
                                                                                      False)
    if problem:
        raise RuntimeError(f"{target.model} over REST: {problem}")
    return elapsed * 1000


def grpc_once(target: Endpoint, body: bytes, label: int) -> float:
    pb2, pb2_grpc = protos.load("inference_pb2"), protos.load("inference_pb2_grpc")
    request = pb2.PredictionsRequest(model_name=target.model, model_version=target.version or "", input={"data": body})
    started = time.perf_counter()
    with grpc.insecure_channel(target.grpc_target) as channel:
        response = pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(request, metadata=target.metadata(),
                                                                           timeout=10)
    elapsed = time.perf_counter() - started
    problem, _ = judge(response.prediction, label)
    if problem:
        raise RuntimeError(f"{target.model} over gRPC: {problem}")
    return elapsed * 1000


@dataclass(frozen=True)
class Row:
    model: str
    rest: tuple[float, float]  # p50, p95 ms
    grpc: tuple[float, float]


def p50_p95(latencies: list[float]) -> tuple[float, float]:
    return percentile(latencies, 50) or 0.0, percentile(latencies, 95) or 0.0


def measure(run_dir: Path, variants: list[str], count: int, warmup: int) -> list[Row]:
    item = test_items(1)[0]
    rows = []
    for variant in variants:
        target = endpoint("direct", variant, run_dir)
        figures = {}
        for protocol, once in (("rest", rest_once), ("grpc", grpc_once)):
            for _ in range(warmup):
                once(target, item.png, item.label)
            figures[protocol] = p50_p95([once(target, item.png, item.label) for _ in range(count)])
            log.info("%s %s: p50 %.1f ms, p95 %.1f ms", target.model, protocol, *figures[protocol])
        rows.append(Row(target.model, figures["rest"], figures["grpc"]))
    return rows


def markdown(rows: list[Row], count: int, warmup: int) -> str:
    lines = [f"One client, one request at a time, a new connection per request, a 28×28 PNG; {count} requests after "
             f"{warmup} of warm-up — p50 / p95 in ms:", "", "| model | REST | gRPC |", "|---|---|---|"]
    lines += [f"| {row.model} | {row.rest[0]:.1f} / {row.rest[1]:.1f} | {row.grpc[0]:.1f} / {row.grpc[1]:.1f} |"
              for row in rows]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--requests", type=int, default=200, help="timed requests per model and protocol")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests before them")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "torchserve")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this Markdown file")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = markdown(measure(args.run_dir, args.variants, args.requests, args.warmup), args.requests, args.warmup)
    publish(table, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
