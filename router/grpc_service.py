"""The router's gRPC front end: TorchServe's own `InferenceAPIsService` (same protos, same messages), so a gRPC
client changes only its target; beside it the Open Inference Protocol's `inference.GRPCInferenceService` and the
standard health service (`router.open_inference_grpc`). The arm and target of each answer travel in trailing
metadata.

The token is checked from the call's metadata by an interceptor before the request message is parsed, so an
unauthenticated caller costs the router no decoding; the server takes at most `max_in_flight` calls at once
and refuses the rest with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2_grpc

from router import open_inference_grpc
from router.config import RouterConfig
from router.core import Routed, Router
from router.errors import RouterError, Unauthenticated
from router.open_inference_service import Caller, OpenInferenceService
from router.request import GRPC, InferenceRequest
from router.tokens import ADMIN, Tokens, bearer
from serving import protos

log = logging.getLogger(__name__)

inference_pb2 = protos.load("inference_pb2")
inference_pb2_grpc = protos.load("inference_pb2_grpc")


SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
OPEN_METHODS = {f"/{SERVICE}/Ping", *open_inference_grpc.OPEN_METHODS}  # health needs no token, as on REST


def no_token() -> Unauthenticated:
    return Unauthenticated("missing or invalid router token (metadata authorization: Bearer <token>)")


async def abort_with(context: grpc.aio.ServicerContext, error: RouterError) -> NoReturn:
    await context.abort(error.grpc_code, error.message, trailing_metadata=_metadata(error.answer_headers()))
    raise AssertionError("unreachable: abort raises")


def _role(tokens: Tokens, metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return tokens.role(bearer(_text(value)))
    return None


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuse a call without a valid token before its message is read into a protobuf."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS or _role(self.tokens, details.invocation_metadata):
            return handler

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await abort_with(context, no_token())

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort_with(context, no_token())
            yield  # pragma: no cover (a generator, as a streaming handler must be)

        # No request deserializer: the message stays raw bytes, never parsed.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)


class InferenceService(inference_pb2_grpc.InferenceAPIsServiceServicer):  # type: ignore[name-defined]
    def __init__(self, router: Router, tokens: Tokens) -> None:
        self.router = router
        self.tokens = tokens

    async def Ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        healthy = await self.router.client.ping()
        return inference_pb2.TorchServeHealthResponse(
            health=json.dumps({"status": "Healthy" if healthy else "Unhealthy"}))

    async def Predictions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer(request, context)

    async def StreamPredictions(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # Our handler answers each request once, so the stream carries one message, as TorchServe's does.
        yield await self._answer(request, context)

    async def _answer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            routed = await self._route(request, context)
        except RouterError as error:
            await abort_with(context, error)
        context.set_trailing_metadata(_metadata(routed.answer_headers()))
        return inference_pb2.PredictionResponse(prediction=routed.reply.body)

    async def StreamPredictions2(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "StreamPredictions2 (sequence batching) is not routed: the kit's models are stateless; "
                            "use Predictions, or TorchServe's port directly for stateful models")

    async def _route(self, request: Any, context: grpc.aio.ServicerContext) -> Routed:
        caller = self.caller(context)
        return await self.router.route(InferenceRequest(
            name=request.model_name, protocol=GRPC, version=request.model_version or None, key=caller.key,
            pin=caller.pin, privileged=caller.privileged, inputs=dict(request.input), deadline=caller.deadline))

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The sticky key, pinned arm, role and deadline of a call, from its metadata (both services)."""
        metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
        role = _role(self.tokens, context.invocation_metadata())
        if role is None:  # the interceptor let it through: only if the token was valid, so this is defence in depth
            raise no_token()
        config = self.router.config
        remaining = context.time_remaining()  # the client's own deadline, if it set one, bounds ours
        return Caller(key=_text(metadata.get(config.sticky_header.lower())) or None,
                      pin=_text(metadata.get(config.override_header.lower())) or None, privileged=role == ADMIN,
                      deadline=None if remaining is None else time.monotonic() + remaining)


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _metadata(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name.lower(), value) for name, value in headers)  # gRPC metadata keys are lowercase


def server(config: RouterConfig, router: Router, tokens: Tokens) -> grpc.aio.Server:
    """The router's gRPC server with its services, limits and token check (not yet listening)."""
    grpc_server = grpc.aio.server(
        interceptors=[TokenCheck(tokens)], maximum_concurrent_rpcs=config.max_in_flight,
        # the same body limit as REST (gRPC's own default is 4 MB)
        options=[("grpc.max_receive_message_length", config.max_body_bytes + 1024),
                 # gRPC sets SO_REUSEPORT by default: a second router would silently share the port. Only
                 # replicas meant to share one address (listen.reuse_port) may.
                 ("grpc.so_reuseport", int(config.listen.reuse_port))])
    torchserve_protocol = InferenceService(router, tokens)
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(torchserve_protocol, grpc_server)
    open_inference = OpenInferenceService(router)
    grpc_server.add_generic_rpc_handlers((open_inference_grpc.OpenInferenceGrpc(
        open_inference, torchserve_protocol.caller, abort_with, _metadata).handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(open_inference_grpc.Health(open_inference), grpc_server)
    return grpc_server
