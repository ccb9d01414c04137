"""The Open Inference Protocol (KServe v2) on the router.

First the codec alone (router.open_inference, no stack): what a REST body (JSON, or JSON followed by Triton's binary
tensors) and a gRPC ModelInferRequest (typed contents or raw contents) become, the REST answer read back by
tritonclient, and every kind of wrong request refused with a BadRequest that names the problem, at a bounded cost.

Then the real router in front of the real test TorchServe: tritonclient (a widely used OIP client no one here
wrote) over REST and gRPC against every experiment and plain model, changing only the URL and the auth header;
the protocol's JSON by hand; health, errors and status codes; and that a v2 request is routed, logged, sticky,
pinnable, shadowed and judged by feedback like a TorchServe-protocol request.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import struct
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

import fashion_cnn
from router import open_inference
from router.config import RouterConfig, load_config
from router.errors import BadRequest, NotFound, RouterError
from router.open_inference import (
    BINARY_HEADER,
    TensorRequest,
    outputs_of,
    parse_grpc,
    parse_rest,
    rest_answer,
    serialize_bytes,
)
from serving import protos
from serving.client import Reply
from serving.project import KIT_VERSION, REPO
from tests.conftest import Chain, encode_image, in_process_labels
from tests.test_router import Stack, stack, until  # noqa: F401 (the real router in front of the test TorchServe)

CLASSES = fashion_cnn.DATASETS["fashion-mnist"].classes
SIGNATURE = json.loads((REPO / "handlers" / "signature.json").read_text())
# What the router's gRPC server parses a request into: TorchServe's compiled messages (another package name than
# tritonclient's, the same wire format).
ROUTER_PB = protos.load("open_inference_grpc_pb2")
IMAGE = 28 * 28
# A refusal quotes client values only in part (router.errors.quoted): a message stays short whatever was sent.
MAX_MESSAGE_CHARS = 300


# --- the codec alone ---------------------------------------------------------------------------------------------
def v2_json(shape: Any, data: Any = None, datatype: str = "UINT8", name: str = "images", **extra: Any) -> bytes:
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        entry["data"] = data
    return json.dumps({"inputs": [entry], **extra}).encode()


def binary_body(shape: list[int], raw: bytes, datatype: str = "UINT8", size: int | None = None,
                data: Any = None, **extra: Any) -> tuple[bytes, str]:
    """A body in Triton's binary extension: the JSON header, then the tensor's bytes; and the header's length."""
    entry = {"name": "images", "datatype": datatype, "shape": shape, "parameters": {
        "binary_data_size": len(raw) if size is None else size}}
    if data is not None:
        entry["data"] = data
    header = json.dumps({"inputs": [entry], **extra}).encode()
    return header + raw, str(len(header))


def png(image: np.ndarray) -> bytes:
    return encode_image(Image.fromarray(image))


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def grpc_request(datatype: str = "UINT8", shape: tuple[int, ...] = (1, 28, 28), contents: dict[str, Any] | None = None,
                 raw: list[bytes] | None = None, outputs: tuple[str, ...] = (), request_id: str = "",
                 inputs: int = 1) -> Any:
    """A ModelInferRequest built with tritonclient's own messages, read as the router's server reads it."""
    message = triton_pb.ModelInferRequest(model_name="fashion", id=request_id)
    for _ in range(inputs):
        tensor = message.inputs.add(name="images", datatype=datatype, shape=shape)
        for field, values in (contents or {}).items():
            getattr(tensor.contents, field).extend(values)
    message.raw_input_contents.extend(raw or [])
    for name in outputs:
        message.outputs.add(name=name)
    return ROUTER_PB.ModelInferRequest.FromString(message.SerializeToString())


def test_rest_json_takes_flat_and_nested_data_in_row_major_order() -> None:
    images = pixels(2)
    flat = parse_rest(v2_json([2, 28, 28], images.flatten().tolist(), id="r-1"), None)
    nested = parse_rest(v2_json([2, 28, 28], images.tolist()), None)
    as_floats = parse_rest(v2_json([2, 784], (images.reshape(2, 784) / 2).tolist(), "FP32"), None)
    assert flat.id == "r-1" and nested.id == ""
    for request in (flat, nested):
        assert request.datatype == "UINT8" and request.shape == (2, 28, 28) and request.array is not None
        assert request.array.dtype == np.uint8 and np.array_equal(request.array, images)
        assert request.outputs == () and request.binary_outputs == frozenset() and request.images == ()
    assert as_floats.array is not None and as_floats.array.dtype == np.float32 and as_floats.shape == (2, 784)
    assert np.array_equal(as_floats.array, (images.reshape(2, 784) / 2).astype(np.float32))


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_rest_binary_extension_as_tritonclient_sends_it(datatype: str) -> None:
    images = pixels(3).astype(np.float32 if datatype == "FP32" else np.uint8)
    tensor = triton_http.InferInput("images", [3, 28, 28], datatype)
    tensor.set_data_from_numpy(images)  # binary by default
    body, header_length = triton_http.InferenceServerClient.generate_request_body([tensor], request_id="tc-1")
    request = parse_rest(body, str(header_length))
    assert request.id == "tc-1" and request.shape == (3, 28, 28) and request.array is not None
    assert request.array.dtype == images.dtype and np.array_equal(request.array, images)
    # no outputs named: tritonclient asks for every output in binary
    assert request.outputs == () and request.binary_outputs == {"label", "class", "probabilities"}

    wanted = [triton_http.InferRequestedOutput("class"), triton_http.InferRequestedOutput("label", binary_data=False)]
    body, header_length = triton_http.InferenceServerClient.generate_request_body([tensor], outputs=wanted)
    request = parse_rest(body, str(header_length))
    assert request.outputs == ("class", "label") and request.binary_outputs == {"class"}


def test_rest_bytes_in_base64_json_and_in_the_binary_extension() -> None:
    pngs = [png(image) for image in pixels(2, seed=1)]
    encoded = [base64.b64encode(png).decode() for png in pngs]
    for data, shape in ((encoded, [2]), ([encoded], [1, 2])):
        request = parse_rest(v2_json(shape, data, "BYTES"), None)
        assert request.images == tuple(pngs) and request.array is None and request.shape == tuple(shape)
    tensor = triton_http.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    body, header_length = triton_http.InferenceServerClient.generate_request_body([tensor])
    assert parse_rest(body, str(header_length)).images == tuple(pngs)


def test_requested_outputs_with_and_without_binary() -> None:
    def outputs(*entries: dict[str, Any], **request_parameters: Any) -> TensorRequest:
        extra: dict[str, Any] = {"outputs": list(entries)}
        if request_parameters:
            extra["parameters"] = request_parameters
        return parse_rest(v2_json([1, 784], [0] * IMAGE, **extra), None)

    assert outputs({"name": "probabilities"}, {"name": "label"}).outputs == ("probabilities", "label")
    assert outputs({"name": "label"}).binary_outputs == frozenset()
    assert outputs({"name": "label", "parameters": {"binary_data": True}}, {"name": "class"}).binary_outputs == {
        "label"}
    both = outputs({"name": "label"}, {"name": "class", "parameters": {"binary_data": False}}, binary_data_output=True)
    assert both.outputs == ("label", "class") and both.binary_outputs == {"label"}


def test_the_upstream_body_is_npy_for_numbers_and_v2_json_for_bytes() -> None:
    images = pixels(2)
    numeric = parse_rest(v2_json([2, 28, 28], images.tolist()), None)
    loaded = np.load(io.BytesIO(numeric.upstream_body()), allow_pickle=False)
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, images)
    image = png(images[0])
    upstream = json.loads(parse_rest(v2_json([1], [base64.b64encode(image).decode()], "BYTES"), None).upstream_body())
    (entry,) = upstream["inputs"]
    assert entry["name"] == "images" and entry["datatype"] == "BYTES" and entry["shape"] == [1]
    assert base64.b64decode(entry["data"][0]) == image


def test_grpc_typed_contents_and_raw_contents() -> None:
    images = pixels(2)
    typed = parse_grpc(grpc_request(shape=(2, 28, 28), contents={"uint_contents": images.flatten().tolist()},
                                    request_id="g-1", outputs=("label",)))
    assert typed.id == "g-1" and typed.outputs == ("label",) and not typed.raw_outputs
    assert typed.array is not None and typed.array.dtype == np.uint8 and np.array_equal(typed.array, images)
    floats = parse_grpc(grpc_request("FP32", (1, 784), contents={"fp32_contents": [0.5] * IMAGE}))
    assert floats.array is not None and floats.array.dtype == np.float32 and float(floats.array.sum()) == 392.0

    raw = parse_grpc(grpc_request(shape=(2, 28, 28), raw=[images.tobytes()]))
    assert raw.raw_outputs and raw.array is not None and np.array_equal(raw.array, images)
    raw_floats = parse_grpc(grpc_request("FP32", (2, 28, 28), raw=[images.astype("<f4").tobytes()]))
    assert raw_floats.array is not None and np.array_equal(raw_floats.array, images.astype(np.float32))

    pngs = [png(image) for image in images]
    typed_bytes = parse_grpc(grpc_request("BYTES", (2,), contents={"bytes_contents": pngs}))
    raw_bytes = parse_grpc(grpc_request("BYTES", (2,), raw=[serialize_bytes(pngs)]))
    assert typed_bytes.images == raw_bytes.images == tuple(pngs)


def handler_answer(count: int) -> tuple[bytes, list[int]]:
    """What the handler answers for `count` images (its v2 JSON), with the labels in it."""
    labels = [(3 * index) % 10 for index in range(count)]
    probabilities = np.full((count, 10), 0.05, dtype=np.float32)
    probabilities[np.arange(count), labels] = 0.55
    answer = {"id": "", "model_name": "fashion-full", "model_version": "1.0", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [count], "data": labels},
        {"name": "class", "datatype": "BYTES", "shape": [count], "data": [CLASSES[label] for label in labels]},
        {"name": "probabilities", "datatype": "FP32", "shape": [count, 10],
         "data": [round(float(p), 6) for p in probabilities.flatten()]}]}
    return json.dumps(answer).encode(), labels


@pytest.mark.parametrize("binary", [(), ("label", "class", "probabilities"), ("class",)],
                         ids=["json", "all-binary", "class-binary"])
def test_rest_answer_reads_back_in_tritonclient(binary: tuple[str, ...]) -> None:
    body, labels = handler_answer(3)
    request = TensorRequest("a-1", "UINT8", (3, 28, 28), binary_outputs=frozenset(binary))
    outputs = outputs_of(Reply(200, body), request).outputs
    parameters = {"request_id": "r" * 32, "experiment": "fashion", "arm": "full", "target": "fashion-full/1.0"}
    answer, headers = rest_answer(request, "fashion", "1.0", outputs, parameters)
    header_length = int(headers[BINARY_HEADER]) if binary else None
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    result = triton_http.InferenceServerClient.parse_response_body(answer, header_length=header_length)
    assert result.as_numpy("label").tolist() == labels
    assert [bytes(value).decode() if isinstance(value, bytes) else value
            for value in result.as_numpy("class").tolist()] == [CLASSES[label] for label in labels]
    probabilities = result.as_numpy("probabilities").reshape(3, 10)  # JSON data comes back flat
    assert probabilities.argmax(1).tolist() == labels
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("a-1", "fashion", "1.0")
    assert response["parameters"] == parameters
    for output in response["outputs"]:
        assert ("data" not in output) == (output["name"] in binary)


def test_the_servers_version_is_the_projects() -> None:
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == KIT_VERSION


def test_outputs_of_keeps_the_order_asked_and_turns_a_refusal_into_a_400() -> None:
    body, labels = handler_answer(2)
    subset = outputs_of(Reply(200, body), TensorRequest("", "UINT8", (2, 784),
                                                         outputs=("probabilities", "label"))).outputs
    assert [output.name for output in subset] == ["probabilities", "label"] and subset[1].data == labels
    assert subset[0].shape == (2, 10) and len(subset[0].flat()) == 20
    refusal = json.dumps({"error": {"code": 400, "type": "InvalidInput", "message": "NPY array shape must be..."},
                          "model": {"name": "fashion-full"}}).encode()
    with pytest.raises(BadRequest, match="NPY array shape must be"):
        outputs_of(Reply(400, refusal), TensorRequest("", "UINT8", (1, 3, 3)))
    with pytest.raises(RouterError) as not_json:
        outputs_of(Reply(200, b"<html>"), TensorRequest("", "UINT8", (1, 784)))
    assert not isinstance(not_json.value, BadRequest) and "not a JSON object" in not_json.value.message
    # TorchServe's own 4xx keeps its meaning; a 200 with no outputs is no answer
    gone = json.dumps({"code": 404, "type": "ModelNotFoundException", "message": "Model not found"}).encode()
    with pytest.raises(NotFound, match="Model not found"):
        outputs_of(Reply(404, gone), TensorRequest("", "UINT8", (1, 784)))
    with pytest.raises(RouterError, match="lacks the outputs"):
        outputs_of(Reply(200, b'{"outputs": []}'), TensorRequest("", "UINT8", (1, 784)))
    with pytest.raises(RouterError, match="malformed output"):
        outputs_of(Reply(200, b'{"outputs": [{"name": "label"}]}'), TensorRequest("", "UINT8", (1, 784)))


def output_entries(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"outputs": list(entries)}


def rest_kind(body: bytes, header_length: str | None = None) -> Callable[[], TensorRequest]:
    return lambda: parse_rest(body, header_length)


def grpc_kind(**request: Any) -> Callable[[], TensorRequest]:
    return lambda: parse_grpc(grpc_request(**request))


GOOD = [0] * IMAGE
BAD_KINDS: dict[str, tuple[Callable[[], TensorRequest], tuple[str, ...]]] = {
    "wrong datatype": (rest_kind(v2_json([1, 784], GOOD, "INT32")), ("takes datatype", "'INT32'")),
    "wrong datatype over gRPC": (grpc_kind(datatype="FP64", raw=[bytes(8 * IMAGE)]), ("takes datatype", "'FP64'")),
    "wrong input name": (rest_kind(v2_json([1, 784], GOOD, name="pixels")), ("unknown input 'pixels'", "'images'")),
    "two inputs": (rest_kind(json.dumps({"inputs": [json.loads(v2_json([1, 784], GOOD))["inputs"][0]] * 2}).encode()),
                   ("exactly one input", "2 entries")),
    "two inputs over gRPC": (grpc_kind(inputs=2, raw=[bytes(IMAGE)] * 2), ("exactly one input", "got 2")),
    "no inputs": (rest_kind(b'{"id": "x"}'), ("exactly one input", "None")),
    "shape rank over 4": (rest_kind(v2_json([1, 1, 1, 28, 28], GOOD)), ("at most 4 integers", "[1, 1, 1, 28, 28]")),
    "shape not a list": (rest_kind(v2_json("28x28", GOOD)), ("must be a list", "'28x28'")),
    "negative dimension": (rest_kind(v2_json([-1, 28, 28], GOOD)), ("integers from 0 to 50176", "-1")),
    "boolean dimension": (rest_kind(v2_json([True, 784], GOOD)), ("integers from 0 to 50176", "True")),
    "dimension over the limit": (rest_kind(v2_json([1, 10**12], GOOD)), ("integers from 0 to 50176",)),
    "elements over max_images*784": (rest_kind(v2_json([65, 28, 28], GOOD)),
                                     ("[65, 28, 28] holds 50960 elements", "over the limit of 50176", "64 images")),
    "elements over the limit in few dimensions": (rest_kind(v2_json([300, 300], GOOD, "FP32")),
                                                  ("holds 90000 elements", "over the limit of 50176")),
    "BYTES over max_images": (rest_kind(v2_json([65], ["aGk="] * 65, "BYTES")),
                              ("dimensions must be integers from 0 to 64", "got 65")),
    "no data in the shape": (rest_kind(v2_json([0, 28, 28], [])), ("holds no data",)),
    "data count != shape": (rest_kind(v2_json([2, 28, 28], GOOD)), ("holds 1568 elements", "'data' has 784")),
    "ragged data": (rest_kind(v2_json([1, 28, 28], [[0] * 28] * 27 + [[0] * 27])), ("not a regular array",)),
    "strings in numeric data": (rest_kind(v2_json([1, 784], ["a"] * IMAGE, "FP32")), ("must hold numbers",)),
    "booleans in numeric data": (rest_kind(v2_json([1, 784], [True] * IMAGE, "FP32")), ("must hold numbers",)),
    "nulls in numeric data": (rest_kind(v2_json([1, 784], [None] * IMAGE, "FP32")), ("must hold numbers",)),
    "floats in UINT8 data": (rest_kind(v2_json([1, 784], [0.5] * IMAGE)), ("must hold integers",)),
    "UINT8 out of range": (rest_kind(v2_json([1, 784], [300] + [0] * 783)), ("[0, 255]", "300")),
    "UINT8 negative": (rest_kind(v2_json([1, 784], [-1] + [0] * 783)), ("[0, 255]", "-1")),
    "UINT8 out of range over gRPC": (grpc_kind(shape=(1, 784), contents={"uint_contents": [256] + [0] * 783}),
                                     ("[0, 255]", "256")),
    "missing data": (rest_kind(v2_json([1, 784])), ("needs 'data'",)),
    "missing data over gRPC": (grpc_kind(), ("no data", "uint_contents or raw_input_contents")),
    "typed contents of the wrong count": (grpc_kind(contents={"uint_contents": [0] * 700}),
                                          ("holds 784 elements", "contents.uint_contents has 700")),
    "typed and raw contents both": (grpc_kind(contents={"uint_contents": GOOD}, raw=[bytes(IMAGE)]),
                                    ("both typed contents and raw_input_contents",)),
    "two raw contents for one input": (grpc_kind(raw=[bytes(IMAGE)] * 2), ("raw_input_contents holds 2 entries",)),
    "raw contents of the wrong length": (grpc_kind(raw=[bytes(700)]), ("700 bytes", "needs 784")),
    "raw FP32 contents of the wrong length": (grpc_kind(datatype="FP32", raw=[bytes(IMAGE)]),
                                              ("784 bytes", "needs 3136")),
    "binary tensor of the wrong length": (rest_kind(*binary_body([1, 28, 28], bytes(700))), ("700 bytes", "needs 784")),
    "torn BYTES element": (grpc_kind(datatype="BYTES", shape=(1,), raw=[struct.pack("<I", 5) + b"ab"]),
                           ("claims 5 bytes", "2 remain")),
    "torn BYTES length": (rest_kind(*binary_body([2], struct.pack("<I", 1) + b"a" + b"\x01\x00", "BYTES")),
                          ("torn length",)),
    "BYTES of fewer elements than the shape": (
        grpc_kind(datatype="BYTES", shape=(3,), raw=[serialize_bytes([b"a"] * 2)]), ("hold 2 elements", "needs 3")),
    "BYTES not base64": (rest_kind(v2_json([1], ["not base64!"], "BYTES")), ("element 0 is not valid base64",)),
    "BYTES not strings": (rest_kind(v2_json([2], [1, 2], "BYTES")), ("2 base64 strings",)),
    "binary_data_size mismatch": (rest_kind(*binary_body([1, 28, 28], bytes(IMAGE), size=IMAGE + 1)),
                                  ("binary_data_size 785", "the 784 bytes")),
    "binary bytes without binary_data_size": (rest_kind(v2_json([1, 784], GOOD) + bytes(10), str(len(v2_json(
        [1, 784], GOOD)))), ("10 bytes follow", "no input has binary_data_size")),
    "binary_data_size and data both": (rest_kind(*binary_body([1, 784], bytes(IMAGE), data=GOOD)),
                                       ("both 'data' and binary_data_size",)),
    "header length not an integer": (rest_kind(v2_json([1, 784], GOOD), "12a"),
                                     ("Inference-Header-Content-Length must be an integer", "'12a'")),
    "header length past the body": (rest_kind(v2_json([1, 784], GOOD), "999999"),
                                    ("Inference-Header-Content-Length 999999", "does not fit")),
    "header length zero": (rest_kind(v2_json([1, 784], GOOD), "0"), ("Inference-Header-Content-Length 0",)),
    "unknown output name": (rest_kind(v2_json([1, 784], GOOD, **output_entries({"name": "logits"}))),
                            ("unknown output 'logits'", "label, class, probabilities")),
    "unknown output name over gRPC": (grpc_kind(raw=[bytes(IMAGE)], outputs=("logits",)), ("unknown output 'logits'",)),
    "duplicate output": (rest_kind(v2_json([1, 784], GOOD, **output_entries({"name": "label"}, {"name": "label"}))),
                         ("requested twice",)),
    "outputs not objects": (rest_kind(v2_json([1, 784], GOOD, outputs=["label"])), ("'outputs' must be a list",)),
    "id too long": (rest_kind(v2_json([1, 784], GOOD, id="x" * 257)), ("at most 256 characters",)),
    "id of a megabyte": (rest_kind(v2_json([1, 784], GOOD, id="x" * (1 << 20))), ("at most 256 characters",)),
    "id not a string": (rest_kind(v2_json([1, 784], GOOD, id=5)), ("'id' must be a string", "5")),
    "id too long over gRPC": (grpc_kind(raw=[bytes(IMAGE)], request_id="x" * 257), ("at most 256 characters",)),
    "invalid JSON": (rest_kind(b'{"inputs": [', None), ("not valid JSON",)),
    "JSON not an object": (rest_kind(b"[1, 2]"), ("must be a JSON object",)),
    "input parameters not an object": (rest_kind(json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                                                          "shape": [1, 784], "data": GOOD,
                                                                          "parameters": [1]}]}).encode()),
                                       ("'parameters' must be an object",)),
}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_each_bad_kind_is_a_bad_request_naming_the_problem(kind: str) -> None:
    parse, words = BAD_KINDS[kind]
    with pytest.raises(BadRequest) as refused:
        parse()
    message = refused.value.message
    assert all(word in message for word in words), f"{message!r} lacks {words}"
    assert len(message) <= MAX_MESSAGE_CHARS, message


def max_body(unit: bytes, opening: bytes, closing_: bytes) -> bytes:
    """A v2 JSON body of exactly the router's max_body_bytes whose data is `unit` repeated inside the brackets."""
    limit = RouterConfig.max_body_bytes
    head = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [64, 28, 28], "data": ' + opening
    tail = closing_ + b"}]}"
    count = (limit - len(head) - len(tail) + 1) // (len(unit) + 1)
    body = head + b",".join([unit] * count) + tail
    return body + b" " * (limit - len(body))  # JSON allows trailing whitespace


@pytest.mark.parametrize("body, words", [
    (np.random.default_rng(0).integers(0, 256, RouterConfig.max_body_bytes, dtype=np.uint8).tobytes(),
     ("not valid JSON",)),
    (b"[" * RouterConfig.max_body_bytes, ("values and lists", "64 images")),  # counted before it is parsed
    (max_body(b"0", b"[[[", b"]]]"), ("values and lists", "64 images")),
    (max_body(b"[0]", b"[[[", b"]]]"), ("values and lists", "64 images")),
], ids=["garbage", "brackets", "4-deep nested list", "4-deep list of one-number lists"])
def test_a_body_at_the_router_limit_is_refused_before_it_is_parsed(
        body: bytes, words: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """json.loads holds the router's event loop for its whole parse (over a second for a limit-sized body of tiny
    lists): a body that cannot be a request of at most 64 images is refused by a count, never handed to it."""
    assert len(body) == RouterConfig.max_body_bytes
    parsed: list[int] = []
    real_loads = json.loads

    def counting_loads(raw: bytes) -> Any:
        parsed.append(len(raw))
        return real_loads(raw)

    monkeypatch.setattr(open_inference.json, "loads", counting_loads)
    with pytest.raises(BadRequest) as refused:
        parse_rest(body, None)
    assert all(word in refused.value.message for word in words), refused.value.message
    # garbage fails JSON's first byte; every body of lists is refused by the count before any parse
    assert parsed == ([len(body)] if words == ("not valid JSON",) else []), parsed


# --- through the router ------------------------------------------------------------------------------------------
# Every experiment and plain model a client may name, with the version it may add.
MODELS = [("fashion", ""), ("fashion-full", ""), ("fashion-full", "2.0"), ("fashion-pruned", ""),
          ("fashion-int8", ""), ("fashion-distilled", "")]
VARIANTS = ("full", "pruned", "int8", "distilled")


def variant_of(target: str) -> str:
    """'fashion-int8/1.0' -> 'int8'."""
    return target.split("/")[0].removeprefix("fashion-")


@pytest.fixture(scope="module")
def expected(chain: Chain, test_images: Any) -> dict[str, list[int]]:
    """What each variant answers, in this process, for the first 8 test images."""
    images, _ = test_images
    return {variant: in_process_labels(chain, variant, images[:8]) for variant in VARIANTS}


@pytest.fixture(scope="module")
def probabilities(chain: Chain, test_images: Any, expected: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Each variant's class probabilities for the same images, in this process: a served answer must match them
    row by row, which a wrong pixel scale or a row mix-up would not (the labels of dry-run models may not tell)."""
    images, _ = test_images
    found = {}
    for variant in VARIANTS:
        model = fashion_cnn.load_model(chain.weights(variant), chain.card(variant)["format"])
        with torch.inference_mode():
            found[variant] = torch.softmax(model(fashion_cnn.normalize(images[:8])).float(), dim=1).numpy()
        assert found[variant].argmax(1).tolist() == expected[variant]
    return found


@pytest.fixture(scope="module")
def images8(test_images: Any) -> np.ndarray:
    return np.asarray(test_images[0][:8].numpy(), dtype=np.uint8)


@dataclass
class Answer:
    """One inference answer as a client library reads it, the same for both protocols."""

    id: str
    model_name: str
    model_version: str
    parameters: dict[str, str]
    names: list[str]
    result: Any

    def labels(self) -> list[int]:
        return [int(label) for label in self.result.as_numpy("label")]

    def classes(self) -> list[str]:
        return [value.decode() if isinstance(value, bytes) else str(value)
                for value in self.result.as_numpy("class").tolist()]

    def probabilities(self) -> np.ndarray:
        return np.asarray(self.result.as_numpy("probabilities"), dtype=np.float32)


@dataclass
class Triton:
    """tritonclient's REST or gRPC client on the router: only the URL and the auth header are the router's."""

    protocol: str
    client: Any
    module: Any
    token: str

    def headers(self, **extra: str) -> dict[str, str]:
        auth = "Authorization" if self.protocol == "rest" else "authorization"  # gRPC metadata is lowercase
        return {auth: f"Bearer {self.token}", **extra}

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        found = self.client.get_model_metadata(name, version, headers=self.headers())
        if self.protocol == "rest":
            return dict(found)

        def tensors(entries: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in entries]

        return {"name": found.name, "versions": list(found.versions), "platform": found.platform,
                "inputs": tensors(found.inputs), "outputs": tensors(found.outputs)}

    def server_metadata(self) -> dict[str, Any]:
        found = self.client.get_server_metadata(headers=self.headers())
        if self.protocol == "rest":
            return dict(found)
        return {"name": found.name, "version": found.version, "extensions": list(found.extensions)}

    def infer(self, name: str, data: np.ndarray, datatype: str, version: str = "", outputs: tuple[str, ...] = (),
              request_id: str = "", headers: dict[str, str] | None = None) -> Answer:
        tensor = self.module.InferInput("images", list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        requested = [self.module.InferRequestedOutput(output) for output in outputs] or None
        result = self.client.infer(name, [tensor], model_version=version, outputs=requested, request_id=request_id,
                                   headers=self.headers(**(headers or {})))
        response = result.get_response()
        if self.protocol == "rest":
            return Answer(response["id"], response["model_name"], response["model_version"], response["parameters"],
                          [output["name"] for output in response["outputs"]], result)
        return Answer(response.id, response.model_name, response.model_version,
                      {key: value.string_param for key, value in response.parameters.items()},
                      [output.name for output in response.outputs], result)


@pytest.fixture(scope="module")
def tritons(stack: Stack) -> Iterator[dict[str, Triton]]:  # noqa: F811 (the imported fixture)
    rest = triton_http.InferenceServerClient(stack.url.removeprefix("http://"), network_timeout=30)
    remote = triton_grpc.InferenceServerClient(stack.grpc_target)
    try:
        yield {"rest": Triton("rest", rest, triton_http, stack.client_token),
               "grpc": Triton("grpc", remote, triton_grpc, stack.client_token)}
    finally:
        rest.close()
        remote.close()


def check_answer(answer: Answer, name: str, version: str, reference: dict[str, np.ndarray], rows: list[int],
                 request_id: str = "") -> None:
    """The protocol's answer for images `rows` of the first 8: the probabilities (and so the labels) the variant
    that answered gives in process, the class names of the labels, and where it went."""
    target = answer.parameters["target"]
    assert answer.id == request_id and answer.model_name == name
    # the version that answered: the routed target's, or the served default's when the client named none
    assert answer.model_version == (target.partition("/")[2] or "1.0")
    assert not version or answer.model_version == version
    assert answer.parameters["experiment"] == name and len(answer.parameters["request_id"]) == 32
    assert answer.parameters["arm"] == ("direct" if name != "fashion" else variant_of(target))
    assert target.startswith(name if name != "fashion" else "fashion-")
    labels = answer.labels()
    expected = reference[variant_of(target)][rows]
    assert labels == expected.argmax(1).tolist(), (target, labels)
    assert answer.classes() == [CLASSES[label] for label in labels]
    probabilities = answer.probabilities().reshape(len(rows), 10)
    assert np.allclose(probabilities, expected, atol=1e-3), (target, probabilities, expected)


@pytest.mark.router
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
@pytest.mark.parametrize("name, version", MODELS, ids=[f"{n}{'@' + v if v else ''}" for n, v in MODELS])
def test_tritonclient_checks_health_reads_metadata_and_infers(tritons: dict[str, Triton], protocol: str, name: str,
                                                              version: str, probabilities: dict[str, np.ndarray],
                                                              images8: np.ndarray) -> None:
    client = tritons[protocol]
    assert client.client.is_server_live() and client.client.is_server_ready()  # probes: no token
    assert client.client.is_model_ready(name, version, headers=client.headers())
    assert client.server_metadata()["name"] == "torchserve-kit-router"
    assert "binary_tensor_data" in client.server_metadata()["extensions"]
    metadata = client.metadata(name, version)
    served = {"fashion": [], "fashion-full": ["1.0", "2.0"]}.get(name, ["1.0"])
    assert metadata == {"name": name, "versions": [version] if version else served, "platform": SIGNATURE["platform"],
                        "inputs": [{key: entry[key] for key in ("name", "datatype", "shape")}
                                   for entry in SIGNATURE["inputs"]], "outputs": SIGNATURE["outputs"]}

    one = client.infer(name, images8[:1], "UINT8", version, request_id=f"{protocol}-uint8")
    check_answer(one, name, version, probabilities, [0], f"{protocol}-uint8")
    assert one.names == ["label", "class", "probabilities"]
    as_floats = client.infer(name, images8[1:2].astype(np.float32), "FP32", version)
    check_answer(as_floats, name, version, probabilities, [1])
    batch = client.infer(name, images8[2:7], "UINT8", version)
    check_answer(batch, name, version, probabilities, [2, 3, 4, 5, 6])
    pngs = np.array([png(image) for image in images8[6:8]], dtype=np.object_)
    check_answer(client.infer(name, pngs, "BYTES", version), name, version, probabilities, [6, 7])
    subset = client.infer(name, images8[:2].reshape(2, 784), "UINT8", version, outputs=("class", "label"))
    assert subset.names == ["class", "label"] and subset.result.as_numpy("probabilities") is None
    reference = probabilities[variant_of(subset.parameters["target"])]
    assert subset.labels() == reference[:2].argmax(1).tolist()


@pytest.mark.router
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tritonclient_sees_the_protocols_errors(tritons: dict[str, Triton], protocol: str,
                                                images8: np.ndarray) -> None:
    client = tritons[protocol]
    codes = {"rest": ("400", "401", "404"), "grpc": ("StatusCode.INVALID_ARGUMENT", "StatusCode.UNAUTHENTICATED",
                                                      "StatusCode.NOT_FOUND")}[protocol]

    def refused(call: Callable[[], Any]) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as error:
            call()
        return error.value

    wrong_type = refused(lambda: client.infer("fashion", images8[:1].astype(np.int32), "INT32"))
    assert wrong_type.status() == codes[0] and "takes datatype" in wrong_type.message()
    too_many = refused(lambda: client.infer("fashion", np.zeros((65, 28, 28), np.uint8), "UINT8"))
    assert too_many.status() == codes[0] and "over the limit of 50176" in too_many.message()
    as_experiment = refused(lambda: client.infer("fashion", images8[:1], "UINT8", version="1.0"))
    assert as_experiment.status() == codes[0] and "is an experiment" in as_experiment.message()
    wrong_shape = refused(lambda: client.infer("fashion-pruned", images8[:1, :3, :3].copy(), "UINT8"))
    assert wrong_shape.status() == codes[0] and "[1, 3, 3]" in wrong_shape.message()  # the handler's refusal

    anonymous = Triton(protocol, client.client, client.module, "wrong-token")
    assert refused(lambda: anonymous.infer("fashion", images8[:1], "UINT8")).status() == codes[1]
    assert refused(lambda: anonymous.metadata("fashion")).status() == codes[1]
    assert refused(lambda: client.infer("no-such-model", images8[:1], "UINT8")).status() == codes[2]
    assert refused(lambda: client.metadata("no-such-model")).status() == codes[2]
    assert refused(lambda: client.metadata("fashion-full", "9.9")).status() == codes[2]
    if protocol == "rest":  # tritonclient's REST readiness is the status code: a 404 reads as not ready
        assert not client.client.is_model_ready("no-such-model", headers=client.headers())
    else:
        assert refused(lambda: client.client.is_model_ready("no-such-model", headers=client.headers())
                       ).status() == codes[2]


# --- the protocol's JSON by hand ---------------------------------------------------------------------------------
def v2_post(live: Stack, path: str, document: Any, **headers: str) -> requests.Response:
    auth = {"Authorization": f"Bearer {live.client_token}"}
    return requests.post(f"{live.url}/v2/models/{path}", data=json.dumps(document), timeout=30,
                         headers={**auth, "Content-Type": "application/json", **headers})


def one_image(image: np.ndarray, request_id: str = "") -> dict[str, Any]:
    """A v2 request for one image (of whatever shape it has: a wrong one is the handler's to refuse)."""
    return {"id": request_id, "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, *image.shape],
                                          "data": image.tolist()}]}


def logged(live: Stack, request_id: str) -> tuple[Any, ...] | None:
    """The request's row in the router's request log (SQLite: the router commits it before it answers)."""
    database = load_config(live.config_path).database
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        row: tuple[Any, ...] | None = db.execute(
            "SELECT experiment, arm, model, version, protocol, status, label FROM requests WHERE request_id = ?",
            (request_id,)).fetchone()
    return row


@pytest.mark.router
def test_the_protocols_json_by_hand(stack: Stack, expected: dict[str, list[int]],  # noqa: F811
                                    images8: np.ndarray) -> None:
    response = v2_post(stack, "fashion/infer", one_image(images8[3], "hand-1"), **{"X-Arm": "pruned"})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    answer = response.json()
    label = expected["pruned"][3]
    assert answer == {
        "id": "hand-1", "model_name": "fashion", "model_version": "1.0",
        "parameters": {"request_id": response.headers["X-Request-Id"], "experiment": "fashion", "arm": "pruned",
                       "target": "fashion-pruned/1.0"},
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [label]},
                    {"name": "class", "datatype": "BYTES", "shape": [1], "data": [CLASSES[label]]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [1, 10],
                     "data": answer["outputs"][2]["data"]}]}
    assert len(answer["outputs"][2]["data"]) == 10
    assert response.headers["X-Arm"] == "pruned" and response.headers["X-Target"] == "fashion-pruned/1.0"

    flat = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 784],
                        "data": images8[:2].astype(float).flatten().tolist()}],
            "outputs": [{"name": "label"}]}
    plain = v2_post(stack, "fashion-full/versions/2.0/infer", flat).json()
    assert plain["model_name"] == "fashion-full" and plain["model_version"] == "2.0" and plain["id"] == ""
    assert plain["parameters"]["arm"] == "direct" and plain["parameters"]["target"] == "fashion-full/2.0"
    assert plain["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [2], "data": expected["full"][:2]}]
    four_dims = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28],
                             "data": images8[6].astype(float).tolist()}]}  # nested 28×28 under [1, 1, 28, 28]
    answered = v2_post(stack, "fashion-int8/infer", four_dims).json()["outputs"]
    assert answered[0]["data"] == [expected["int8"][6]] and answered[2]["shape"] == [1, 10]

    def error(response: requests.Response, status: int, words: tuple[str, ...]) -> None:
        assert response.status_code == status, response.text
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), body
        assert all(word in body["error"] for word in words), body

    url = stack.url
    error(v2_post(stack, "fashion/infer", {"inputs": [{"name": "images", "datatype": "INT8", "shape": [1, 784],
                                                       "data": [0] * IMAGE}]}), 400, ("takes datatype",))
    error(v2_post(stack, "fashion/versions/1.0/infer", one_image(images8[0])), 400, ("is an experiment",))
    error(v2_post(stack, "no-such-model/infer", one_image(images8[0])), 404, ("no-such-model",))
    error(v2_post(stack, "fashion-full/versions/9.9/infer", one_image(images8[0])), 404, ("9.9",))
    error(v2_post(stack, "fashion/infer", one_image(images8[0]), Authorization="Bearer wrong"), 401, ("token",))
    error(requests.post(f"{url}/v2/models/fashion/infer", headers={"Authorization": f"Bearer {stack.client_token}"},
                        timeout=10), 400, ("empty request body",))
    for path in ("/v2", "/v2/models/fashion", "/v2/models/fashion/ready"):
        error(requests.get(url + path, timeout=10), 401, ("token",))
    error(requests.get(f"{url}/v2/models/no-such-model", headers=stack.admin(), timeout=10), 404, ("no-such-model",))
    error(requests.get(f"{url}/v2/models/fashion/versions/1.0", headers=stack.admin(), timeout=10), 400,
          ("is an experiment",))
    error(requests.get(f"{url}/v2/models/fashion/infer", headers=stack.admin(), timeout=10), 405, ("no endpoint",))
    error(requests.get(f"{url}/v2/no/such/path", timeout=10), 404, ("no endpoint",))
    limit = RouterConfig.max_body_bytes
    error(requests.post(f"{url}/v2/models/fashion/infer", data=bytes(limit + 1), timeout=30, headers={
        "Authorization": f"Bearer {stack.client_token}"}), 413, (f"{limit}", "exceeded"))

    live = requests.get(f"{url}/v2/health/live", timeout=10)  # probes: no token
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready = requests.get(f"{url}/v2/health/ready", timeout=10)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    model_ready = requests.get(f"{url}/v2/models/fashion-int8/ready", headers=stack.admin(), timeout=10)
    assert (model_ready.status_code, model_ready.json()) == (200, {"name": "fashion-int8", "ready": True})
    server = requests.get(f"{url}/v2", headers={"Authorization": f"Bearer {stack.client_token}"}, timeout=10).json()
    assert server["name"] == "torchserve-kit-router" and server["extensions"] == ["binary_tensor_data"]
    assert isinstance(server["version"], str) and server["version"]


@pytest.mark.router
def test_v2_requests_are_logged_sticky_pinnable_shadowed_and_judged_like_the_others(
        stack: Stack, tritons: dict[str, Triton], expected: dict[str, list[int]],  # noqa: F811
        images8: np.ndarray, test_images: Any) -> None:
    _, truths = test_images
    before = {row["arm"]: row["requests"] for row in stack.report("fashion")["arms"]}
    rest_metric = stack.metric("router_requests_total", experiment="fashion", protocol="v2-rest")
    grpc_metric = stack.metric("router_requests_total", experiment="fashion", protocol="v2-grpc")

    # logged, with the protocol and (for one image) the label; a batch has no one label
    single = tritons["rest"].infer("fashion", images8[:1], "UINT8", headers={"X-Arm": "int8"})
    batch = tritons["grpc"].infer("fashion", images8[:3], "UINT8", headers={"x-arm": "full"})
    refused = v2_post(stack, "fashion/infer", one_image(images8[0][:3, :3]), **{"X-Arm": "int8"})
    assert refused.status_code == 400 and "[1, 3, 3]" in refused.json()["error"]  # the handler's 400, passed on
    assert logged(stack, single.parameters["request_id"]) == (
        "fashion", "int8", "fashion-int8", "1.0", "v2-rest", 200, expected["int8"][0])
    assert logged(stack, batch.parameters["request_id"]) == (
        "fashion", "full", "fashion-full", "1.0", "v2-grpc", 200, None)
    assert logged(stack, refused.headers["X-Request-Id"]) == (
        "fashion", "int8", "fashion-int8", "1.0", "v2-rest", 400, None)
    after = {row["arm"]: row["requests"] for row in stack.report("fashion")["arms"]}
    assert after["int8"] - before.get("int8", 0) == 2 and after["full"] - before.get("full", 0) == 1
    assert stack.metric("router_requests_total", experiment="fashion", protocol="v2-rest") == rest_metric + 2
    assert stack.metric("router_requests_total", experiment="fashion", protocol="v2-grpc") == grpc_metric + 1

    # sticky: one user, one arm, over both v2 front ends and TorchServe's protocol alike
    arms = {}
    for user in (f"v2-user-{index}" for index in range(8)):
        seen = {tritons[protocol].infer("fashion", images8[:1], "UINT8", headers={header: user}).parameters["arm"]
                for protocol, header in (("rest", "X-User-Id"), ("grpc", "x-user-id"), ("rest", "X-User-Id"))}
        seen.add(stack.predict("fashion", png(images8[0]), **{"X-User-Id": user}).headers["X-Arm"])
        assert len(seen) == 1, f"{user} moved between arms: {seen}"
        arms[user] = seen.pop()
    assert len(set(arms.values())) > 1  # and users do spread over the arms

    # pinned: both front ends, answered by the pinned arm
    for protocol, header in (("rest", "X-Arm"), ("grpc", "x-arm")):
        pinned = tritons[protocol].infer("fashion", images8[4:5], "UINT8", headers={header: "pruned"})
        assert pinned.parameters["arm"] == "pruned" and pinned.parameters["target"] == "fashion-pruned/1.0"
        assert pinned.labels() == [expected["pruned"][4]]

    # feedback on a one-image v2 answer counts for its arm, by the request id the answer names
    feedback_before = {row["arm"]: row["feedback"] for row in stack.report("fashion")["arms"]}
    for protocol, header in (("rest", "X-Arm"), ("grpc", "x-arm")):
        answered = tritons[protocol].infer("fashion", images8[5:6], "UINT8", headers={header: "int8"})
        judged = requests.post(f"{stack.url}/feedback", headers=stack.headers(), timeout=10, json={
            "request_id": answered.parameters["request_id"], "label": int(truths[5])})
        assert judged.status_code == 200, judged.text
        assert judged.json()["predicted"] == answered.labels()[0] == expected["int8"][5]
        assert judged.json()["correct"] == (expected["int8"][5] == int(truths[5]))
    feedback_after = {row["arm"]: row["feedback"] for row in stack.report("fashion")["arms"]}
    assert feedback_after["int8"] == feedback_before["int8"] + 2

    # feedback on a batch is kept but not judged: its answer named no single class (not in the metric or report)
    judged = requests.post(f"{stack.url}/feedback", headers=stack.headers(), timeout=10, json={
        "request_id": batch.parameters["request_id"], "label": int(truths[0])})
    assert judged.status_code == 200 and (judged.json()["predicted"], judged.json()["correct"]) == (None, None)
    assert {row["arm"]: row["feedback"] for row in stack.report("fashion")["arms"]}["full"] == feedback_after["full"]

    # shadowed: a one-image v2 request is copied to the shadow (the same weights under version 2.0) and agrees;
    # a batch is not copied (one agreement for N images would weigh it as one). The shadowed experiment is an OIP
    # model like the others: ready, and described by the same signature.
    for protocol in ("rest", "grpc"):
        client = tritons[protocol]
        assert client.client.is_model_ready("mirrored", "", headers=client.headers())
        described = client.metadata("mirrored")
        assert (described["name"], described["outputs"]) == ("mirrored", SIGNATURE["outputs"])
        assert [entry["name"] for entry in described["inputs"]] == [entry["name"] for entry in SIGNATURE["inputs"]]
        mirrored = client.infer("mirrored", images8[:1], "UINT8")
        assert mirrored.labels() == expected["full"][:1]
    assert tritons["rest"].infer("mirrored", images8[:4], "UINT8").labels() == expected["full"][:4]
    assert tritons["grpc"].infer("mirrored", images8[1:2], "UINT8").labels() == expected["full"][1:2]
    until(lambda: stack.metric("router_shadow_requests_total", experiment="mirrored") >= 3)  # copies finish later
    (shadow,) = stack.report("mirrored")["shadow"]
    assert shadow["compared"] == 3 and shadow["agreement"] == 1.0  # the three single images, not the batch
    assert stack.metric("router_shadow_requests_total", experiment="mirrored") == 3


@pytest.mark.router
def test_grpc_health_service_and_typed_contents_by_hand(stack: Stack, expected: dict[str, list[int]],  # noqa: F811
                                                        images8: np.ndarray) -> None:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):  # no token: Kubernetes' probes send none
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        # typed contents in, typed contents out (tritonclient always sends raw contents)
        stub = triton_pb_grpc.GRPCInferenceServiceStub(channel)
        request = triton_pb.ModelInferRequest(model_name="fashion-pruned", id="typed-1")
        request.inputs.add(name="images", datatype="UINT8", shape=[2, 28, 28]).contents.uint_contents.extend(
            images8[:2].flatten().tolist())
        request.outputs.add(name="label")
        request.outputs.add(name="class")
        auth = (("authorization", f"Bearer {stack.client_token}"),)
        response, call = stub.ModelInfer.with_call(request, metadata=auth, timeout=30)
        assert response.id == "typed-1" and response.model_name == "fashion-pruned" and not response.raw_output_contents
        label, name = response.outputs
        assert (label.name, label.datatype, list(label.shape)) == ("label", "INT64", [2])
        assert list(label.contents.int64_contents) == expected["pruned"][:2]
        assert [value.decode() for value in name.contents.bytes_contents] == [
            CLASSES[index] for index in expected["pruned"][:2]]
        trailers = dict(call.trailing_metadata())
        assert trailers["x-arm"] == "direct"
        assert trailers["x-request-id"] == response.parameters["request_id"].string_param

        def code(message: Any, metadata: tuple[tuple[str, str], ...] = auth) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as failed:
                stub.ModelInfer(message, metadata=metadata, timeout=30)
            return failed.value.code()

        assert code(request, ()) == grpc.StatusCode.UNAUTHENTICATED
        assert code(triton_pb.ModelInferRequest(model_name="fashion", inputs=request.inputs, raw_input_contents=[
            b"\0" * 700])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(triton_pb.ModelInferRequest(model_name="no-such-model", inputs=request.inputs)
                    ) == grpc.StatusCode.NOT_FOUND
        assert stub.ServerLive(triton_pb.ServerLiveRequest(), timeout=10).live  # no token
        assert stub.ServerReady(triton_pb.ServerReadyRequest(), timeout=10).ready


def test_fp32_values_beyond_float32_are_refused_naming_the_range() -> None:
    """1e39 is a finite JSON number that float32 cannot hold: the cast makes it infinity (with numpy's overflow
    warning, an error under this suite's warning filter), and the handler then refuses an "NPY array" for "NaN
    or infinity" the client never sent."""
    with pytest.raises(BadRequest) as refused:
        parse_rest(v2_json([1, 784], [1e39] + [0.0] * 783, "FP32"), None)
    assert "FP32" in refused.value.message and "1e+39" in refused.value.message


@pytest.mark.router
def test_a_v2_grpc_refusal_is_logged_with_the_status_its_client_gets(stack: Stack,  # noqa: F811
                                                                      images8: np.ndarray) -> None:
    """The handler's refusal reaches the router in the body over gRPC (TorchServe's gRPC ignores per-request
    codes); the client gets INVALID_ARGUMENT, so the log, the metrics and the guardrail must see a 400, as for the
    same refusal over v2 REST, not a 200."""
    request = triton_pb.ModelInferRequest(model_name="fashion", raw_input_contents=[images8[0][:3, :3].tobytes()])
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, 3])
    before = stack.metric("router_requests_total", experiment="fashion", protocol="v2-grpc", code="400")
    with grpc.insecure_channel(stack.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
        triton_pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=(
            ("authorization", f"Bearer {stack.client_token}"), ("x-arm", "pruned")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[1, 3, 3]" in (refused.value.details() or "")
    request_id = dict(refused.value.trailing_metadata() or ())["x-request-id"]
    assert logged(stack, request_id) == ("fashion", "pruned", "fashion-pruned", "1.0", "v2-grpc", 400, None)
    assert stack.metric("router_requests_total", experiment="fashion", protocol="v2-grpc", code="400") == before + 1


@pytest.mark.router
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_bytes_too_large_for_torchserve_are_refused_with_a_4xx(tritons: dict[str, Triton], protocol: str) -> None:
    """Five 1 MB elements fit the router's body limit (6,553,500 bytes), but their base64 upstream form (6.7 MB)
    does not fit TorchServe's max_request_size (the same figure): the client must learn that from a 4xx naming the
    size, not from a 5xx that blames the server."""
    elements = np.array([bytes([index]) * (1 << 20) for index in range(5)], dtype=np.object_)
    with pytest.raises(InferenceServerException) as refused:
        tritons[protocol].infer("fashion-pruned", elements, "BYTES")
    status = refused.value.status()
    assert status == ("413" if protocol == "rest" else "StatusCode.RESOURCE_EXHAUSTED"), (
        status, refused.value.message())
    assert "bytes" in (refused.value.message() or ""), refused.value.message()
