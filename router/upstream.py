"""The router's connection to one TorchServe host (`router.hosts` spreads attempts over several): the kit's
asyncio TorchServe client (`serving.client.AsyncClient`:
a keep-alive aiohttp pool and a grpc.aio channel, explicit timeouts, TorchServe's inference key read from its
key file and renewed before it expires), configured from the experiment file, with its errors in the router's
terms.

An attempt that fails in a way another arm might not (5xx, connection error, timeout) raises `AttemptFailed`;
anything else TorchServe answers (200, a 4xx about the input) is returned as a `Reply`. TorchServe unusable
(no key file, key refused) is `UpstreamUnavailable`; a gRPC request TorchServe refused keeps its meaning
(NOT_FOUND, INVALID_ARGUMENT). Clients of the router never see TorchServe's keys.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import grpc

from router.config import Host, Timeouts
from router.errors import BadRequest, NotFound, RouterError, UpstreamUnavailable
from serving.client import AsyncClient, AttemptFailed, Refused, Reply, Target, Unavailable

if TYPE_CHECKING:  # router.request imports this module (Reply); at run time only the protocol name is needed
    from router.request import InferenceRequest

# The protocols a routed request can come in (router.request): TorchServe's own, and the Open Inference Protocol's
# (router.open_inference). Each goes upstream on its own transport family: v2 over REST on TorchServe's REST
# inference API, v2 over gRPC on its gRPC one.
REST, GRPC, V2_REST, V2_GRPC = "rest", "grpc", "v2-rest", "v2-grpc"
GRPC_TRANSPORT = (GRPC, V2_GRPC)

__all__ = ["AttemptFailed", "Reply", "TorchServeClient"]

GRPC_PASS_THROUGH: dict[grpc.StatusCode, type[RouterError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: BadRequest}


class TorchServeClient(AsyncClient):
    """`AsyncClient` for the TorchServe an experiment file names, raising `RouterError`s. A protocol-neutral
    entry for the core (one upstream request in, a `Reply` out) belongs here, on top of `predict_rest` and
    `predict_grpc`: it only picks one by the request's protocol."""

    def __init__(self, host: Host, timeouts: Timeouts, pool_size: int = 256) -> None:
        super().__init__(host, connect_timeout_s=timeouts.connect_s, request_timeout_s=timeouts.request_s,
                         pool_size=pool_size)
        self.host = host
        self.timeouts = timeouts

    def _translate(self, error: Unavailable | Refused) -> Exception:
        if isinstance(error, Refused) and error.grpc_code is not None:
            return GRPC_PASS_THROUGH.get(error.grpc_code, UpstreamUnavailable)(error.message)
        return UpstreamUnavailable(error.message, retry_after_s=getattr(error, "retry_after_s", None))

    async def infer(self, target: Target, request: InferenceRequest, timeout_s: float) -> Reply:
        """Forward one routed request to `target` in the protocol it came in."""
        if request.protocol in GRPC_TRANSPORT:
            reply = await self.predict_grpc(target, dict(request.inputs), timeout_s)
            return in_body_status(reply) if request.protocol == V2_GRPC else reply
        return await self.predict_rest(target, request.body, request.content_type, timeout_s)


def in_body_status(reply: Reply) -> Reply:
    """TorchServe's gRPC ignores a handler's per-request status: a refusal comes back OK, its code in the body
    ({"error": {"code": 400, ...}}). A v2 gRPC client gets that code (INVALID_ARGUMENT), so the core must log,
    count, judge and shadow the request by it too."""
    if b'"error"' not in reply.body[:32]:  # a cheap look first: TorchServe writes {"error": ...} indented
        return reply
    try:
        code = json.loads(reply.body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return reply
    return dataclasses.replace(reply, status=code) if isinstance(code, int) and 400 <= code < 500 else reply
