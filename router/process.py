"""Start the router in the background and stop it again, by its own pid file (what `make serve` and
`make stop` use; tests use it too, so they exercise the same path). The pid-file mechanics are shared with
TorchServe's (`serving.pidfile`)."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import requests

from router.config import STATE_DIR_ENV, RouterConfig, load_config
from serving.pidfile import PidFile, tail

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The router did not come up (the message carries the end of its log) or could not be stopped."""


def pid_file(config: RouterConfig) -> Path:
    return config.state_dir / "router.pid"


def log_file(config: RouterConfig) -> Path:
    return config.state_dir / "router.log"


def base_url(config: RouterConfig) -> str:
    return f"http://{config.listen.host}:{config.listen.rest_port}"


def _is_router(cmdline: list[str]) -> bool:
    """`python -m router --config <file> serve`, as `start` runs it."""
    return "router" in cmdline and "serve" in cmdline


def _pid_file(config: RouterConfig) -> PidFile:
    return PidFile(pid_file(config), _is_router, name="the router")


def running_pid(config: RouterConfig) -> int | None:
    """The pid in the pid file if that process is alive and is this router, else None."""
    return _pid_file(config).pid()


def replica(config_path: Path, state_dir: Path | None = None) -> RouterConfig:
    """The configuration of the router that runs from `state_dir` (default: the file's, or ROUTER_STATE_DIR's):
    replicas share one experiment file and differ in their state directory."""
    config = load_config(config_path)
    return config if state_dir is None else replace(config, state_dir=state_dir)


def _listens(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def start(config_path: Path, timeout_s: float = 90.0, state_dir: Path | None = None,
          env: dict[str, str] | None = None) -> int:
    """Start `python -m router --config <file> serve` unless it already runs from that state directory; wait
    until it is ready. `env` adds to its environment (ROUTER_DATABASE_URL, say)."""
    config = replica(config_path, state_dir)
    pid = running_pid(config)
    if pid is not None:
        log.info("router already running (pid %d)", pid)
        return pid
    child_env = {**os.environ, **(env or {}), **({STATE_DIR_ENV: str(state_dir)} if state_dir else {})}
    process = _pid_file(config).launch([sys.executable, "-m", "router", "--config", str(config_path), "serve"],
                                       log_file(config), env=child_env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"the router exited with {process.returncode}; end of {log_file(config)}:\n"
                              f"{tail(log_file(config))}")
        try:
            # The port may be shared with other replicas (listen.reuse_port): ready means this process listens
            # and the router behind the port is ready (it listens only once it has checked its targets).
            if _listens(process.pid, config.listen.rest_port) and \
                    requests.get(f"{base_url(config)}/readyz", timeout=2).status_code == 200:
                log.info("router ready (pid %d) on %s", process.pid, base_url(config))
                return process.pid
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop(config_path, state_dir=state_dir)
    raise LaunchError(f"the router was not ready within {timeout_s:g} s; end of {log_file(config)}:\n"
                      f"{tail(log_file(config))}")


def stop(config_path: Path, timeout_s: float = 20.0, state_dir: Path | None = None) -> bool:
    """SIGTERM the router this state directory started (SIGKILL if it hangs); True if one was running."""
    config = replica(config_path, state_dir)
    if _pid_file(config).stop(timeout_s=timeout_s) is None:
        log.info("no router running from %s", config.state_dir)
        return False
    return True


def describe(config: RouterConfig) -> str:
    url = base_url(config)
    name = next(iter(config.experiments))
    arms = ", ".join(f"{arm.name} ({arm.target}, weight {arm.weight:g})" for arm in config.experiments[name].arms)
    return "\n".join([
        f"A/B router is up (listening on {config.listen.host} only):",
        f"  REST          {url}/predictions/<experiment or model>   (TorchServe's paths)",
        f"  gRPC          {config.listen.host}:{config.listen.grpc_port} (TorchServe's InferenceAPIsService)",
        f"  health        {url}/healthz (alive), {url}/readyz and /ping (TorchServe reachable)",
        f"  metrics       {url}/metrics (Prometheus, no token)",
        f"  feedback      POST {url}/feedback {{\"request_id\": ..., \"label\": ...}}",
        f"  admin         {url}/admin/experiments | /admin/report/<experiment> | /admin/reload (admin token)",
        f"  tokens        {config.tokens_file} (\"client\" for requests and feedback, \"admin\" for /admin)",
        f"  experiment    {name}: {arms}",
        "",
        "Try:",
        f"  TOKEN=$(python3 -c \"import json; print(json.load(open('{config.tokens_file}'))['client'])\")",
        f"  curl -i -H \"Authorization: Bearer $TOKEN\" -H '{config.sticky_header}: alice' "
        f"-H 'Content-Type: image/png' --data-binary @runs/examples/sneaker.png {url}/predictions/{name}",
    ])
