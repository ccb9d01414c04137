"""The Open Inference Protocol (KServe v2) envelope: parse an inference request, format an inference response.

Protocol only; which tensors a model takes and what it answers are the handler's business. Parsing is bounded
before any arithmetic on client numbers: the number of inputs, the rank of a shape and each of its
dimensions are checked first, so the element count is a product of at most `max_rank` small numbers, and
`data` is walked with a budget (a nested list is read row-major and the walk stops at the first element past
`max_elements`). Errors raise InvalidInput with a capped message that quotes no unbounded input.

Spec: https://github.com/kserve/open-inference-protocol (REST `$request_input` / `$response_output`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from invalid_input import InvalidInput, quote

NUMERIC_DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                     "FP32", "FP64")
DATATYPES = (*NUMERIC_DATATYPES, "BYTES")
MAX_ID_CHARS = 256  # the request id is echoed in the answer, so it must be short
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class Tensor:
    """One `$request_input` or `$response_output`: data is flat, in row-major order."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[Any]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "datatype": self.datatype, "data": self.data}


@dataclass(frozen=True)
class InferenceRequest:
    id: str
    inputs: tuple[Tensor, ...]


def is_inference_request(payload: Any) -> bool:
    return isinstance(payload, dict) and "inputs" in payload


# Called with each input's datatype and shape before its data is read: the model's own signature check.
AcceptInput = Callable[[str, tuple[int, ...]], None]


def parse_request(payload: dict[str, Any], max_inputs: int, max_rank: int, max_elements: int,
                  accept: AcceptInput | None = None) -> InferenceRequest:
    """A v2 inference request, checked against the protocol and against the caller's size limits."""
    request_id = payload.get("id", "")
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        request_id = str(request_id) if request_id.bit_length() <= 64 else None
    if not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS:
        raise InvalidInput(f"v2 request 'id' must be a string of at most {MAX_ID_CHARS} characters, "
                           f"got {quote(payload.get('id'))}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= max_inputs:
        count = f"{len(inputs)} entries" if isinstance(inputs, list) else quote(inputs)
        raise InvalidInput(f"v2 request needs {_count(max_inputs)} in 'inputs', got {count}")
    return InferenceRequest(request_id,
                            tuple(_parse_input(entry, max_rank, max_elements, accept) for entry in inputs))


def _count(most: int) -> str:
    return "exactly one entry" if most == 1 else f"1 to {most} entries"


def _parse_input(entry: Any, max_rank: int, max_elements: int, accept: AcceptInput | None) -> Tensor:
    if not isinstance(entry, dict):
        raise InvalidInput(f"v2 'inputs' entries must be objects, got {quote(entry)}")
    name = entry.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"v2 input 'name' must be a string of at most {MAX_NAME_CHARS} characters")
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"v2 input datatype must be one of {', '.join(DATATYPES)}, got {quote(datatype)}")
    shape = parse_shape(entry.get("shape"), max_rank, max_elements)
    if accept is not None:
        accept(datatype, shape)
    data = flatten(entry.get("data"), max_rank, max_elements)
    elements = 1
    for dimension in shape:  # at most max_rank factors, each at most max_elements
        elements *= dimension
    if elements != len(data):
        raise InvalidInput(f"v2 input shape {list(shape)} holds {elements} elements but 'data' has {len(data)}")
    return Tensor(name, datatype, shape, data)


def parse_shape(shape: Any, max_rank: int, max_elements: int) -> tuple[int, ...]:
    """The rank is checked before any element is looked at, each dimension before it is multiplied."""
    if not isinstance(shape, list):
        raise InvalidInput(f"v2 input needs a 'shape': a list of at most {max_rank} integers, got {quote(shape)}")
    if len(shape) > max_rank:
        raise InvalidInput(f"v2 input shape has {len(shape)} dimensions; at most {max_rank} are accepted")
    for dimension in shape:
        if isinstance(dimension, bool) or not isinstance(dimension, int) or not 0 <= dimension <= max_elements:
            raise InvalidInput(f"v2 input shape dimensions must be integers from 0 to {max_elements}, "
                               f"got {quote(dimension)}")
    return tuple(shape)


def flatten(data: Any, max_depth: int, max_elements: int) -> list[Any]:
    """Row-major elements of a flat or nested list, walking at most max_elements leaves and max_depth levels."""
    if not isinstance(data, list):
        raise InvalidInput(f"v2 input 'data' must be a list, got {quote(data)}")
    flat: list[Any] = []
    # Every list visited is either a leaf's parent or empty; counting both bounds the walk by the budget.
    budget = 2 * max_elements + max_depth
    stack: list[tuple[list[Any], int, int]] = [(data, 0, 1)]  # (list, next index, depth)
    while stack:
        current, index, depth = stack.pop()
        if index >= len(current):
            continue
        stack.append((current, index + 1, depth))
        item = current[index]
        budget -= 1
        if isinstance(item, list):
            if depth >= max_depth:
                raise InvalidInput(f"v2 input 'data' is nested deeper than {max_depth} levels")
            stack.append((item, 0, depth + 1))
        else:
            flat.append(item)
        if budget < 0 or len(flat) > max_elements:
            raise InvalidInput(f"v2 input 'data' holds more than {max_elements} elements (or that many lists)")
    return flat


def response(model_name: str, model_version: str, request_id: str, outputs: list[Tensor]) -> dict[str, Any]:
    return {"id": request_id, "model_name": model_name, "model_version": model_version,
            "outputs": [output.as_json() for output in outputs]}
