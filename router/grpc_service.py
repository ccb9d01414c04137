"""The router's gRPC front end: TorchServe's own `InferenceAPIsService` (same protos, same messages), so a gRPC
client changes only its target. The arm and target of each answer travel in trailing metadata."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from router.core import Routed, Router
from router.errors import RouterError, Unauthenticated
from router.tokens import Tokens, bearer
from serving import protos

log = logging.getLogger(__name__)

inference_pb2 = protos.load("inference_pb2")
inference_pb2_grpc = protos.load("inference_pb2_grpc")


async def abort_with(context: grpc.aio.ServicerContext, error: RouterError) -> NoReturn:
    await context.abort(error.grpc_code, error.message, trailing_metadata=_metadata(error.answer_headers()))
    raise AssertionError("unreachable: abort raises")


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
        metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
        if not self.tokens.is_client(bearer(_text(metadata.get("authorization")))):
            raise Unauthenticated("missing or invalid router token (metadata authorization: Bearer <token>)")
        config = self.router.config
        inputs = dict(request.input)
        client = self.router.client

        async def call(target: Any, timeout_s: float) -> Any:
            remaining = context.time_remaining()  # the client's own deadline, if it set one, bounds ours
            return await client.predict_grpc(target, inputs, timeout_s if remaining is None
                                             else max(0.001, min(timeout_s, remaining)))

        return await self.router.route(
            request.model_name, request.model_version or None,
            _text(metadata.get(config.sticky_header.lower())) or None,
            _text(metadata.get(config.override_header.lower())) or None, "grpc", call)


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _metadata(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name.lower(), value) for name, value in headers)  # gRPC metadata keys are lowercase


def add_to_server(server: grpc.aio.Server, router: Router, tokens: Tokens) -> None:
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(InferenceService(router, tokens), server)
