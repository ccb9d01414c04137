"""The Open Inference Protocol's REST paths on the router's REST port (aiohttp), beside TorchServe's:
health (`/v2/health/live`, `/v2/health/ready`, no token, like `/ping`), server metadata (`/v2`), and per model —
an experiment or a plain TorchServe model, with an optional `/versions/{version}` — metadata, readiness and
`infer` (the client token; the sticky and override headers as on `/predictions`).

Errors on these paths leave in the protocol's shape, `{"error": "<message>"}` (`rest.errors_as_json`). Health
follows the protocol: 200 for true, a 4xx (400) with the body for false.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from router.errors import BadRequest
from router.open_inference import BINARY_HEADER, parse_rest, rest_answer
from router.open_inference_service import Caller, OpenInferenceService
from router.request import V2_REST
from router.tokens import ADMIN

PREFIX = "/v2"
NOT_READY = 400  # the protocol: "a 200 status code indicates true and a 4xx status code indicates false"


class OpenInferenceRest:
    def __init__(self, service: OpenInferenceService, client_role: Callable[[web.Request], str]) -> None:
        self.service = service
        self.client_role = client_role  # RestFrontEnd._client: the caller's role, Unauthenticated without a token

    def routes(self) -> list[web.RouteDef]:
        routes = [web.get(f"{PREFIX}/health/live", self.live), web.get(f"{PREFIX}/health/ready", self.ready),
                  web.get(PREFIX, self.server_metadata)]
        for model in (f"{PREFIX}/models/{{model}}", f"{PREFIX}/models/{{model}}/versions/{{version}}"):
            routes += [web.get(model, self.model_metadata), web.get(f"{model}/ready", self.model_ready),
                       web.post(f"{model}/infer", self.infer)]
        return routes

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = await self.service.server_ready()
        return web.json_response({"ready": ready}, status=200 if ready else NOT_READY)

    async def server_metadata(self, request: web.Request) -> web.Response:
        self.client_role(request)
        return web.json_response(self.service.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        self.client_role(request)
        return web.json_response(await self.service.model_metadata(*_model(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        self.client_role(request)
        name, version = _model(request)
        ready = await self.service.model_ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else NOT_READY)

    async def infer(self, request: web.Request) -> web.Response:
        role = self.client_role(request)
        body = await request.read()
        if not body:
            raise BadRequest("empty request body: send a JSON inference request with 'inputs'")
        name, version = _model(request)
        tensors = self.service.parse(name, V2_REST, lambda: parse_rest(body, request.headers.get(BINARY_HEADER)))
        config = self.service.router.config
        inferred = await self.service.infer(name, version, tensors, V2_REST, Caller(
            key=request.headers.get(config.sticky_header) or None,
            pin=request.headers.get(config.override_header) or None, privileged=role == ADMIN))
        answer, headers = rest_answer(tensors, name, inferred.model_version, inferred.outputs, inferred.parameters())
        return web.Response(body=answer, headers={**headers, **dict(inferred.routed.answer_headers())})


def _model(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["model"], request.match_info.get("version")
