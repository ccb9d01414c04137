"""The router's REST front end (aiohttp): TorchServe's own inference paths and the Open Inference Protocol's
(`router.open_inference_rest`), plus health, metrics, feedback and the admin endpoints. Errors leave in
TorchServe's shape ({"error": {"code", "type", "message"}}), on the protocol's paths in its own ({"error": "..."})."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router import dashboard
from router.core import Router
from router.errors import BadRequest, Forbidden, Overloaded, RouterError, Unauthenticated, json_object, quoted
from router.open_inference import error_body as open_inference_error
from router.open_inference_rest import PREFIX as OPEN_INFERENCE_PREFIX
from router.open_inference_rest import OpenInferenceRest
from router.open_inference_service import OpenInferenceService
from router.request import REST, InferenceRequest
from router.tokens import ADMIN, CLIENT, Tokens, bearer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Feedback and admin bodies are a few hundred bytes of JSON: anything far larger is refused unread.
MAX_JSON_BYTES = 64 * 1024
# The work the in-flight limit bounds: inference and feedback. Probes, metrics and the admin API are never refused
# by it, so an operator can see and steer an overloaded router.
LIMITED_PATHS = ("/predictions/", "/feedback", f"{OPEN_INFERENCE_PREFIX}/models/")


def error_response(error: RouterError, path: str) -> web.Response:
    body = open_inference_error(error) if _open_inference(path) else error.body()
    return web.json_response(body, status=error.http_status, headers=dict(error.answer_headers()))


def _open_inference(path: str) -> bool:
    return path == OPEN_INFERENCE_PREFIX or path.startswith(f"{OPEN_INFERENCE_PREFIX}/")


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as error:
        return error_response(error, request.path)
    except web.HTTPException as error:  # aiohttp's own: unknown path, wrong method, body too large
        if error.status < 400:
            raise
        message = error.text or error.reason
        if error.status in (404, 405):  # TorchServe's management API, for one, is deliberately not here
            message = (f"no endpoint {request.method} {request.path} on the router (it serves /predictions/*, "
                       "/v2/*, /ping, /healthz, /readyz, /metrics, /feedback, /admin/* and /dashboard)")
        body: dict[str, Any] = {"error": {"code": error.status, "type": error.reason, "message": message}}
        if _open_inference(request.path):
            body = {"error": message}
        return web.json_response(body, status=error.status, headers={
            name: value for name, value in error.headers.items() if name.lower() == "allow"})


def in_flight_limit(limit: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Refuse (503, Retry-After) rather than queue once `limit` requests are being worked on: under overload the
    router's memory and every request's latency stay bounded, and the client learns to back off."""
    in_flight = 0

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        if not request.path.startswith(LIMITED_PATHS):  # health, metrics and admin stay reachable under overload
            return await handler(request)
        if in_flight >= limit:
            raise Overloaded(f"the router is working on its limit of {limit} requests; retry shortly",
                             retry_after_s=1)
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    return middleware


class RestFrontEnd:
    def __init__(self, router: Router, tokens: Tokens) -> None:
        self.router = router
        self.tokens = tokens

    def app(self) -> web.Application:
        config = self.router.config
        app = web.Application(client_max_size=config.max_body_bytes,
                              middlewares=[errors_as_json, in_flight_limit(config.max_in_flight)])
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
            web.get("/admin/series/{name}", self.series),
            web.get("/dashboard", dashboard.page),
            web.get("/dashboard/{asset}", dashboard.asset),
            *OpenInferenceRest(OpenInferenceService(self.router), self._client).routes(),
        ])
        return app

    def _client(self, request: web.Request) -> str:
        """The caller's role; Unauthenticated without a valid token."""
        role = self.tokens.role(bearer(request.headers.get("Authorization")))
        if role is None:
            raise Unauthenticated("missing or invalid router token (Authorization: Bearer <token>, "
                                  "see the router's tokens.json)")
        return role

    def _admin(self, request: web.Request) -> None:
        role = self.tokens.role(bearer(request.headers.get("Authorization")))
        if role == CLIENT:
            raise Forbidden("this endpoint needs the admin token, not the client token")
        if role != ADMIN:
            raise Unauthenticated("missing or invalid admin token (Authorization: Bearer <admin token>)")

    async def predict(self, request: web.Request) -> web.Response:
        role = self._client(request)
        body = await request.read()
        if not body:
            raise BadRequest("empty request body: send an image (Content-Type: image/png, ...) or JSON")
        config = self.router.config
        routed = await self.router.route(InferenceRequest(
            name=request.match_info["model"], protocol=REST, version=request.match_info.get("version"),
            key=request.headers.get(config.sticky_header) or None,
            pin=request.headers.get(config.override_header) or None, privileged=role == ADMIN,
            body=body, content_type=request.headers.get("Content-Type", "application/octet-stream")))
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
            raise BadRequest(f'feedback needs "label": the true class as an integer >= 0, got {quoted(label)}')
        return web.json_response(await self.router.evaluation.feedback(request_id, label))

    async def experiments(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(self.router.describe())

    async def set_weights(self, request: web.Request) -> web.Response:
        self._admin(request)
        document = await _json_object(request)
        weights = document.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise BadRequest('send {"weights": {"<arm>": <weight>, ...}} (0 drains an arm)')
        reason = f"admin: {str(document.get('reason', 'weights set through the admin API'))[:300]}"
        await self.router.control.set_weights(request.match_info["name"], weights, reason)
        return web.json_response(self.router.describe()["experiments"][request.match_info["name"]])

    async def clear_override(self, request: web.Request) -> web.Response:
        self._admin(request)
        await self.router.control.clear_override(request.match_info["name"])
        return web.json_response(self.router.describe()["experiments"][request.match_info["name"]])

    async def reload(self, request: web.Request) -> web.Response:
        self._admin(request)
        changed = await self.router.control.reload("admin-reload")
        return web.json_response({"reloaded": changed, **self.router.describe()})

    async def report(self, request: web.Request) -> web.Response:
        self._admin(request)
        since = 0.0
        if "since_s" in request.query:
            since_s = _seconds(request, "since_s", 0.0)
            if not (math.isfinite(since_s) and since_s >= 0):  # nan or inf would make a report no JSON can carry
                raise BadRequest(f"since_s must be a finite number of seconds >= 0, got {since_s:g}")
            since = time.time() - since_s
        return web.json_response(await self.router.evaluation.report(request.match_info["name"], since,
                                                                     _seconds(request, "max_age_s", 0.0)))

    async def series(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(await self.router.evaluation.series(
            request.match_info["name"], _seconds(request, "window_s", 300.0), _seconds(request, "step_s", 10.0)))


def _seconds(request: web.Request, key: str, default: float) -> float:
    """A query parameter that is a number of seconds (its range is checked where it is used)."""
    if key not in request.query:
        return default
    try:
        return float(request.query[key])
    except ValueError:
        raise BadRequest(f"{key} must be a number of seconds, got {quoted(request.query[key])}") from None


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise BadRequest(f"body of {request.content_length} bytes is larger than this endpoint's {MAX_JSON_BYTES}")
    raw = await request.read()
    if len(raw) > MAX_JSON_BYTES:
        raise BadRequest(f"body of {len(raw)} bytes is larger than this endpoint's {MAX_JSON_BYTES}")
    return json_object(raw)
