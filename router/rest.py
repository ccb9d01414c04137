"""The router's REST front end (aiohttp): TorchServe's own inference paths, plus health, metrics, feedback and
the admin endpoints. Errors leave in TorchServe's shape ({"error": {"code", "type", "message"}})."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.core import Router
from router.errors import BadRequest, Forbidden, RouterError, Unauthenticated
from router.tokens import Tokens, bearer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: RouterError) -> web.Response:
    return web.json_response(error.body(), status=error.http_status, headers=dict(error.answer_headers()))


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as error:
        return error_response(error)
    except web.HTTPException as error:  # aiohttp's own: unknown path, wrong method, body too large
        if error.status < 400:
            raise
        message = error.text or error.reason
        if error.status in (404, 405):  # TorchServe's management API, for one, is deliberately not here
            message = (f"no endpoint {request.method} {request.path} on the router (it serves /predictions/*, "
                       "/ping, /healthz, /readyz, /metrics, /feedback and /admin/*)")
        body = {"error": {"code": error.status, "type": error.reason, "message": message}}
        return web.json_response(body, status=error.status, headers={
            name: value for name, value in error.headers.items() if name.lower() == "allow"})


class RestFrontEnd:
    def __init__(self, router: Router, tokens: Tokens) -> None:
        self.router = router
        self.tokens = tokens

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.router.config.max_body_bytes, middlewares=[errors_as_json])
        app.add_routes([
            web.post("/predictions/{model}", self.predict),
            web.post("/predictions/{model}/{version}", self.predict),
            web.get("/ping", self.ready),
            web.get("/readyz", self.ready),
            web.get("/healthz", self.alive),
            web.get("/metrics", self.metrics),
            web.post("/feedback", self.feedback),
            web.get("/admin/experiments", self.experiments),
            web.put("/admin/experiments/{name}/weights", self.set_weights),
            web.delete("/admin/experiments/{name}/override", self.clear_override),
            web.post("/admin/reload", self.reload),
            web.get("/admin/report/{name}", self.report),
        ])
        return app

    def _client(self, request: web.Request) -> None:
        if not self.tokens.is_client(bearer(request.headers.get("Authorization"))):
            raise Unauthenticated("missing or invalid router token (Authorization: Bearer <token>, "
                                  "see the router's tokens.json)")

    def _admin(self, request: web.Request) -> None:
        token = bearer(request.headers.get("Authorization"))
        if not self.tokens.is_admin(token):
            if self.tokens.is_client(token):
                raise Forbidden("this endpoint needs the admin token, not the client token")
            raise Unauthenticated("missing or invalid admin token (Authorization: Bearer <admin token>)")

    async def predict(self, request: web.Request) -> web.Response:
        self._client(request)
        body = await request.read()
        if not body:
            raise BadRequest("empty request body: send an image (Content-Type: image/png, ...) or JSON")
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        client = self.router.client

        async def call(target: Any, timeout_s: float) -> Any:
            return await client.predict_rest(target, body, content_type, timeout_s)

        routed = await self.router.route(
            request.match_info["model"], request.match_info.get("version"),
            request.headers.get(self.router.config.sticky_header) or None,
            request.headers.get(self.router.config.override_header) or None, "rest", call)
        headers = {"Content-Type": routed.reply.content_type, **dict(routed.answer_headers()),
                   **dict(routed.reply.headers)}
        return web.Response(status=routed.reply.status, body=routed.reply.body, headers=headers)

    async def ready(self, request: web.Request) -> web.Response:
        healthy = await self.router.client.ping()
        return web.json_response({"status": "Healthy" if healthy else "Unhealthy"}, status=200 if healthy else 503)

    async def alive(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.router.metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def feedback(self, request: web.Request) -> web.Response:
        self._client(request)
        document = await _json_object(request)
        request_id, label = document.get("request_id"), document.get("label")
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest('feedback needs "request_id": the X-Request-Id of the answer')
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise BadRequest(f'feedback needs "label": the true class as an integer >= 0, got {label!r}')
        return web.json_response(await self.router.feedback(request_id, label))

    async def experiments(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(self.router.describe())

    async def set_weights(self, request: web.Request) -> web.Response:
        self._admin(request)
        document = await _json_object(request)
        weights = document.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise BadRequest('send {"weights": {"<arm>": <weight>, ...}} (0 drains an arm)')
        reason = f"admin: {document.get('reason', 'weights set through the admin API')}"
        await self.router.set_weights(request.match_info["name"], weights, reason)
        return web.json_response(self.router.describe()["experiments"][request.match_info["name"]])

    async def clear_override(self, request: web.Request) -> web.Response:
        self._admin(request)
        await self.router.clear_override(request.match_info["name"])
        return web.json_response(self.router.describe()["experiments"][request.match_info["name"]])

    async def reload(self, request: web.Request) -> web.Response:
        self._admin(request)
        changed = await self.router.reload("admin-reload")
        return web.json_response({"reloaded": changed, **self.router.describe()})

    async def report(self, request: web.Request) -> web.Response:
        self._admin(request)
        since = 0.0
        if "since_s" in request.query:
            try:
                since = time.time() - float(request.query["since_s"])
            except ValueError:
                raise BadRequest("since_s must be a number of seconds") from None
        return web.json_response(await self.router.report(request.match_info["name"], since))


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        document = json.loads(await request.read())
    except ValueError as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise BadRequest("body must be a JSON object")
    return document
