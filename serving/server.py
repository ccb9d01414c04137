"""Run one TorchServe: start it from its run directory, wait until every model version has ready workers,
report their status, switch a model's default version, stop it — and describe how to reach it.

The pieces it works with have their own modules, re-exported here because every caller needs them together
(`server.start(server.Instance(...))`): the instance and its files (`serving.instance`), the models file
(`serving.models_file`), the rendered config (`serving.ts_config`), the TorchServe client (`serving.client`)
and pid-file process control (`serving.pidfile`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serving.client import Client, TorchServeError
from serving.errors import ServeError
from serving.instance import DEFAULT_RUN_DIR, STATE_FILE, Instance, Ports, free_ports
from serving.models_file import DEFAULT_MODELS_FILE, read_models, write_default
from serving.pidfile import PidFile, tail
from serving.project import MODEL_CONFIGS, REPO
from serving.ts_config import BASE_CONFIG, render_config

__all__ = [
    "BASE_CONFIG", "DEFAULT_MODELS_FILE", "DEFAULT_RUN_DIR", "MODEL_CONFIGS", "STATE_FILE", "Instance", "Ports",
    "ServeError", "describe", "free_ports", "model_status", "running_instance", "running_pid", "set_default",
    "start", "stop", "tail", "wait_until_ready",
]

log = logging.getLogger(__name__)

FRONTEND_CLASS = "org.pytorch.serve.ModelServer"  # on the Java frontend's command line


def _pid_file(instance: Instance) -> PidFile:
    # TorchServe's launcher writes the Java frontend's pid into TEMP (the instance's own folder, see _environment).
    # Ours is the frontend started with this run directory's config (`-f <run_dir>/config.properties`).
    config = os.path.realpath(instance.run_dir / "config.properties")

    def owns(cmdline: list[str]) -> bool:
        return FRONTEND_CLASS in cmdline and any(os.path.realpath(arg) == config for arg in cmdline
                                                 if arg.endswith("config.properties"))

    return PidFile(instance.pid_file, owns, name="TorchServe")


def running_pid(instance: Instance) -> int | None:
    """The pid of this run directory's TorchServe if it is alive (and really TorchServe), else None."""
    return _pid_file(instance).pid()


def running_instance(run_dir: Path) -> Instance:
    """The TorchServe `make serve` started from `run_dir`, for the tools that measure it; exits naming the fix
    when none is running there."""
    instance = Instance.load(run_dir.resolve())
    if running_pid(instance) is None:
        raise SystemExit(f"no TorchServe running from {run_dir}: run `make serve` first")
    return instance


def _environment(instance: Instance, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    # The pid file (tempfile.gettempdir(): TMPDIR, then TEMP, then TMP), java.io.tmpdir (TEMP) and the
    # worker sockets all go to this instance's own folder. No PYTHONPATH: workers must import the modules
    # packed in their .mar, not whatever the repository holds now.
    temp = str(instance.temp_dir)
    env.update({"TMPDIR": temp, "TEMP": temp, "TMP": temp,
                "LOG_LOCATION": str(instance.log_dir), "METRICS_LOCATION": str(instance.log_dir)})
    env.pop("PYTHONPATH", None)
    return env


def torchserve_binary() -> str:
    candidate = Path(sys.executable).with_name("torchserve")
    return str(candidate) if candidate.exists() else "torchserve"


def start(instance: Instance, timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
    """Start TorchServe for `instance` (unless it already runs) and wait until every version is ready. `env` adds
    to the environment TorchServe and its workers get (e.g. OMP_NUM_THREADS)."""
    instance.run_dir.mkdir(parents=True, exist_ok=True)
    instance.temp_dir.mkdir(exist_ok=True)
    config = instance.run_dir / "config.properties"
    # BASE_CONFIG is looked up here, at call time, so a caller may point this module at another base file.
    rendered = render_config(instance, BASE_CONFIG)
    pid = running_pid(instance)
    if pid is not None:
        log.info("TorchServe already running from %s (pid %s)", instance.run_dir, pid)
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
    if instance.netns is not None:  # a host of its own: the launcher and the Java server it forks live in there
        command = ["ip", "netns", "exec", instance.netns, *command]
    log.info("starting TorchServe: %s", " ".join(command))
    # The Java server inherits the launcher's stdout/stderr: a file, never a pipe that nobody would drain.
    console = instance.log_dir / "console.log"
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
    status: dict[tuple[str, str], dict[str, Any]] = {}
    with Client(instance, request_timeout_s=5.0) as client:
        for entry in read_models(instance.models_file):
            versions = client.describe(entry.name, "all")
            if versions is None:  # not registered (yet)
                continue
            default = client.describe(entry.name)  # a model without a version: its default version
            default_version = str(default[0]["modelVersion"]) if default else None
            for description in versions:
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
            log_tail = tail(instance.log_dir / "ts_log.log")
            raise ServeError(f"TorchServe exited during start-up; last log lines:\n{log_tail}")
        try:
            status = model_status(instance)
            pending = sorted(key for key in expected if status.get(key, {}).get("ready", 0) < 1
                             or status[key]["ready"] < status[key]["min"])
            if not pending:
                log.info("TorchServe ready: %d model versions with workers", len(expected))
                return
            last_error = f"waiting for workers of {pending}"
        except (TorchServeError, KeyError, ValueError) as error:
            last_error = str(error)
        time.sleep(1.0)
    raise ServeError(f"TorchServe not ready after {timeout:.0f} s ({last_error}); see {instance.log_dir}")


def stop(instance: Instance, timeout: float = 60.0) -> bool:
    """Stop this run directory's TorchServe (SIGTERM, as `torchserve --stop` does; SIGKILL after `timeout`);
    True if one was running."""
    pid = _pid_file(instance).stop(timeout_s=timeout)
    if pid is None:
        log.info("no TorchServe running from %s", instance.run_dir)
        return False
    instance.key_file.unlink(missing_ok=True)  # `torchserve --stop` removes it too: the keys died with the server
    log.info("stopped TorchServe (pid %d) from %s", pid, instance.run_dir)
    return True


def set_default(instance: Instance, model: str, version: str) -> None:
    """Switch the default version live (management API) and in the models file, so a restart keeps it."""
    with Client(instance) as client:
        client.set_default(model, version)
    write_default(instance.models_file, model, version)


def describe(instance: Instance) -> str:
    entries = read_models(instance.models_file)
    example = entries[0].name
    image = REPO / "runs" / "examples" / "sneaker.png"
    return "\n".join([
        f"TorchServe is up (all listeners on {instance.address}):",
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
