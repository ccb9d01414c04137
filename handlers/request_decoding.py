"""Turning one TorchServe request into pixels: every input form the handler accepts, and every way it can be wrong.

The accepted forms and the error contract are described in `fashion_handler.py`. Every check runs before the
work it guards and costs at most what a valid request costs: a JSON body is counted (one pass in C) before it
is parsed, a pixel list is measured before it is walked, a v2 shape is bounded before it is multiplied (see
`open_inference.py`), an image is sized from its header before it is decoded (see `image_decoding.py`).
Refusals raise InvalidInput, whose message is capped and quotes no unbounded input (`invalid_input.py`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

import open_inference
import torch
from image_decoding import image_to_pixels
from invalid_input import InvalidInput, clip, quote, quote_names

import fashion_cnn

DEFAULT_TOPK = 3
SIZE = fashion_cnn.IMAGE_SIZE
PIXELS = SIZE * SIZE
# One image is 784 numbers: a JSON body with more values than this is refused before it is parsed (parsing a
# 6 MB list of numbers would make ~60 MB of Python objects). Counted as commas: base64 strings have none.
MAX_JSON_VALUES = 4096
JSON_STARTS = (b"{", b"[", b'"')  # no accepted image format starts with these bytes
# A v2 tensor that is one image: these shapes, with any number of leading 1s (rank at most 4).
V2_MAX_RANK = 4
V2_IMAGE_SHAPES = ([SIZE, SIZE], [PIXELS])
V2_IMAGE_SHAPES_TEXT = "[28, 28], [1, 28, 28], [1, 1, 28, 28], [784] or [1, 784]"
NATIVE_FIELDS = frozenset({"data", "image", "topk"})


@dataclass(frozen=True)
class Request:
    pixels: torch.Tensor  # 28×28, 0–255 scale
    topk: int
    v2_id: str | None = None  # set for KServe v2 requests, which get a v2-shaped answer


def decode_request(row: dict[str, Any], num_classes: int) -> Request:
    """One TorchServe request to a Request (pixels, topk, protocol); raises InvalidInput."""
    payload = row.get("data")
    if payload is None:
        payload = row.get("body")
    topk_value = row.get("topk")
    raw = _as_bytes(payload)
    if raw is not None and raw.lstrip()[:1] in JSON_STARTS:
        payload = _decode_json(raw)
    elif raw is not None:
        return Request(image_to_pixels(raw), parse_topk(topk_value, num_classes))
    if isinstance(payload, str) and payload.lstrip()[:1] in ("{", "["):
        payload = _decode_json(payload.encode())
    if isinstance(payload, dict) and open_inference.is_inference_request(payload):
        request = open_inference.parse_request(payload, max_inputs=1, max_rank=V2_MAX_RANK, max_elements=PIXELS,
                                               accept=_accept_v2_image)
        return Request(_v2_pixels(request.inputs[0]), num_classes, request.id)
    if isinstance(payload, dict):
        unknown = set(payload) - NATIVE_FIELDS
        if unknown:
            raise InvalidInput(f"unknown JSON fields {quote_names(unknown)}; expected 'data' (or 'image') and 'topk'")
        topk_value = payload.get("topk", topk_value)
        payload = payload.get("data", payload.get("image"))
        if payload is None:
            raise InvalidInput("JSON body needs a 'data' field: 28×28 pixel values or a base64 image")
    if isinstance(payload, str):
        pixels = _base64_image(payload)
    elif isinstance(payload, list):
        pixels = array_to_pixels(payload)
    elif payload is None or payload == b"":
        raise InvalidInput("empty body: send an image, or JSON with a 'data' field")
    else:
        raise InvalidInput(f"unsupported input: {quote(payload)}; send an image, pixel values or a base64 image")
    return Request(pixels, parse_topk(topk_value, num_classes))


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
                           f"(one {SIZE}×{SIZE} image is {PIXELS} numbers)")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        raise InvalidInput(f"body looks like JSON but does not parse: {clip(str(error), 200)}") from error


def _base64_image(text: str) -> torch.Tensor:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"'data' is a string but not valid base64: {clip(str(error), 200)}") from error
    return image_to_pixels(data)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"pixel values must be numbers, found {quote(value)}")
    try:
        return float(value)
    except OverflowError as error:
        raise InvalidInput("pixel values must be in [0, 255], got an integer too large for a float") from error


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
        flat = [_number(value) for row in values for value in row]
    elif rows:
        raise InvalidInput(f"'data' mixes numbers and lists: send {SIZE} rows of {SIZE} numbers, or {PIXELS} numbers")
    elif len(values) != PIXELS:
        raise InvalidInput(f"'data' must hold {PIXELS} pixel values ({SIZE}×{SIZE}), got {len(values)}")
    else:
        flat = [_number(value) for value in values]
    if not all(math.isfinite(value) for value in flat):
        raise InvalidInput("'data' contains NaN or infinity")
    low, high = min(flat), max(flat)
    if low < 0 or high > 255:
        raise InvalidInput(f"pixel values must be in [0, 255], got values from {low:.6g} to {high:.6g}")
    return torch.tensor(flat, dtype=torch.float32).view(SIZE, SIZE)


def _accept_v2_image(datatype: str, shape: tuple[int, ...]) -> None:
    """What this model takes over v2, checked before the tensor's data is read: one image."""
    if datatype == "BYTES":
        if [dimension for dimension in shape if dimension != 1]:
            raise InvalidInput(f"v2 BYTES input holds one base64 image: shape [1], got {list(shape)}")
        return
    if datatype == "BOOL":
        raise InvalidInput("v2 input datatype must be BYTES (a base64 image) or numeric pixel values, got BOOL")
    if [dimension for dimension in shape if dimension != 1] not in V2_IMAGE_SHAPES:
        raise InvalidInput(f"v2 input shape must describe one 28×28 image ({V2_IMAGE_SHAPES_TEXT}), "
                           f"got {list(shape)}")


def _v2_pixels(tensor: open_inference.Tensor) -> torch.Tensor:
    if tensor.datatype == "BYTES":
        if not isinstance(tensor.data[0], str):
            raise InvalidInput("v2 BYTES input needs 'data': [\"<base64 image>\"]")
        return _base64_image(tensor.data[0])
    return array_to_pixels(tensor.data)
