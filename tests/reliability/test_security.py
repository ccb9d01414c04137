"""Secure by default, checked on the running processes: nothing listens beyond loopback, and no token —
TorchServe's keys or the router's — is written to any log."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from loadtest.workload import children
from serving import server
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by these processes (from /proc/net/tcp{,6})."""
    owned = set().union(*(socket_inodes(pid) for pid in pids))
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owned:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            if family == socket.AF_INET:
                address = socket.inet_ntop(family, raw[::-1])
            else:  # four little-endian 32-bit words
                address = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.add((address, int(port_hex, 16)))
    return found


def test_nothing_listens_beyond_loopback(stack: Stack) -> None:  # noqa: F811 (the imported fixture)
    frontend = server.running_pid(stack.torchserve)
    assert frontend is not None
    router_pid = int((stack.log_file.parent / "router.pid").read_text())
    listening = listening_addresses([frontend, *children(frontend), router_pid])
    ports = stack.torchserve.ports
    expected = {ports.inference, ports.management, ports.metrics, ports.grpc_inference, ports.grpc_management,
                int(stack.url.rsplit(":", 1)[1]), int(stack.grpc_target.rsplit(":", 1)[1])}
    assert expected <= {port for _, port in listening}  # the check sees what it must see
    # Java listens on IPv6 sockets bound to the IPv4-mapped loopback address (::ffff:127.0.0.1): loopback too
    outside = [(address, port) for address, port in listening if not is_loopback(address)]
    assert not outside, f"listening beyond loopback: {outside}"


def is_loopback(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return parsed.is_loopback or (mapped is not None and mapped.is_loopback)


def test_no_token_reaches_any_log(stack: Stack) -> None:  # noqa: F811
    keys = stack.torchserve._read_keys()
    secrets = [keys[kind]["key"] for kind in ("inference", "management", "API")]
    secrets += [stack.client_token, stack.admin_token]
    logs = [*stack.torchserve.run_dir.joinpath("logs").rglob("*.log"), stack.log_file]
    assert logs and all(path.is_file() for path in logs)
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = [secret[:6] + "…" for secret in secrets if secret in text]
        assert not leaked, f"{path} contains tokens {leaked}"
