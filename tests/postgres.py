"""A scratch PostgreSQL for tests and rehearsals: `serving.postgres.PostgresServer` in a temporary directory of
its own, on a free loopback port, and a fresh database per test (CREATE DATABASE takes about 0.1 s).

    with ScratchPostgres() as postgres:          # initdb + start: about 2 s
        with postgres.database() as url:         # a new, empty database; dropped afterwards
            ...
        postgres.restart()                       # or stop() ... start(): an outage
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from serving.instance import free_ports
from serving.postgres import PostgresServer, find_bin_dir


def missing_reason() -> str | None:
    """Why no scratch server can start here (None: it can)."""
    if find_bin_dir() is None:
        return ("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on the PATH): "
                "`apt-get install -y postgresql`, as scripts/check_system.sh does")
    return None


class ScratchPostgres:
    """A PostgreSQL server that lives as long as this object: `start()` initializes it, `close()` stops it and
    deletes its files."""

    def __init__(self, port: int | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="router-pg-"))
        self.root.chmod(0o711)  # under root the server runs as `postgres`, which must reach its data directory
        self.server = PostgresServer(self.root / "data", port or free_ports(1)[0])

    @property
    def url(self) -> str:
        """The `postgres` database (for administration: each test gets a database of its own)."""
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def running(self) -> bool:
        return self.server.running

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server.restart()

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        return self.server.create_database(f"test_{uuid.uuid4().hex[:16]}")

    def drop_database(self, url: str) -> None:
        self.server.drop_database(url.rsplit("/", 1)[1])

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database for the block, dropped after it (its connections are ended)."""
        url = self.create_database()
        try:
            yield url
        finally:
            if self.running:
                self.drop_database(url)

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ScratchPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
