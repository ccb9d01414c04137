"""`make cluster`: the scale-out rehearsal. The cluster (`serving.cluster`: PostgreSQL, two TorchServe hosts in
network namespaces of their own, two router replicas sharing one address) under fixed-rate load from a Locust
master with two workers (`loadtest/rehearsal_users.py`: predict, then label), while faults are done to it:

1. SIGKILL one router replica (clients move to the other; the requests in flight on it fail), then restart it;
2. stop one TorchServe host (its requests go to the other host: no errors, no wrong answers), then start it;
3. cut the other host off (its link down: packets lost, no answer) — the router times out, opens that host's
   circuit and moves on within its stated timeouts — then reconnect it;
4. restart PostgreSQL (the routers keep answering; what they answer meanwhile is buffered in memory within the
   request log's queue bound and committed when the database returns).

Then the clients' ledger is checked against the database: every answered request must have its row, every
acknowledged feedback its label. The figures go to `reports/cluster.md` (and the README's table comes from it).
The exit code is 1 when a promise was broken: a row or an acknowledged label lost, a wrong answer, an error
while a host was stopped or cut off, or the Locust run itself invalid.

Usage:
    python -m loadtest.rehearsal [--rate 20] [--output reports/cluster]   # brings the cluster up if needed;
                                                                            # the report: reports/cluster.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from loadtest.workload import users_for_rate
from router import process as router_process
from router.config import load_config
from router.stats import percentile
from router.tokens import load_tokens
from serving import server
from serving.cluster import LINKS, ROUTER_REST_PORT, TIMEOUTS, Cluster
from serving.project import REPO

log = logging.getLogger("loadtest.rehearsal")

LOCUSTFILES = "loadtest/locustfile.py,loadtest/rehearsal_users.py"
ROUTER_URL = f"http://127.0.0.1:{ROUTER_REST_PORT}"
# What router.store logs when its database is back: how many answers went out while their rows waited in memory.
OUTAGE_OVER = re.compile(r"the database is back after [\d.]+ s; the (\d+) requests answered meanwhile are committed")
POSTGRES_DOWN_S = 5.0  # how long the database stays down: long enough for the routers to notice and buffer


@dataclass
class Fault:
    name: str
    started: float
    ended: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Entry:
    sent: float
    kind: str
    status: int
    request_id: str
    latency_ms: float
    ok: bool


class Rehearsal:
    def __init__(self, cluster: Cluster, rate: float, output: Path) -> None:
        self.cluster = cluster
        self.rate = rate
        self.output = output
        self.faults: list[Fault] = []
        self.admin = ""

    # --- the faults -----------------------------------------------------------------------------------------------
    @staticmethod
    def wait_until(moment: float) -> None:
        time.sleep(max(0.0, moment - time.time()))

    def kill_replica(self) -> None:
        pid = self.cluster.replica_pid(1)
        assert pid is not None, "router replica 1 is not running"
        fault = Fault("SIGKILL router replica 1", time.time())
        os.kill(pid, signal.SIGKILL)
        time.sleep(5)
        router_process.start(self.cluster.router_config, state_dir=self.cluster.state_dir(1),
                             env=self.cluster.router_env)
        fault.ended = time.time()
        fault.notes["restarted_after_s"] = round(fault.ended - fault.started, 1)
        self.faults.append(fault)

    def stop_host(self) -> threading.Thread:
        """Stop host A (TorchServe's own shutdown), then start it again in the background."""
        host = self.cluster.hosts[0]
        fault = Fault(f"stop TorchServe host {host.address}", time.time())
        server.stop(host)
        fault.notes["stopped_in_s"] = round(time.time() - fault.started, 1)
        self.faults.append(fault)

        def restart() -> None:
            time.sleep(10)
            try:
                server.start(host)
            except Exception as error:  # reported in the table; host B's cut then finds no host to move to
                fault.notes["restart_failed"] = str(error)[:200]
            fault.ended = time.time()
            fault.notes["back_after_s"] = round(fault.ended - fault.started, 1)

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread

    def cut_host(self, duration_s: float) -> None:
        link, host = LINKS[1], self.cluster.hosts[1]
        name = load_config(self.cluster.router_config).torchserve.hosts[1].name
        fault = Fault(f"cut TorchServe host {host.address} off", time.time())
        link.cut()
        opened = None
        try:
            while time.time() - fault.started < duration_s:
                if opened is None and self.host_circuit(name) == "open":
                    opened = time.time() - fault.started
                time.sleep(0.2)
        finally:
            link.restore()
        fault.ended = time.time()
        fault.notes["circuit_open_after_s"] = None if opened is None else round(opened, 1)
        self.faults.append(fault)

    def restart_postgres(self) -> None:
        postgres = self.cluster.postgres
        fault = Fault("restart PostgreSQL", time.time())
        try:
            postgres.stop()
            time.sleep(POSTGRES_DOWN_S)
        finally:
            postgres.start()
        fault.ended = time.time()
        fault.notes["down_s"] = round(fault.ended - fault.started, 1)
        self.faults.append(fault)

    def host_circuit(self, name: str) -> str | None:
        """A host's circuit as one replica sees it (the shared port picks the replica)."""
        try:
            described = requests.get(f"{ROUTER_URL}/admin/experiments", timeout=2,
                                     headers={"Authorization": f"Bearer {self.admin}"}).json()
            state: str | None = described["hosts"][name]["circuit"]
            return state
        except (requests.RequestException, ValueError, KeyError):
            return None

    # --- the run --------------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.output.mkdir(parents=True, exist_ok=True)
        self.cluster.up()
        self.admin = load_tokens(self.cluster.root / "tokens.json").admin
        ledger_path = self.output / "ledger.json"
        ledger_path.unlink(missing_ok=True)
        run_s = 185
        master, workers = self.start_locust(run_s, ledger_path)
        try:
            started = self.wait_for_load(master)
            self.wait_until(started + 10)
            self.kill_replica()
            self.wait_until(started + 30)
            restarted = self.stop_host()
            self.wait_until(started + 110)
            restarted.join(timeout=120)  # host A must be back before host B is cut off
            self.cut_host(15)
            self.wait_until(started + 150)
            self.restart_postgres()
            code = master.wait(timeout=run_s + 120)
            for worker in workers:
                worker.wait(timeout=60)
        finally:  # a fault that failed (or Ctrl-C) leaves no load generator behind; the faults undo themselves
            for process in (master, *workers):
                if process.poll() is None:
                    process.terminate()
                    process.wait(timeout=30)
        return self.report(code, ledger_path)

    def start_locust(self, run_s: int, ledger: Path) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
        locust = str(Path(sys.executable).with_name("locust"))
        users = users_for_rate(self.rate)
        common = ["-f", LOCUSTFILES]
        master = _launch(
            [locust, *common, "--master", "--master-bind-host", "127.0.0.1", "--expect-workers", "2",
             "--headless", "-u", str(users), "-r", str(users), "-t", f"{run_s}s", "--rate", str(self.rate),
             "--target", "router", "--no-pin", "--router-config", str(self.cluster.router_config),
             "--run-dir", str(self.cluster.hosts[0].run_dir), "--samples", str(self.output / "samples"),
             "--ledger", str(ledger), "--max-lag-ms", "50", "--max-failure-ratio", "0.05", "RehearsalUser"],
            self.output / "master.log")
        workers = [_launch([locust, *common, "--worker", "--master-host", "127.0.0.1"],
                           self.output / f"worker-{n}.log") for n in (1, 2)]
        return master, workers

    def wait_for_load(self, master: subprocess.Popen[bytes], timeout_s: float = 120) -> float:
        """The moment the routers start logging the run's requests."""
        begun = time.time()
        with psycopg.connect(self.cluster.database_url, autocommit=True) as db:
            while time.time() - begun < timeout_s:
                if master.poll() is not None:
                    raise RuntimeError(f"Locust's master exited early; see {self.output / 'master.log'}")
                (count,) = db.execute("SELECT count(*) FROM requests WHERE at >= %s", (begun,)).fetchone() or (0,)
                if count:
                    return time.time()
                time.sleep(0.5)
        raise RuntimeError("no request reached the routers")

    # --- the verdict ----------------------------------------------------------------------------------------------
    def report(self, locust_code: int, ledger_path: Path) -> int:
        if not ledger_path.is_file():
            log.error("no ledger from Locust's master (exit code %d); see %s", locust_code, self.output)
            return 1
        entries = [Entry(*row) for row in json.loads(ledger_path.read_text())]
        predictions = [e for e in entries if e.kind == "predict"]
        answered = {e.request_id for e in predictions if e.status == 200}
        acknowledged = {e.request_id for e in entries if e.kind == "feedback" and e.status == 200}
        rows, labels = self.stored(answered, acknowledged)
        windows = [(fault, [e for e in predictions if fault.started <= e.sent <= (fault.ended or fault.started) + 2],
                    [e for e in entries if e.kind == "feedback" and fault.started <= e.sent <= fault.ended + 2])
                   for fault in self.faults]
        lines = ["# Cluster rehearsal (`make cluster`)", "",
                 f"Two router replicas on one address, two TorchServe hosts in network namespaces, PostgreSQL; "
                 f"{self.rate:g} predictions/s (each followed by its feedback) from a Locust master with two workers; "
                 f"router timeouts {TIMEOUTS['request_s']:g} s per attempt, circuits after 3 failures.", "",
                 "| fault | window (s) | predictions | failed | p50 ms | p99 ms | max ms | feedback acked / sent | "
                 "notes |", "|---|---|---|---|---|---|---|---|---|"]
        broken: list[str] = []
        for fault, window, feedback in windows:
            failed = [e for e in window if e.status != 200]
            wrong = [e for e in window if e.status == 200 and not e.ok]
            latencies = [e.latency_ms for e in window]
            notes = ", ".join(f"{k} {v}" for k, v in fault.notes.items())
            lines.append(f"| {fault.name} | {(fault.ended or fault.started) - fault.started + 2:.0f} | {len(window)} | "
                         f"{len(failed)} | {_ms(percentile(latencies, 50))} | {_ms(percentile(latencies, 99))} | "
                         f"{_ms(max(latencies, default=None))} | "
                         f"{sum(e.status == 200 for e in feedback)} / {len(feedback)} | {notes} |")
            if wrong:
                broken.append(f"{len(wrong)} wrong answers during '{fault.name}'")
            if failed and not fault.name.startswith("SIGKILL"):
                broken.append(f"{len(failed)} failed predictions during '{fault.name}'")
        wrong_total = sum(1 for e in predictions if e.status == 200 and not e.ok)
        lost_rows, lost_labels = len(answered - rows), len(acknowledged - labels)
        outage = next((f for f in self.faults if f.name == "restart PostgreSQL"), None)
        buffered = [e for e in predictions if outage and outage.started <= e.sent <= outage.ended and e.status == 200]
        held = self.held_in_memory(outage.started if outage else time.time())
        lines += ["", "| what the clients saw | count | in the database afterwards |", "|---|---|---|",
                  f"| predictions sent / answered | {len(predictions)} / {len(answered)} | {len(answered & rows)} rows "
                  f"(lost: {lost_rows}) |",
                  f"| feedback acknowledged | {len(acknowledged)} | {len(acknowledged & labels)} labels "
                  f"(lost: {lost_labels}) |",
                  f"| answered while PostgreSQL was down | {len(buffered)} | "
                  f"{len({e.request_id for e in buffered} & rows)} rows |",
                  f"| rows the routers held in memory during the outage, then committed (their logs) | "
                  f"{'–' if held is None else held} | |",
                  f"| wrong answers (body from another model than X-Target names) | {wrong_total} | |",
                  f"| Locust master exit code (its merged gate: failure ratio <= 5 %) | {locust_code} | |"]
        if lost_rows:
            broken.append(f"{lost_rows} answered requests have no row")
        if lost_labels:
            broken.append(f"{lost_labels} acknowledged feedbacks have no label")
        if locust_code not in (0, 1):
            broken.append(f"the Locust run is invalid (exit code {locust_code})")
        lines += ["", "Verdict: " + ("every promise held" if not broken else "BROKEN: " + "; ".join(broken))]
        text = "\n".join(lines) + "\n"
        report = self.output.parent / "cluster.md"
        report.write_text(text)
        print(text)
        return 1 if broken else 0

    def held_in_memory(self, since: float) -> int | None:
        """How many answers the replicas sent while the database was away, by their own count (the request log
        says so when the database is back); None if no replica logged an outage since `since`."""
        total, seen = 0, False
        for state_dir in self.cluster.replicas:
            log_file = router_process.log_file(router_process.replica(self.cluster.router_config, state_dir))
            for line in log_file.read_text(errors="replace").splitlines():
                match = OUTAGE_OVER.search(line)
                if match and _logged_at(line) >= since:
                    total, seen = total + int(match.group(1)), True
        return total if seen else None

    def stored(self, answered: set[str], acknowledged: set[str], timeout_s: float = 60) -> tuple[set[str], set[str]]:
        """The request ids among `answered` with a row, and among `acknowledged` with a label — once the routers
        have committed what they buffered (waiting up to `timeout_s` for the rows to stop arriving)."""
        deadline = time.time() + timeout_s
        rows: set[str] = set()
        with psycopg.connect(self.cluster.database_url, autocommit=True) as db:
            while True:
                rows = {r for (r,) in db.execute("SELECT request_id FROM requests WHERE request_id = ANY(%s)",
                                                 (list(answered),))}
                if rows >= answered or time.time() > deadline:
                    break
                time.sleep(1)
            labels = {r for (r,) in db.execute("SELECT request_id FROM feedback WHERE request_id = ANY(%s)",
                                               (list(acknowledged),))}
        return rows, labels


def _logged_at(line: str) -> float:
    """The time of a log line written with the router's format ("2026-11-30 22:55:35,560 ...", local time)."""
    try:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return 0.0


def _launch(command: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.rehearsal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="predictions per second, all workers together")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "cluster",
                        help="Locust's files and the ledger; the report goes beside it as cluster.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Rehearsal(Cluster(), args.rate, args.output).run()


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
