"""Several TorchServe hosts behind the arms (router.hosts): the configuration forms, the host choice, and the pool
against the real TorchServe beside hosts that refuse connections or accept them and never answer."""

from __future__ import annotations

import asyncio
import collections
import random
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from router.config import CircuitBreakerSettings, Host, Resolve, Target, Timeouts, TorchServe, parse_config
from router.errors import ConfigError
from router.hosts import TorchServeHosts
from router.metrics import Metrics
from router.request import REST, InferenceRequest
from router.routing import choose_host
from router.upstream import AttemptFailed
from serving.instance import free_ports
from tests.conftest import encode_image
from tests.test_router import launch
from tests.test_store import until

EXPERIMENT = {"arms": {"a": {"model": "m", "weight": 1}}}


def parsed(torchserve: Any) -> TorchServe:
    return parse_config({"experiments": {"e": EXPERIMENT}, "torchserve": torchserve}).torchserve


def test_one_host_a_list_or_a_dns_name() -> None:
    single = parsed({"inference_url": "http://127.0.0.1:9080", "key_file": None})
    assert single.hosts == (Host(inference_url="http://127.0.0.1:9080", key_file=None),)
    assert single.hosts[0].name == "127.0.0.1:9080"
    listed = parsed({"hosts": [{"inference_url": "http://10.0.0.2:8080", "management_url": "http://10.0.0.2:8081",
                                "grpc_target": "10.0.0.2:7070", "key_file": "a/key_file.json"},
                               {"inference_url": "http://10.0.0.3:8080", "management_url": "http://10.0.0.3:8081",
                                "grpc_target": "10.0.0.3:7070", "key_file": None}]})
    assert [host.name for host in listed.hosts] == ["10.0.0.2:8080", "10.0.0.3:8080"]
    assert listed.hosts[0].key_file == Path("a/key_file.json") and listed.hosts[1].key_file is None
    resolved = parsed({"resolve": {"name": "torchserve.models.svc", "inference_port": 8080, "every_s": 5}})
    assert resolved.hosts == () and resolved.resolve == Resolve("torchserve.models.svc", every_s=5.0)
    assert resolved.resolve.host("10.1.2.3") == Host("http://10.1.2.3:8080", "http://10.1.2.3:8081", "10.1.2.3:7070",
                                                     None)
    assert resolved.resolve.host("fd00::5").inference_url == "http://[fd00::5]:8080"
    assert parsed(None).hosts == (Host(),)  # nothing said: TorchServe's defaults on loopback


HOST = {"inference_url": "http://h:1", "management_url": "http://h:2", "grpc_target": "h:3", "key_file": None}


@pytest.mark.parametrize(("torchserve", "message"), [
    ({"hosts": [], "key_file": None}, "not hosts and key_file"),
    ({"hosts": []}, "torchserve.hosts: needs a list of at least one host"),
    ({"hosts": [HOST, HOST]}, "a host is listed twice"),
    ({"hosts": [{**HOST, "inference_url": "h:1"}]}, "torchserve.hosts[0].inference_url: must be an http(s) URL"),
    ({"hosts": [{"inference_url": "http://h:1", "management_url": "http://h:2", "grpc_target": "h:3"}]},
     "torchserve.hosts[0]: missing key 'key_file'"),
    ({"hosts": [{"inference_urls": "http://h:1"}]}, "torchserve.hosts[0]: unknown key 'inference_urls'"),
    ({"resolve": {"inference_port": 8080}}, "torchserve.resolve: missing key 'name'"),
    ({"resolve": {"name": "ts", "grpc_port": 70000}}, "torchserve.resolve.grpc_port: must be a number"),
])
def test_host_mistakes_are_named(torchserve: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parsed(torchserve)


def test_the_less_busy_of_two_random_hosts() -> None:
    rng = random.Random(0)
    assert choose_host(set(), {}, rng) is None
    assert choose_host({"a"}, {"a": 99}, rng) == "a"
    # With two hosts both are always drawn: the less busy one wins.
    assert all(choose_host({"a", "b"}, {"a": 3, "b": 1}, rng) == "b" for _ in range(50))
    # Equal loads spread evenly.
    picks = collections.Counter(choose_host({"a", "b", "c"}, {}, rng) for _ in range(3000))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 800
    # The busiest of three is picked only when drawn with... nobody less busy: never.
    assert "c" not in {choose_host({"a", "b", "c"}, {"a": 0, "b": 0, "c": 5}, rng) for _ in range(200)}


class Blackhole:
    """A TCP port that accepts connections and never answers: a host that stopped answering."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.socket = socket.create_server((address, port))
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def dead_host() -> Host:
    """Ports nothing listens on: every connection is refused."""
    inference, management, grpc_port = free_ports(3)
    return Host(f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}", f"127.0.0.1:{grpc_port}", None)


def silent_host(hole: Blackhole) -> Host:
    url = f"http://127.0.0.1:{hole.port}"
    return Host(url, url, f"127.0.0.1:{hole.port}", None)


def live_host(instance: Any) -> Host:
    return Host(instance.inference_url, instance.management_url, instance.grpc_target, instance.key_file)


def run_pool(hosts: tuple[Host, ...], work: Any, failures: int = 3, request_s: float = 0.5) -> Any:
    async def main() -> Any:
        metrics = Metrics()
        pool = TorchServeHosts(TorchServe(hosts), Timeouts(connect_s=0.5, request_s=request_s),
                               CircuitBreakerSettings(failures=failures, reset_s=30), metrics, random.Random(1))
        await pool.open()
        try:
            return await work(pool, metrics)
        finally:
            await pool.close()

    return asyncio.run(main())


def attempts(metrics: Metrics, host: Host, outcome: str) -> float:
    value = metrics.registry.get_sample_value("router_host_attempts_total", {"host": host.name, "outcome": outcome})
    return value or 0.0


@pytest.mark.router
def test_requests_go_around_a_refusing_and_a_silent_host(torchserve: Any, blackhole: Blackhole,
                                                         test_images: Any) -> None:
    """Every request is answered by the live host: a failed attempt is retried on another host, and after
    `failures` in a row each bad host is out — the refusing one as a host, the silent one (it accepts connections
    and never answers: stuck, as far as we can tell) for this model — so later requests no longer pay for it."""
    live, dead, silent = live_host(torchserve), dead_host(), silent_host(blackhole)
    images, _ = test_images
    request = InferenceRequest("fashion-int8", REST, body=encode_image(images[0]), content_type="image/png")
    target = Target("fashion-int8", "1.0")

    async def work(pool: TorchServeHosts, metrics: Metrics) -> dict[str, Any]:
        replies = [await pool.infer(target, request, 0.5) for _ in range(30)]
        return {"statuses": {reply.status for reply in replies}, "labels": {reply.json()["label"] for reply in replies},
                "described": pool.describe(),
                "dead_refused": attempts(metrics, dead, "connection"), "silent_timeouts": attempts(metrics, silent,
                                                                                                   "timeout"),
                "live_ok": attempts(metrics, live, "ok"), "served": await pool.served_models(),
                "ready": await pool.ping()}

    outcome = run_pool((live, dead, silent), work)
    assert outcome["statuses"] == {200} and len(outcome["labels"]) == 1
    assert outcome["live_ok"] == 30
    # Each bad host failed exactly `failures` times, then its circuit kept it out.
    assert outcome["dead_refused"] == 3 and outcome["silent_timeouts"] == 3
    described = outcome["described"]
    assert described[dead.name]["circuit"] == "open"
    assert described[silent.name]["circuit"] == "closed" and described[silent.name]["models_out"] == [str(target)]
    assert described[live.name] == {"circuit": "closed", "in_flight": 0, "models_out": []}
    assert "fashion-int8" in outcome["served"] and outcome["ready"]  # the hosts that answer decide


@pytest.mark.router
def test_no_host_left_fails_the_attempt_for_the_core(blackhole: Blackhole) -> None:
    """With every host failing, the pool raises AttemptFailed (the core then tries another arm): each host is
    tried at most once per attempt, each within the stated timeout."""
    dead, silent = dead_host(), silent_host(blackhole)
    request = InferenceRequest("m", REST, body=b"x", content_type="image/png")

    async def work(pool: TorchServeHosts, metrics: Metrics) -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        kinds = []
        started = loop.time()
        for _ in range(4):
            with pytest.raises(AttemptFailed) as failed:
                await pool.infer(Target("m"), request, 0.3)
            kinds.append(failed.value.kind)
        return kinds, loop.time() - started

    kinds, elapsed = run_pool((dead, silent), work, failures=100, request_s=0.3)
    assert set(kinds) <= {"connection", "timeout"} and "timeout" in kinds
    assert elapsed < 4 * (0.3 + 0.3) + 1.0  # both hosts per attempt, each bounded by its timeout


@pytest.mark.router
def test_a_router_with_a_dead_host_answers_everything_and_shows_its_hosts(torchserve: Any, tmp_path: Path,
                                                                           test_images: Any) -> None:
    from router import process

    dead = dead_host()
    hosts = [{"inference_url": torchserve.inference_url, "management_url": torchserve.management_url,
              "grpc_target": torchserve.grpc_target, "key_file": str(torchserve.key_file)},
             {"inference_url": dead.inference_url, "management_url": dead.management_url,
              "grpc_target": dead.grpc_target, "key_file": None}]
    experiments = {"fashion": {"control": "int8", "arms": {"int8": {"model": "fashion-int8", "version": "1.0",
                                                                    "weight": 1}}}}
    stack = launch(torchserve, tmp_path, experiments, torchserve={"hosts": hosts})
    try:
        images, _ = test_images
        body = encode_image(images[0])
        statuses = collections.Counter(stack.predict("fashion", body).status_code for _ in range(20))
        grpc_answer, _ = stack.grpc_predict("fashion", body)
        described = requests.get(f"{stack.url}/admin/experiments", headers=stack.admin(), timeout=10).json()
    finally:
        process.stop(stack.config_path)
    assert statuses == {200: 20}
    assert "label" in grpc_answer
    # failures: 2, reset_s: 1 in launch's settings: taken out, and at most on probation since
    assert described["hosts"][dead.name]["circuit"] in ("open", "half-open")
    assert described["hosts"][live_host(torchserve).name]["circuit"] == "closed"


class Resolver:
    """What a DNS name resolves to, changed by the test: the event loop's getaddrinfo, as `router.hosts` calls it.
    None: the lookup fails (a DNS outage)."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.addresses: list[str] | None = addresses
        self.lookups = 0

    async def getaddrinfo(self, host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        assert host == self.name and kwargs.get("type") == socket.SOCK_STREAM
        self.lookups += 1
        if self.addresses is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in self.addresses]


@pytest.mark.router
def test_hosts_follow_what_a_dns_name_resolves_to() -> None:
    """A name's addresses become the hosts (looked up again every `every_s`): a new address is added, one that is
    gone is retired — its client closed, its metrics dropped, but only once the attempt it is answering is over —
    and a failed lookup keeps the hosts there are. Addresses on loopback, all with the same ports, as the pods
    behind a headless Service: 127.0.0.5 accepts connections and never answers, the others refuse them."""
    inference, management, grpc_port = free_ports(3)
    silent = Blackhole("127.0.0.5", inference)
    resolve = Resolve("torchserve.test", inference, management, grpc_port, every_s=0.05)
    resolver = Resolver(resolve.name, ["127.0.0.2", "127.0.0.5"])
    request = InferenceRequest("m", REST, body=b"x", content_type="image/png")

    async def looked_up_again() -> None:
        """Until a lookup made after now has been followed: the one after it has begun (they run one by one)."""
        lookups = resolver.lookups
        await until(lambda: resolver.lookups >= lookups + 2, timeout_s=2)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.getaddrinfo = resolver.getaddrinfo  # type: ignore[method-assign]
        metrics = Metrics()
        pool = TorchServeHosts(TorchServe(hosts=(), resolve=resolve), Timeouts(connect_s=0.5, request_s=1.0),
                               CircuitBreakerSettings(failures=100, reset_s=30), metrics, random.Random(1))
        await pool.open()
        following = asyncio.create_task(pool.resolve_forever())
        seen: dict[str, Any] = {"opened": sorted(pool.hosts), "count": metrics.registry.get_sample_value(
            "router_hosts")}
        try:
            gone = pool.hosts[f"127.0.0.5:{inference}"]
            # Each attempt tries both hosts (failures: 100 keeps every circuit closed): one refuses, one times out.
            with pytest.raises(AttemptFailed):
                await pool.infer(Target("m"), request, 0.05)
            seen["silent_counted"] = attempts(metrics, gone.host, "timeout")
            # The next holds the silent host while the name stops resolving to it.
            hanging = asyncio.create_task(pool.infer(Target("m"), request, 1.0))
            await until(lambda: gone.in_flight == 1, timeout_s=2)  # an attempt in flight on the silent host
            resolver.addresses = ["127.0.0.2", "127.0.0.3"]
            await looked_up_again()
            seen["moved"] = sorted(pool.hosts)
            seen["retired_open"] = gone.retired and not gone.client.transport.session.closed
            with pytest.raises(AttemptFailed):
                await hanging
            seen["retired_closed"] = gone.client.transport.session.closed and not pool._retired
            seen["gone_metrics"] = attempts(metrics, gone.host, "timeout")
            resolver.addresses = None
            await looked_up_again()
            seen["kept"] = sorted(pool.hosts)
            resolver.addresses = ["127.0.0.3"]
            await looked_up_again()
            seen["last"] = sorted(pool.hosts)
            seen["count_last"] = metrics.registry.get_sample_value("router_hosts")
        finally:
            following.cancel()
            await pool.close()
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        silent.close()
    names = {address: f"{address}:{inference}" for address in ("127.0.0.2", "127.0.0.3", "127.0.0.5")}
    assert seen["opened"] == [names["127.0.0.2"], names["127.0.0.5"]] and seen["count"] == 2
    assert seen["silent_counted"] == 1
    assert seen["moved"] == [names["127.0.0.2"], names["127.0.0.3"]]
    assert seen["retired_open"], "a retired host was closed under its attempt in flight"
    assert seen["retired_closed"], "a retired host was not closed after its last attempt"
    assert seen["gone_metrics"] == 0, "a retired host's metrics outlived it (its last attempt counted again)"
    assert seen["kept"] == seen["moved"], "a failed lookup changed the hosts"
    assert seen["last"] == [names["127.0.0.3"]] and seen["count_last"] == 1


@pytest.mark.router
def test_a_real_name_resolves_to_hosts() -> None:
    """The system's resolver, not a stand-in: localhost becomes a host on 127.0.0.1 with the name's ports."""
    resolve = Resolve("localhost", *free_ports(3))

    async def main() -> list[str]:
        pool = TorchServeHosts(TorchServe(hosts=(), resolve=resolve), Timeouts(), CircuitBreakerSettings())
        await pool.open()
        try:
            return sorted(pool.hosts)
        finally:
            await pool.close()

    assert f"127.0.0.1:{resolve.inference_port}" in asyncio.run(main())
