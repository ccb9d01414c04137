"""One exception hierarchy for the router, each class carrying its HTTP status and gRPC code.

The REST and gRPC front ends translate a `RouterError` in exactly one place each (`rest.error_response`,
`grpc_service.abort_with`), so the same failure reads the same on both protocols.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

# Every answer, error or not, names where it was routed: REST headers; gRPC trailing metadata, lowercased.
WHERE_HEADERS = ("X-Request-Id", "X-Experiment", "X-Arm", "X-Target")
# An error message quotes what the client sent only up to this many characters: never unbounded input.
QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr() of a client's value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class RouterError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        # (request id, experiment, arm, target) once routing got that far: error answers name them too.
        self.where: tuple[str, str, str, str] | None = None

    def answer_headers(self) -> list[tuple[str, str]]:
        headers = []
        if self.retry_after_s is not None:
            headers.append(("Retry-After", str(max(1, round(self.retry_after_s)))))
        if self.where is not None:
            headers += zip(WHERE_HEADERS, self.where, strict=True)
        return headers

    def body(self) -> dict[str, dict[str, object]]:
        """TorchServe's own error shape ({"code", "type", "message"}), so clients parse one format."""
        return {"error": {"code": self.http_status, "type": type(self).__name__, "message": self.message}}


class ConfigError(RouterError):
    """The experiment file (or a weight change) is invalid; the message names the offending entry."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class BadRequest(RouterError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RouterError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class Forbidden(RouterError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class PayloadTooLarge(RouterError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(RouterError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class UpstreamUnavailable(RouterError):
    """No arm could answer (5xx, connection refused, open circuits); the client may retry after Retry-After."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Overloaded(RouterError):
    """The router already has its limit of requests in flight: refused at once rather than queued without end."""

    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UpstreamTimeout(RouterError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


def json_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """A client's JSON object, or the BadRequest that says why it is not one (both front ends' bodies)."""
    try:
        document = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{what} is JSON nested too deeply") from None
    except ValueError as error:
        raise BadRequest(f"{what} is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return document
