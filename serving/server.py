"""Start, wait for, describe and stop one TorchServe instance that lives in its own run directory.

Everything TorchServe writes at run time goes under the run directory (default `runs/torchserve/`): the
rendered config.properties, `key_file.json` (TorchServe writes it into its working directory), logs, the pid
file and worker sockets (via TEMP, which TorchServe uses for both), so a test instance and `make serve` never
clash, and `stop` stops only the instance this run directory started.

Which models and versions load, and which version of each is the default, is declared in a models file
(default `serving/models.yaml`) and rendered into TorchServe's `model_snapshot`: the default is chosen
declaratively, not by load order, and holds across restarts. The batch/worker settings come from each
variant's `handlers/model_configs/<variant>.yaml` (TorchServe lets a snapshot override the archive's
model-config.yaml, so the snapshot carries the same values).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from serving.archive import MODEL_CONFIGS, REPO, mar_file_name

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = REPO / "runs" / "torchserve"
DEFAULT_MODELS_FILE = REPO / "serving" / "models.yaml"
BASE_CONFIG = REPO / "config.properties"
STATE_FILE = "serve.json"
LOOPBACK = "127.0.0.1"
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")


class ServeError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    initial_worker: int = 9000


@dataclass(frozen=True)
class ModelEntry:
    name: str
    variant: str
    versions: tuple[str, ...]
    default: str


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


def _loopback_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}"


@dataclass(frozen=True)
class Instance:
    """What a running (or last started) TorchServe of one run directory is: saved as serve.json."""

    run_dir: Path
    model_store: Path
    models_file: Path
    ports: Ports = field(default_factory=Ports)
    model_configs: Path = MODEL_CONFIGS  # <variant>.yaml: workers and batching per variant

    @property
    def inference_url(self) -> str:
        return _loopback_url(self.ports.inference)

    @property
    def management_url(self) -> str:
        return _loopback_url(self.ports.management)

    @property
    def metrics_url(self) -> str:
        return _loopback_url(self.ports.metrics)

    @property
    def grpc_target(self) -> str:
        return f"{LOOPBACK}:{self.ports.grpc_inference}"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def temp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def pid_file(self) -> Path:
        return self.temp_dir / ".model_server.pid"

    def save(self) -> None:
        state = {"run_dir": str(self.run_dir), "model_store": str(self.model_store),
                 "models_file": str(self.models_file), "ports": asdict(self.ports),
                 "model_configs": str(self.model_configs)}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Instance:
        path = run_dir / STATE_FILE
        if not path.is_file():
            raise ServeError(f"no TorchServe was started from {run_dir} (no {STATE_FILE}); run `make serve`")
        state = json.loads(path.read_text())
        return cls(Path(state["run_dir"]), Path(state["model_store"]), Path(state["models_file"]),
                   Ports(**state["ports"]), Path(state["model_configs"]))

    def token(self, kind: str = "inference") -> str:
        """The current key of `kind` ("inference", "management" or "API") from TorchServe's key file.

        Inference and management keys expire (token_expiration_min) and TorchServe does not renew them by
        itself: a key about to expire is renewed here with the API key, which rewrites the key file.
        """
        keys = self._read_keys()
        if kind != "API" and expires_soon(keys[kind].get("expiration time")):
            response = requests.post(f"{self.management_url}/token", params={"type": kind},
                                     headers={"Authorization": f"Bearer {keys['API']['key']}"}, timeout=10)
            if response.status_code != 200:
                raise ServeError(f"renewing the {kind} key failed: HTTP {response.status_code} {response.text}")
            keys = self._read_keys()
        return str(keys[kind]["key"])

    def _read_keys(self) -> dict[str, Any]:
        try:
            keys: dict[str, Any] = json.loads(self.key_file.read_text())
        except FileNotFoundError as error:
            raise ServeError(f"{self.key_file} not found: is TorchServe running? (`make serve`)") from error
        return keys

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(kind)}"}


def expires_soon(expiration: str | None, margin_s: float = 60.0) -> bool:
    if not expiration:
        return False
    expires = datetime.datetime.fromisoformat(expiration.replace("Z", "+00:00"))
    return expires.timestamp() - time.time() < margin_s


def read_models(models_file: Path) -> list[ModelEntry]:
    document = yaml.safe_load(models_file.read_text()) or {}
    entries = []
    for name, spec in (document.get("models") or {}).items():
        versions = tuple(str(version) for version in spec.get("versions", []))
        default = str(spec.get("default", versions[-1] if versions else ""))
        if not versions or default not in versions:
            raise ServeError(f"{models_file}: model {name!r} needs 'versions' and a 'default' among them")
        entries.append(ModelEntry(name, str(spec["variant"]), versions, default))
    if not entries:
        raise ServeError(f"{models_file} declares no models")
    return entries


def write_default(models_file: Path, model: str, version: str) -> None:
    """Set `default:` of one model in place, keeping the file's comments and layout."""
    entry = next((e for e in read_models(models_file) if e.name == model), None)
    if entry is None or version not in entry.versions:
        raise ServeError(f"{models_file} declares no version {version} of {model}")
    lines = models_file.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{model}:")
    block_indent = " " * (len(lines[start]) - len(lines[start].lstrip()) + 1)
    for index in range(start + 1, len(lines)):
        if lines[index].strip().startswith("default:"):
            indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
            lines[index] = f'{indent}default: "{version}"\n'
            break
        if lines[index].strip() and not lines[index].startswith(block_indent):  # left the model's block
            raise ServeError(f"{models_file}: {model} has no 'default:' line to change")
    models_file.write_text("".join(lines))
    if next(e for e in read_models(models_file) if e.name == model).default != version:
        raise ServeError(f"{models_file}: could not set the default of {model}")


def model_snapshot(entries: list[ModelEntry], model_store: Path, model_configs: Path) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for entry in entries:
        settings = yaml.safe_load((model_configs / f"{entry.variant}.yaml").read_text())
        models[entry.name] = {}
        for version in entry.versions:
            mar = mar_file_name(entry.name, version)
            if not (model_store / mar).is_file():
                raise ServeError(f"{model_store / mar} is missing; run `make archive`")
            models[entry.name][version] = {
                "defaultVersion": version == entry.default,
                "marName": mar,
                **{key: settings[key] for key in SNAPSHOT_KEYS},
            }
    count = sum(len(versions) for versions in models.values())
    return {"name": "startup.cfg", "modelCount": count, "models": models}


def render_config(instance: Instance) -> str:
    """The base config.properties with this instance's ports, model store and snapshot filled in."""
    ports = instance.ports
    overrides = {
        "inference_address": instance.inference_url,
        "management_address": instance.management_url,
        "metrics_address": instance.metrics_url,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "initial_worker_port": str(ports.initial_worker),
        "model_store": str(instance.model_store),
        # Only archives from our own model store may be loaded (CVE-2023-43654 was an SSRF through URLs).
        "allowed_urls": f"file://{instance.model_store}/.*",
        "model_snapshot": json.dumps(
            model_snapshot(read_models(instance.models_file), instance.model_store, instance.model_configs)
        ),
    }
    lines = []
    for line in BASE_CONFIG.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in overrides and not line.lstrip().startswith("#"):
            continue
        lines.append(line)
    lines.append("# --- rendered by serving.server for this run directory ---")
    lines += [f"{key}={value}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def _environment(instance: Instance, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    # The pid file (tempfile.gettempdir(): TMPDIR, then TEMP, then TMP), java.io.tmpdir (TEMP) and the
    # worker sockets all go to this instance's own folder. No PYTHONPATH: workers must import the modules
    # packed in their .mar, not whatever the repository holds now.
    temp = str(instance.temp_dir)
    env.update({"TMPDIR": temp, "TEMP": temp, "TMP": temp,
                "LOG_LOCATION": str(instance.run_dir / "logs"), "METRICS_LOCATION": str(instance.run_dir / "logs")})
    env.pop("PYTHONPATH", None)
    return env


def running_pid(instance: Instance) -> int | None:
    """The pid of this run directory's TorchServe if it is alive (and really TorchServe), else None."""
    try:
        pid = int(instance.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid if b"org.pytorch.serve.ModelServer" in cmdline else None


def torchserve_binary() -> str:
    candidate = Path(sys.executable).with_name("torchserve")
    return str(candidate) if candidate.exists() else "torchserve"


def start(instance: Instance, timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
    """Start TorchServe for `instance` (unless it already runs) and wait until every version is ready. `env` adds
    to the environment TorchServe and its workers get (e.g. OMP_NUM_THREADS)."""
    instance.run_dir.mkdir(parents=True, exist_ok=True)
    instance.temp_dir.mkdir(exist_ok=True)
    config = instance.run_dir / "config.properties"
    rendered = render_config(instance)
    if running_pid(instance) is not None:
        log.info("TorchServe already running from %s (pid %s)", instance.run_dir, running_pid(instance))
        if config.is_file() and config.read_text() != rendered:
            log.warning("models, archives or settings changed since it started: `make stop && make serve` "
                        "to load them")
            instance = Instance.load(instance.run_dir)
        wait_until_ready(instance, timeout)
        return
    config.write_text(rendered)
    instance.save()
    command = [torchserve_binary(), "--start", "--ts-config", str(config), "--model-store",
               str(instance.model_store), "--ncs"]
    log.info("starting TorchServe: %s", " ".join(command))
    # The Java server inherits the launcher's stdout/stderr: a file, never a pipe that nobody would drain.
    console = instance.run_dir / "logs" / "console.log"
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "ab") as output:
        result = subprocess.run(command, cwd=instance.run_dir, env=_environment(instance, env), stdout=output,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
    if result.returncode != 0:
        raise ServeError(f"torchserve --start failed ({result.returncode}); see {console}:\n{tail(console)}")
    try:
        wait_until_ready(instance, timeout)
    except ServeError:
        stop(instance)  # never leave a half-started server behind
        raise


def model_status(instance: Instance) -> dict[tuple[str, str], dict[str, Any]]:
    """{(model, version): {"ready": n, "min": n, "default": bool}} from the management API."""
    headers = instance.headers("management")
    status: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in read_models(instance.models_file):
        response = requests.get(f"{instance.management_url}/models/{entry.name}/all", headers=headers, timeout=5)
        if response.status_code == 404:  # not registered (yet)
            continue
        if response.status_code != 200:
            raise ServeError(f"management API: HTTP {response.status_code} {response.text.strip()}")
        # Describing a model without a version describes its default version.
        default = requests.get(f"{instance.management_url}/models/{entry.name}", headers=headers, timeout=5)
        default_version = str(default.json()[0]["modelVersion"]) if default.status_code == 200 else None
        for description in response.json():
            workers = description.get("workers", [])
            status[(entry.name, str(description["modelVersion"]))] = {
                "ready": sum(1 for worker in workers if worker.get("status") == "READY"),
                "min": description.get("minWorkers", 1),
                "default": str(description["modelVersion"]) == default_version,
            }
    return status


def wait_until_ready(instance: Instance, timeout: float = 300.0) -> None:
    expected = {(entry.name, version) for entry in read_models(instance.models_file) for version in entry.versions}
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if running_pid(instance) is None:
            log_tail = tail(instance.run_dir / "logs" / "ts_log.log")
            raise ServeError(f"TorchServe exited during start-up; last log lines:\n{log_tail}")
        try:
            status = model_status(instance)
            pending = sorted(key for key in expected if status.get(key, {}).get("ready", 0) < 1
                             or status[key]["ready"] < status[key]["min"])
            if not pending:
                log.info("TorchServe ready: %d model versions with workers", len(expected))
                return
            last_error = f"waiting for workers of {pending}"
        except (requests.RequestException, ServeError, KeyError, ValueError) as error:
            last_error = str(error)
        time.sleep(1.0)
    raise ServeError(f"TorchServe not ready after {timeout:.0f} s ({last_error}); see {instance.run_dir / 'logs'}")


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} not written)"


def stop(instance: Instance, timeout: float = 60.0) -> bool:
    """Stop this run directory's TorchServe with its own `torchserve --stop`; True if one was running."""
    pid = running_pid(instance)
    if pid is None:
        log.info("no TorchServe running from %s", instance.run_dir)
        return False
    subprocess.run([torchserve_binary(), "--stop"], cwd=instance.run_dir, env=_environment(instance),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():  # --stop asked politely; this pid is ours (checked above)
        os.kill(pid, signal.SIGKILL)
    log.info("stopped TorchServe (pid %d) from %s", pid, instance.run_dir)
    return True


def set_default(instance: Instance, model: str, version: str) -> None:
    """Switch the default version live (management API) and in the models file, so a restart keeps it."""
    response = requests.put(f"{instance.management_url}/models/{model}/{version}/set-default",
                            headers=instance.headers("management"), timeout=10)
    if response.status_code != 200:
        raise ServeError(f"set-default {model} {version}: HTTP {response.status_code} {response.text}")
    write_default(instance.models_file, model, version)


def describe(instance: Instance) -> str:
    entries = read_models(instance.models_file)
    example = entries[0].name
    image = REPO / "runs" / "examples" / "sneaker.png"
    return "\n".join([
        "TorchServe is up (all listeners on 127.0.0.1):",
        f"  REST inference   {instance.inference_url}/predictions/<model>[/<version>]",
        f"  REST management  {instance.management_url}/models",
        f"  KServe v2        {instance.inference_url}/v2/models/<model>/infer",
        f"  metrics          {instance.metrics_url}/metrics (Prometheus, no token)",
        f"  gRPC inference   {instance.grpc_target} (org.pytorch.serve.grpc.inference.InferenceAPIsService)",
        "  models           " + ", ".join(f"{e.name} (versions {', '.join(e.versions)}; default {e.default})"
                                         for e in entries),
        f"  tokens           {instance.key_file} (inference key for 8080/7070, management key for 8081)",
        "",
        "Try:",
        f"  TOKEN=$(python -c \"import json; print(json.load(open('{instance.key_file}'))['inference']['key'])\")",
        f"  curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: image/png' "
        f"--data-binary @{image} {instance.inference_url}/predictions/{example}",
        f"  .venv/bin/python -m serving predict {image} --model {example}",
        f"  .venv/bin/python -m serving predict {image} --model {example} --grpc",
    ])

