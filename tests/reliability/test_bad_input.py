"""The bad-input matrix: every kind of malformed request, over REST and gRPC, directly to TorchServe and through
the router, each sent inside a batch of good requests. Each must get a 4xx (gRPC: INVALID_ARGUMENT, or the
documented in-body error with code 400) with a message saying what is wrong; the good requests beside it must be
answered correctly; no worker may restart; the workers' memory must stay flat.

Its table goes to the reliability report (`make chaos`: reports/reliability.md); `make test` runs it too.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import requests
from PIL import Image

from loadtest.workload import children, resident_mb
from serving import protos, server
from tests.conftest import Chain, encode_image, in_process_labels
from tests.reliability.conftest import ChaosReport
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router

# 300 ms batch window in the test TorchServe: concurrent requests share a batch. Through the router it is a
# plain model name, which the router passes through (measured, logged, with its own limits).
MODEL = "fashion-distilled"
TORCHSERVE_MAX_REQUEST_BYTES = 6_553_500  # its default max_request_size (config.properties leaves it as it is)


def bomb() -> bytes:
    """A small PNG that claims 20,000 × 20,000 pixels (a decompression bomb)."""
    return encode_image(Image.new("1", (20_000, 20_000)))


def kinds() -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) — at least 30 ways to be wrong."""
    good = Image.new("L", (28, 28), 0)
    png, jpeg = encode_image(good), encode_image(good, "JPEG")
    pixels = [[0] * 28 for _ in range(28)]

    def js(value: Any) -> bytes:
        return json.dumps(value).encode()

    deep: Any = 0
    for _ in range(200):
        deep = [deep]
    return [
        ("empty body", b"", "image/png"),
        ("truncated PNG", png[: len(png) // 2], "image/png"),
        ("corrupt PNG (garbage after the signature)", png[:8] + os.urandom(64), "image/png"),
        ("PNG signature only", png[:8], "image/png"),
        ("truncated JPEG", jpeg[: len(jpeg) // 2], "image/jpeg"),
        ("corrupt JPEG", jpeg[:4] + os.urandom(80), "image/jpeg"),
        ("random bytes", os.urandom(512), "application/octet-stream"),
        ("decompression bomb (20000×20000 PNG)", bomb(), "image/png"),
        ("image over the handler's limit (6 MB)", b"\x89PNG" + os.urandom(6 * 1024 * 1024), "image/png"),
        ("body over the request limit (7 MB)", b"\x89PNG" + os.urandom(7 * 1024 * 1024), "image/png"),
        ("invalid JSON", b'{"data": [1, 2,', "application/json"),
        ("JSON string", js("hello"), "application/json"),
        ("JSON number", b"[42]", "application/json"),
        ("JSON object without data", js({"topk": 3}), "application/json"),
        ("unknown JSON field", js({"data": pixels, "colour": "red"}), "application/json"),
        ("27×28 pixels", js({"data": pixels[:27]}), "application/json"),
        ("783 flat pixels", js({"data": [0] * 783}), "application/json"),
        ("ragged rows", js({"data": [[0] * 28] * 27 + [[0] * 27]}), "application/json"),
        ("strings as pixels", js({"data": [["a"] * 28] * 28}), "application/json"),
        ("NaN pixels", b'{"data": [' + b",".join([b"NaN"] * 784) + b"]}", "application/json"),
        ("infinite pixels", b'{"data": [' + b",".join([b"Infinity"] * 784) + b"]}", "application/json"),
        ("negative pixels", js({"data": [-5] * 784}), "application/json"),
        ("huge pixels", js({"data": [1e30] * 784}), "application/json"),
        ("booleans as pixels", js({"data": [True] * 784}), "application/json"),
        ("null data", js({"data": None}), "application/json"),
        ("deep nesting (200 levels)", js({"data": deep}), "application/json"),
        ("invalid base64", js({"data": "!!not base64!!"}), "application/json"),
        ("base64 of a non-image", js({"data": base64.b64encode(b"hello world").decode()}), "application/json"),
        ("unicode garbage", "{\"data\": \"\u202e\U0001f4a5\u0000\ufffd\"}".encode(), "application/json"),
        ("a PNG declared as JSON", png[:1] + b"{" + png[2:], "application/json"),
        ("topk 0", js({"data": pixels, "topk": 0}), "application/json"),
        ("topk not a number", js({"data": pixels, "topk": "three"}), "application/json"),
        ("topk above the class count", js({"data": pixels, "topk": 11}), "application/json"),
        ("KServe v2 wrong shape", js({"inputs": [{"name": "x", "shape": [3, 3], "datatype": "UINT8",
                                                  "data": [0] * 9}]}), "application/json"),
        ("KServe v2 wrong datatype", js({"inputs": [{"name": "x", "shape": [28, 28], "datatype": "FP64x",
                                                     "data": [0] * 784}]}), "application/json"),
    ]


KINDS = kinds()
RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def good(test_images: Any, chain: Chain) -> tuple[bytes, int]:
    images, _ = test_images
    return encode_image(images[5]), in_process_labels(chain, "distilled", images[5:6])[0]


def worker_pids(instance: server.Instance) -> set[int]:
    frontend = server.running_pid(instance)
    assert frontend is not None
    return set(children(frontend))


def rss_mb(pids: set[int]) -> float:
    return sum(resident_mb(pid) for pid in pids)


@pytest.fixture(scope="module")
def watched(stack: Stack, chaos_report: ChaosReport) -> Iterator[Stack]:  # noqa: F811 (the imported fixture)
    """No worker may restart and the workers' memory must stay flat over the whole matrix."""
    pids = worker_pids(stack.torchserve)
    memory = rss_mb(pids)
    yield stack
    assert worker_pids(stack.torchserve) == pids, "a worker restarted"
    assert rss_mb(pids) < memory + 100, f"worker memory grew from {memory:.0f} MB to {rss_mb(pids):.0f} MB"
    chaos_report.add("Bad-input matrix", matrix_table(pids))


def rest(live: Stack, path: str, body: bytes, content_type: str) -> tuple[int, str]:
    if path == "direct":
        url, headers = f"{live.torchserve.inference_url}/predictions/{MODEL}", live.torchserve.headers()
    else:
        url, headers = f"{live.url}/predictions/{MODEL}", {"Authorization": f"Bearer {live.client_token}"}
    response = requests.post(url, data=body, headers={**headers, "Content-Type": content_type}, timeout=60)
    # TorchServe's frontend refuses a body over its max_request_size with an empty 413: the status line is all
    return response.status_code, response.text or f"(empty body) {response.status_code} {response.reason}"


def grpc_call(live: Stack, path: str, body: bytes, key: str = "data") -> tuple[str, str]:
    """(outcome, message): "ok", "in-body 400" or the gRPC status code name."""
    target = live.torchserve.grpc_target if path == "direct" else live.grpc_target
    token = live.torchserve.token() if path == "direct" else live.client_token
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(channel)
        request = protos.load("inference_pb2").PredictionsRequest(
            model_name=MODEL, input={key: body})
        try:
            answer = json.loads(stub.Predictions(request, metadata=metadata, timeout=60).prediction)
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
    if "error" in answer:
        return f"in-body {answer['error']['code']}", answer["error"]["message"]
    return "ok", json.dumps(answer)[:100]


@pytest.mark.parametrize("path", ["direct", "router"])
@pytest.mark.parametrize(("kind", "body", "content_type"), KINDS, ids=[kind for kind, _, _ in KINDS])
def test_bad_input_fails_alone_with_a_clear_4xx(watched: Stack, good: tuple[bytes, int], path: str, kind: str,
                                                body: bytes, content_type: str) -> None:
    good_body, label = good
    with ThreadPoolExecutor(4) as pool:  # the bad request inside a batch of good ones (300 ms window)
        futures = [pool.submit(rest, watched, path, good_body, "image/png"),
                   pool.submit(rest, watched, path, body, content_type),
                   pool.submit(rest, watched, path, good_body, "image/png"),
                   pool.submit(grpc_call, watched, path, body)]
        good_before, (status, text), good_after, (grpc_outcome, grpc_message) = (f.result() for f in futures)
    for good_status, good_text in (good_before, good_after):
        assert good_status == 200 and json.loads(good_text)["label"] == label
    assert 400 <= status < 500, f"{kind} via {path}: HTTP {status} {text[:300]}"
    message = json.loads(text)["error"]["message"] if text.startswith("{") else text
    assert len(message) > 10
    if len(body) > TORCHSERVE_MAX_REQUEST_BYTES and path == "direct":
        # TorchServe's own gRPC server resets the stream of a message over max_request_size: the client sees
        # CANCELLED, not a status that names the limit (the router, in front, answers RESOURCE_EXHAUSTED)
        assert grpc_outcome in ("RESOURCE_EXHAUSTED", "CANCELLED"), grpc_outcome
        grpc_message = grpc_message or "(no details: TorchServe reset the stream)"
    elif len(body) > 4 * 1024 * 1024:  # refused before any worker sees it, or by the handler's own limit
        assert grpc_outcome in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "in-body 400"), grpc_outcome
    else:
        assert grpc_outcome in ("in-body 400", "INVALID_ARGUMENT"), f"{kind} via {path} gRPC: {grpc_outcome}"
    assert len(grpc_message) > 10
    RESULTS.append({"kind": kind, "path": path, "rest": status, "rest_message": message[:110],
                    "grpc": grpc_outcome, "grpc_message": grpc_message[:110]})


@pytest.mark.parametrize("path", ["direct", "router"])
def test_grpc_with_the_wrong_input_key_is_refused(watched: Stack, path: str) -> None:
    outcome, message = grpc_call(watched, path, encode_image(Image.new("L", (28, 28))), key="image_bytes")
    assert outcome in ("in-body 400", "INVALID_ARGUMENT") and "'data'" in message


def matrix_table(pids: set[int]) -> str:
    lines = [f"{len(KINDS)} kinds × (REST, gRPC) × (direct, router), each inside a batch of good requests (which "
             f"were all answered correctly). Worker restarts: 0 ({len(pids)} workers watched).", "",
             "| kind | path | REST | REST message | gRPC | gRPC message |", "|---|---|---|---|---|---|"]
    for row in sorted(RESULTS, key=lambda r: (r["kind"], r["path"])):
        lines.append(f"| {row['kind']} | {row['path']} | {row['rest']} | {row['rest_message']} | {row['grpc']} | "
                     f"{row['grpc_message']} |".replace("\n", " "))
    return "\n".join(lines)
