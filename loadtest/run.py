"""`make loadtest`: headless Locust runs against the stack `make serve` started, and their report.

For every variant, REST and gRPC, directly and (for the full model) through the router: a step run (users
1 → 64) that finds the saturation throughput and draws latency against throughput, then fixed-arrival-rate runs
whose latency is measured from each request's intended send time. Each run writes Locust's CSV and HTML report
and our full-resolution samples under `reports/loadtest/<run>/`; `reports/loadtest/summary.md` holds the tables
(with the CPU used by TorchServe, the router and the load generator) and `latency_vs_throughput.png` and
`accuracy_p99_size.png` the plots.

A run is invalid — it measured the generator, not the system — when the generator used more than 90 % of a core
or, at a fixed rate, when its lag p99 (how late requests left against their intended send time) exceeds the
bound (`--max-lag-ms`). Fixed-rate runs get enough users for their rate (`workload.users_for_rate`), their
schedule starts only once every user is spawned, and their first `--warmup-s` seconds are left out. The exit
code is 1 when any run failed its gate, crashed or was invalid.

Usage:
    make serve && make loadtest
    .venv/bin/python -m loadtest.run [--variants full int8] [--rates 200 600] [--step-s 5] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.workload import (
    MAX_LAG_P99_MS,
    REPO,
    Gate,
    children,
    fmt_pct,
    process_cpu_seconds,
    read_samples,
    summarize,
    users_for_rate,
)
from serving.project import VARIANTS

log = logging.getLogger("loadtest.run")

GENERATOR_CPU_LIMIT = 0.9  # of one core: above it the generator, not the server, set the pace


@dataclass
class LocustRun:
    name: str
    variant: str
    protocol: str  # rest | grpc
    path: str  # direct | router
    rate: float = 0.0  # 0: step run (closed loop)
    users: int = 0  # fixed rate: 0 sizes them for the rate (users_for_rate)
    duration_s: float = 10.0  # fixed rate: seconds measured, after the spawn and the warm-up
    warmup_s: float = 1.0
    processes: int = 1  # Locust worker processes (--processes); each sends rate / processes, the master merges
    max_lag_ms: float = MAX_LAG_P99_MS
    extra: list[str] = field(default_factory=list)

    @property
    def user_class(self) -> str:
        return "RestUser" if self.protocol == "rest" else "GrpcUser"

    @property
    def user_count(self) -> int:
        return self.users or users_for_rate(self.rate)


@dataclass
class Outcome:
    run: LocustRun
    exit_code: int
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    cpu: dict[str, float]
    wall_s: float
    invalid: list[str] = field(default_factory=list)  # why the figures are the generator's, not the system's

    @property
    def valid(self) -> bool:
        return not self.invalid


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
        users = run.user_count
        spawn_rate = max(users, 100)  # Locust warns above 100/s; the ramp is outside the schedule in any case
        # The schedule starts once every user is spawned, so -t covers the spawn, the warm-up and the run.
        run_time = math.ceil(users / spawn_rate + run.warmup_s + run.duration_s)  # Locust takes whole seconds
        command += ["-u", str(users), "-r", str(spawn_rate), "-t", f"{run_time}s",
                    "--rate", str(run.rate), "--warmup-s", str(run.warmup_s), "--max-lag-ms", str(run.max_lag_ms)]
    if run.processes > 1:
        command += ["--processes", str(run.processes)]
    command.append(run.user_class)
    env = {**os.environ, "LOADTEST_STEP_S": str(step_s), "LOADTEST_STEPS": steps}
    before = {role: sum(process_cpu_seconds(pid) for pid in group) for role, group in pids.items()}
    started = time.monotonic()
    with open(folder / "locust.log", "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        generator_cpu: dict[int, float] = {}  # per process of the generator: its workers too, with --processes
        while process.poll() is None:  # sample the generator's CPU while it lives (its /proc goes with it)
            with contextlib.suppress(ProcessLookupError):  # it may end between the poll and the listing
                for pid in [process.pid, *children(process.pid)]:
                    generator_cpu[pid] = max(generator_cpu.get(pid, 0.0), process_cpu_seconds(pid))
            time.sleep(0.2)
    wall = time.monotonic() - started
    cpu = {role: (sum(process_cpu_seconds(pid) for pid in group) - before[role]) / wall
           for role, group in pids.items()}
    # The busiest process is what saturates first: each Locust process runs on one core at most.
    cpu["generator"] = max(generator_cpu.values(), default=0.0) / wall
    cpu["generator_total"] = sum(generator_cpu.values()) / wall
    # one file: the single process's, or with --processes the master's merge of every worker's samples
    samples = read_samples(sorted(folder.glob("samples.*.csv")))
    summary = summarize(samples)
    steps_summary = step_table(samples, step_s) if run.rate == 0 else []
    outcome = Outcome(run, process.returncode, summary, steps_summary, cpu, wall,
                      invalid_reasons(run, summary, cpu))
    (folder / "outcome.json").write_text(json.dumps({
        "run": run.__dict__, "exit_code": outcome.exit_code, "valid": outcome.valid, "invalid": outcome.invalid,
        "cpu": cpu, "summary": summary, "steps": steps_summary}, indent=2))
    total = summary.get("Aggregated", {})
    lag = (f"  lag p50 {total['lag_p50_ms']:.2f} p99 {total['lag_p99_ms']:.2f} ms"
           if total.get("lag_p99_ms") is not None else "")
    log.info("%-28s %7.1f req/s  p50 %6.1f  p99 %6.1f ms%s  failures %d  cpu ts %.2f router %.2f gen %.2f%s",
             run.name, total.get("throughput", 0), total.get("p50_ms") or 0, total.get("p99_ms") or 0, lag,
             total.get("failures", 0), cpu["torchserve"], cpu.get("router", 0), cpu["generator"],
             "" if outcome.valid else "  INVALID: " + "; ".join(outcome.invalid))
    return outcome


def invalid_reasons(run: LocustRun, summary: dict[str, Any], cpu: dict[str, float]) -> list[str]:
    """The run's own verdict (its exit code) is Locust's, on every sample of the run; this adds the CPU of the
    generator's busiest process, measured from outside, and says why a run is invalid in the report."""
    reasons = Gate(max_lag_p99_ms=run.max_lag_ms).invalid(summary)
    if cpu["generator"] > GENERATOR_CPU_LIMIT:
        reasons.append(f"a generator process used {cpu['generator']:.2f} of a core")
    if not summary:
        reasons.append("no samples")
    return reasons


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
             f"## Saturation (step runs: {' → '.join(map(str, steps))} users)\n",
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
                     f"{verdict(outcome)} |")
    lines += ["", "## Fixed arrival rate (latency from each request's intended send time)\n",
              "| variant | path | offered req/s | users × processes | achieved req/s | p50 ms | p95 ms | p99 ms | "
              "max ms | errors | accuracy | generator lag p50 / p99 / max ms | no free user | CPU generator | valid |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for outcome in outcomes:
        if not outcome.run.rate:
            continue
        total = outcome.summary.get("Aggregated")
        if total is None:
            lines.append(f"| {outcome.run.variant} | {outcome.run.path} | {outcome.run.rate:g} | no samples |")
            continue
        lines.append(f"| {outcome.run.variant} | {outcome.run.path} | {outcome.run.rate:g} | "
                     f"{outcome.run.user_count} × {outcome.run.processes} | "
                     f"{total['throughput']:.0f} | {total['p50_ms']:.1f} | {total['p95_ms']:.1f} | "
                     f"{total['p99_ms']:.1f} | {total['max_ms']:.1f} | {total['failures']} | "
                     f"{fmt_pct(total['accuracy'])} | {total['lag_p50_ms']:.2f} / {total['lag_p99_ms']:.2f} / "
                     f"{total['lag_max_ms']:.1f} | {fmt_pct(total['no_free_user_ratio'])} | "
                     f"{outcome.cpu['generator']:.2f} | {verdict(outcome)} |")
    lines += ["", "Generator lag: how late each request left against its intended send time (it is part of the "
              "latency columns, which count from the intended time); a run whose lag p99 exceeds "
              f"{outcomes[0].run.max_lag_ms if outcomes else MAX_LAG_P99_MS:g} ms is invalid. No free user: "
              "requests whose slot had passed before a user was free to send them (too few users for the rate "
              "and the latency). The schedule starts once every user is spawned; its warm-up is left out.",
              "", "CPU: cores used on average over the run (2 = both cores; the generator: its busiest process). "
              "Plots: `latency_vs_throughput.png`, `accuracy_p99_size.png`. Per-run Locust CSV/HTML and samples: "
              "the run folders.", ""]
    return "\n".join(lines)


def verdict(outcome: Outcome) -> str:
    return "yes" if outcome.valid else "no: " + "; ".join(outcome.invalid)


def locust_version() -> str:
    # Not `import locust` here: it monkey-patches the standard library with gevent, too late in this process.
    return importlib.metadata.version("locust")


def plot(outcomes: list[Outcome], out: Path, checkpoints: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    stepped = [outcome for outcome in outcomes if not outcome.run.rate and outcome.steps]
    if stepped:
        latency_against_throughput(stepped, out / "latency_vs_throughput.png")
    accuracy_p99_size(outcomes, out / "accuracy_p99_size.png", checkpoints)


def latency_against_throughput(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for outcome in outcomes:
        label = f"{outcome.run.variant} {outcome.run.protocol} {outcome.run.path}"
        x = [step["throughput"] for step in outcome.steps]
        axes[0].plot(x, [step["p50_ms"] for step in outcome.steps], marker="o", label=label)
        axes[1].plot(x, [step["p99_ms"] for step in outcome.steps], marker="o", label=label)
    for axis, title in zip(axes, ("p50", "p99"), strict=True):
        axis.set_xlabel("throughput (req/s)")
        axis.set_ylabel(f"{title} latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.set_title(f"{title} latency against throughput (step runs)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def accuracy_p99_size(outcomes: list[Outcome], path: Path, checkpoints: Path) -> None:
    import matplotlib.pyplot as plt

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
    figure.savefig(path, dpi=120)
    plt.close(figure)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--rates", nargs="*", type=float, default=[200.0, 500.0])
    parser.add_argument("--step-s", type=float, default=5.0)
    parser.add_argument("--steps", default="1,4,16,32,64")
    parser.add_argument("--quick", action="store_true", help="REST only")
    parser.add_argument("--rate-s", type=float, default=10.0, help="seconds measured in each fixed-rate run")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="fixed rate: seconds left out after the spawn")
    parser.add_argument("--processes", type=int, default=1, help="Locust processes of each fixed-rate run")
    parser.add_argument("--users", type=int, default=0,
                        help="users of each fixed-rate run (default: sized for its rate, workload.users_for_rate)")
    parser.add_argument("--skip-steps", action="store_true", help="only the fixed-rate runs")
    parser.add_argument("--max-lag-ms", type=float, default=MAX_LAG_P99_MS,
                        help="a fixed-rate run whose generator lag p99 exceeds this is invalid")
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
        if args.skip_steps and not run.rate:
            continue
        run.extra += extra
        if run.rate:
            run.duration_s, run.warmup_s, run.processes = args.rate_s, args.warmup_s, args.processes
            run.max_lag_ms, run.users = args.max_lag_ms, args.users
        outcomes.append(execute(run, args.output, pids, args.step_s, args.steps))
    command = "python -m loadtest.run " + " ".join(sys.argv[1:])
    summary = markdown(outcomes, command.strip(), [int(users) for users in args.steps.split(",")])
    (args.output / "summary.md").write_text(summary)
    plot(outcomes, args.output, args.checkpoints)
    print(summary)
    failed = [o.run.name for o in outcomes if o.exit_code != 0]
    invalid = [o.run.name for o in outcomes if not o.valid]
    if failed:
        log.error("runs that failed their gate, crashed or were invalid: %s", ", ".join(failed))
    if invalid:
        log.error("invalid runs (the generator, not the system, set their figures): %s", ", ".join(invalid))
    return 1 if failed or invalid else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
