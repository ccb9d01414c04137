"""What both Open Inference Protocol front ends (REST: `router.open_inference_rest`, gRPC:
`router.open_inference_grpc`) ask of the router: inference through the same data plane as TorchServe's protocol
(routing, stickiness, pins, shadows, guardrail, metrics, the request log), model metadata and readiness, server
health. Experiments and plain TorchServe models answer alike; an experiment has no versions of its own (it picks
them), so its metadata lists none and a version in its path is refused, as on TorchServe's paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.config import Target
from router.core import Router
from router.errors import BadRequest, PayloadTooLarge, RouterError
from router.open_inference import Output, TensorRequest, outputs_of, signature
from router.request import V2_GRPC, InferenceRequest, Routed
from serving.project import KIT_VERSION

SERVER_NAME = "torchserve-kit-router"
# Triton's binary tensor extension (REST): what tritonclient sends by default
EXTENSIONS = ("binary_tensor_data",)
UPSTREAM_FRAMING_BYTES = 1024  # what gRPC adds around the body (the model name, field tags)
NPY_CONTENT_TYPE = "application/octet-stream"  # the handler recognises an NPY body by its magic bytes


@dataclass(frozen=True)
class Caller:
    """Who sent a request and how it may be routed: the protocol-specific parts a front end reads from headers
    or metadata."""

    key: str | None = None
    pin: str | None = None
    privileged: bool = False
    deadline: float | None = None  # time.monotonic() by which the client stops waiting


@dataclass(frozen=True)
class Inferred:
    routed: Routed
    outputs: list[Output]
    model_version: str  # the routed target's version, or the one the model answered with when none was named

    def parameters(self) -> dict[str, str]:
        """Where the request went, in the protocol's response parameters (as the headers say it on REST)."""
        parameters = {"request_id": self.routed.request_id, "experiment": self.routed.experiment,
                      "arm": self.routed.arm, "target": str(self.routed.target)}
        if self.routed.retried_from:
            parameters["retried_from"] = self.routed.retried_from
        return parameters


class OpenInferenceService:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.signature = signature()

    def parse(self, name: str, protocol: str, parse: Callable[[], TensorRequest]) -> TensorRequest:
        """A front end's parse of a request, counted when it is refused: the request never reaches the data plane
        (no arm, no log row), but it is in `router_requests_total` with arm "none", as a refused route is."""
        try:
            return parse()
        except RouterError as error:
            known = self.router.control.experiment(name) is not None or name in self.router.catalog.served
            self.router.metrics.requests.labels(name if known else "unknown", "none", protocol,
                                                str(error.http_status)).inc()
            raise

    async def infer(self, name: str, version: str | None, tensors: TensorRequest, protocol: str,
                    caller: Caller) -> Inferred:
        body = tensors.upstream_body()
        limit = self.router.config.max_body_bytes - UPSTREAM_FRAMING_BYTES  # TorchServe's max_request_size
        if len(body) > limit:
            raise PayloadTooLarge(f"the request's tensor takes {len(body)} bytes on its way to the model (BYTES as "
                                  f"base64 in JSON), over its limit of {limit} bytes: send fewer or smaller images "
                                  "per request")
        content_type = NPY_CONTENT_TYPE if tensors.array is not None else "application/json"
        routed = await self.router.route(InferenceRequest(
            name=name, protocol=protocol, version=version or None, key=caller.key, pin=caller.pin,
            privileged=caller.privileged, deadline=caller.deadline,
            **({"inputs": {"data": body}} if protocol == V2_GRPC else {"body": body, "content_type": content_type})))
        try:
            answer = outputs_of(routed.reply, tensors)
            return Inferred(routed, answer.outputs, routed.target.version or answer.model_version)
        except RouterError as error:  # the handler refused the input: still name where it was routed
            error.where = (routed.request_id, routed.experiment, routed.arm, str(routed.target))
            raise

    async def versions(self, name: str, version: str | None) -> list[str]:
        """The versions a client may name; NotFound for a name (or version) neither an experiment nor served."""
        if self.router.control.experiment(name) is not None:
            if version:
                raise BadRequest(f"{name!r} is an experiment: it picks the version itself; leave the version out")
            return []
        await self.router.catalog.check(name, version or None, self.router.control.names())
        return sorted(self.router.catalog.served[name])

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        versions = await self.versions(name, version)
        return self.signature.metadata(name, [version] if version else versions)

    async def model_ready(self, name: str, version: str | None) -> bool:
        """Whether a request for it would be routed now: an experiment with an arm that takes traffic and is not
        taken out by its circuit; a model whose circuit is not open."""
        await self.versions(name, version)  # NotFound first
        experiment = self.router.control.experiment(name)
        if experiment is not None:
            unavailable = self.router.circuits.unavailable(experiment)
            return any(weight > 0 and arm not in unavailable for arm, weight in experiment.weights.items())
        target = Target(name, version or None)  # the breaker the data plane uses for it (router.core)
        return self.router.circuits.breaker(target).available(time.monotonic())

    async def server_ready(self) -> bool:
        return await self.router.client.ping()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": KIT_VERSION,
                "extensions": list(EXTENSIONS)}
