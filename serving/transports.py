"""How a TorchServe client's requests travel: blocking (requests + grpc) or asyncio (aiohttp + grpc.aio).

A transport only sends: it takes an `HttpRequest` or `GrpcRequest` built by `serving.client`, returns the
answer as it came, and turns a failure to get one into `SendFailed` (HTTP: "timeout" or "connection") or
`GrpcFailed` (any gRPC status). Deciding what an answer means is the client's job, the same for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import grpc.aio
import requests

GRPC_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20)]


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    params: Mapping[str, str] | None = None
    body: bytes | None = None
    timeout_s: float | None = None  # None: the transport's request timeout


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: Mapping[str, str]  # case-insensitive, as both HTTP libraries give them


@dataclass(frozen=True)
class GrpcRequest:
    method: str  # a method of TorchServe's InferenceAPIsService, e.g. "Predictions"
    message: Any
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float | None = None


class SendFailed(Exception):
    """No HTTP answer: kind is "timeout" or "connection"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class GrpcFailed(Exception):
    """A gRPC call ended with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"gRPC {code.name} {details}")
        self.code = code
        self.details = details


class SyncTransport:
    """A keep-alive `requests` session and a gRPC channel opened on first use."""

    def __init__(self, grpc_target: str, stub_class: Any, connect_timeout_s: float, request_timeout_s: float) -> None:
        self.grpc_target = grpc_target
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._stub_class = stub_class  # called lazily: the generated stubs are only loaded when gRPC is used
        self._session = requests.Session()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def send(self, request: HttpRequest) -> HttpResponse:
        timeout = (self.connect_timeout_s, request.timeout_s or self.request_timeout_s)
        try:
            r = self._session.request(request.method, request.url, params=request.params, data=request.body,
                                      headers=request.headers, timeout=timeout)
        except requests.Timeout as error:
            raise SendFailed("timeout", str(error)) from error
        except requests.RequestException as error:
            raise SendFailed("connection", str(error)) from error
        return HttpResponse(r.status_code, r.content, r.headers)

    def call(self, request: GrpcRequest) -> Any:
        if self._stub is None:
            self._channel = grpc.insecure_channel(self.grpc_target, options=GRPC_OPTIONS)
            self._stub = self._stub_class()(self._channel)
        try:
            return getattr(self._stub, request.method)(request.message, metadata=request.metadata,
                                                       timeout=request.timeout_s or self.request_timeout_s)
        except grpc.RpcError as error:
            raise GrpcFailed(error.code(), error.details() or "") from error

    def close(self) -> None:
        self._session.close()
        if self._channel is not None:
            self._channel.close()


class AsyncTransport:
    """A keep-alive aiohttp pool and a grpc.aio channel, opened in `open()` (inside the running event loop)."""

    def __init__(self, grpc_target: str, stub_class: Any, connect_timeout_s: float, request_timeout_s: float,
                 pool_size: int = 256) -> None:
        self.grpc_target = grpc_target
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._stub_class = stub_class
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=60, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, connect=self.connect_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        self._channel = grpc.aio.insecure_channel(self.grpc_target, options=GRPC_OPTIONS)
        self._stub = self._stub_class()(self._channel)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the TorchServe client was not opened (await client.open())")
        return self._session

    async def send(self, request: HttpRequest) -> HttpResponse:
        # The session's timeout is the request timeout; only requests with another limit build their own.
        options: dict[str, Any] = {} if request.timeout_s in (None, self.request_timeout_s) else {
            "timeout": aiohttp.ClientTimeout(total=request.timeout_s, connect=self.connect_timeout_s)}
        try:
            async with self.session.request(request.method, request.url, params=request.params, data=request.body,
                                            headers=request.headers, **options) as r:
                return HttpResponse(r.status, await r.read(), r.headers)
        except aiohttp.ConnectionTimeoutError as error:  # no connection within connect_s: unreachable, not slow
            raise SendFailed("connection", f"no connection within {self.connect_timeout_s:g} s") from error
        except TimeoutError as error:
            raise SendFailed("timeout", f"no answer within {request.timeout_s or self.request_timeout_s:g} s") \
                from error
        except aiohttp.ClientError as error:
            raise SendFailed("connection", str(error) or type(error).__name__) from error

    async def call(self, request: GrpcRequest) -> Any:
        if self._stub is None:
            raise RuntimeError("the TorchServe client was not opened (await client.open())")
        try:
            return await getattr(self._stub, request.method)(request.message, metadata=request.metadata,
                                                             timeout=request.timeout_s or self.request_timeout_s)
        except grpc.aio.AioRpcError as error:
            raise GrpcFailed(error.code(), error.details() or "") from error
