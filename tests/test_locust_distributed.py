"""Distributed Locust, for real and in parts. A real master and two real worker processes on loopback, against
the test TorchServe at a fixed rate: `--rate` is the total over the workers (not per worker), the master's merge
holds every sample the workers sent, the master's exit code is the gate's and the workers' is not, and a worker
that quits or whose data never arrives fails the run. `--processes 3` (Locust's master and workers in one
command) shares the rate the same way and gets the same merged gate. Then the merge and the verdict as plain
functions."""

from __future__ import annotations

import itertools
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadtest.distributed import (
    INVALID_EXIT_CODE,
    Merged,
    Report,
    chunks,
    decode,
    encode,
    judge_run,
    local_merge,
    merge,
    positions,
)
from loadtest.workload import Gate, Sample, read_samples, summarize, users_for_rate
from serving import server
from serving.instance import free_ports
from serving.project import REPO

RATE = 40.0
# These runs check the mechanism (the split, the merge, who exits with what), not the generator's timing: four
# runs at once on this machine's two shared cores make the lag the machine's, so its bound is out of the way.
LENIENT_LAG = ("--max-lag-ms", "10000")
PROCESS_TIMEOUT_S = 90  # each Locust process is bounded by `timeout`


@dataclass
class Finished:
    code: int
    log: str


class Process:
    """A Locust process under `timeout`, its output in a file (no pipe to fill up)."""

    def __init__(self, out: Path, name: str, args: list[str]) -> None:
        self.path = out / f"{name}.log"
        self.handle = open(self.path, "w")  # noqa: SIM115 - closed in wait()
        self.popen = subprocess.Popen(["timeout", str(PROCESS_TIMEOUT_S), sys.executable, "-m", "locust", *args],
                                      cwd=REPO, stdout=self.handle, stderr=subprocess.STDOUT)
        self.finished: Finished | None = None

    def log(self) -> str:
        return self.path.read_text()

    def wait(self) -> Finished:
        if self.finished is None:
            try:
                code = self.popen.wait(timeout=PROCESS_TIMEOUT_S + 10)
            finally:
                self.handle.close()
            self.finished = Finished(code, self.log())
        return self.finished

    def kill_locust(self) -> None:
        """SIGKILL the Locust process itself (not `timeout`): it sends nothing more, not even a goodbye."""
        for child in psutil.Process(self.popen.pid).children():
            child.send_signal(signal.SIGKILL)


@dataclass
class Distributed:
    master: Process
    workers: list[Process]
    out: Path


def run_options(instance: server.Instance, out: Path, run_s: int) -> list[str]:
    return ["-f", "loadtest/locustfile.py", "--headless", "--only-summary", "-u", str(users_for_rate(RATE)),
            "-r", "100", "-t", f"{run_s}s", "--stop-timeout", "2", "--rate", str(RATE), "--warmup-s", "1",
            "--run-dir", str(instance.run_dir), "--target", "direct", "--variant", "int8", "--items", "32",
            "--samples", str(out / "samples"), *LENIENT_LAG]


def start_distributed(instance: server.Instance, out: Path, *gate: str, run_s: int = 5, report_wait_s: float = 10,
                      worker_count: int = 2) -> Distributed:
    out.mkdir(parents=True)
    port = free_ports(1)[0]
    master = Process(out, "master", [*run_options(instance, out, run_s), "--master", "--master-bind-host",
                                     "127.0.0.1", "--master-bind-port", str(port),
                                     "--expect-workers", str(worker_count), "--expect-workers-max-wait", "60",
                                     "--report-wait-s", str(report_wait_s), *gate, "RestUser"])
    workers = [Process(out, f"worker{n}", ["-f", "loadtest/locustfile.py", "--worker", "--master-host", "127.0.0.1",
                                           "--master-port", str(port), "--items", "32"])
               for n in range(worker_count)]
    return Distributed(master, workers, out)


def end_two_workers_mid_run(run: Distributed) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while "Sending spawn jobs" not in run.master.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.5)  # mid-run: they have sent a chunk or so, not their final reports
    run.workers[1].kill_locust()  # its data never arrives
    run.workers[2].popen.send_signal(signal.SIGTERM)  # it quits (`timeout` passes the signal on)


@pytest.fixture(scope="module")
def runs(torchserve: server.Instance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every real run of this file at once (the Locust processes' start-up, seconds each, is most of the time):
    two workers with a loose gate, two with an impossible one, three of which one is killed and one quits
    mid-run, and
    `--processes 3` with the impossible gate."""
    out = tmp_path_factory.mktemp("distributed")
    started: dict[str, Any] = {
        "loose": start_distributed(torchserve, out / "loose"),
        "impossible": start_distributed(torchserve, out / "impossible", "--max-p99-ms", "0.001"),
        "killed": start_distributed(torchserve, out / "killed", run_s=7, report_wait_s=3, worker_count=3),
    }
    (out / "processes").mkdir()
    started["processes"] = Process(out / "processes", "locust", [*run_options(torchserve, out / "processes", 5),
                                                                  "--processes", "3", "--max-p99-ms", "0.001",
                                                                  "RestUser"])
    killer = threading.Thread(target=end_two_workers_mid_run, args=(started["killed"],))
    killer.start()
    try:
        yield started
    finally:
        killer.join()
        for run in started.values():
            for process in [run] if isinstance(run, Process) else [run.master, *run.workers]:
                if process.popen.poll() is None:
                    process.popen.kill()
                process.wait()


def sent_by_worker(log: str) -> int:
    found = re.findall(r"sent (\d+) samples to the master", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


def intended(samples: list[Sample]) -> list[float]:
    """Each sample's intended send time: its completion minus its latency, which is counted from that time."""
    return sorted(s.at - s.latency_ms / 1000 for s in samples)


def assert_one_schedule_at_the_rate(samples: list[Sample]) -> None:
    """W interleaved schedules at rate/W each make one at `rate`, evenly spaced: the workers' slots are 1/rate
    apart, not bunched at whatever phase each worker started."""
    times = intended(samples)
    # Over the schedule's middle: a worker that falls behind on a busy machine is stopped with its last slots
    # unsent, so the run's tail can be one worker's slots alone (CI once read 35.5 req/s over the whole span).
    # Two workers sending the whole rate each would still read 80 here, and one alone 20.
    low, high = len(times) // 5, len(times) * 4 // 5
    assert (high - low) / (times[high] - times[low]) == pytest.approx(RATE, rel=0.03)
    assert statistics.median(b - a for a, b in itertools.pairwise(times)) == pytest.approx(1 / RATE, rel=0.1)


@pytest.mark.serving
def test_two_workers_share_the_rate_and_the_master_merges_every_sample(runs: dict[str, Any]) -> None:
    run = runs["loose"]
    master, workers = run.master.wait(), [worker.wait() for worker in run.workers]
    assert master.code == 0, master.log[-4000:]
    assert [worker.code for worker in workers] == [0, 0], [worker.log[-2000:] for worker in workers]
    files = sorted(run.out.glob("samples.*.csv"))
    assert len(files) == 1  # the master's merge, the only writer
    samples = read_samples(files)
    # every sample the workers sent, by their own count, is in the master's merge
    sent = [sent_by_worker(worker.log) for worker in workers]
    assert len(samples) == sum(sent) > 40  # a second of the schedule at least, on a busy machine
    report = json.loads((run.out / "samples.workers.json").read_text())
    assert sorted(w["index"] for w in report) == [0, 1]
    assert sorted(w["sent"] for w in report) == sorted(sent) and all(w["received"] == w["sent"] for w in report)
    assert abs(sent[0] - sent[1]) <= 0.2 * sum(sent)  # each worker sends half the rate
    # --rate is the total: 40 req/s from both workers together, not 40 each
    assert_one_schedule_at_the_rate(samples)
    total = json.loads((run.out / "samples.summary.json").read_text())["Aggregated"]
    again = summarize(samples)["Aggregated"]  # from the file, whose figures are rounded
    assert total["requests"] == again["requests"] == len(samples) and total["failures"] == 0
    assert total["p99_ms"] == pytest.approx(again["p99_ms"], abs=0.01)
    # achieved: the samples over the first send to the last answer (a short run: the last answers' latency counts)
    assert total["throughput"] == pytest.approx(RATE, rel=0.2)
    assert "full-resolution:" in master.log and "generator lag:" in master.log


@pytest.mark.serving
def test_the_master_exits_with_the_gate_and_the_workers_do_not(runs: dict[str, Any]) -> None:
    run = runs["impossible"]
    master, workers = run.master.wait(), [worker.wait() for worker in run.workers]
    assert master.code == 1, master.log[-4000:]
    assert "gate failed: p99" in master.log
    assert [worker.code for worker in workers] == [0, 0], [worker.log[-2000:] for worker in workers]
    assert not any("gate failed" in worker.log for worker in workers)


@pytest.mark.serving
def test_a_worker_that_quits_or_whose_data_never_arrives_fails_the_run(runs: dict[str, Any]) -> None:
    run = runs["killed"]
    master = run.master.wait()
    assert master.code == INVALID_EXIT_CODE, master.log[-4000:]
    invalid = next(line for line in master.log.splitlines() if "run invalid:" in line)
    # one worker each (their positions are Locust's connection order)
    assert invalid.count("sent no final report (it quit, or its data never arrived): its share is missing") == 1
    assert invalid.count("stopped before the master ended the run: its share is partial") == 1
    assert run.workers[0].wait().code == 0
    assert run.workers[1].wait().code != 0  # killed
    quitter = run.workers[2].wait()
    assert quitter.code != 0 and "quitting before the master ended the run" in quitter.log


@pytest.mark.serving
def test_processes_get_the_same_merged_gate(runs: dict[str, Any]) -> None:
    process = runs["processes"]
    finished = process.wait()
    assert finished.code == 1, finished.log[-4000:]
    assert "gate failed: p99" in finished.log
    files = list(process.path.parent.glob("samples.*.csv"))
    assert len(files) == 1
    workers = json.loads((process.path.parent / "samples.workers.json").read_text())
    samples = read_samples(files)
    assert sorted(w["index"] for w in workers) == [0, 1, 2]
    assert all(w["received"] == w["sent"] for w in workers) and sum(w["sent"] for w in workers) == len(samples)
    assert_one_schedule_at_the_rate(samples)  # three workers at a third of the rate each


def test_pyproject_gives_locust_the_kits_defaults_and_the_command_line_wins() -> None:
    # In a subprocess: importing Locust monkey-patches the standard library with gevent.
    script = ("import loadtest.locustfile; from locust.argument_parser import get_parser; p = get_parser(); "
              "d = p.parse_args([]); o = p.parse_args(['-f', 'other.py', '--stop-timeout', '3', '--headful']); "
              "print(d.locustfile, d.headless, d.stop_timeout, o.locustfile, o.stop_timeout, o.headful)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["loadtest/locustfile.py", "True", "10", "other.py", "3", "True"]


# --- the merge and the verdict, as plain functions ---


def sample(at: float, latency: float = 10.0, ok: bool = True, name: str = "int8 rest png",
           lag: float | None = 0.5) -> Sample:
    return Sample(name, ok, at, latency - (lag or 0), latency, True if ok else None, lag, False)


def final(sent: int, chunk_count: int = 1, requested: bool = True, **extra: object) -> dict[str, object]:
    return {"run": "r", "sent": sent, "chunks": chunk_count, "requested": requested, "warmup_requests": 3,
            "cpu_warning": False, "extras": {}, **extra}


def test_positions_are_dense_in_locusts_order() -> None:
    # Locust's worker_index counts every worker that ever connected: 0, 3 and 7 are positions 0, 1 and 2 of 3
    order = {"a": 7, "b": 0, "c": 3}
    assert positions(order, order.__getitem__) == {"b": 0, "c": 1, "a": 2}


def test_samples_survive_the_wire_and_are_sent_in_bounded_chunks() -> None:
    samples = [Sample("x", True, 1.5, 2.25, 3.125, None, None, False), Sample("y", False, 2.0, 1.0, 9.0, False,
                                                                             8.0, True)]
    assert decode(encode(samples)) == samples
    assert decode(json.loads(json.dumps(encode(samples)))) == samples  # lists of plain values, as msgpack sends
    rows = encode([sample(float(i)) for i in range(12)])
    assert [len(c) for c in chunks(rows, 5)] == [5, 5, 2]
    assert [row for c in chunks(rows, 5) for row in c] == rows


def test_a_complete_merge_is_judged_as_one_process_would() -> None:
    first = [sample(1.0 + i / 10, latency=10 + i) for i in range(50)]
    second = [sample(1.05 + i / 10, latency=20 + i) for i in range(50)]
    reports = [Report("w1", 1, second, 2, final(50, 2, extras={"acks": [2]})),
               Report("w0", 0, first, 1, final(50, 1, extras={"acks": [1]}))]
    merged = merge(reports)
    assert merged.problems == [] and len(merged.samples) == 100
    assert [s.at for s in merged.samples] == sorted(s.at for s in first + second)
    assert merged.warmup_requests == 6 and merged.extras == {"acks": {0: [1], 1: [2]}}
    assert [w["index"] for w in merged.workers] == [0, 1]
    verdict = judge_run(merged, Gate(max_p99_ms=1000))
    assert verdict.summary == summarize(first + second) and verdict.exit_code == 0
    assert judge_run(merged, Gate(max_p99_ms=5)).exit_code == 1  # the gate, on the whole run's p99
    assert judge_run(merged, Gate(max_lag_p99_ms=0.1)).exit_code == INVALID_EXIT_CODE


def test_a_merge_with_a_share_missing_is_invalid() -> None:
    whole = Report("w0", 0, [sample(1.0)], 1, final(1))
    never = Report("w1", 1, [sample(1.1)], 1, None)  # some samples came, the final report did not
    short = Report("w2", 2, [sample(1.2)], 1, final(2, 2))  # a chunk was lost
    early = Report("w3", 3, [sample(1.3)], 1, final(1, requested=False))  # quit before the master ended the run
    merged = merge([whole, never, short, early])
    assert len(merged.problems) == 3
    assert "w1 (position 1) sent no final report" in merged.problems[0]
    assert "w2 (position 2): 1 of its 2 samples arrived (1 of 2 chunks)" in merged.problems[1]
    assert "w3 (position 3) stopped before the master ended the run" in merged.problems[2]
    verdict = judge_run(merged, Gate(max_p99_ms=1000))
    assert verdict.exit_code == INVALID_EXIT_CODE and verdict.invalid[:3] == merged.problems
    assert merge([]).problems == ["no worker took part in the run"]
    assert judge_run(merge([]), Gate()).violations == ["no requests were made"]


def test_a_worker_that_joined_mid_run_is_keyed_by_its_id_and_listeners_can_fail_the_run() -> None:
    merged = merge([Report("w0", 0, [sample(1.0)], 1, final(1, extras={"n": 1})),
                    Report("late", None, [], 0, final(0, 0, extras={"n": 0}))])
    assert merged.problems == [] and merged.extras == {"n": {0: 1, "late": 0}}
    merged.violations.append("an answered request was never acknowledged")
    assert judge_run(merged, Gate(max_p99_ms=1000)).exit_code == 1


def test_a_single_process_is_a_merge_of_one() -> None:
    samples = [sample(1.0 + i / 10) for i in range(10)]
    merged: Merged = local_merge(samples, warmup_requests=4, cpu_warning=True)
    assert merged.samples == samples and merged.warmup_requests == 4 and merged.problems == []
    verdict = judge_run(merged, Gate())
    assert verdict.exit_code == INVALID_EXIT_CODE and "CPU" in verdict.invalid[0]

