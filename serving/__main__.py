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
from typing import Any

from urllib3 import encode_multipart_formdata

from serving import server
from serving.client import Client, Reply, Target, TorchServeError
from serving.project import MODEL_STORE

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                  ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}


def content_type_of(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "application/json"
    return IMAGE_SUFFIXES.get(path.suffix.lower(), "application/octet-stream")


def rest_body(body: bytes, content_type: str, topk: int | None) -> tuple[bytes, str]:
    """The REST body for one input file: with `topk`, JSON gets a "topk" field and an image goes as a multipart
    form (fields "data" and "topk"), since TorchServe passes no query parameters to /predictions."""
    if topk is None:
        return body, content_type
    if content_type == "application/json":
        return json.dumps({**json.loads(body), "topk": topk}).encode(), content_type
    return encode_multipart_formdata({"data": ("image", body, content_type), "topk": str(topk)})


def grpc_inputs(body: bytes, topk: int | None) -> dict[str, bytes]:
    return {"data": body} if topk is None else {"data": body, "topk": str(topk).encode()}


def predict(client: Client, target: Target, path: Path, use_grpc: bool, topk: int | None) -> Reply:
    body = path.read_bytes()
    if use_grpc:
        return client.predict_grpc(target, grpc_inputs(body, topk))
    return client.predict_rest(target, *rest_body(body, content_type_of(path), topk))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start TorchServe and wait until every model is ready")
    start.add_argument("--models", type=Path, default=server.DEFAULT_MODELS_FILE)
    start.add_argument("--model-store", type=Path, default=MODEL_STORE)
    start.add_argument("--timeout", type=float, default=300.0)
    commands.add_parser("stop", help="stop the TorchServe this run directory started")
    commands.add_parser("status", help="models, versions and ready workers")
    predict_command = commands.add_parser("predict", help="send an image (or a JSON file) and print the answer")
    predict_command.add_argument("input", type=Path)
    predict_command.add_argument("--model", default="fashion-full")
    predict_command.add_argument("--version", default=None)
    predict_command.add_argument("--grpc", action="store_true", help="use gRPC instead of REST")
    predict_command.add_argument("--topk", type=int, default=None)
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
            with Client(instance) as client:
                reply = predict(client, Target(args.model, args.version), args.input, args.grpc, args.topk)
            try:
                answer: Any = reply.json()
            except ValueError:
                answer = reply.body.decode("utf-8", "replace")
            print(json.dumps(answer, indent=2))
            # gRPC carries handler errors in the body (TorchServe ignores per-request codes there)
            return 1 if reply.status != 200 or (isinstance(answer, dict) and "error" in answer) else 0
    except (server.ServeError, TorchServeError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
