"""Which model versions TorchServe serves: checked for every arm at start and on every reload, and for every
pass-through request, so a client can neither reach other upstream paths through a crafted version nor mint
metric labels, breakers and log rows for models that do not exist."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from router.config import RouterConfig, check_targets
from router.errors import NotFound, RouterError, quoted

log = logging.getLogger(__name__)

REFRESH_S = 5.0  # an unknown name re-reads TorchServe's list at most this often


class Catalog:
    def __init__(self, list_models: Callable[[], Awaitable[dict[str, set[str]]]]) -> None:
        self._list_models = list_models
        self.served: dict[str, set[str]] = {}
        self._read_at = 0.0

    async def validate(self, config: RouterConfig) -> None:
        """Every arm and shadow must be a model version TorchServe serves (ConfigError names the one that isn't)."""
        served = await self._list_models()
        check_targets(config, served)
        self.served, self._read_at = served, time.monotonic()

    async def check(self, name: str, version: str | None, experiments: list[str]) -> None:
        """A plain model name (and version) must be one TorchServe serves; NotFound lists what there is."""
        if (name not in self.served or (version is not None and version not in self.served[name])) \
                and time.monotonic() - self._read_at > REFRESH_S:
            self._read_at = time.monotonic()
            try:
                self.served = await self._list_models()
            except RouterError as error:
                log.warning("could not refresh TorchServe's model list: %s", error.message)
        if name not in self.served:
            raise NotFound(f"no experiment or TorchServe model {quoted(name)} (experiments: {', '.join(experiments)}; "
                           f"models: {', '.join(sorted(self.served))})")
        if version is not None and version not in self.served[name]:
            raise NotFound(f"TorchServe serves no version {quoted(version)} of {name!r} "
                           f"(versions: {', '.join(sorted(self.served[name]))})")
