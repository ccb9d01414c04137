"""A refused request: the exception every decoder raises, the answer it becomes, and how a message quotes input.

The handler module itself may define only its handler class (TorchServe loads the one class it finds there),
so a refused request's place in a batch (Refusal) is defined here too.

A message says what is wrong in at most MAX_MESSAGE_CHARS characters and never echoes client input beyond a
short, fixed-size quote (`quote`): a client that sends 6 MB of garbage gets a few hundred characters back, and
building the message costs nothing that grows with the body.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_CHARS = 300
QUOTE_CHARS = 40
# Integers up to this many bits are quoted as digits; beyond, by their size (str() of a huge int costs and
# Python 3.11 refuses it past 4,300 digits).
QUOTE_INT_BITS = 64


class InvalidInput(ValueError):
    """A request the handler cannot turn into an image; its (capped) message goes back to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(message))


@dataclass(frozen=True)
class Refusal:
    """A request of the batch that gets a 400 instead of an answer."""

    message: str


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A short description of a client value for an error message: bounded in length and in cost."""
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= QUOTE_INT_BITS else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:limit]) + ("…" if len(value) > limit else "")
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value[:limit])) + ("…" if len(value) > limit else "")
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return f"a value of type {type(value).__name__}"


def quote_names(names: set[str] | list[str], most: int = 5) -> str:
    """A few (quoted, clipped) names out of a set a client chose, and how many more there are."""
    shown = heapq.nsmallest(most, names, key=lambda name: (len(name), name))  # O(n): the set may be large
    more = len(names) - len(shown)
    return ", ".join(quote(name, 20) for name in shown) + (f" and {more} more" if more else "")


def error_body(message: str, model: dict[str, str]) -> dict[str, Any]:
    return {"error": {"code": 400, "type": "InvalidInput", "message": clip(message)}, "model": model}
