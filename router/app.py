"""Run the router: REST (aiohttp) and gRPC (grpc.aio) in one asyncio loop, with the background tasks that
follow the experiment file, check the guardrails and renew TorchServe's keys. SIGTERM/SIGINT stop it cleanly:
in-flight requests finish, queued log rows are committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

import grpc
import uvloop
from aiohttp import web

from router import grpc_service
from router.config import RouterConfig, load_config
from router.core import Router
from router.errors import RouterError, UpstreamUnavailable
from router.hosts import TorchServeHosts
from router.metrics import Metrics
from router.rest import RestFrontEnd
from router.store import StoreError, open_store
from router.tokens import load_tokens

log = logging.getLogger(__name__)


async def wait_for_targets(router: Router, config: RouterConfig, timeout_s: float) -> None:
    """Check every arm against TorchServe's model list, waiting up to `timeout_s` for TorchServe to answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await router.catalog.validate(config)
            return
        except (UpstreamUnavailable, OSError) as error:
            if time.monotonic() > deadline:
                raise UpstreamUnavailable(f"no TorchServe host's management API answered within {timeout_s:g} s: "
                                          f"{error}") from error
            await asyncio.sleep(1.0)


async def serve(config_path: Path, wait_s: float = 60.0) -> None:
    config = load_config(config_path)
    tokens = load_tokens(config.tokens_file)
    metrics = Metrics()
    store = open_store(config)  # first: a database that cannot be reached fails the start before anything opens
    client = TorchServeHosts(config.torchserve, config.timeouts, config.circuit_breaker, metrics)
    router: Router | None = None
    runner: web.AppRunner | None = None
    grpc_server: grpc.aio.Server | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await client.open()
        router = Router(config, client, store, metrics)
        metrics.watch_store(store)
        # Followed from the start: a Service's addresses may appear only after the router has started.
        tasks.append(asyncio.create_task(client.resolve_forever()))
        await wait_for_targets(router, config, wait_s)
        runner = web.AppRunner(RestFrontEnd(router, tokens).app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, config.listen.host, config.listen.rest_port, backlog=1024,
                          reuse_port=config.listen.reuse_port).start()
        grpc_server = grpc_service.server(config, router, tokens)
        if grpc_server.add_insecure_port(f"{config.listen.host}:{config.listen.grpc_port}") == 0:
            raise OSError(f"cannot listen on {config.listen.host}:{config.listen.grpc_port} (gRPC)")
        await grpc_server.start()
        tasks += [asyncio.create_task(coroutine) for coroutine in (
            router.control.watch_config(), router.control.follow_store(), router.guardrail.run_forever(),
            client.renew_keys_forever())]
        log.info("router listening on http://%s:%d (REST) and %s:%d (gRPC); experiments: %s; TorchServe hosts: %s; "
                 "store: %s", config.listen.host, config.listen.rest_port, config.listen.host, config.listen.grpc_port,
                 ", ".join(config.experiments), ", ".join(client.hosts) or "none yet", config.store.backend)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        for task in tasks:
            task.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        if runner is not None:
            await runner.cleanup()
        if router is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(router.shadows.drain(), timeout=config.timeouts.shadow_s)
        await client.close()
        store.close()
        log.info("router stopped")


def run(config_path: Path, wait_s: float = 60.0) -> int:
    try:
        # uvloop's event loop (libuv) spends far less CPU per request than asyncio's: on a machine whose cores
        # also run TorchServe, the router's CPU is throughput taken from inference.
        uvloop.run(serve(config_path, wait_s))
    except RouterError as error:
        log.error("%s", error.message)
        return 1
    except (OSError, StoreError) as error:  # a port taken, the request log's database unreachable
        log.error("cannot start the router: %s", error)
        return 1
    return 0
