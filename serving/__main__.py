"""Command line for the serving stage.

Usage:
    python -m serving start [--run-dir runs/torchserve] [--models serving/models.yaml]
    python -m serving stop
    python -m serving status
    python -m serving predict IMAGE_OR_JSON --model fashion-full [--version 1.0] [--grpc] [--topk 5]
    python -m serving set-default fashion-full 2.0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import grpc
import requests

from serving import client, server
from serving.archive import REPO


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start TorchServe and wait until every model is ready")
    start.add_argument("--models", type=Path, default=server.DEFAULT_MODELS_FILE)
    start.add_argument("--model-store", type=Path, default=REPO / "model_store")
    start.add_argument("--timeout", type=float, default=300.0)
    commands.add_parser("stop", help="stop the TorchServe this run directory started")
    commands.add_parser("status", help="models, versions and ready workers")
    predict = commands.add_parser("predict", help="send an image (or a JSON file) and print the answer")
    predict.add_argument("input", type=Path)
    predict.add_argument("--model", default="fashion-full")
    predict.add_argument("--version", default=None)
    predict.add_argument("--grpc", action="store_true", help="use gRPC instead of REST")
    predict.add_argument("--topk", type=int, default=None)
    default = commands.add_parser("set-default", help="switch a model's default version (live and declared)")
    default.add_argument("model")
    default.add_argument("version")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("serving")
    try:
        if args.command == "start":
            instance = server.Instance(args.run_dir.resolve(), args.model_store.resolve(), args.models.resolve())
            server.start(instance, args.timeout)
            print(server.describe(instance))
            return 0
        if args.command == "stop" and not (args.run_dir / server.STATE_FILE).is_file():
            log.info("nothing to stop: no TorchServe was started from %s", args.run_dir)
            return 0
        instance = server.Instance.load(args.run_dir.resolve())
        if args.command == "stop":
            server.stop(instance)
        elif args.command == "status":
            for (model, version), status in sorted(server.model_status(instance).items()):
                marker = " (default)" if status["default"] else ""
                print(f"{model} {version}{marker}: {status['ready']} ready workers")
        elif args.command == "set-default":
            server.set_default(instance, args.model, args.version)
            log.info("%s now answers with version %s (declared in %s)", args.model, args.version,
                     instance.models_file)
        elif args.command == "predict":
            body = args.input.read_bytes()
            if args.grpc:
                answer = client.predict_grpc(instance, args.model, body, args.version, args.topk)
            else:
                content_type = client.content_type_of(args.input)
                status_code, answer = client.predict_rest(instance, args.model, body, content_type, args.version,
                                                          topk=args.topk)
                if status_code != 200:
                    print(json.dumps(answer, indent=2))
                    return 1
            print(json.dumps(answer, indent=2))
            return 1 if isinstance(answer, dict) and "error" in answer else 0
    except (server.ServeError, requests.RequestException, grpc.RpcError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
