"""`make loadtest`: headless Locust runs against the stack `make serve` started, and their report.

For every variant, REST and gRPC, directly and (for the full model) through the router: a step run (users
1 → 64) that finds the saturation throughput and draws latency against throughput, then fixed-arrival-rate runs
whose latency is measured from each request's intended send time. Each run writes Locust's CSV and HTML report
and our full-resolution samples under `reports/loadtest/<run>/`; `reports/loadtest/summary.md` holds the tables
(with the CPU used by TorchServe, the router and the load generator: a run whose generator used more than 90 %
of a core is marked invalid), `latency_vs_throughput.png` and `accuracy_p99_size.png` the plots.

Usage:
    make serve && make loadtest
    .venv/bin/python -m loadtest.run [--variants full int8] [--rates 200 600] [--step-s 5] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.workload import REPO, children, fmt_pct, process_cpu_seconds, read_samples, summarize
from serving.archive import VARIANTS

log = logging.getLogger("loadtest.run")

GENERATOR_CPU_LIMIT = 0.9  # of one core: above it the generator, not the server, set the pace


@dataclass
class LocustRun:
    name: str
    variant: str
    protocol: str  # rest | grpc
    path: str  # direct | router
    rate: float = 0.0  # 0: step run (closed loop)
    users: int = 64
    duration_s: float = 10.0
    extra: list[str] = field(default_factory=list)

    @property
    def user_class(self) -> str:
        return "RestUser" if self.protocol == "rest" else "GrpcUser"


@dataclass
class Outcome:
    run: LocustRun
    exit_code: int
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    cpu: dict[str, float]
    wall_s: float

    @property
    def valid(self) -> bool:
        return self.cpu["generator"] <= GENERATOR_CPU_LIMIT


def stack_pids(run_dir: Path, router_config: Path) -> dict[str, list[int]]:
    from router import process
    from router.config import load_config
    from serving import server

    instance = server.Instance.load(run_dir.resolve())
    frontend = server.running_pid(instance)
    if frontend is None:
        raise SystemExit(f"no TorchServe running from {run_dir}: run `make serve` first")
    router = process.running_pid(load_config(router_config))
    return {"torchserve": [frontend, *children(frontend)], "router": [router] if router else []}


def execute(run: LocustRun, out: Path, pids: dict[str, list[int]], step_s: float, steps: str) -> Outcome:
    folder = out / run.name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("samples.*"):  # a run's folder holds only that run
        stale.unlink()
    files = "loadtest/locustfile.py" + (",loadtest/shapes.py" if run.rate == 0 else "")
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--only-summary", "--skip-log-setup",
               "--csv", str(folder / "locust"), "--html", str(folder / "locust.html"),
               "--samples", str(folder / "samples"), "--target", run.path, "--variant", run.variant,
               "--stop-timeout", "10", *run.extra]
    if run.rate > 0:
        command += ["-u", str(run.users), "-r", str(run.users), "-t", f"{run.duration_s:g}s", "--rate", str(run.rate)]
    command.append(run.user_class)
    env = {**os.environ, "LOADTEST_STEP_S": str(step_s), "LOADTEST_STEPS": steps}
    before = {role: sum(process_cpu_seconds(pid) for pid in group) for role, group in pids.items()}
    started = time.monotonic()
    with open(folder / "locust.log", "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        generator_cpu = 0.0
        while process.poll() is None:  # sample the generator's CPU while it lives (its /proc goes with it)
            generator_cpu = process_cpu_seconds(process.pid)
            time.sleep(0.2)
    wall = time.monotonic() - started
    cpu = {role: (sum(process_cpu_seconds(pid) for pid in group) - before[role]) / wall
           for role, group in pids.items()}
    cpu["generator"] = generator_cpu / wall
    samples = read_samples(sorted(folder.glob("samples.*.csv")))
    summary = summarize(samples)
    steps_summary = step_table(samples, step_s) if run.rate == 0 else []
    outcome = Outcome(run, process.returncode, summary, steps_summary, cpu, wall)
    (folder / "outcome.json").write_text(json.dumps({
        "run": run.__dict__, "exit_code": outcome.exit_code, "valid": outcome.valid, "cpu": cpu,
        "summary": summary, "steps": steps_summary}, indent=2))
    total = summary.get("Aggregated", {})
    log.info("%-28s %7.1f req/s  p50 %6.1f  p99 %6.1f ms  failures %d  cpu ts %.2f router %.2f gen %.2f%s",
             run.name, total.get("throughput", 0), total.get("p50_ms") or 0, total.get("p99_ms") or 0,
             total.get("failures", 0), cpu["torchserve"], cpu.get("router", 0), cpu["generator"],
             "" if outcome.valid else "  INVALID (generator saturated)")
    return outcome


def step_table(samples: list[Any], step_s: float) -> list[dict[str, Any]]:
    """Throughput and latency of each step of a step run, from the samples' own timestamps."""
    if not samples:
        return []
    t0 = min(s.at - s.service_ms / 1000 for s in samples)
    by_step: dict[int, list[Any]] = {}
    for sample in samples:
        by_step.setdefault(int((sample.at - t0) // step_s), []).append(sample)
    table = []
    for index in sorted(by_step):
        stats = summarize(by_step[index], t0 + index * step_s, t0 + (index + 1) * step_s)["Aggregated"]
        table.append({"step": index, **stats})
    return table


def plan(variants: list[str], rates: list[float], quick: bool) -> list[LocustRun]:
    runs = []
    protocols = ["rest"] if quick else ["rest", "grpc"]
    for variant in variants:
        for protocol in protocols:
            runs.append(LocustRun(f"step-{variant}-{protocol}-direct", variant, protocol, "direct"))
    if "full" in variants:
        for protocol in protocols:
            runs.append(LocustRun(f"step-full-{protocol}-router", "full", protocol, "router"))
    for rate in rates:
        for variant in variants:
            runs.append(LocustRun(f"rate{rate:g}-{variant}-rest-direct", variant, "rest", "direct", rate=rate))
        if "full" in variants:
            runs.append(LocustRun(f"rate{rate:g}-full-rest-router", "full", "rest", "router", rate=rate))
    return runs


def markdown(outcomes: list[Outcome], command: str, steps: list[int]) -> str:
    lines = [f"# Load test\n\n`{command}` — Locust {locust_version()}, one generator process on the same machine as "
             "the servers. Latency percentiles from every request (not Locust's rounded ones).\n",
             "## Saturation (step runs: 1 → 64 users)\n",
             "| variant | protocol | path | saturation req/s | at users | p50 ms | p99 ms | errors | accuracy "
             "| CPU TorchServe | CPU router | CPU generator | valid |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for outcome in outcomes:
        if outcome.run.rate or not outcome.steps:
            continue
        best = max(outcome.steps, key=lambda step: step["throughput"])
        total = outcome.summary["Aggregated"]
        users = steps[min(best["step"], len(steps) - 1)]
        lines.append(f"| {outcome.run.variant} | {outcome.run.protocol} | {outcome.run.path} | "
                     f"{best['throughput']:.0f} | {users} | {best['p50_ms']:.1f} | {best['p99_ms']:.1f} | "
                     f"{total['failures']} | {fmt_pct(total['accuracy'])} | {outcome.cpu['torchserve']:.2f} | "
                     f"{outcome.cpu.get('router', 0):.2f} | {outcome.cpu['generator']:.2f} | "
                     f"{'yes' if outcome.valid else 'no: generator saturated'} |")
    lines += ["", "## Fixed arrival rate (latency from each request's intended send time)\n",
              "| variant | path | offered req/s | achieved req/s | p50 ms | p95 ms | p99 ms | max ms | errors | "
              "accuracy | CPU generator | valid |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for outcome in outcomes:
        if not outcome.run.rate:
            continue
        total = outcome.summary["Aggregated"]
        lines.append(f"| {outcome.run.variant} | {outcome.run.path} | {outcome.run.rate:g} | "
                     f"{total['throughput']:.0f} | {total['p50_ms']:.1f} | {total['p95_ms']:.1f} | "
                     f"{total['p99_ms']:.1f} | {total['max_ms']:.1f} | {total['failures']} | "
                     f"{fmt_pct(total['accuracy'])} | {outcome.cpu['generator']:.2f} | "
                     f"{'yes' if outcome.valid else 'no'} |")
    lines += ["", "CPU: cores used on average over the run (2 = both cores). Plots: `latency_vs_throughput.png`, "
              "`accuracy_p99_size.png`. Per-run Locust CSV/HTML and samples: the run folders.", ""]
    return "\n".join(lines)


def locust_version() -> str:
    # Not `import locust` here: it monkey-patches the standard library with gevent, too late in this process.
    return importlib.metadata.version("locust")


def plot(outcomes: list[Outcome], out: Path, checkpoints: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for outcome in outcomes:
        if outcome.run.rate or not outcome.steps:
            continue
        label = f"{outcome.run.variant} {outcome.run.protocol} {outcome.run.path}"
        x = [step["throughput"] for step in outcome.steps]
        axes[0].plot(x, [step["p50_ms"] for step in outcome.steps], marker="o", label=label)
        axes[1].plot(x, [step["p99_ms"] for step in outcome.steps], marker="o", label=label)
    for axis, title in zip(axes, ("p50", "p99"), strict=True):
        axis.set_xlabel("throughput (req/s)")
        axis.set_ylabel(f"{title} latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.set_title(f"{title} latency against throughput (steps of 1 → 64 users)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "latency_vs_throughput.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    rate = max((o.run.rate for o in outcomes), default=0)
    for outcome in outcomes:
        card_path = checkpoints / f"{outcome.run.variant}.card.json"
        if outcome.run.rate != rate or outcome.run.path != "direct" or not card_path.is_file():
            continue
        card = json.loads(card_path.read_text())
        accuracy, size_mb = card["test_accuracy"], card["file_bytes"] / 1e6
        p99 = outcome.summary["Aggregated"]["p99_ms"]
        axis.scatter(p99, accuracy * 100, s=40 + size_mb * 20, alpha=0.6)
        axis.annotate(f"{outcome.run.variant} ({size_mb:.1f} MB)", (p99, accuracy * 100), fontsize=8)
    axis.set_xlabel(f"p99 latency at {rate:g} req/s offered (ms)")
    axis.set_ylabel("test accuracy (%) from the model card")
    axis.set_title("accuracy against p99 latency; marker area ~ file size")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "accuracy_p99_size.png", dpi=120)
    plt.close(figure)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--rates", nargs="*", type=float, default=[200.0, 500.0])
    parser.add_argument("--step-s", type=float, default=5.0)
    parser.add_argument("--steps", default="1,4,16,32,64")
    parser.add_argument("--quick", action="store_true", help="REST only")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "loadtest")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "torchserve")
    parser.add_argument("--router-config", type=Path, default=REPO / "router" / "experiments.yaml")
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pids = stack_pids(args.run_dir, args.router_config)
    args.output.mkdir(parents=True, exist_ok=True)
    extra = ["--run-dir", str(args.run_dir), "--router-config", str(args.router_config)]
    outcomes = []
    for run in plan(args.variants, args.rates, args.quick):
        run.extra += extra
        outcomes.append(execute(run, args.output, pids, args.step_s, args.steps))
    command = "python -m loadtest.run " + " ".join(sys.argv[1:])
    summary = markdown(outcomes, command.strip(), [int(users) for users in args.steps.split(",")])
    (args.output / "summary.md").write_text(summary)
    plot(outcomes, args.output, args.checkpoints)
    print(summary)
    failed = [o.run.name for o in outcomes if o.exit_code != 0]
    if failed:
        log.error("runs that failed their gate or crashed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
