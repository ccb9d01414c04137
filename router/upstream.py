"""The router's one connection to TorchServe: a keep-alive HTTP pool (aiohttp) and a gRPC channel (grpc.aio),
both with explicit timeouts, authenticated with TorchServe's inference key.

The key is read from TorchServe's key file and re-read when the file changes (TorchServe rewrites it when a
key is renewed); a key close to expiry is renewed with the API key, since TorchServe never renews keys by
itself. Clients of the router never see it.

An attempt that fails in a way another arm might not (5xx, connection error, timeout) raises `AttemptFailed`;
anything else TorchServe answers (200, a 4xx about the input) is returned as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from router.config import Target, Timeouts, TorchServe
from router.errors import BadRequest, NotFound, RouterError, UpstreamUnavailable
from serving import protos
from serving.client import prediction_path
from serving.server import expires_soon

log = logging.getLogger(__name__)

AUTH_FAILED = b"Token Authorization failed"
# gRPC codes that say the target (not the request) failed: worth a retry on another arm.
GRPC_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
GRPC_PASS_THROUGH: dict[grpc.StatusCode, type[RouterError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: BadRequest}
FORWARDED_HEADERS = ("X-Batch-Size",)


class AttemptFailed(Exception):
    """One attempt on one target failed: kind is "timeout", "connection" or "server_error"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class KeyFile:
    """TorchServe's key_file.json, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Any] = {}

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError as error:
            raise UpstreamUnavailable(f"TorchServe's key file {self.path} does not exist: is TorchServe running?",
                                      retry_after_s=5) from error
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                keys = json.loads(self.path.read_text())
                missing = [kind for kind in ("inference", "management", "API") if "key" not in keys.get(kind, {})]
                if missing:
                    raise KeyError(f"no {missing[0]} key")
            except (ValueError, KeyError, TypeError, OSError) as error:
                # TorchServe may be rewriting the file right now: keep the last good keys and read it again later.
                if not self._keys:
                    raise UpstreamUnavailable(f"TorchServe's key file {self.path} is unreadable: {error!r}",
                                              retry_after_s=1) from error
                return
            self._keys, self._stamp = keys, stamp

    def key(self, kind: str = "inference") -> str:
        self._refresh()
        return str(self._keys[kind]["key"])

    def expires_soon(self, kind: str, margin_s: float) -> bool:
        self._refresh()
        return expires_soon(self._keys[kind].get("expiration time"), margin_s)

    def forget(self) -> None:
        self._stamp = None


class TorchServeClient:
    def __init__(self, torchserve: TorchServe, timeouts: Timeouts, pool_size: int = 256) -> None:
        self.torchserve = torchserve
        self.timeouts = timeouts
        self.keys = KeyFile(torchserve.key_file)
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._pb2 = protos.load("inference_pb2")

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=60, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=self.timeouts.request_s, connect=self.timeouts.connect_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        self._channel = grpc.aio.insecure_channel(self.torchserve.grpc_target, options=[
            ("grpc.keepalive_time_ms", 30_000), ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20)])
        self._stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(self._channel)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("TorchServeClient.open() was not called")
        return self._session

    def _authorization(self, kind: str = "inference") -> str:
        return f"Bearer {self.keys.key(kind)}"

    # --- inference ---------------------------------------------------------------------------------------------
    async def predict_rest(self, target: Target, body: bytes, content_type: str, timeout_s: float) -> Reply:
        url = self.torchserve.inference_url + prediction_path(target.model, target.version)
        # The session's timeout is the request timeout; only shadow copies need their own.
        options: dict[str, Any] = {} if timeout_s == self.timeouts.request_s else {
            "timeout": aiohttp.ClientTimeout(total=timeout_s, connect=self.timeouts.connect_s)}
        for attempt in range(2):
            headers = {"Authorization": self._authorization(), "Content-Type": content_type}
            try:
                async with self.session.post(url, data=body, headers=headers, **options) as r:
                    data = await r.read()
                    status, reply_type = r.status, r.headers.get("Content-Type", "application/json")
                    forwarded = tuple((name, r.headers[name]) for name in FORWARDED_HEADERS if name in r.headers)
            except TimeoutError as error:
                raise AttemptFailed("timeout", f"{target} did not answer within {timeout_s:g} s") from error
            except aiohttp.ClientError as error:
                raise AttemptFailed("connection", f"{target}: {error}") from error
            if status == 400 and AUTH_FAILED in data and attempt == 0:
                self.keys.forget()  # the key was renewed under us: read the file again and retry once
                continue
            if status >= 500:
                raise AttemptFailed("server_error", f"{target} answered HTTP {status}: {_snippet(data)}")
            return Reply(status, data, reply_type, forwarded)
        raise UpstreamUnavailable("TorchServe refused the router's inference key (is the key file current?)")

    async def predict_grpc(self, target: Target, inputs: dict[str, bytes], timeout_s: float) -> Reply:
        request = self._pb2.PredictionsRequest(model_name=target.model, model_version=target.version or "",
                                               input=inputs)
        for attempt in range(2):
            try:
                response = await self._stub.Predictions(request, timeout=timeout_s,
                                                        metadata=(("authorization", self._authorization()),))
                return Reply(200, bytes(response.prediction))
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code == grpc.StatusCode.PERMISSION_DENIED and attempt == 0:
                    self.keys.forget()
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise AttemptFailed("timeout", f"{target} did not answer within {timeout_s:g} s") from error
                if code in GRPC_FAILURES:
                    raise AttemptFailed("server_error" if code != grpc.StatusCode.UNAVAILABLE else "connection",
                                        f"{target}: gRPC {code.name} {error.details()}") from error
                raise GRPC_PASS_THROUGH.get(code, UpstreamUnavailable)(
                    f"TorchServe: {error.details() or code.name}") from error
        raise UpstreamUnavailable("TorchServe refused the router's inference key (is the key file current?)")

    async def ping(self) -> bool:
        try:
            async with self.session.get(f"{self.torchserve.inference_url}/ping",
                                        headers={"Authorization": self._authorization()},
                                        timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200 and (await response.json()).get("status") == "Healthy"
        except (aiohttp.ClientError, TimeoutError, ValueError, RouterError):
            return False

    # --- management (model list for validation, key renewal) --------------------------------------------------
    async def served_models(self) -> dict[str, set[str]]:
        """{model: {versions}} that TorchServe serves, from its management API."""
        try:
            return await self._served_models()
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as error:
            raise UpstreamUnavailable(f"TorchServe's management API at {self.torchserve.management_url} "
                                      f"did not list its models: {error!r}", retry_after_s=5) from error

    async def _served_models(self) -> dict[str, set[str]]:
        headers = {"Authorization": self._authorization("management")}
        base = self.torchserve.management_url
        async with self.session.get(f"{base}/models", params={"limit": "1000"}, headers=headers) as response:
            if response.status != 200:
                raise UpstreamUnavailable(f"TorchServe's management API answered HTTP {response.status}")
            names = [model["modelName"] for model in (await response.json())["models"]]
        served: dict[str, set[str]] = {}
        for name in names:
            async with self.session.get(f"{base}/models/{name}/all", headers=headers) as response:
                served[name] = {str(entry["modelVersion"]) for entry in await response.json()}
        return served

    async def renew_keys(self, margin_s: float = 300.0) -> None:
        """Renew the inference and management keys when they expire within `margin_s`."""
        for kind in ("inference", "management"):
            if not self.keys.expires_soon(kind, margin_s):
                continue
            async with self.session.post(f"{self.torchserve.management_url}/token", params={"type": kind},
                                         headers={"Authorization": self._authorization("API")}) as response:
                if response.status == 200:
                    log.info("renewed TorchServe's %s key", kind)
                    self.keys.forget()
                else:
                    log.error("renewing TorchServe's %s key failed: HTTP %d", kind, response.status)

    async def renew_keys_forever(self, period_s: float = 30.0) -> None:
        while True:
            try:
                await self.renew_keys()
            except (aiohttp.ClientError, TimeoutError, RouterError, KeyError, ValueError) as error:
                log.warning("could not check TorchServe's key expiry: %s", error)
            await asyncio.sleep(period_s)


def _snippet(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit]
