"""What crosses the router's data plane: one protocol-neutral inference request in, one routed answer out.

The front ends (REST, gRPC) turn their protocol into an `InferenceRequest` and hand it to `Router.route`; the
core picks a target and gives the same request to the upstream client, which forwards the payload in the
protocol it came in. Nothing in the core knows a protocol beyond its name (for metrics and the log).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.config import Target
from router.errors import WHERE_HEADERS
from router.upstream import GRPC, REST, V2_GRPC, V2_REST, Reply

__all__ = ["GRPC", "REST", "V2_GRPC", "V2_REST", "InferenceRequest", "Routed", "Upstream", "labels_of"]


@dataclass(frozen=True)
class InferenceRequest:
    """One client request: where it wants to go, how it may be routed, and the payload to forward as it came."""

    name: str  # an experiment, or a plain TorchServe model (passed through)
    protocol: str  # REST, GRPC, V2_REST or V2_GRPC: the transport upstream, the label in metrics and the log
    version: str | None = None  # only for plain models: experiments pick the version themselves
    key: str | None = None  # the sticky key (same key, same arm)
    pin: str | None = None  # an arm the client pinned
    privileged: bool = False  # sent with the admin token: may pin an arm the experiment has drained
    body: bytes = b""  # REST transport
    content_type: str = "application/octet-stream"  # REST transport
    inputs: Mapping[str, bytes] = field(default_factory=dict)  # gRPC transport
    deadline: float | None = None  # time.monotonic() by which the client stops waiting (a gRPC deadline)

    def timeout_s(self, limit_s: float) -> float:
        """The router's own limit, shortened to the client's deadline when it has one."""
        if self.deadline is None:
            return limit_s
        return max(0.001, min(limit_s, self.deadline - time.monotonic()))


@dataclass(frozen=True)
class Routed:
    """A request's answer and where it came from."""

    reply: Reply
    request_id: str
    experiment: str
    arm: str
    target: Target
    retried_from: str | None = None

    def answer_headers(self) -> list[tuple[str, str]]:
        headers = list(zip(WHERE_HEADERS, (self.request_id, self.experiment, self.arm, str(self.target)),
                           strict=True))
        if self.retried_from:
            headers.append(("X-Retried-From", self.retried_from))
        return headers


def labels_of(reply: Reply) -> tuple[int, ...] | None:
    """The predicted classes in one of our handler's answers — one for TorchServe's protocol, one per image of an
    Open Inference Protocol answer — or None for anything else (an error, another format). Read from the reply's
    parsed body, which the Open Inference Protocol's answer then reuses."""
    answer = reply.document
    if not isinstance(answer, dict):
        return None
    if "outputs" in answer:
        labels = next((output.get("data") for output in answer["outputs"]
                       if isinstance(output, dict) and output.get("name") == "label"), None)
    else:
        labels = [answer.get("label")]
    if not isinstance(labels, list) or not labels:
        return None
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        return None
    return tuple(labels)


def single_label(labels: tuple[int, ...] | None) -> int | None:
    """What the request log keeps: the label of a one-image answer. A batch has no one label to judge with
    feedback (its row says so with none)."""
    return labels[0] if labels is not None and len(labels) == 1 else None


class Upstream(Protocol):
    """What the core needs of the upstream client (router.upstream.TorchServeClient; scripted in unit tests)."""

    async def infer(self, target: Target, request: InferenceRequest, timeout_s: float) -> Reply:
        """One attempt on `target`. `timeout_s` is the router's own limit; the request's deadline, if it has one,
        shortens it (`InferenceRequest.timeout_s`)."""

    async def served_models(self) -> dict[str, set[str]]: ...

    async def ping(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...  # the hosts and their circuits, for the admin API
