"""Soak: a bounded run through the router at a fixed fraction (default 70 %) of the stack's measured saturation,
with the resident memory of TorchServe's frontend, its workers and the router sampled every second.

First wrk (C: it leaves the cores to the servers) finds the saturation throughput through the router at 16 and
32 connections; then Locust's fixed-rate mode holds `--load` × that for `--duration` seconds (latency from each
request's intended send time, every answer checked), the experiment's own weights choosing the arms in both.
It passes when no request failed or was answered wrongly, the rate was held, the generator kept up, and no
process's memory kept growing (last quarter of the run against the first). `make chaos` runs it against
`make serve`'s stack after the test suite and appends its section to reports/reliability.md;
`tests/reliability/test_soak.py` runs its short form against the test stack.

Usage:
    make serve && make chaos                       # the suite, then a 300 s soak
    make chaos SOAK_S=1800                         # a longer soak
    .venv/bin/python -m loadtest.soak --duration 600 --load 0.7 [--append-to reports/reliability.md]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.router_overhead import wrk
from loadtest.run import LocustRun, Outcome, execute, stack_pids
from loadtest.workload import REPO, children, endpoint, fmt_pct, resident_mb, test_items
from serving.server import ServeError

log = logging.getLogger("loadtest.soak")

PROBE_CONNECTIONS = (16, 32)
# Flat: allocator and JIT warm-up may add a little early on; steady growth over the run exceeds this.
GROWTH_FACTOR, GROWTH_SLACK_MB = 1.10, 30.0


@dataclass
class SoakResult:
    experiment: str
    saturation: float
    rate: float
    outcome: Outcome
    memory_mb: dict[str, list[float]]
    problems: list[str] = field(default_factory=list)

    def markdown(self, where: str) -> str:
        total = self.outcome.summary["Aggregated"]
        connections = " and ".join(map(str, PROBE_CONNECTIONS))
        lines = [f"{where}: saturation through the router measured first at {self.saturation:.0f} req/s (wrk, "
                 f"best of {connections} connections); then Locust for {self.outcome.run.duration_s:g} s at "
                 f"{self.rate:.0f} req/s ({self.rate / self.saturation:.0%} of it), experiment "
                 f"`{self.experiment}` choosing the arms.",
                 "",
                 "| requests | failures | achieved req/s | p50 ms | p95 ms | p99 ms | max ms | accuracy | "
                 "CPU generator |",
                 "|---|---|---|---|---|---|---|---|---|",
                 f"| {total['requests']} | {total['failures']} | {total['throughput']:.0f} | {total['p50_ms']:.1f} | "
                 f"{total['p95_ms']:.1f} | {total['p99_ms']:.1f} | {total['max_ms']:.1f} | "
                 f"{fmt_pct(total['accuracy'])} | "
                 f"{self.outcome.cpu['generator']:.2f} |",
                 "", "| resident memory (MB) | first quarter | last quarter | peak |", "|---|---|---|---|"]
        for role, values in self.memory_mb.items():
            first, last = quarters(values)
            lines.append(f"| {role} | {first:.0f} | {last:.0f} | {max(values, default=0):.0f} |")
        lines += ["", "Verdict: " + ("passed" if not self.problems else "FAILED: " + "; ".join(self.problems))]
        return "\n".join(lines)


def quarters(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last quarter of a series."""
    if not values:
        return 0.0, 0.0
    quarter = max(1, len(values) // 4)
    return sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter


def memory_problems(memory_mb: dict[str, list[float]]) -> list[str]:
    problems = []
    for role, values in memory_mb.items():
        first, last = quarters(values)
        if last > first * GROWTH_FACTOR + GROWTH_SLACK_MB:
            problems.append(f"{role} memory grew from {first:.0f} to {last:.0f} MB")
    return problems


class MemorySampler(threading.Thread):
    """Resident memory of the frontend, all its workers (re-listed each time: a restarted worker counts) and the
    router, once a second."""

    def __init__(self, frontend: int, router: int) -> None:
        super().__init__(daemon=True)
        self.frontend, self.router = frontend, router
        self.series: dict[str, list[float]] = {"frontend": [], "workers": [], "router": []}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.series["frontend"].append(resident_mb(self.frontend))
            self.series["workers"].append(sum(resident_mb(pid) for pid in children(self.frontend)))
            self.series["router"].append(resident_mb(self.router))


def probe(run_dir: Path, router_config: Path, experiment: str, output: Path, duration_s: float) -> float:
    """Requests/s the router serves at saturation, the experiment's weights choosing the arms."""
    target = endpoint("router", "full", run_dir, router_config, experiment, pin=False)
    body = output / "probe.png"
    body.write_bytes(test_items(1)[0].png)
    best = 0.0
    for connections in PROBE_CONNECTIONS:
        rate, _, _, errors = wrk(target.rest_url + target.rest_path(), target.headers("image/png"), body,
                                 connections, duration_s)
        if errors:
            raise RuntimeError(f"{errors} errors while probing saturation at {connections} connections")
        best = max(best, rate)
    return best


def soak(run_dir: Path, router_config: Path, output: Path, duration_s: float, load: float = 0.7,
         experiment: str = "fashion", step_s: float = 6.0) -> SoakResult:
    pids = stack_pids(run_dir, router_config)
    if not pids["router"]:
        raise SystemExit(f"no router running for {router_config}: run `make serve` first")
    saturation = probe(run_dir, router_config, experiment, output, step_s)
    rate = load * saturation
    extra = ["--run-dir", str(run_dir), "--router-config", str(router_config), "--experiment", experiment,
             "--no-pin", "--max-failure-ratio", "0"]
    sampler = MemorySampler(pids["torchserve"][0], pids["router"][0])
    sampler.start()
    try:
        outcome = execute(LocustRun("soak", "full", "rest", "router", rate=rate, users=32, duration_s=duration_s,
                                    extra=extra), output, pids, step_s, steps="")
    finally:
        sampler.done.set()
        sampler.join()
    result = SoakResult(experiment, saturation, rate, outcome, sampler.series)
    total = outcome.summary.get("Aggregated", {})
    if outcome.exit_code != 0 or total.get("failures", 1) != 0:
        result.problems.append(f"{total.get('failures', '?')} failed requests (Locust exit {outcome.exit_code})")
    if not outcome.valid:
        result.problems.append(f"the generator used {outcome.cpu['generator']:.2f} of a core: it set the pace")
    if total.get("throughput", 0) < 0.9 * rate:
        result.problems.append(f"achieved {total.get('throughput', 0):.0f} of {rate:.0f} req/s")
    result.problems += memory_problems(sampler.series)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds at the fixed rate")
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured saturation")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "torchserve")
    parser.add_argument("--router-config", type=Path, default=REPO / "router" / "experiments.yaml")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "soak", help="Locust files of the runs")
    parser.add_argument("--append-to", type=Path, default=None, help="append the section to this Markdown file")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        result = soak(args.run_dir, args.router_config, args.output, args.duration, args.load, args.experiment)
    except ServeError as error:  # no stack to soak: say so, without a traceback
        log.error("%s", error)
        return 2
    section = "## Soak of `make serve`'s stack\n\n" + result.markdown("`make serve`'s stack")
    (args.output / "soak.md").write_text(section + "\n")
    if args.append_to:
        with open(args.append_to, "a") as handle:
            handle.write("\n" + section + "\n")
    print(section)
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
