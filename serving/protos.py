"""gRPC stubs for TorchServe, generated at build time from the protos inside TorchServe's own jar.

The jar (`ts/frontend/model-server.jar`) carries `inference.proto`, `management.proto`,
`open_inference_grpc.proto` and the `google/rpc/status.proto` they import (grpcio-tools does not ship it), so
the stubs always match the server that is installed. They are written to `serving/_grpc/` (git-ignored).

Usage:
    python -m serving.protos            # (re)generate the stubs
"""

from __future__ import annotations

import importlib
import logging
import sys
import zipfile
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

STUB_DIR = Path(__file__).resolve().parent / "_grpc"
PROTOS = ("inference.proto", "management.proto", "open_inference_grpc.proto")


def server_jar() -> Path:
    import ts

    return Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"


def generate(out_dir: Path = STUB_DIR) -> Path:
    from grpc_tools import protoc

    source = out_dir / "proto_src"
    with zipfile.ZipFile(server_jar()) as jar:
        for name in jar.namelist():
            if (name.startswith("proto/") and name.endswith(".proto")) or name == "google/rpc/status.proto":
                jar.extract(name, source)
    include = Path(protoc.__file__).resolve().parent / "_proto"  # the well-known types (empty.proto ...)
    targets = [str(source / "proto" / name) for name in PROTOS] + [str(source / "google/rpc/status.proto")]
    arguments = [
        "grpc_tools.protoc", f"-I{source / 'proto'}", f"-I{source}", f"-I{include}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *targets,
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {targets}")
    (out_dir / "STAMP").write_text(str(server_jar().stat().st_mtime))
    log.info("generated gRPC stubs in %s", out_dir)
    return out_dir


def load(name: str) -> ModuleType:
    """Import a generated module (e.g. "inference_pb2_grpc"), generating the stubs first if needed."""
    stamp = STUB_DIR / "STAMP"
    if not stamp.is_file() or stamp.read_text() != str(server_jar().stat().st_mtime):
        generate()
    # The generated modules import each other by bare name ("import inference_pb2"), so their folder goes on
    # sys.path; the folder has no google/__init__.py, so google.rpc merges into protobuf's namespace package.
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))
    return importlib.import_module(name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate()
