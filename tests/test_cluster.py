"""The pieces of `make cluster` that a test can check quickly: the replicas' experiment file is rendered from the
repository's, and a host in a network namespace can really be cut off and reconnected (the rehearsal itself,
`python -m loadtest.rehearsal`, takes minutes and is run by `make cluster`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from router.config import POSTGRESQL, load_config
from serving.cluster import EXPERIMENTS_FILE, LINKS, ROUTER_REST_PORT, Cluster
from serving.netns import Link


def test_the_replicas_file_is_the_repository_file_with_hosts_store_and_shared_ports(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    config = load_config(cluster.render_router_config())
    repository = load_config(EXPERIMENTS_FILE)
    assert config.experiments == repository.experiments  # one source of truth for what is routed
    assert config.experiments_digest == repository.experiments_digest  # so overrides would carry over
    assert config.sticky_header == repository.sticky_header and config.override_header == repository.override_header
    assert [host.inference_url for host in config.torchserve.hosts] == [
        f"http://{link.host_address}:8080" for link in LINKS]
    assert all(host.key_file is not None and host.key_file.parent.name.startswith("ts-")
               for host in config.torchserve.hosts)  # keys per host: each TorchServe's own key file
    assert config.store.backend == POSTGRESQL and config.store.url is None  # the URL comes from the environment
    assert config.listen.reuse_port and config.listen.rest_port == ROUTER_REST_PORT
    assert config.tokens_file == tmp_path / "tokens.json"
    assert config.timeouts.request_s <= 2 and config.circuit_breaker.failures == 3


ECHO = """
import socket, sys, threading
def answer(connection):
    with connection:
        connection.sendall(connection.recv(64))
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:  # a connection stuck behind the cut must not keep the next one waiting
    threading.Thread(target=answer, args=(server.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def link() -> Iterator[Link]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    made = Link("tskit-test", 250)
    made.create()
    yield made
    made.destroy()


def echo(address: str, port: int, timeout_s: float) -> bytes:
    with socket.create_connection((address, port), timeout=timeout_s) as connection:
        connection.sendall(b"ping")
        return connection.recv(64)


def test_a_host_in_its_namespace_can_be_cut_off_and_reconnected(link: Link) -> None:
    port = 9999
    server = subprocess.Popen(["ip", "netns", "exec", link.name, sys.executable, "-c", ECHO, link.host_address,
                               str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert echo(link.host_address, port, 1.0) == b"ping"
                break
            except OSError:
                assert time.monotonic() < deadline, "the echo server in the namespace never answered"
                time.sleep(0.1)
        with pytest.raises(OSError):  # the address exists only in the namespace: not on this side's loopback
            echo("127.0.0.1", port, 0.5)
        established = socket.create_connection((link.host_address, port), timeout=1.0)
        link.cut()
        started = time.monotonic()
        with pytest.raises(OSError):  # cut off: what is sent is lost, and nothing comes back
            established.sendall(b"ping")
            established.recv(64)
        assert time.monotonic() - started >= 0.9  # it hung until our timeout, it was not refused
        established.close()
        with pytest.raises(OSError):
            echo(link.host_address, port, 1.0)
        link.restore()
        assert echo(link.host_address, port, 2.0) == b"ping"
    finally:
        server.kill()
        server.wait()
    link.destroy()
    assert not link.exists()
    assert link.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def test_the_cluster_file_names_no_address_beyond_its_own_links(tmp_path: Path) -> None:
    """Loopback for the routers and PostgreSQL, the namespaces' own addresses for the hosts: nothing else."""
    document = yaml.safe_load(Cluster(tmp_path).render_router_config().read_text())
    assert document["listen"]["host"] == "127.0.0.1"
    hosts = {urlsplit(url).hostname for host in document["torchserve"]["hosts"]
             for url in (host["inference_url"], host["management_url"])}
    assert hosts == {link.host_address for link in LINKS}
    assert Cluster(tmp_path).database_url.startswith("postgresql://postgres@127.0.0.1:")
