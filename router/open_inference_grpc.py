"""The Open Inference Protocol's gRPC service, `inference.GRPCInferenceService`, on the router's gRPC port beside
TorchServe's own service, and the standard health service (`grpc.health.v1.Health`) for probes.

The messages are TorchServe's compiled `open_inference_grpc.proto`: the protocol's `grpc_predict_v2.proto` under
another package name. A message's wire format does not carry its package, so the router serves the protocol's
service name with them; compiling the file again under the package `inference` would clash, in any process
that also imports tritonclient, with the `inference` messages tritonclient registers.

ServerLive, ServerReady and the health service need no token (probes); the rest need the client token, checked
by `grpc_service.TokenCheck` before a message is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.errors import NotFound, RouterError
from router.open_inference import CONTENTS_FIELDS, grpc_outputs, parse_grpc
from router.open_inference_service import Caller, OpenInferenceService
from router.request import V2_GRPC
from serving import protos

log = logging.getLogger(__name__)
pb = protos.load("open_inference_grpc_pb2")

SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
OPEN_METHODS = {f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady", f"/{HEALTH_SERVICE}/Check",
                f"/{HEALTH_SERVICE}/Watch"}
# What the health service answers for: the whole server (""), and each service on the port.
HEALTH_NAMES = ("", SERVICE, "org.pytorch.serve.grpc.inference.InferenceAPIsService")

Abort = Callable[[grpc.aio.ServicerContext, RouterError], Awaitable[Any]]
ReadCaller = Callable[[grpc.aio.ServicerContext], Caller]


class OpenInferenceGrpc:
    def __init__(self, service: OpenInferenceService, caller: ReadCaller, abort: Abort,
                 trailing: Callable[[list[tuple[str, str]]], Any]) -> None:
        self.service = service
        self.caller = caller  # the sticky key, pin, role and deadline from the call's metadata (grpc_service)
        self.abort = abort  # grpc_service.abort_with: the one place a RouterError becomes a gRPC status
        self.trailing = trailing

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(
                self._errors(method), request_deserializer=request.FromString,
                response_serializer=response.SerializeToString)
            for name, (method, request, response) in methods.items()})

    def _errors(self, method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(request, context)
            except RouterError as error:
                await self.abort(context, error)
            except Exception as error:  # a bug of ours: INTERNAL with no detail for the client, the trace in the log
                log.exception("v2 gRPC %s failed", method.__name__)
                await self.abort(context, RouterError(f"internal error ({type(error).__name__}); see the router's log"))
        return call

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=await self.service.server_ready())

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=await self.service.model_ready(request.name, request.version or None))

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = await self.service.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in metadata["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in metadata["outputs"]])

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tensors = self.service.parse(request.model_name, V2_GRPC, lambda: parse_grpc(request))
        inferred = await self.service.infer(request.model_name, request.model_version or None, tensors, V2_GRPC,
                                            self.caller(context))
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=inferred.model_version,
                                         id=tensors.id)
        for key, value in inferred.parameters().items():
            response.parameters[key].string_param = value
        for output, raw in grpc_outputs(tensors, inferred.outputs):
            tensor = response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
            if raw is not None:
                response.raw_output_contents.append(raw)
            elif output.datatype == "BYTES":
                tensor.contents.bytes_contents.extend(str(value).encode() for value in output.data)
            else:
                getattr(tensor.contents, CONTENTS_FIELDS[output.datatype]).extend(output.flat())
        context.set_trailing_metadata(self.trailing(inferred.routed.answer_headers()))
        return response


class Health(health_pb2_grpc.HealthServicer):
    """`Check` answers SERVING while a TorchServe host answers its ping (what `/v2/health/ready` says on REST);
    Kubernetes' gRPC probes call it. `Watch` streams are not offered (UNIMPLEMENTED, the base class)."""

    def __init__(self, service: OpenInferenceService) -> None:
        self.service = service

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in HEALTH_NAMES:
            await context.abort(grpc.StatusCode.NOT_FOUND, NotFound(
                f"no service {request.service!r} here (health is kept for {HEALTH_NAMES[1:]} and '')").message)
        ready = await self.service.server_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
