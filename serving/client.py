"""The one TorchServe client of this kit: the CLI, `serving.server`, the router and the load tests use it.

Like httpx, one client core and two ways to send: `Client` blocks (requests + grpc), `AsyncClient` awaits
(aiohttp + grpc.aio). Everything about TorchServe lives once, in `_Core`: URLs and paths, headers and the keys
(TorchServe's key file, re-read when it changes; a key close to expiry renewed with the API key), retrying once
when TorchServe refuses a key that was just renewed, and what each answer means. Each operation is written
once, as a generator that yields the requests it needs and gets the answers back; the two clients only drive
those generators over their transport (`serving.transports`).

What an answer means:
- a prediction TorchServe answered with a status below 500 (200, or a 4xx about the input) is a `Reply`;
- an attempt that failed in a way another model version might not (5xx, no connection, timeout; on gRPC
  UNAVAILABLE, INTERNAL, ...) raises `AttemptFailed`, whose `kind` is "timeout", "connection" or
  "server_error";
- TorchServe unreachable for anything else, its key file missing, or our key refused raises `Unavailable`;
- a request it refused on gRPC (NOT_FOUND, INVALID_ARGUMENT, ...) or on the management API raises `Refused`.
A subclass may translate `Unavailable` and `Refused` into its own errors (`_translate`), as the router does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Generator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol, TypeVar

import grpc

from serving import protos
from serving.keys import EXPIRING_KINDS, KeyFile, KeyFileError
from serving.transports import (
    AsyncTransport,
    GrpcFailed,
    GrpcRequest,
    HttpRequest,
    HttpResponse,
    SendFailed,
    SyncTransport,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# An operation: yields the requests it needs, is sent each answer (or has the transport's failure thrown in),
# returns its result.
Flow = Generator[HttpRequest | GrpcRequest, Any, T]

KEY_REFUSED = "InvalidKeyException"  # the "type" of TorchServe's 400 for a missing, wrong or expired key
# gRPC codes that say the target (not the request) failed: worth an attempt on another model version.
GRPC_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
FORWARDED_HEADERS = ("X-Batch-Size",)  # answer headers of TorchServe's worth passing on
KEY_RENEWAL_MARGIN_S = 60.0  # a key that expires sooner than this is renewed before it is used
PING_TIMEOUT_S = 2.0


class Endpoints(Protocol):
    """Where one TorchServe listens, and its key file (`serving.instance.Instance`, the router's config)."""

    @property
    def inference_url(self) -> str: ...
    @property
    def management_url(self) -> str: ...
    @property
    def grpc_target(self) -> str: ...
    @property
    def key_file(self) -> Path | None: ...  # None: that TorchServe runs with token authorization off


class ModelVersion(Protocol):
    """A model and a version of it; None means the model's default version."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str | None: ...


@dataclass(frozen=True)
class Target:
    """A model version to predict with (the router's arms name theirs with it too)."""

    model: str
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.model}/{self.version}" if self.version else self.model


@dataclass(frozen=True)
class Reply:
    """What TorchServe answered to a prediction (status below 500)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()  # FORWARDED_HEADERS it sent

    def json(self) -> Any:
        return json.loads(self.body)

    @cached_property
    def document(self) -> Any:
        """The body parsed as JSON, once (the router reads an answer's labels and its v2 outputs from it); None
        when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class TorchServeError(Exception):
    """Anything this client raises."""


class AttemptFailed(TorchServeError):
    """One attempt on one target failed: kind is "timeout", "connection" or "server_error"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Unavailable(TorchServeError):
    """TorchServe cannot be used now (not running, key file missing, key refused, management API failing)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class Refused(TorchServeError):
    """TorchServe refused the request itself: a gRPC status such as NOT_FOUND, or a management API error."""

    def __init__(self, message: str, grpc_code: grpc.StatusCode | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.grpc_code = grpc_code
        self.http_status = http_status


def prediction_path(model: str, version: str | None = None) -> str:
    """TorchServe's REST prediction path of a model (its default version) or of one version."""
    return f"/predictions/{model}" + (f"/{version}" if version else "")


def _snippet(data: bytes, limit: int = 200) -> str:
    """The start of an answer body, on one line, for error messages (never the whole of an unbounded body)."""
    return data[:limit].decode("utf-8", "replace").strip().replace("\n", " ")


def _key_refused(response: HttpResponse) -> bool:
    """TorchServe's own refusal of the key ({"code": 400, "type": "InvalidKeyException", ...}), told apart from
    a handler's 400 about the input, whatever text that one carries."""
    if response.status != 400 or KEY_REFUSED.encode() not in response.body:
        return False
    try:
        answer = json.loads(response.body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("type") == KEY_REFUSED


def _json(response: HttpResponse, what: str) -> Any:
    try:
        return json.loads(response.body)
    except ValueError as error:
        raise Unavailable(f"TorchServe's answer to {what} is not JSON: {_snippet(response.body)}") from error


class _Core:
    """Everything both clients share; each `_..._flow` is one operation, written once."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        # No key file: TorchServe runs with token authorization off (the router's hosts in a cluster, where a
        # NetworkPolicy lets only the router in): requests carry no key and there is nothing to renew.
        self.keys = None if endpoints.key_file is None else KeyFile(endpoints.key_file)
        self._pb2: ModuleType | None = None

    # --- building requests --------------------------------------------------------------------------------------
    def _auth(self, kind: str = "inference") -> dict[str, str]:
        """The Authorization header for a key of `kind` (none when token authorization is off)."""
        if self.keys is None:
            return {}
        try:
            return {"Authorization": f"Bearer {self.keys.key(kind)}"}
        except KeyFileError as error:
            raise Unavailable(str(error), retry_after_s=error.retry_after_s) from error

    def _forget_keys(self) -> None:
        if self.keys is not None:
            self.keys.forget()

    def _management(self, method: str, path: str, params: dict[str, str] | None = None,
                    kind: str = "management") -> HttpRequest:
        return HttpRequest(method, self.endpoints.management_url + path, self._auth(kind), params)

    @property
    def inference_pb2(self) -> ModuleType:
        if self._pb2 is None:
            self._pb2 = protos.load("inference_pb2")
        return self._pb2

    @staticmethod
    def _stub_class() -> Any:
        return protos.load("inference_pb2_grpc").InferenceAPIsServiceStub

    # --- inference ----------------------------------------------------------------------------------------------
    def _predict_rest_flow(self, target: ModelVersion, body: bytes, content_type: str,
                           timeout_s: float | None) -> Flow[Reply]:
        url = self.endpoints.inference_url + prediction_path(target.model, target.version)
        for _ in range(2):
            request = HttpRequest("POST", url, {**self._auth(), "Content-Type": content_type},
                                  body=body, timeout_s=timeout_s)
            try:
                response: HttpResponse = yield request
            except SendFailed as failure:
                raise AttemptFailed(failure.kind, f"{_name(target)}: {failure.detail}") from failure
            if _key_refused(response):
                if self.keys is None:
                    raise Unavailable(f"{self.endpoints.inference_url} requires a key, but no key file is configured "
                                      "for it (key_file: null means its token authorization is off)", retry_after_s=5)
                # Our key, not the client's request: it was renewed under us, so read the file again and try
                # once more; refused twice, TorchServe is unusable for now (not a 400 for the client).
                self._forget_keys()
                continue
            if response.status >= 500:
                raise AttemptFailed("server_error", f"{_name(target)} answered HTTP {response.status}: "
                                    f"{_snippet(response.body)}")
            headers = response.headers
            forwarded = tuple((name, headers[name]) for name in FORWARDED_HEADERS if name in headers)
            return Reply(response.status, response.body, headers.get("Content-Type", "application/json"), forwarded)
        raise Unavailable("TorchServe refused the inference key (is the key file current?)", retry_after_s=5)

    def _predict_grpc_flow(self, target: ModelVersion, inputs: dict[str, bytes],
                           timeout_s: float | None) -> Flow[Reply]:
        message = self.inference_pb2.PredictionsRequest(model_name=target.model, model_version=target.version or "",
                                                        input=inputs)
        for _ in range(2):
            metadata = tuple((name.lower(), value) for name, value in self._auth().items())
            request = GrpcRequest("Predictions", message, metadata, timeout_s)
            try:
                response = yield request
            except GrpcFailed as failure:
                if failure.code == grpc.StatusCode.PERMISSION_DENIED and self.keys is not None:
                    self._forget_keys()
                    continue
                raise self._grpc_failure(target, failure, timeout_s) from failure
            return Reply(200, bytes(response.prediction))
        raise Unavailable("TorchServe refused the inference key (is the key file current?)", retry_after_s=5)

    @staticmethod
    def _grpc_failure(target: ModelVersion, failure: GrpcFailed, timeout_s: float | None) -> TorchServeError:
        code = failure.code
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            limit = f"within {timeout_s:g} s" if timeout_s else "in time"
            return AttemptFailed("timeout", f"{_name(target)} did not answer {limit}")
        if code in GRPC_FAILURES:
            kind = "connection" if code == grpc.StatusCode.UNAVAILABLE else "server_error"
            return AttemptFailed(kind, f"{_name(target)}: gRPC {code.name} {failure.details}")
        return Refused(f"TorchServe: {failure.details or code.name}", grpc_code=code)

    def _ping_flow(self) -> Flow[bool]:
        try:
            request = HttpRequest("GET", f"{self.endpoints.inference_url}/ping", self._auth(),
                                  timeout_s=PING_TIMEOUT_S)
            response: HttpResponse = yield request
            return response.status == 200 and json.loads(response.body).get("status") == "Healthy"
        except (SendFailed, Unavailable, ValueError, AttributeError):
            return False

    # --- management ---------------------------------------------------------------------------------------------
    def _served_models_flow(self) -> Flow[dict[str, set[str]]]:
        """{model: {versions}} that TorchServe serves (every page of its model list)."""
        names: list[str] = []
        params = {"limit": "100"}
        try:
            while True:
                response: HttpResponse = yield self._management("GET", "/models", params)
                if response.status != 200:
                    raise Unavailable(f"TorchServe's management API answered HTTP {response.status}: "
                                      f"{_snippet(response.body)}", retry_after_s=5)
                listing = _json(response, "GET /models")
                names += [model["modelName"] for model in listing["models"]]
                if not listing.get("nextPageToken"):
                    break
                params = {"limit": "100", "next_page_token": str(listing["nextPageToken"])}
            served: dict[str, set[str]] = {}
            for name in names:
                described = yield from self._describe_flow(name, "all")
                served[name] = {str(entry["modelVersion"]) for entry in described or []}
            return served
        except (SendFailed, KeyError, TypeError) as error:
            raise Unavailable(f"TorchServe's management API at {self.endpoints.management_url} did not list its "
                              f"models: {error!r}", retry_after_s=5) from error

    def _describe_flow(self, model: str, version: str | None = None) -> Flow[list[dict[str, Any]] | None]:
        """TorchServe's description of a model's default version, of one version, or of "all"; None if the model
        (or version) is not registered."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        try:
            response: HttpResponse = yield self._management("GET", path)
        except SendFailed as failure:
            raise Unavailable(f"TorchServe's management API: {failure}", retry_after_s=5) from failure
        if response.status == 404:
            return None
        if response.status != 200:
            raise Unavailable(f"TorchServe's management API answered HTTP {response.status} to GET {path}: "
                              f"{_snippet(response.body)}", retry_after_s=5)
        described: list[dict[str, Any]] = _json(response, f"GET {path}")
        return described

    def _set_default_flow(self, model: str, version: str) -> Flow[None]:
        path = f"/models/{model}/{version}/set-default"
        try:
            response: HttpResponse = yield self._management("PUT", path)
        except SendFailed as failure:
            raise Unavailable(f"TorchServe's management API: {failure}", retry_after_s=5) from failure
        if response.status != 200:
            raise Refused(f"set-default {model} {version}: HTTP {response.status} {_snippet(response.body)}",
                          http_status=response.status)

    # --- keys ---------------------------------------------------------------------------------------------------
    def _renew_keys_flow(self, margin_s: float, kinds: tuple[str, ...] = EXPIRING_KINDS) -> Flow[list[str]]:
        """Renew each of `kinds` that expires within `margin_s` (TorchServe rewrites its key file); the kinds
        renewed. Every due kind is tried before a failure is raised."""
        if self.keys is None:
            return []
        try:
            due = self.keys.expiring(margin_s, kinds)
        except KeyFileError as error:
            raise Unavailable(str(error), retry_after_s=error.retry_after_s) from error
        renewed, failed = [], []
        for kind in due:
            try:
                response: HttpResponse = yield self._management("POST", "/token", {"type": kind}, kind="API")
            except SendFailed as failure:
                failed.append(f"{kind}: {failure}")
                continue
            if response.status == 200:
                renewed.append(kind)
                log.info("renewed TorchServe's %s key", kind)
            else:
                failed.append(f"{kind}: HTTP {response.status} {_snippet(response.body)}")
        if renewed:
            self._forget_keys()
        if failed:
            raise Unavailable("renewing TorchServe's keys failed: " + "; ".join(failed), retry_after_s=5)
        return renewed

    def _token_flow(self, kind: str) -> Flow[str]:
        """The current key of `kind`, renewed first when it expires within KEY_RENEWAL_MARGIN_S."""
        yield from self._renew_keys_flow(KEY_RENEWAL_MARGIN_S, (kind,))
        if self.keys is None:
            raise Unavailable(f"{self.endpoints.inference_url} runs with token authorization off: it has no keys")
        try:
            return self.keys.key(kind)
        except KeyFileError as error:
            raise Unavailable(str(error), retry_after_s=error.retry_after_s) from error

    # --- errors -------------------------------------------------------------------------------------------------
    def _translated(self, error: Unavailable | Refused) -> BaseException:
        """What a client raises for a flow's error: the subclass's own terms (caused by it), or the error itself."""
        translated = self._translate(error)
        if translated is not error:
            translated.__cause__ = error
        return translated

    def _translate(self, error: Unavailable | Refused) -> Exception:
        """The exception to raise for `error`: itself here; a subclass may map it into its own hierarchy."""
        return error


def _name(target: ModelVersion) -> str:
    return f"{target.model}/{target.version}" if target.version else target.model


class Client(_Core):
    """The blocking client (the CLI, `serving.server`, tests and load-test tools). Use it as a context manager,
    or call `close()`."""

    def __init__(self, endpoints: Endpoints, connect_timeout_s: float = 5.0, request_timeout_s: float = 30.0) -> None:
        super().__init__(endpoints)
        self.transport = SyncTransport(endpoints.grpc_target, self._stub_class, connect_timeout_s, request_timeout_s)

    def _run(self, flow: Flow[T]) -> T:
        try:
            request = next(flow)
            while True:
                try:
                    answer = (self.transport.send(request) if isinstance(request, HttpRequest)
                              else self.transport.call(request))
                except (SendFailed, GrpcFailed) as failure:
                    request = flow.throw(failure)
                else:
                    request = flow.send(answer)
        except StopIteration as done:
            result: T = done.value
            return result
        except (Unavailable, Refused) as error:
            raise self._translated(error)  # noqa: B904 (the cause is set there, unless it is the error itself)

    def predict_rest(self, target: ModelVersion, body: bytes, content_type: str,
                     timeout_s: float | None = None) -> Reply:
        return self._run(self._predict_rest_flow(target, body, content_type, timeout_s))

    def predict_grpc(self, target: ModelVersion, inputs: dict[str, bytes], timeout_s: float | None = None) -> Reply:
        return self._run(self._predict_grpc_flow(target, inputs, timeout_s))

    def ping(self) -> bool:
        return self._run(self._ping_flow())

    def served_models(self) -> dict[str, set[str]]:
        return self._run(self._served_models_flow())

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]] | None:
        return self._run(self._describe_flow(model, version))

    def set_default(self, model: str, version: str) -> None:
        self._run(self._set_default_flow(model, version))

    def renew_keys(self, margin_s: float = 300.0, kinds: tuple[str, ...] = EXPIRING_KINDS) -> list[str]:
        return self._run(self._renew_keys_flow(margin_s, kinds))

    def token(self, kind: str = "inference") -> str:
        return self._run(self._token_flow(kind))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Core):
    """The asyncio client (the router): `await open()` inside the event loop, `await close()` at the end."""

    def __init__(self, endpoints: Endpoints, connect_timeout_s: float = 1.0, request_timeout_s: float = 10.0,
                 pool_size: int = 256) -> None:
        super().__init__(endpoints)
        self.transport = AsyncTransport(endpoints.grpc_target, self._stub_class, connect_timeout_s,
                                        request_timeout_s, pool_size)

    async def open(self) -> None:
        self._pb2 = protos.load("inference_pb2")  # generate and import the stubs now, not on the first request
        await self.transport.open()

    async def close(self) -> None:
        await self.transport.close()

    async def _run(self, flow: Flow[T]) -> T:
        try:
            request = next(flow)
            while True:
                try:
                    answer = await (self.transport.send(request) if isinstance(request, HttpRequest)
                                    else self.transport.call(request))
                except (SendFailed, GrpcFailed) as failure:
                    request = flow.throw(failure)
                else:
                    request = flow.send(answer)
        except StopIteration as done:
            result: T = done.value
            return result
        except (Unavailable, Refused) as error:
            raise self._translated(error)  # noqa: B904 (the cause is set there, unless it is the error itself)

    async def predict_rest(self, target: ModelVersion, body: bytes, content_type: str,
                           timeout_s: float | None = None) -> Reply:
        return await self._run(self._predict_rest_flow(target, body, content_type, timeout_s))

    async def predict_grpc(self, target: ModelVersion, inputs: dict[str, bytes],
                           timeout_s: float | None = None) -> Reply:
        return await self._run(self._predict_grpc_flow(target, inputs, timeout_s))

    async def ping(self) -> bool:
        return await self._run(self._ping_flow())

    async def served_models(self) -> dict[str, set[str]]:
        return await self._run(self._served_models_flow())

    async def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]] | None:
        return await self._run(self._describe_flow(model, version))

    async def set_default(self, model: str, version: str) -> None:
        await self._run(self._set_default_flow(model, version))

    async def renew_keys(self, margin_s: float = 300.0, kinds: tuple[str, ...] = EXPIRING_KINDS) -> list[str]:
        return await self._run(self._renew_keys_flow(margin_s, kinds))

    async def token(self, kind: str = "inference") -> str:
        return await self._run(self._token_flow(kind))

    async def renew_keys_forever(self, period_s: float = 30.0, margin_s: float = 300.0) -> None:
        """Check every `period_s` and renew keys that expire within `margin_s`, for as long as the task runs."""
        while True:
            try:
                await self.renew_keys(margin_s)
            except Exception as error:  # a background task that must outlive any one failed check
                log.warning("could not check or renew TorchServe's keys: %s", error)
            await asyncio.sleep(period_s)
