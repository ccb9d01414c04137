"""One TorchServe instance and where it lives: its ports, its run directory and the files in it, saved as
`serve.json` so that `stop`, `status` and the tools find the instance a run directory started.

Everything TorchServe writes at run time goes under the run directory (default `runs/torchserve/`): the
rendered config.properties, `key_file.json` (TorchServe writes it into its working directory), logs, the pid
file and worker sockets (via TEMP, which TorchServe uses for both), so a test instance and `make serve` never
clash.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serving.client import Client
from serving.errors import ServeError
from serving.keys import KeyFile
from serving.project import MODEL_CONFIGS, REPO

DEFAULT_RUN_DIR = REPO / "runs" / "torchserve"
STATE_FILE = "serve.json"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    initial_worker: int = 9000


def free_ports(count: int) -> list[int]:
    """`count` TCP ports free on loopback right now (for test and benchmark instances beside `make serve`)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class Instance:
    """What a running (or last started) TorchServe of one run directory is: saved as serve.json.

    It has the four things a TorchServe client needs (`inference_url`, `management_url`, `grpc_target`,
    `key_file`), so `serving.client.Client(instance)` talks to it.
    """

    run_dir: Path
    model_store: Path
    models_file: Path
    ports: Ports = field(default_factory=Ports)
    model_configs: Path = MODEL_CONFIGS  # <variant>.yaml: workers and batching per variant
    # Where every listener binds: loopback, unless the instance is a host of its own in a network namespace
    # (`serving.netns`, the cluster rehearsal), reachable only over the link made for it.
    address: str = LOOPBACK
    netns: str | None = None

    def _url(self, port: int) -> str:
        return f"http://{self.address}:{port}"

    @property
    def inference_url(self) -> str:
        return self._url(self.ports.inference)

    @property
    def management_url(self) -> str:
        return self._url(self.ports.management)

    @property
    def metrics_url(self) -> str:
        return self._url(self.ports.metrics)

    @property
    def grpc_target(self) -> str:
        return f"{self.address}:{self.ports.grpc_inference}"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def temp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def pid_file(self) -> Path:
        return self.temp_dir / ".model_server.pid"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def save(self) -> None:
        state = {"run_dir": str(self.run_dir), "model_store": str(self.model_store),
                 "models_file": str(self.models_file), "ports": asdict(self.ports),
                 "model_configs": str(self.model_configs), "address": self.address, "netns": self.netns}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Instance:
        path = run_dir / STATE_FILE
        if not path.is_file():
            raise ServeError(f"no TorchServe was started from {run_dir} (no {STATE_FILE}); run `make serve`")
        state = json.loads(path.read_text())
        return cls(Path(state["run_dir"]), Path(state["model_store"]), Path(state["models_file"]),
                   Ports(**state["ports"]), Path(state["model_configs"]), state.get("address", LOOPBACK),
                   state.get("netns"))

    # Shortcuts for scripts and tests that send their own requests; the keys are read (and renewed when close
    # to expiry) by serving.client, the one place that knows TorchServe's key file.
    def token(self, kind: str = "inference") -> str:
        """The current key of `kind` ("inference", "management" or "API"), renewed first if about to expire."""
        with Client(self) as client:
            return client.token(kind)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(kind)}"}

    def _read_keys(self) -> dict[str, Any]:
        """The key file as TorchServe wrote it (every kind, with expiry times)."""
        return KeyFile(self.key_file).read()
