"""One PostgreSQL server of our own, for the router's shared store (router.store_postgres): initialized on its
first start in its data directory, listening on loopback only, its Unix socket in the data directory too, so it
clashes with no other server on the machine (Debian's default cluster included).

Authentication is `trust`: any local user who can reach the port is let in. That is what a test, a rehearsal or
`make cluster` on one machine needs, and why it listens on 127.0.0.1 only; a real deployment runs a managed or
properly configured server and gives the router its URL (`store.url` / ROUTER_DATABASE_URL).

PostgreSQL refuses to run as root, so as root every command runs as the `postgres` user (`runuser`), and the
data directory is handed to that user; its parent directories must let that user through.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql

from serving.errors import ServeError
from serving.instance import LOOPBACK

log = logging.getLogger(__name__)

SUPERUSER = "postgres"  # the database role initdb creates (-U), and the system user the server runs as under root
LOG_FILE = "server.log"  # in the data directory


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian puts them in /usr/lib/postgresql/<major>/bin, off the
    PATH), else the directory of an `initdb` on the PATH; None when PostgreSQL is not installed."""
    installed = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if installed:
        return max(installed, key=lambda bin_dir: int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else 0)
    found = shutil.which("initdb")
    return None if found is None else Path(found).parent


class PostgresServer:
    """A PostgreSQL server in `data_dir` on `port` (loopback). `start()` runs initdb first when the directory
    holds no cluster yet; `stop()` is a fast shutdown (open connections are ended, committed data is kept)."""

    def __init__(self, data_dir: Path, port: int, bin_dir: Path | None = None,
                 settings: Mapping[str, str] | None = None) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise ServeError("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on the PATH); "
                             "`apt-get install -y postgresql` (scripts/check_system.sh does it)")
        self.bin_dir = found
        self.data_dir = data_dir.resolve()
        self.port = port
        self.settings = dict(settings or {})  # extra server settings (-c name=value)

    @property
    def url(self) -> str:
        return self.url_for(SUPERUSER)

    def url_for(self, database: str) -> str:
        """The URL of one database on this server (the superuser's, over TCP on loopback)."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def running(self) -> bool:
        """Whether a server runs from this data directory (pg_ctl status: 0 running, 3 stopped, 4 no cluster)."""
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def start(self, timeout_s: float = 60.0) -> None:
        """Initialize the cluster if there is none, start the server and wait until it accepts connections."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._init()
        options = [f"-p {self.port}", f"-k {self.data_dir}", f"-c listen_addresses={LOOPBACK}",
                   *(f"-c {name}={value}" for name, value in self.settings.items())]
        self._pg_ctl("-o", " ".join(options), "-l", str(self.log_file), "-w", "-t", str(int(timeout_s)), "start")
        log.info("PostgreSQL started: %s (data %s)", self.url, self.data_dir)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: end the open connections, shut down cleanly); nothing to do if it is down."""
        if self.running:
            self._pg_ctl("-m", mode, "-w", "stop")
            log.info("PostgreSQL stopped (data %s)", self.data_dir)

    def restart(self, timeout_s: float = 60.0) -> None:
        self.stop()
        self.start(timeout_s)

    # --- databases -------------------------------------------------------------------------------------------------
    def create_database(self, name: str) -> str:
        """Create the database `name` unless it exists (so a second `up` changes nothing); its URL."""
        with psycopg.connect(self.url, autocommit=True) as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop the database `name` if it exists, ending the connections still open to it."""
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # --- the commands ----------------------------------------------------------------------------------------------
    def _as_server_user(self) -> list[str]:
        return ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []

    def _init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, SUPERUSER, SUPERUSER)
            closed = [parent for parent in self.data_dir.parents if not parent.stat().st_mode & 0o001]
            if closed:  # initdb would only say "Permission denied"
                raise ServeError(f"the {SUPERUSER} user cannot reach {self.data_dir}: {closed[0]} is closed to other "
                                 f"users (chmod o+x it, or choose a data directory elsewhere)")
        # C collation: the order of text is the order of its bytes, as in SQLite and Python's sorted().
        self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", SUPERUSER,
                   "-E", "UTF8", "--locale=C", "--no-sync"], "initdb")

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], f"pg_ctl {args[-1]}",
                         check=check)

    def _run(self, command: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self._as_server_user(), *command], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=120)
        if check and result.returncode != 0:
            server_log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise ServeError(f"{what} failed ({result.returncode}) for {self.data_dir}:\n"
                             f"{(result.stdout + result.stderr)[-2000:]}\n{server_log}")
        return result
