"""The A/B router in front of TorchServe.

Usage:
    python -m router --config router/experiments.yaml            # serve in the foreground (REST + gRPC)
    python -m router --config router/experiments.yaml start      # in the background; waits until ready
    python -m router --config router/experiments.yaml stop
    python -m router --config router/experiments.yaml status     # experiments, weights, circuits (admin API)
    python -m router --config router/experiments.yaml report [--experiment fashion] [--since-s 3600] [--json]
    python -m router --config router/experiments.yaml check      # validate the file (and targets, if TorchServe is up)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import requests

from router import app, process
from router.config import check_targets, load_config
from router.errors import RouterError
from router.hosts import TorchServeHosts
from router.report import build_report, to_markdown
from router.store import StoreError
from router.tokens import load_tokens

DEFAULT_CONFIG = Path("router/experiments.yaml")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the experiment file")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run in the foreground (the default)")
    serve.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for TorchServe at start")
    commands.add_parser("start", help="run in the background and wait until ready")
    commands.add_parser("stop", help="stop the router started from this config's state_dir")
    commands.add_parser("status", help="experiments, effective weights and circuits of the running router")
    report = commands.add_parser("report", help="per-arm verdict from the request log")
    report.add_argument("--experiment", default=None, help="default: every experiment in the file")
    report.add_argument("--since-s", type=float, default=None, help="only the last N seconds")
    report.add_argument("--json", action="store_true")
    commands.add_parser("check", help="validate the experiment file (targets too, when TorchServe is up)")
    return parser


def _check(config_path: Path) -> None:
    config = load_config(config_path)

    async def targets() -> None:
        hosts = TorchServeHosts(config.torchserve, config.timeouts, config.circuit_breaker)
        await hosts.open()
        try:
            check_targets(config, await hosts.served_models())
        finally:
            await hosts.close()

    asyncio.run(targets())
    print(f"{config_path}: valid; every target is served by TorchServe")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("router")
    command = args.command or "serve"
    try:
        if command == "serve":
            return app.run(args.config, getattr(args, "wait_s", 60.0))
        if command == "start":
            process.start(args.config)
            print(process.describe(load_config(args.config)))
            return 0
        if command == "stop":
            process.stop(args.config)
            return 0
        if command == "check":
            _check(args.config)
            return 0
        config = load_config(args.config)
        if command == "status":
            tokens = load_tokens(config.tokens_file)
            response = requests.get(f"{process.base_url(config)}/admin/experiments", timeout=10,
                                    headers={"Authorization": f"Bearer {tokens.admin}"})
            print(json.dumps(response.json(), indent=2))
            return 0 if response.status_code == 200 else 1
        if command == "report":
            since = 0.0 if args.since_s is None else time.time() - args.since_s
            names = [args.experiment] if args.experiment else list(config.experiments)
            for name in names:
                if name not in config.experiments:
                    log.error("no experiment %r in %s", name, args.config)
                    return 1
                report = build_report(config, config.experiments[name], since)
                print(json.dumps(report, indent=2) if args.json else to_markdown(report))
            return 0
    except (RouterError, StoreError, process.LaunchError, requests.RequestException, OSError) as error:
        log.error("%s", error)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
