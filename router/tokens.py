"""The router's own bearer tokens: one for clients (inference, feedback), one for admins (control endpoints).

They live in `<state_dir>/tokens.json` (mode 0600), created with random values on first start and kept across
restarts so clients keep working; `ROUTER_CLIENT_TOKEN` / `ROUTER_ADMIN_TOKEN` override them (a Kubernetes
Secret, say). They are never logged. TorchServe's own keys stay inside the router.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

CLIENT_ENV = "ROUTER_CLIENT_TOKEN"
ADMIN_ENV = "ROUTER_ADMIN_TOKEN"
CLIENT, ADMIN = "client", "admin"


@dataclass(frozen=True)
class Tokens:
    client: str
    admin: str

    def role(self, presented: str | None) -> str | None:
        """ADMIN, CLIENT, or None for a missing or unknown token. The admin token may also send requests."""
        if presented is None:
            return None
        if _same(presented, self.admin):
            return ADMIN
        return CLIENT if _same(presented, self.client) else None


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (or gRPC metadata), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def load_tokens(path: Path) -> Tokens:
    """The tokens in `path`, created (mode 0600) with random values if missing. Replicas that share the file and
    start together agree: the file appears whole, at once, and the first one written stands."""
    stored: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    if not stored.get("client") or not stored.get("admin"):
        completed = {"client": stored.get("client") or secrets.token_urlsafe(32),
                     "admin": stored.get("admin") or secrets.token_urlsafe(32)}
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(completed, handle, indent=2)
        try:
            if stored:
                os.replace(draft, path)  # completing a file that lacked a token
            else:
                os.link(draft, path)  # a new file: fails if another replica's came first
        except FileExistsError:
            completed = json.loads(path.read_text())
        finally:
            draft.unlink(missing_ok=True)
        stored = completed
    return Tokens(os.environ.get(CLIENT_ENV) or stored["client"], os.environ.get(ADMIN_ENV) or stored["admin"])
