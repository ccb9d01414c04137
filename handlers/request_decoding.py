"""Turning one TorchServe request into pixels: every input form the handler accepts, and every way it can be wrong.

Kept apart from the handler because TorchServe loads the one class a handler module defines; this module is
packed into each .mar beside it. The accepted forms and the error contract are described in
`fashion_handler.py`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

import fashion_cnn

DEFAULT_TOPK = 3
MAX_BODY_BYTES = 5 * 1024 * 1024
# Pillow's own bomb guard stops at ~89 M pixels; a 28×28 model never needs more than this.
MAX_IMAGE_PIXELS = 4096 * 4096
PIXELS = fashion_cnn.IMAGE_SIZE * fashion_cnn.IMAGE_SIZE
# The Open Inference Protocol's numeric tensor datatypes (pixel values are checked for range separately).
V2_NUMERIC_DATATYPES = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                        "FP64")


class InvalidInput(ValueError):
    """A request the handler cannot turn into an image; its message goes back to the client."""


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return None


def parse_topk(value: Any, num_classes: int) -> int:
    if value is None:
        return min(DEFAULT_TOPK, num_classes)
    raw = _as_bytes(value)
    if raw is not None:
        value = raw.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError as error:
            raise InvalidInput(f"topk must be an integer, got {value!r}") from error
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"topk must be an integer, got {type(value).__name__}")
    if not 1 <= value <= num_classes:
        raise InvalidInput(f"topk must be between 1 and {num_classes}, got {value}")
    return value


def image_to_pixels(data: bytes) -> torch.Tensor:
    """Decode any Pillow image into a 28×28 uint8 tensor that looks like a Fashion-MNIST image."""
    if not data:
        raise InvalidInput("empty body: send an image, or JSON with a 'data' field")
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"image of {len(data)} bytes is larger than the limit of {MAX_BODY_BYTES}")
    image: Image.Image
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInput(
                f"image of {width}×{height} pixels is too large to decode safely (limit {MAX_IMAGE_PIXELS} pixels)"
            )
        image.load()
        return _like_training_data(image)
    except InvalidInput:
        raise
    except UnidentifiedImageError as error:  # Pillow's message names an in-memory object, not the problem
        raise InvalidInput("cannot decode the image: not an image format Pillow knows (PNG, JPEG, BMP, GIF, TIFF, "
                           f"WebP, ...); {len(data)} bytes starting {data[:8]!r}") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidInput(f"cannot decode the image: {error}") from error


def _like_training_data(image: Image.Image) -> torch.Tensor:
    """Grayscale, light garment on black, longer side 28 px, centred: how Fashion-MNIST images look."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    gray = image.convert("L")
    pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(gray.height, gray.width)
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).float()
    if border.mean() > 127:  # a light background: photos of garments are dark on light, the data set is not
        gray = Image.eval(gray, lambda value: 255 - value)
    size = fashion_cnn.IMAGE_SIZE
    if gray.size != (size, size):
        scale = size / max(gray.size)
        resized = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                              Image.Resampling.LANCZOS)
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
        gray = canvas
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(size, size).clone()


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"pixel values must be numbers, found {type(value).__name__} {value!r:.40}")
    try:
        return float(value)
    except OverflowError as error:
        raise InvalidInput("pixel values must be in [0, 255], got an integer too large for a float") from error


def array_to_pixels(values: Any) -> torch.Tensor:
    """A 28×28 nested list or a flat list of 784 numbers in [0, 255] to a 28×28 float tensor."""
    size = fashion_cnn.IMAGE_SIZE
    if not isinstance(values, list) or not values:
        raise InvalidInput("'data' must be a non-empty list of pixel values, or a base64 image string")
    if all(isinstance(row, list) for row in values):
        if len(values) != size or any(len(row) != size for row in values):
            shape = f"{len(values)}×{'/'.join(sorted({str(len(row)) for row in values}))}"
            raise InvalidInput(f"'data' must be {size}×{size} pixels, got {shape}")
        flat = [_number(value) for row in values for value in row]
    elif any(isinstance(row, list) for row in values):
        raise InvalidInput("'data' mixes numbers and lists: send 28 rows of 28 numbers, or 784 numbers")
    else:
        if len(values) != PIXELS:
            raise InvalidInput(f"'data' must hold {PIXELS} pixel values (28×28), got {len(values)}")
        flat = [_number(value) for value in values]
    if not all(math.isfinite(value) for value in flat):
        raise InvalidInput("'data' contains NaN or infinity")
    low, high = min(flat), max(flat)
    if low < 0 or high > 255:
        raise InvalidInput(f"pixel values must be in [0, 255], got values from {low:g} to {high:g}")
    return torch.tensor(flat, dtype=torch.float32).view(size, size)


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        raise InvalidInput(f"body looks like JSON but does not parse: {str(error)[:200]}") from error


def _base64_image(text: str) -> torch.Tensor:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"'data' is a string but not valid base64: {error}") from error
    return image_to_pixels(data)


def flatten_numbers(values: Any, max_depth: int = 4) -> list[Any]:
    """Flatten nested lists up to `max_depth` levels ([1, 1, 28, 28] is the deepest image shape)."""
    flat = values if isinstance(values, list) else [values]
    for _ in range(max_depth):
        if not any(isinstance(value, list) for value in flat):
            return flat
        flat = [item for value in flat for item in (value if isinstance(value, list) else [value])]
    raise InvalidInput(f"v2 'data' is nested deeper than {max_depth} levels")


def decode_v2_request(payload: dict[str, Any]) -> torch.Tensor:
    """KServe v2 (Open Inference Protocol): one input holding one image.

    Numeric datatypes: 784 pixel values in [0, 255] with shape [28, 28], [1, 28, 28], [1, 1, 28, 28], [784]
    or [1, 784]; datatype BYTES: data[0] is a base64-encoded image.
    """
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput("v2 request needs exactly one entry in 'inputs'")
    tensor = inputs[0]
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if datatype == "BYTES":
        if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
            raise InvalidInput("v2 BYTES input needs 'data': [\"<base64 image>\"]")
        return _base64_image(data[0])
    if datatype not in V2_NUMERIC_DATATYPES:
        raise InvalidInput(f"v2 input datatype must be BYTES or one of {', '.join(V2_NUMERIC_DATATYPES)}, "
                           f"got {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput("v2 input needs an integer 'shape'")
    if math.prod(shape) != PIXELS or [d for d in shape if d != 1] not in ([28, 28], [784]):
        raise InvalidInput(f"v2 input shape must describe one 28×28 image, got {shape}")
    return array_to_pixels(flatten_numbers(data))


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
    if raw is not None and raw.lstrip()[:1] in (b"{", b"["):
        payload = _decode_json(raw)
    elif raw is not None:
        return Request(image_to_pixels(raw), parse_topk(topk_value, num_classes))
    if isinstance(payload, str):
        payload = _decode_json(payload.encode()) if payload.lstrip()[:1] in ("{", "[") else payload
    if isinstance(payload, dict) and "inputs" in payload:
        return Request(decode_v2_request(payload), num_classes, str(payload.get("id", "")))
    if isinstance(payload, dict):
        unknown = set(payload) - {"data", "image", "topk"}
        if unknown:
            raise InvalidInput(f"unknown JSON fields {sorted(unknown)}; expected 'data' (or 'image') and 'topk'")
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
        raise InvalidInput(f"unsupported input of type {type(payload).__name__}")
    return Request(pixels, parse_topk(topk_value, num_classes))


def error_body(message: str, model: dict[str, str]) -> dict[str, Any]:
    return {"error": {"code": 400, "type": "InvalidInput", "message": message}, "model": model}
