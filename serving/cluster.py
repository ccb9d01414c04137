"""`make cluster`: the kit as it runs beyond one machine, brought up on this one with real processes.

- PostgreSQL (`serving.postgres`) on 127.0.0.1:55432, data in `runs/cluster/postgres`: the router replicas'
  shared store.
- Two TorchServe hosts, each in a network namespace of its own (`serving.netns`): 10.231.1.2 and 10.231.2.2,
  TorchServe's default ports on their own addresses, the repository's model store, models file and model
  configs. Token authorization stays on and each host keeps its own key file (keys per host: on one machine
  the router can read them; in a cluster it cannot, see the README's threat model).
- Two router replicas sharing one address, 127.0.0.1:8190 (REST) and :7190 (gRPC), with SO_REUSEPORT: the
  kernel spreads connections over the replicas that listen, as a Kubernetes Service spreads them over pods.
  Their experiment file, `runs/cluster/router.yaml`, is rendered from `router/experiments.yaml` (the same
  experiments, guardrail and headers) with the hosts, the store and shorter timeouts; each replica has its own
  state directory (`runs/cluster/router-<n>`: pid file, log) and they share one tokens file.

Usage:
    python -m serving.cluster up        # start what is not running; prints where everything is
    python -m serving.cluster status
    python -m serving.cluster down      # stop everything it started, remove the namespaces
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router import process as router_process
from router.config import DATABASE_URL_ENV, POSTGRESQL, load_config
from serving import server
from serving.errors import ServeError
from serving.instance import Instance
from serving.models_file import DEFAULT_MODELS_FILE
from serving.netns import Link
from serving.postgres import PostgresServer
from serving.project import REPO

log = logging.getLogger(__name__)

ROOT = REPO / "runs" / "cluster"
POSTGRES_PORT = 55432
ROUTER_REST_PORT, ROUTER_GRPC_PORT = 8190, 7190
REPLICAS = 2
LINKS = (Link("tskit-a", 1), Link("tskit-b", 2))
EXPERIMENTS_FILE = REPO / "router" / "experiments.yaml"
# What the replicas' file changes in router/experiments.yaml: a cut-off host must be noticed within seconds, so
# an attempt gives up after 2 s and three failures in a row take a host out for 5 s.
TIMEOUTS = {"connect_s": 0.5, "request_s": 2.0, "shadow_s": 2.0}
CIRCUIT_BREAKER = {"failures": 3, "reset_s": 5.0}


@dataclass(frozen=True)
class Cluster:
    root: Path = ROOT

    @property
    def postgres(self) -> PostgresServer:
        return PostgresServer(self.root / "postgres", POSTGRES_PORT)

    @property
    def database_url(self) -> str:
        return self.postgres.url_for("router")

    def host(self, link: Link) -> Instance:
        return Instance(self.root / f"ts-{link.name}", REPO / "model_store", DEFAULT_MODELS_FILE,
                        address=link.host_address, netns=link.name)

    @property
    def hosts(self) -> list[Instance]:
        return [self.host(link) for link in LINKS]

    @property
    def router_config(self) -> Path:
        return self.root / "router.yaml"

    def state_dir(self, replica: int) -> Path:
        return self.root / f"router-{replica}"

    @property
    def replicas(self) -> list[Path]:
        return [self.state_dir(replica) for replica in range(1, REPLICAS + 1)]

    @property
    def router_env(self) -> dict[str, str]:
        return {DATABASE_URL_ENV: self.database_url}

    # --- the router's file ----------------------------------------------------------------------------------------
    def render_router_config(self) -> Path:
        document: dict[str, Any] = yaml.safe_load(EXPERIMENTS_FILE.read_text())
        document.update({
            "torchserve": {"hosts": [{"inference_url": host.inference_url, "management_url": host.management_url,
                                      "grpc_target": host.grpc_target, "key_file": str(host.key_file)}
                                     for host in self.hosts]},
            "listen": {"host": "127.0.0.1", "rest_port": ROUTER_REST_PORT, "grpc_port": ROUTER_GRPC_PORT,
                       "reuse_port": True},
            "state_dir": str(self.root / "router"),  # each replica runs with its own (ROUTER_STATE_DIR)
            "tokens_file": str(self.root / "tokens.json"),
            "store": {"backend": POSTGRESQL, "url_env": DATABASE_URL_ENV},
            "timeouts": TIMEOUTS,
            "circuit_breaker": CIRCUIT_BREAKER,
        })
        self.root.mkdir(parents=True, exist_ok=True)
        header = (f"# Rendered by serving.cluster from {EXPERIMENTS_FILE.relative_to(REPO)}: edit that file, then "
                  "`python -m serving.cluster up` again.\n")
        self.router_config.write_text(header + yaml.safe_dump(document, sort_keys=False))
        load_config(self.router_config)  # validate what was written
        return self.router_config

    # --- up, down, status -----------------------------------------------------------------------------------------
    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        postgres = self.postgres
        if not postgres.running:
            postgres.start()
        postgres.create_database("router")
        for link in LINKS:
            if not link.exists():
                link.create()
        # The hosts start side by side: each takes a while to load its models.
        with concurrent.futures.ThreadPoolExecutor(len(LINKS)) as pool:
            for started in [pool.submit(server.start, host) for host in self.hosts]:
                started.result()
        self.render_router_config()
        for state_dir in self.replicas:
            router_process.start(self.router_config, state_dir=state_dir, env=self.router_env)

    def down(self) -> None:
        """Stop everything `up` started, each piece whatever happened to the others; the failures are raised at
        the end, together."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.router_config.is_file():
            steps += [(f"router {state_dir.name}", functools.partial(
                router_process.stop, self.router_config, state_dir=state_dir)) for state_dir in self.replicas]
        steps += [(f"TorchServe {host.address}", functools.partial(server.stop, host))
                  for host in self.hosts if (host.run_dir / "serve.json").is_file()]
        steps += [(f"namespace {link.name}", link.destroy) for link in LINKS]
        steps.append(("PostgreSQL", self.postgres.stop))
        problems = []
        for what, step in steps:
            try:
                step()
            except (ServeError, router_process.LaunchError, OSError) as error:
                problems.append(f"{what}: {error}")
        if problems:
            raise ServeError("; ".join(problems))

    def replica_pid(self, replica: int) -> int | None:
        return router_process.running_pid(router_process.replica(self.router_config, self.state_dir(replica)))

    def describe(self) -> str:
        lines = ["The cluster rehearsal's stack:",
                 f"  PostgreSQL  {self.database_url} ({'running' if self.postgres.running else 'stopped'})"]
        for link, host in zip(LINKS, self.hosts, strict=True):
            pid = server.running_pid(host) if (host.run_dir / "serve.json").is_file() else None
            lines.append(f"  TorchServe  {host.inference_url} in namespace {link.name} "
                         f"({'pid ' + str(pid) if pid else 'stopped'})")
        for replica in range(1, REPLICAS + 1):
            pid = self.replica_pid(replica) if self.router_config.is_file() else None
            lines.append(f"  router {replica}    http://127.0.0.1:{ROUTER_REST_PORT} and 127.0.0.1:{ROUTER_GRPC_PORT} "
                         f"(shared; {'pid ' + str(pid) if pid else 'stopped'})")
        lines.append(f"  tokens      {self.root / 'tokens.json'}")
        return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=ROOT, help="where the cluster's files go")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = Cluster(args.root)
    try:
        if args.command == "up":
            cluster.up()
        elif args.command == "down":
            cluster.down()
            return 0
        print(cluster.describe())
    except (ServeError, router_process.LaunchError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
