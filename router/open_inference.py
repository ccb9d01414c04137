"""The Open Inference Protocol (KServe v2) on the router: its tensors in, the kit's upstream form out, and the
handler's answer back in the protocol's shape. Both front ends (REST in `router.open_inference_rest`, gRPC in
`router.open_inference_grpc`) turn their wire format into one `TensorRequest` here and hand it to the same data
plane (`Router.route`) as the TorchServe protocol does.

What a request may hold is the kit's model signature, `handlers/signature.json` — the file every `.mar` carries
and the handler reads too: one input (UINT8 or FP32 pixels, or BYTES images), at most `max_images` images, the
outputs `label`, `class` and `probabilities`. This module checks the protocol (names, datatypes, shapes against
the data's length, binary sizes, requested outputs, the element limit) before any conversion, so a wrong
request costs at most a parse of a body within the router's size limit; the image rules (which shapes are
images, the pixel range) stay with the handler, whose 400 comes back as the protocol's error.

Upstream, numeric tensors travel as one NPY file (numpy's own header + the raw little-endian bytes: no JSON
numbers to print or parse on either side), BYTES tensors as the handler's v2 JSON with base64 images.

REST also speaks Triton's binary tensor extension (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data_output`), which the most common OIP client (tritonclient) uses by default. gRPC answers in
`raw_output_contents` when the request came in `raw_input_contents`, in typed `contents` otherwise.

Spec: https://github.com/kserve/open-inference-protocol (REST and gRPC); Triton's binary extension:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from router.errors import BadRequest, NotFound, PayloadTooLarge, RouterError, json_object, quoted
from router.upstream import Reply
from serving.project import REPO

SIGNATURE_FILE = REPO / "handlers" / "signature.json"
BINARY_HEADER = "Inference-Header-Content-Length"
MAX_ID_CHARS = 256
MAX_RANK = 4
FP32_MAX = float(np.finfo(np.float32).max)
# What each datatype is on the wire (little-endian, as the protocol's raw contents and Triton's extension are).
NUMPY_TYPES = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
               "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
# Each typed field of InferTensorContents as numpy reads it (the protocol's widening: UINT8 in uint32, ...).
CONTENTS_TYPES = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
                  "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
                  "fp64_contents": np.float64}
# The typed field of InferTensorContents each datatype travels in over gRPC.
CONTENTS_FIELDS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                   "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """The kit's models in the protocol's terms (handlers/signature.json)."""

    platform: str
    max_images: int
    input: TensorSpec
    input_datatypes: tuple[str, ...]  # the input's datatype first, then the others it also takes
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def load(cls, path: Path = SIGNATURE_FILE) -> Signature:
        document = json.loads(path.read_text())
        (entry,) = document["inputs"]
        spec = TensorSpec(entry["name"], entry["datatype"], tuple(entry["shape"]))
        return cls(document["platform"], int(document["max_images"]), spec,
                   (spec.datatype, *entry.get("also", ())),
                   tuple(TensorSpec(o["name"], o["datatype"], tuple(o["shape"])) for o in document["outputs"]))

    @property
    def image_elements(self) -> int:
        elements = 1
        for dimension in self.input.shape:
            elements *= max(dimension, 1)
        return elements

    def max_elements(self, datatype: str) -> int:
        return self.max_images if datatype == "BYTES" else self.max_images * self.image_elements

    def metadata(self, name: str, versions: list[str]) -> dict[str, Any]:
        return {"name": name, "versions": versions, "platform": self.platform,
                "inputs": [self.input.as_json()], "outputs": [output.as_json() for output in self.outputs]}


@cache
def signature() -> Signature:
    return Signature.load()


@dataclass(frozen=True)
class TensorRequest:
    """One v2 inference request, checked against the protocol and the signature, whatever wire it came on."""

    id: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None  # numeric datatypes, in the shape the client gave
    images: tuple[bytes, ...] = ()  # BYTES: each element one encoded image
    outputs: tuple[str, ...] = ()  # the outputs the client asked for, in its order; empty: all
    binary_outputs: frozenset[str] = frozenset()  # REST: outputs to send in Triton's binary extension
    raw_outputs: bool = False  # gRPC: answer in raw_output_contents

    def upstream_body(self) -> bytes:
        """What the handler receives: an NPY file for pixels, the handler's v2 JSON for encoded images."""
        if self.array is not None:
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, self.array, allow_pickle=False)
            return buffer.getvalue()
        return json.dumps({"id": "", "inputs": [{
            "name": signature().input.name, "datatype": "BYTES", "shape": list(self.shape),
            "data": [base64.b64encode(image).decode() for image in self.images]}]}).encode()


# --- parsing --------------------------------------------------------------------------------------------------


def _check_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS:
        raise BadRequest(f"'id' must be a string of at most {MAX_ID_CHARS} characters, got {quoted(request_id)}")
    return request_id


def _check_input(sig: Signature, name: Any, datatype: Any, shape: Any) -> tuple[str, tuple[int, ...], int]:
    """The input's name, datatype and shape; returns its element count (bounded before it is multiplied)."""
    if name != sig.input.name:
        raise BadRequest(f"unknown input {quoted(name)}: the model takes one input, {sig.input.name!r}")
    if datatype not in sig.input_datatypes:
        raise BadRequest(f"input {sig.input.name!r} takes datatype {', '.join(sig.input_datatypes)}, "
                         f"got {quoted(datatype)}")
    limit = sig.max_elements(datatype)
    if not isinstance(shape, list | tuple) or len(shape) > MAX_RANK:
        raise BadRequest(f"input 'shape' must be a list of at most {MAX_RANK} integers, got {quoted(shape)}")
    elements = 1
    for dimension in shape:
        if isinstance(dimension, bool) or not isinstance(dimension, int) or not 0 <= dimension <= limit:
            raise BadRequest(f"input shape dimensions must be integers from 0 to {limit}, got {quoted(dimension)}")
        elements *= dimension
    if elements > limit:
        what = "images" if datatype == "BYTES" else "elements"
        raise BadRequest(f"input shape {list(shape)} holds {elements} {what}, over the limit of {limit} "
                         f"({sig.max_images} images of {sig.image_elements} pixels)")
    if elements == 0:
        raise BadRequest(f"input shape {list(shape)} holds no data")
    return datatype, tuple(shape), elements


def _requested(sig: Signature, names: list[Any]) -> tuple[str, ...]:
    known = [output.name for output in sig.outputs]
    for name in names:
        if name not in known:
            raise BadRequest(f"unknown output {quoted(name)}: the model answers {', '.join(known)}")
    if len(set(names)) != len(names):
        raise BadRequest("an output is requested twice")
    return tuple(names)


def _numeric(datatype: str, shape: tuple[int, ...], elements: int, raw: bytes) -> np.ndarray:
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(raw) != elements * dtype.itemsize:
        raise BadRequest(f"raw {datatype} contents of {len(raw)} bytes; shape {list(shape)} needs "
                         f"{elements * dtype.itemsize} ({elements} × {dtype.itemsize})")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_values(datatype: str, shape: tuple[int, ...], elements: int, values: Any) -> np.ndarray:
    """Numbers from JSON (flat or nested, row-major) or typed gRPC contents, as the datatype's array."""
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nesting
        raise BadRequest(f"input 'data' is not a regular array: {str(error)[:120]}") from None
    if array.size != elements:
        raise BadRequest(f"input shape {list(shape)} holds {elements} elements but 'data' has {array.size}")
    if array.dtype.kind not in "iuf" or (datatype == "UINT8" and array.dtype.kind == "f"):
        kind = "integers" if datatype == "UINT8" else "numbers"
        raise BadRequest(f"{datatype} input 'data' must hold {kind}, found {array.dtype.kind!r}-kind values")
    if datatype == "UINT8" and array.size and (array.min() < 0 or array.max() > 255):
        raise BadRequest(f"UINT8 values must be in [0, 255], got {array.min()} to {array.max()}")
    if datatype == "FP32" and array.dtype.kind == "f" and array.size:
        largest = float(np.abs(array).max())
        if largest > FP32_MAX:  # the cast would make it infinity (NaN compares false: the handler names it)
            raise BadRequest(f"FP32 values must be within float32's range (±{FP32_MAX:.3g}), got {largest:g}")
    return array.astype(NUMPY_TYPES[datatype]).reshape(shape)


def deserialize_bytes(raw: bytes, elements: int) -> tuple[bytes, ...]:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(items) >= elements or offset + 4 > len(raw):
            raise BadRequest(f"raw BYTES contents hold more than the shape's {elements} elements, or a torn length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(f"raw BYTES element {len(items)} claims {length} bytes; {len(raw) - offset} remain")
        items.append(raw[offset:offset + length])
        offset += length
    if len(items) != elements:
        raise BadRequest(f"raw BYTES contents hold {len(items)} elements; the shape needs {elements}")
    return tuple(items)


def serialize_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


def _json_document(raw: bytes, sig: Signature) -> dict[str, Any]:
    # json.loads holds the loop for its whole parse: a body at the size limit made of tiny lists costs over a
    # second. A request's values and lists are counted first (one pass in C; base64 strings hold neither).
    tokens = raw.count(b",") + raw.count(b"[")
    limit = 2 * sig.max_elements("FP32") + 64
    if tokens > limit:
        raise BadRequest(f"request JSON holds about {tokens} values and lists, more than the {limit} a request of "
                         f"{sig.max_images} images can need")
    return json_object(raw, "request body")


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where} 'parameters' must be an object")
    return parameters


def parse_rest(body: bytes, header_length: str | None, sig: Signature | None = None) -> TensorRequest:
    """A REST inference request: JSON, or JSON followed by binary tensors (Triton's binary extension)."""
    sig = sig or signature()
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"{BINARY_HEADER} must be an integer, got {quoted(header_length)}") from None
        if not 0 < length <= len(body):
            raise BadRequest(f"{BINARY_HEADER} {length} does not fit the body of {len(body)} bytes")
        body, binary = body[:length], body[length:]
    document = _json_document(body, sig)
    request_id = _check_id(document.get("id", ""))
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = f"{len(inputs)} entries" if isinstance(inputs, list) else quoted(inputs)
        raise BadRequest(f"'inputs' must hold exactly one input object ({sig.input.name!r}), got {count}")
    entry = inputs[0]
    datatype, shape, elements = _check_input(sig, entry.get("name"), entry.get("datatype"), entry.get("shape"))
    size = _parameters(entry, "input").get("binary_data_size")
    array: np.ndarray | None = None
    images: tuple[bytes, ...] = ()
    if size is not None:
        if "data" in entry:
            raise BadRequest("input has both 'data' and binary_data_size: send one")
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise BadRequest(f"binary_data_size {quoted(size)} does not match the {len(binary)} bytes after the "
                             "JSON header")
        if datatype == "BYTES":
            images = deserialize_bytes(binary, elements)
        else:
            array = _numeric(datatype, shape, elements, binary)
    elif binary:
        raise BadRequest(f"{len(binary)} bytes follow the JSON header but no input has binary_data_size")
    elif "data" not in entry:
        raise BadRequest("input needs 'data' (or binary_data_size with the binary extension)")
    elif datatype == "BYTES":
        images = _base64_images(entry["data"], elements)
    else:
        array = _from_values(datatype, shape, elements, entry["data"])
    binary_all = _parameters(document, "request").get("binary_data_output") is True
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(output, dict) for output in outputs):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    names = _requested(sig, [output.get("name") for output in outputs])
    binary_outputs = {output["name"] for output in outputs
                      if _parameters(output, "output").get("binary_data", binary_all) is True}
    if not outputs and binary_all:
        binary_outputs = {output.name for output in sig.outputs}
    return TensorRequest(request_id, datatype, shape, array, images, names, frozenset(binary_outputs))


def _base64_images(data: Any, elements: int) -> tuple[bytes, ...]:
    """BYTES in JSON: base64 strings. Decoded here only to be forwarded: the handler decodes the images."""
    if not isinstance(data, list):
        raise BadRequest(f"BYTES input 'data' must be a list of base64 strings, got {quoted(data)}")
    flat: list[Any] = []
    pending = [(data, 1)]  # nested as the shape is (row-major), at most MAX_RANK deep and `elements` long
    while pending:
        current, depth = pending.pop()
        for index, item in enumerate(current):
            if isinstance(item, list) and depth < MAX_RANK and len(flat) <= elements:
                pending.append((current[index + 1:], depth))
                pending.append((item, depth + 1))
                break
            flat.append(item)
    if len(flat) != elements or not all(isinstance(item, str) for item in flat):
        raise BadRequest(f"BYTES input 'data' must hold {elements} base64 strings (its shape), got {quoted(data)}")
    images = []
    for index, item in enumerate(flat):
        try:
            images.append(base64.b64decode(item, validate=True))
        except ValueError:
            raise BadRequest(f"BYTES element {index} is not valid base64") from None
    return tuple(images)


def parse_grpc(message: Any, sig: Signature | None = None) -> TensorRequest:
    """A gRPC ModelInferRequest, its tensor in typed `contents` or in `raw_input_contents`."""
    sig = sig or signature()
    request_id = _check_id(message.id)
    if len(message.inputs) != 1:
        raise BadRequest(f"ModelInferRequest must hold exactly one input ({sig.input.name!r}), "
                         f"got {len(message.inputs)}")
    entry = message.inputs[0]
    datatype, shape, elements = _check_input(sig, entry.name, entry.datatype, list(entry.shape))
    raw = message.raw_input_contents
    field = CONTENTS_FIELDS[datatype]
    typed = getattr(entry.contents, field)
    array: np.ndarray | None = None
    images: tuple[bytes, ...] = ()
    if raw:
        if len(raw) != 1:
            raise BadRequest(f"raw_input_contents holds {len(raw)} entries for 1 input")
        if entry.HasField("contents"):
            raise BadRequest("the input has both typed contents and raw_input_contents: send one")
        if datatype == "BYTES":
            images = deserialize_bytes(raw[0], elements)
        else:
            array = _numeric(datatype, shape, elements, raw[0])
    elif not typed:
        raise BadRequest(f"input has no data: {datatype} goes in contents.{field} or raw_input_contents")
    elif len(typed) != elements:
        raise BadRequest(f"input shape {list(shape)} holds {elements} elements but contents.{field} has {len(typed)}")
    elif datatype == "BYTES":
        images = tuple(typed)
    else:  # a repeated protobuf field: read in one pass in C, as its own type
        array = _from_values(datatype, shape, elements, np.fromiter(typed, dtype=CONTENTS_TYPES[field],
                                                                     count=len(typed)))
    names = _requested(sig, [output.name for output in message.outputs])
    return TensorRequest(request_id, datatype, shape, array, images, names, raw_outputs=bool(raw))


# --- answers --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[Any]

    def flat(self) -> list[Any]:
        """The data in row-major order, however the handler nested it."""
        return list(np.asarray(self.data).ravel().tolist())

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return serialize_bytes([str(value).encode() for value in self.data])
        return np.asarray(self.data, dtype=NUMPY_TYPES[self.datatype]).tobytes()


@dataclass(frozen=True)
class Answer:
    """The handler's v2 answer: the outputs the client asked for, in its order, and the version that answered."""

    outputs: list[Output]
    model_version: str


def outputs_of(reply: Reply, request: TensorRequest) -> Answer:
    """The outputs the client asked for, from the handler's v2 answer. A refusal by the handler (its error body:
    on REST with status 400, on gRPC in the body alone) is the client's 400; TorchServe's own 4xx (a model or
    version it no longer serves, a body over its size limit) keeps its status; anything else that is not a v2
    answer is the router's 500, never a 200 with no outputs."""
    answer = reply.document  # parsed once: the router core read its labels from it
    if not isinstance(answer, dict):
        raise RouterError(f"the model's answer (HTTP {reply.status}) is not a JSON object: {reply.body[:80]!r}")
    error = answer.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        raise BadRequest(str(message)[:300])
    if reply.status != 200:  # TorchServe's own error shape: {"code", "type", "message"}
        error_type = {404: NotFound, 413: PayloadTooLarge}.get(reply.status, BadRequest if reply.status < 500
                                                                else RouterError)
        raise error_type(f"TorchServe answered {reply.status}: {str(answer.get('message', ''))[:200]}")
    by_name: dict[str, Output] = {}
    for entry in answer.get("outputs", ()) if isinstance(answer.get("outputs"), list) else ():
        try:
            by_name[entry["name"]] = Output(entry["name"], entry["datatype"], tuple(entry["shape"]), entry["data"])
        except (KeyError, TypeError):
            raise RouterError(f"the model's answer has a malformed output: {str(entry)[:80]}") from None
    names = request.outputs or tuple(by_name)
    missing = [name for name in names if name not in by_name]
    if missing or not names:
        raise RouterError(f"the model's answer lacks the outputs {missing or 'it should have'}")
    return Answer([by_name[name] for name in names], str(answer.get("model_version", "")))


def rest_answer(request: TensorRequest, model_name: str, model_version: str, outputs: list[Output],
                parameters: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """The REST response body and its headers: JSON, followed by the binary outputs the client asked for."""
    entries: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if output.name in request.binary_outputs:
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = output.data
        entries.append(entry)
    header = json.dumps({"id": request.id, "model_name": model_name, "model_version": model_version,
                         "parameters": parameters, "outputs": entries}).encode()
    if not binaries:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(binaries), {"Content-Type": "application/octet-stream",
                                         BINARY_HEADER: str(len(header))}


def grpc_outputs(request: TensorRequest, outputs: list[Output]) -> Iterator[tuple[Output, bytes | None]]:
    """Each output with its raw bytes when the answer goes in raw_output_contents (None: typed contents)."""
    for output in outputs:
        yield output, output.raw() if request.raw_outputs else None


def error_body(error: RouterError) -> dict[str, str]:
    """The protocol's error shape."""
    return {"error": error.message}
