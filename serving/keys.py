"""TorchServe's key file (`key_file.json`, written into its working directory when token authorization is on):
the inference, management and API keys, read once and read again only when the file changes.

TorchServe rewrites the file when a key is renewed (`POST /token?type=...` with the API key); inference and
management keys expire after `token_expiration_min` and TorchServe never renews them by itself, so a client
asks which keys expire soon (`expiring`) and renews those.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

KINDS = ("inference", "management", "API")
EXPIRING_KINDS = ("inference", "management")  # the API key does not expire


class KeyFileError(Exception):
    """The key file is missing (TorchServe is not running) or unreadable; `retry_after_s` says when to look again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def expires_soon(expiration: str | None, margin_s: float = 60.0) -> bool:
    """Whether a key file's "expiration time" (ISO 8601, e.g. "2026-11-30T19:18:00.123Z") is within `margin_s`."""
    if not expiration:
        return False
    expires = datetime.datetime.fromisoformat(expiration.replace("Z", "+00:00"))
    return expires.timestamp() - time.time() < margin_s


class KeyFile:
    """The keys in one key file, re-read when its modification time or size changes.

    The file is looked at (one stat) at most every `recheck_s`: on the router's hot path a stat per request
    costs more than the rest of reading the key. A key renewed by someone else in between is caught sooner by
    its refusal: the client then calls `forget()` and tries once more.
    """

    def __init__(self, path: Path, recheck_s: float = 1.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self._keys: dict[str, Any] = {}

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._stamp is not None and now < self._next_check:
            return
        self._next_check = now + self.recheck_s
        try:
            stat = os.stat(self.path)
        except FileNotFoundError as error:
            raise KeyFileError(f"TorchServe's key file {self.path} does not exist: is TorchServe running?",
                               retry_after_s=5) from error
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            keys = json.loads(self.path.read_text())
            missing = [kind for kind in KINDS if "key" not in keys.get(kind, {})]
            if missing:
                raise KeyError(f"no {missing[0]} key")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
            # TorchServe may be rewriting the file right now: keep the last good keys and read it again next time.
            if not self._keys:
                raise KeyFileError(f"TorchServe's key file {self.path} is unreadable: {error!r}",
                                   retry_after_s=1) from error
            return
        self._keys, self._stamp = keys, stamp

    def read(self) -> dict[str, Any]:
        """Every key with its expiry, as TorchServe wrote them."""
        self._refresh()
        return self._keys

    def key(self, kind: str = "inference") -> str:
        self._refresh()
        return str(self._keys[kind]["key"])

    def expiring(self, margin_s: float, kinds: tuple[str, ...] = EXPIRING_KINDS) -> list[str]:
        """Which of `kinds` expire within `margin_s` (the API key never does)."""
        self._refresh()
        return [kind for kind in kinds if kind in EXPIRING_KINDS
                and expires_soon(self._keys[kind].get("expiration time"), margin_s)]

    def forget(self) -> None:
        """Read the file again on next use (a key was renewed, or TorchServe refused the one we hold)."""
        self._stamp = None
