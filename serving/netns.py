"""Hosts of their own on one machine: a network namespace per host, joined to this one by a veth pair.

A process started inside the namespace (`ip netns exec NAME ...`) has its own network stack: it can bind only
the address on its end of the link, and it is reachable only over that link. So the cluster rehearsal
(`serving.cluster`) can do to a TorchServe host what a network does to a machine: cut the link (the host stops
answering: packets go nowhere, established connections hang until their timeouts) and restore it.

Each link is a /30 in 10.231.0.0/16, used only on links made here and removed by `destroy`. Needs root
(`ip netns add`), as CI and these machines have.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

from serving.errors import ServeError

log = logging.getLogger(__name__)

PREFIX = "10.231"  # 10.231.<index>.1 on this side, .2 in the namespace


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise ServeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Link:
    """A namespace `name` and the veth pair that joins it to this one."""

    name: str
    index: int  # 1-254: the third byte of the link's addresses

    def __post_init__(self) -> None:
        if not 1 <= self.index <= 254 or len(self.name) > 12:
            raise ServeError(f"a link needs an index in 1-254 and a name of at most 12 characters: {self}")

    @property
    def host_address(self) -> str:
        return f"{PREFIX}.{self.index}.2"

    @property
    def root_address(self) -> str:
        return f"{PREFIX}.{self.index}.1"

    @property
    def host_device(self) -> str:
        return f"{self.name}-h"

    @property
    def root_device(self) -> str:
        return f"{self.name}-r"

    def exists(self) -> bool:
        listed = _ip("netns", "list", check=False).stdout.split()
        return self.name in listed

    def create(self) -> None:
        """The namespace, the pair and the addresses, links up (nothing is left behind if a step fails)."""
        if os.geteuid() != 0:
            raise ServeError("network namespaces need root (ip netns add)")
        self.destroy()  # a namespace left over by a killed run
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.root_device, "type", "veth", "peer", "name", self.host_device)
            _ip("link", "set", self.host_device, "netns", self.name)
            _ip("addr", "add", f"{self.root_address}/30", "dev", self.root_device)
            _ip("link", "set", self.root_device, "up")
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_device, netns=self.name)
            _ip("link", "set", self.host_device, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
        except ServeError:
            self.destroy()
            raise
        log.info("host %s: %s over %s", self.name, self.host_address, self.root_device)

    def destroy(self) -> None:
        """Remove the pair and the namespace (each only if it exists)."""
        _ip("link", "del", self.root_device, check=False)  # deletes both ends
        if self.exists():
            _ip("netns", "del", self.name)

    def cut(self) -> None:
        """Take the host's end of the link down: what it was sent is lost, and it sends nothing back."""
        _ip("link", "set", self.host_device, "down", netns=self.name)
        log.warning("host %s cut off", self.name)

    def restore(self) -> None:
        _ip("link", "set", self.host_device, "up", netns=self.name)
        log.warning("host %s reconnected", self.name)
