"""Turning one TorchServe request into images: every input form the handler accepts, and every way it can be wrong.

Accepted forms, per request (the answers are described in `fashion_handler.py`):
  * native: an image file body; JSON `{"data": PIXELS}` (28×28 or 784 numbers in [0, 255]); JSON
    `{"data": "<base64 image>"}` (or `"image"`); an optional `topk`. One image each.
  * NPY (numpy's .npy file, starting b"\\x93NUMPY"): the router's upstream form for numeric Open Inference
    Protocol tensors. dtype `|u1` (UINT8) or `<f4` (FP32), C order, a shape that `images_in_shape` accepts, and
    exactly N×784×itemsize bytes of data after the header.
  * Open Inference Protocol (KServe v2) JSON with one input: numeric (FP32 or UINT8) with a shape that
    `images_in_shape` accepts, or BYTES of shape [N] (one non-1 dimension at most), each element a base64 image.
N images (1 <= N <= the signature's max_images) become a Request of N×28×28 pixels, answered with N rows.

Every check runs before the work it guards and costs at most what a valid request costs: a JSON body is counted
(one pass in C) before it is parsed, a pixel list is measured before it is walked, a shape is bounded before it
is multiplied (see `open_inference.py`), an NPY header is bounded before numpy parses it and the data length is
checked before it is read, an image is sized from its header before it is decoded (see `image_decoding.py`).
Refusals raise InvalidInput, whose message is capped and quotes no unbounded input (`invalid_input.py`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from tokenize import TokenError  # numpy retokenizes a header that does not parse (Python 2's)
from typing import Any

import numpy as np
import open_inference
import torch
from image_decoding import image_to_pixels
from invalid_input import InvalidInput, clip, quote, quote_names

import fashion_cnn

DEFAULT_TOPK = 3
SIZE = fashion_cnn.IMAGE_SIZE
PIXELS = SIZE * SIZE
# One image is 784 numbers: a JSON body with more values than this is refused before it is parsed (parsing a
# 6 MB list of numbers would make ~60 MB of Python objects). Counted as commas: base64 strings have none. Larger
# numeric batches come as NPY (the router converts v2 tensors to it) or as encoded images.
MAX_JSON_VALUES = 4096
JSON_STARTS = (b"{", b"[", b'"')  # no accepted image format starts with these bytes
NATIVE_FIELDS = frozenset({"data", "image", "topk"})

# The shape rules of a numeric tensor of images (v2 JSON and NPY alike): the trailing dimensions are one image,
# the leading ones count images; at most one leading dimension may differ from 1, and only the first.
MAX_RANK = 4
IMAGE_DIMS = ((SIZE, SIZE), (PIXELS,))
SHAPES_TEXT = (f"one {SIZE}×{SIZE} image ([{SIZE}, {SIZE}], [{PIXELS}], [1, {PIXELS}], [1, {SIZE}, {SIZE}], "
               f"[1, 1, {SIZE}, {SIZE}]) or N of them ([N, {SIZE}, {SIZE}], [N, {PIXELS}], [N, 1, {SIZE}, {SIZE}])")

# The Open Inference Protocol datatypes this decoder implements; the model signature (signature.json) must
# declare exactly these (the handler checks at initialize).
NUMERIC_DATATYPES = ("FP32", "UINT8")
BYTES_DATATYPE = "BYTES"
ACCEPTED_DATATYPES = frozenset({*NUMERIC_DATATYPES, BYTES_DATATYPE})

# NPY: numpy's file format (numpy.lib.format), the upstream form of numeric v2 tensors.
NPY_MAGIC = b"\x93NUMPY"
NPY_DTYPES = {"|u1": "UINT8", "<f4": "FP32"}  # dtype.str to its v2 datatype
# numpy writes a header of 118 bytes for any shape accepted here (padded to 64-byte alignment); a longer one is
# refused before it is parsed.
NPY_MAX_HEADER = 1024
NPY_HEADER_LENGTH = {(1, 0): "<H", (2, 0): "<I"}  # the header-length field of each version numpy.lib.format reads


@dataclass(frozen=True)
class Request:
    pixels: torch.Tensor  # N×28×28, 0–255 scale (N = 1 for native requests)
    topk: int
    v2_id: str | None = None  # set for Open Inference Protocol requests (v2 JSON or NPY): answered in v2 form


def decode_request(row: dict[str, Any], num_classes: int, max_images: int) -> Request:
    """One TorchServe request to a Request (pixels, topk, protocol); raises InvalidInput."""
    payload = row.get("data")
    if payload is None:
        payload = row.get("body")
    topk_value = row.get("topk")
    raw = _as_bytes(payload)
    if raw is not None and raw.startswith(NPY_MAGIC):
        return Request(npy_to_images(raw, max_images), num_classes, "")
    if raw is not None and raw.lstrip()[:1] in JSON_STARTS:
        payload = _decode_json(raw)
    elif raw is not None:
        return Request(image_to_pixels(raw).unsqueeze(0), parse_topk(topk_value, num_classes))
    if isinstance(payload, str) and payload.lstrip()[:1] in ("{", "["):
        payload = _decode_json(payload.encode())
    if isinstance(payload, dict) and open_inference.is_inference_request(payload):
        pixels, request_id = _v2_images(payload, max_images)
        return Request(pixels, num_classes, request_id)
    if isinstance(payload, dict):
        unknown = set(payload) - NATIVE_FIELDS
        if unknown:
            raise InvalidInput(f"unknown JSON fields {quote_names(unknown)}; expected 'data' (or 'image') and 'topk'")
        topk_value = payload.get("topk", topk_value)
        payload = payload.get("data", payload.get("image"))
        if payload is None:
            raise InvalidInput("JSON body needs a 'data' field: 28×28 pixel values or a base64 image")
    if isinstance(payload, str):
        pixels = image_to_pixels(_base64(payload, "'data'"))
    elif isinstance(payload, list):
        pixels = array_to_pixels(payload)
    elif payload is None or payload == b"":
        raise InvalidInput("empty body: send an image, or JSON with a 'data' field")
    else:
        raise InvalidInput(f"unsupported input: {quote(payload)}; send an image, pixel values or a base64 image")
    return Request(pixels.unsqueeze(0), parse_topk(topk_value, num_classes))


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return None


def parse_topk(value: Any, num_classes: int) -> int:
    if value is None:
        return min(DEFAULT_TOPK, num_classes)
    raw = _as_bytes(value)
    if raw is not None:
        value = raw[:64].decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = int(value.strip()[:64])
        except ValueError as error:
            raise InvalidInput(f"topk must be an integer, got {quote(value)}") from error
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"topk must be an integer, got {quote(value)}")
    if not 1 <= value <= num_classes:
        raise InvalidInput(f"topk must be between 1 and {num_classes}, got {quote(value)}")
    return value


def _decode_json(raw: bytes) -> Any:
    values = raw.count(b",") + 1
    if values > MAX_JSON_VALUES:
        raise InvalidInput(f"JSON body holds about {values} values, more than the {MAX_JSON_VALUES} accepted "
                           f"(one {SIZE}×{SIZE} image is {PIXELS} numbers); send a larger batch of pixels as a v2 "
                           f"tensor through the router (it forwards them as NPY) or as encoded images (v2 BYTES)")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        raise InvalidInput(f"body looks like JSON but does not parse: {clip(str(error), 200)}") from error


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"{what} is a string but not valid base64: {clip(str(error), 200)}") from error


# --- shapes and pixel values: one set of rules for every numeric form ------------------------------------------
def shape_text(shape: Sequence[Any]) -> str:
    """A shape for a message; callers check the rank first, so at most MAX_RANK short quotes."""
    return "[" + ", ".join(quote(dimension, 12) for dimension in shape[:MAX_RANK]) + "]"


def images_in_shape(shape: Sequence[Any], max_images: int, what: str) -> int:
    """How many 28×28 images a numeric tensor of this shape holds (1..max_images); raises InvalidInput.

    The trailing dimensions are one image, [28, 28] or [784]; the leading ones count images: [28, 28], [784],
    [1, 784], [1, 28, 28] and [1, 1, 28, 28] are one image, [N, 28, 28], [N, 784] and [N, 1, 28, 28] are N. At
    most MAX_RANK dimensions; at most one leading dimension other than 1, and it must be the first.
    """
    if not 1 <= len(shape) <= MAX_RANK:
        raise InvalidInput(f"{what} shape has {len(shape)} dimensions; it must have 1 to {MAX_RANK}: {SHAPES_TEXT}")
    for dimension in shape:
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 0:
            raise InvalidInput(f"{what} shape dimensions must be non-negative integers, got {shape_text(shape)}")
    dims = tuple(shape)
    if dims[-2:] == IMAGE_DIMS[0]:
        leading = dims[:-2]
    elif dims[-1:] == IMAGE_DIMS[1]:
        leading = dims[:-1]
    else:
        raise InvalidInput(f"{what} shape must be {SHAPES_TEXT}; got {shape_text(shape)}")
    if any(dimension != 1 for dimension in leading[1:]):
        raise InvalidInput(f"{what} shape must be {SHAPES_TEXT} (only the first dimension counts images); "
                           f"got {shape_text(shape)}")
    return check_image_count(leading[0] if leading else 1, max_images, what, shape)


def images_in_bytes_shape(shape: Sequence[Any], max_images: int, what: str) -> int:
    """How many encoded images a BYTES tensor of this shape holds: [N], or [1, N], [N, 1]... (one non-1 dimension)."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{what} shape has {len(shape)} dimensions; at most {MAX_RANK} are accepted")
    counts = [dimension for dimension in shape if dimension != 1]
    if len(counts) > 1:
        raise InvalidInput(f"{what} BYTES shape must be [N] (N encoded images; [1, N] or [N, 1] also do), "
                           f"got {shape_text(shape)}")
    return check_image_count(counts[0] if counts else 1, max_images, what, shape)


def check_image_count(count: Any, max_images: int, what: str, shape: Sequence[Any]) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidInput(f"{what} of shape {shape_text(shape)} holds no image: send 1 to {max_images} images")
    if count > max_images:
        raise InvalidInput(f"{what} of shape {shape_text(shape)} holds {quote(count)} images, over the limit of "
                           f"{max_images} images per request: split the batch")
    return count


def check_pixel_values(pixels: torch.Tensor, what: str) -> None:
    """Finite and in [0, 255], the data set's uint8 scale (uint8 pixels are, trivially)."""
    if pixels.dtype == torch.uint8 or pixels.numel() == 0:
        return
    if not bool(torch.isfinite(pixels).all()):
        raise InvalidInput(f"{what} contains NaN or infinity")
    low, high = (float(value) for value in torch.aminmax(pixels))
    if low < 0 or high > 255:
        raise InvalidInput(f"pixel values must be in [0, 255], got values from {low:.6g} to {high:.6g} in {what}")


# --- native JSON pixels ------------------------------------------------------------------------------------------
def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"pixel values must be numbers, found {quote(value)}")
    try:
        return float(value)
    except OverflowError as error:
        raise InvalidInput("pixel values must be in [0, 255], got an integer too large for a float") from error


def _numbers(values: list[Any], what: str) -> torch.Tensor:
    """JSON numbers (bounded in count by the caller) to a float tensor, checked before any float32 rounding."""
    pixels = torch.tensor([_number(value) for value in values], dtype=torch.float64)
    check_pixel_values(pixels, what)
    return pixels.to(torch.float32)


def array_to_pixels(values: Any) -> torch.Tensor:
    """A 28×28 nested list or a flat list of 784 numbers in [0, 255] to a 28×28 float tensor.

    Lengths are checked before any element is read, so a list of millions of values costs no more than one of 784.
    """
    if not isinstance(values, list) or not values:
        raise InvalidInput("'data' must be a non-empty list of pixel values, or a base64 image string")
    if len(values) not in (SIZE, PIXELS):
        found = "rows" if isinstance(values[0], list) else "values"
        raise InvalidInput(f"'data' must be {SIZE}×{SIZE} pixels ({SIZE} rows of {SIZE} numbers, or {PIXELS} "
                           f"numbers), got {len(values)} {found}")
    rows = sum(isinstance(value, list) for value in values)
    if rows == len(values):
        lengths = {len(row) for row in values}
        if len(values) != SIZE or lengths != {SIZE}:
            shown = "/".join(str(length) for length in sorted(lengths)[:5]) + ("/…" if len(lengths) > 5 else "")
            raise InvalidInput(f"'data' must be {SIZE}×{SIZE} pixels, got {len(values)} rows of {shown} numbers")
        flat = [value for row in values for value in row]
    elif rows:
        raise InvalidInput(f"'data' mixes numbers and lists: send {SIZE} rows of {SIZE} numbers, or {PIXELS} numbers")
    elif len(values) != PIXELS:
        raise InvalidInput(f"'data' must hold {PIXELS} pixel values ({SIZE}×{SIZE}), got {len(values)}")
    else:
        flat = values
    return _numbers(flat, "'data'").view(SIZE, SIZE)


# --- Open Inference Protocol JSON ------------------------------------------------------------------------------
def accept_v2_input(datatype: str, shape: tuple[int, ...], max_images: int) -> int:
    """What this model takes over v2, checked before the tensor's data is read; returns the number of images."""
    if datatype not in ACCEPTED_DATATYPES:
        raise InvalidInput(f"v2 input datatype must be {', '.join(NUMERIC_DATATYPES)} (pixel values) or "
                           f"{BYTES_DATATYPE} (base64 images), got {datatype}")
    if datatype == BYTES_DATATYPE:
        return images_in_bytes_shape(shape, max_images, "v2 input")
    return images_in_shape(shape, max_images, "v2 input")


def _v2_images(payload: dict[str, Any], max_images: int) -> tuple[torch.Tensor, str]:
    """A v2 JSON request's N images and its id."""

    def accept(datatype: str, shape: tuple[int, ...]) -> None:
        accept_v2_input(datatype, shape, max_images)

    request = open_inference.parse_request(payload, max_inputs=1, max_rank=MAX_RANK,
                                           max_elements=max_images * PIXELS, accept=accept)
    tensor = request.inputs[0]
    count = accept_v2_input(tensor.datatype, tensor.shape, max_images)
    if tensor.datatype != BYTES_DATATYPE:
        return _numbers(tensor.data, "v2 input 'data'").view(count, SIZE, SIZE), request.id
    images = []
    for index, element in enumerate(tensor.data):
        if not isinstance(element, str):
            raise InvalidInput(f"v2 BYTES input needs base64 image strings in 'data', element {index} is "
                               f"{quote(element)}")
        data = _base64(element, f"v2 BYTES element {index} of {count}")
        try:
            images.append(image_to_pixels(data))
        except InvalidInput as error:  # which of the N images is wrong, then what is wrong with it
            raise InvalidInput(f"v2 BYTES element {index} of {count}: {error}") from error
    return torch.stack(images), request.id


# --- NPY ---------------------------------------------------------------------------------------------------------
def npy_to_images(raw: bytes, max_images: int) -> torch.Tensor:
    """An NPY file body (numpy.lib.format) to N×28×28 pixels; everything is checked before the data is read.

    Never np.load and never pickles: the magic, the header's length and then the header itself (numpy's own
    parser, a literal dict) come first; the dtype, the order, the shape (`images_in_shape`) and the exact data
    length are checked before one byte of data is converted (np.frombuffer, no Python loop over pixels).
    """
    start = len(NPY_MAGIC) + 2
    version = (raw[start - 2], raw[start - 1]) if len(raw) >= start else None
    length_format = NPY_HEADER_LENGTH.get(version) if version else None
    if length_format is None:
        raise InvalidInput(f"NPY body has version {quote(raw[start - 2:start])} after its magic string; versions "
                           f"1.0 and 2.0 are accepted (not an NPY file?)")
    field = raw[start:start + struct.calcsize(length_format)]
    if len(field) < struct.calcsize(length_format):
        raise InvalidInput(f"NPY body of {len(raw)} bytes ends before its header")
    (header_length,) = struct.unpack(length_format, field)
    if header_length > NPY_MAX_HEADER:
        raise InvalidInput(f"NPY header of {header_length} bytes is longer than the {NPY_MAX_HEADER} accepted")
    stream = io.BytesIO(raw)
    try:
        with warnings.catch_warnings():  # a header written by Python 2's numpy parses, with a warning
            warnings.simplefilter("ignore")
            np.lib.format.read_magic(stream)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(stream, max_header_size=NPY_MAX_HEADER)
    except (ValueError, SyntaxError, TypeError, OverflowError, RecursionError, MemoryError, TokenError) as error:
        # numpy's messages are "what: <the offending header text>"; the text is the client's, so only quoted
        reason, _, detail = str(error).partition(": ")
        raise InvalidInput(f"NPY header does not parse: {clip(reason, 80)}" + (f": {quote(detail)}" if detail else "")
                           ) from error
    datatype = NPY_DTYPES.get(dtype.str)
    if datatype is None:
        raise InvalidInput(f"NPY array dtype must be {' or '.join(f'{k} ({v})' for k, v in NPY_DTYPES.items())}, "
                           f"got {quote(dtype.str, 20)}")
    if fortran_order:
        raise InvalidInput("NPY array must be in C order (row-major), got fortran_order True")
    count = images_in_shape(shape, max_images, "tensor")
    offset = stream.tell()
    expected = count * PIXELS * dtype.itemsize
    if len(raw) - offset != expected:
        raise InvalidInput(f"NPY data is {len(raw) - offset} bytes after the header, but shape {shape_text(shape)} "
                           f"of {dtype.str} needs exactly {expected}")
    # A writable copy (torch will not share a read-only buffer); <f4 and |u1 are native on every host torch runs on.
    pixels = torch.from_numpy(np.frombuffer(raw, dtype=dtype, offset=offset).copy())
    check_pixel_values(pixels, "tensor")
    return pixels.view(count, SIZE, SIZE)
