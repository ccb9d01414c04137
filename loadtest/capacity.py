"""Capacity on paper, from measurement: how many TorchServe and router pods a load needs, from `make bench`.

Inputs, all from `reports/bench.json` (one `make bench` run): each variant's served throughput and p99 with its
workers on the bench machine (`served`), that machine's cores (`cores`), and the router's CPU per request at its
busiest (`router_cpu_us`). The experiment's mix of arms comes from `router/experiments.yaml`.

The model:
- a TorchServe pod of `--pod-cpus` cores serves the bench machine's throughput scaled by pod cores ÷ bench cores
  (the kit runs one single-threaded worker per core, so throughput scales with cores, not with pods);
- pods run at most `--utilization` of that (headroom: the bench's p99 is measured at saturation, so a pod kept
  below it keeps its p99 at or under the measured one; a variant whose measured p99 exceeds `--p99-ms` is
  flagged, its pods would need more headroom than this model gives);
- an experiment's arms share the load by weight, so its cost per request is the weighted mean of the arms' costs;
- routers need `router_cpu_us` × load of CPU, at the same utilization, in pods of `--router-pod-cpus`, and never
  fewer than 2 (the manifests' PodDisruptionBudget keeps one up).
What it leaves out, and says: the request log's database (one row per request), the network, and anything the
bench machine did not measure (other CPUs, AVX-512/AMX, larger batches).

Usage:
    make bench && python -m loadtest.capacity [--bench reports/bench.json] [--output reports/capacity.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.workload import REPO, publish
from router.config import Experiment, load_config
from serving.project import model_name

log = logging.getLogger("loadtest.capacity")

LOADS = (1_000, 10_000, 100_000)


@dataclass(frozen=True)
class Sizing:
    pod_cpus: float
    router_pod_cpus: float
    utilization: float
    p99_ms: float


def pod_throughput(bench: dict[str, Any], variant: str, sizing: Sizing) -> float:
    """Requests per second one TorchServe pod serves at saturation, by the bench machine's per-core figure."""
    served: float = bench["served"][variant]["requests_per_s"]
    return served / bench["cores"] * sizing.pod_cpus


def experiment_throughput(bench: dict[str, Any], experiment: Experiment, sizing: Sizing) -> float:
    """One pod's saturation throughput under the experiment's mix: the arms' costs (1 / throughput) weighted."""
    variants = {model_name(variant): variant for variant in bench["served"]}
    total = sum(arm.weight for arm in experiment.arms)
    cost = sum(arm.weight / total / pod_throughput(bench, variants[arm.target.model], sizing)
               for arm in experiment.arms)
    return 1 / cost


def pods(load: float, throughput: float, utilization: float) -> int:
    return math.ceil(load / (throughput * utilization))


def router_pods(load: float, cpu_us: float, sizing: Sizing) -> int:
    cores = load * cpu_us / 1e6 / sizing.utilization
    return max(2, math.ceil(cores / sizing.router_pod_cpus))


def table(bench: dict[str, Any], experiment: Experiment, sizing: Sizing) -> str:
    cpu_us = bench["router_cpu_us"]["rest"]
    head = " | ".join(f"{load:,} req/s" for load in LOADS)
    lines = [f"TorchServe pods of {sizing.pod_cpus:g} CPUs at ≤ {sizing.utilization:.0%} of their measured saturation "
             f"(bench: {bench['cores']} cores), and router pods of {sizing.router_pod_cpus:g} CPUs at "
             f"{cpu_us:.0f} µs of CPU per REST request:", "",
             f"| serving | pod saturation req/s | bench p99 ms | {head} |",
             "|---|---|---|" + "---|" * len(LOADS)]
    for variant, measured in bench["served"].items():
        throughput = pod_throughput(bench, variant, sizing)
        flag = "" if measured["p99_ms"] <= sizing.p99_ms else f" (over the {sizing.p99_ms:g} ms target)"
        counts = " | ".join(f"{pods(load, throughput, sizing.utilization):,}" for load in LOADS)
        lines.append(f"| {variant} alone | {throughput:,.0f} | {measured['p99_ms']:.1f}{flag} | {counts} |")
    mixed = experiment_throughput(bench, experiment, sizing)
    weights = ", ".join(f"{arm.name} {arm.weight:g}" for arm in experiment.arms)
    counts = " | ".join(f"{pods(load, mixed, sizing.utilization):,}" for load in LOADS)
    lines.append(f"| experiment `{experiment.name}` ({weights}) | {mixed:,.0f} | – | {counts} |")
    counts = " | ".join(f"{router_pods(load, cpu_us, sizing):,}" for load in LOADS)
    lines.append(f"| router replicas (REST) | {sizing.router_pod_cpus * sizing.utilization * 1e6 / cpu_us:,.0f} "
                 f"| – | {counts} |")
    lines += ["", "Not included: the request log's database (a row per request: size it from "
              "`python -m loadtest.request_log --database-url ...`), the network, and CPUs other than the bench "
              "machine's."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=REPO / "reports" / "bench.json")
    parser.add_argument("--experiments", type=Path, default=REPO / "router" / "experiments.yaml")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--pod-cpus", type=float, default=2.0, help="CPUs of a TorchServe pod (the manifests')")
    parser.add_argument("--router-pod-cpus", type=float, default=2.0)
    parser.add_argument("--utilization", type=float, default=0.7, help="the share of saturation pods run at")
    parser.add_argument("--p99-ms", type=float, default=100.0, help="the p99 target")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "capacity.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.bench.is_file():
        log.error("no %s: run `make serve && make bench` first", args.bench)
        return 1
    bench = json.loads(args.bench.read_text())
    if "router_cpu_us" not in bench or "cores" not in bench:
        log.error("%s has no router CPU or core count: it is from an older `make bench`; run it again", args.bench)
        return 1
    experiments = load_config(args.experiments).experiments
    if args.experiment not in experiments:
        log.error("no experiment %r in %s: it has %s", args.experiment, args.experiments, ", ".join(experiments))
        return 1
    experiment = experiments[args.experiment]
    measured = {model_name(variant) for variant in bench["served"]}
    unmeasured = sorted({arm.target.model for arm in experiment.arms} - measured)
    if unmeasured:
        log.error("%s has no throughput for %s, which experiment %r routes to: run `make bench` with the models "
                  "`make serve` serves now", args.bench, ", ".join(unmeasured), args.experiment)
        return 1
    sizing = Sizing(args.pod_cpus, args.router_pod_cpus, args.utilization, args.p99_ms)
    publish(table(bench, experiment, sizing), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
