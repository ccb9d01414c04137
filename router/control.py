"""The experiments as they route now: the experiment file, live edits of it, and runtime weight overrides (admin
changes and guardrail rollbacks), kept in the store so they survive a restart of the router.

Every change goes through here, one at a time, and is announced to the listeners (circuit breakers, guardrail
windows) so they drop state that belonged to the old decision.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from router.catalog import Catalog
from router.config import Experiment, RouterConfig, load_config, with_weights
from router.errors import ConfigError, NotFound, RouterError, quoted
from router.metrics import Metrics
from router.store import ROLLBACK, Override, Store

log = logging.getLogger(__name__)

# How often a replica reads the overrides the others may have made in the shared store: a weight change,
# reset or rollback made on one replica holds on all of them within about this long.
FOLLOW_STORE_S = 0.5
# Called after every change with the new configuration and the experiment that changed (None: all of them).
Listener = Callable[[RouterConfig, str | None], None]


class Control:
    def __init__(self, config: RouterConfig, store: Store, catalog: Catalog, metrics: Metrics) -> None:
        self.store = store
        self.catalog = catalog
        self.metrics = metrics
        self.listeners: list[Listener] = []
        self.config = config
        self.overrides: dict[str, Override] = {}
        self._effective: dict[str, Experiment] = {}
        self._last_reload_error = ""  # an invalid edit is reported once, not every second
        # Reloads, admin changes and rollbacks each await the store between reading and replacing the state:
        # one at a time, so none installs an override built for a config another has just replaced.
        self._changes = asyncio.Lock()
        self._apply(config, store.overrides(config.experiments_digest), None)

    def experiment(self, name: str) -> Experiment | None:
        """The experiment as it routes now: the file's arms with any runtime override of their weights."""
        return self._effective.get(name)

    def names(self) -> list[str]:
        return list(self.config.experiments)

    def rolled_back(self, name: str) -> bool:
        override = self.overrides.get(name)
        return override is not None and override.rollback

    def drained(self, name: str, arm: str) -> bool:
        """Whether the experiment sends an arm no traffic now (weight 0: drained by an admin or rolled back)."""
        experiment = self._effective.get(name)
        return experiment is not None and experiment.weights.get(arm, 0.0) <= 0

    def _apply(self, config: RouterConfig, overrides: dict[str, Override], changed: str | None) -> None:
        self.config = config
        self.overrides = {name: o for name, o in overrides.items() if name in config.experiments}
        # Weights with overrides applied, once per change rather than on every request.
        self._effective = {name: with_weights(experiment, self.overrides[name].weights)
                           if name in self.overrides else experiment
                           for name, experiment in config.experiments.items()}
        for name, experiment in self._effective.items():
            for arm in experiment.arms:
                self.metrics.weight.labels(name, arm.name).set(arm.weight)
            self.metrics.rolled_back.labels(name).set(int(self.rolled_back(name)))
        for listener in self.listeners:
            listener(config, changed)

    # --- the experiment file ------------------------------------------------------------------------------------
    async def reload(self, reason: str = "reload") -> bool:
        """Read the experiment file again; True if it changed and was applied. A bad file changes nothing."""
        assert self.config.source is not None
        async with self._changes:
            config = load_config(self.config.source)
            if config.digest == self.config.digest:
                return False
            await self.catalog.validate(config)
            if config.experiments_digest == self.config.experiments_digest:
                overrides = self.overrides  # only other settings changed: the weights in force stay
            else:
                # Edited experiments are the operator's new decision: overrides of older versions go (they would
                # come back if the file were edited back). Other replicas that reloaded first may already have
                # made overrides for this version: those stand.
                await self.store.clear_overrides(except_digest=config.experiments_digest)
                overrides = await asyncio.to_thread(self.store.overrides, config.experiments_digest)
            self._apply(config, overrides, None)
        for name, experiment in config.experiments.items():
            weights = ", ".join(f"{arm.name}={arm.weight:g}" for arm in experiment.arms)
            self.store.event(name, reason, f"experiment file applied: {weights}")
        log.warning("%s: applied %s (%s)", reason, config.source, ", ".join(config.experiments))
        return True

    async def watch_config(self, period_s: float = 1.0) -> None:
        """Apply edits of the experiment file without a restart; an invalid edit is logged (once) and ignored."""
        assert self.config.source is not None
        seen: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(period_s)
            try:
                stat = self.config.source.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp == seen:  # parse the file only when it changed
                    continue
                await self.reload("file-reload")
                seen, self._last_reload_error = stamp, ""
            except Exception as error:  # the watcher must outlive a bad file or an unreachable TorchServe
                if isinstance(error, ConfigError):
                    seen = stamp  # an invalid file stays invalid until it is edited again; TorchServe may return
                message = error.message if isinstance(error, RouterError) else repr(error)
                if message != self._last_reload_error:
                    log.error("experiment file not applied, keeping the running experiments: %s", message)
                    self._last_reload_error = message

    async def follow_store(self, period_s: float = FOLLOW_STORE_S) -> None:
        """Apply the overrides other router replicas made (weight changes, resets, guardrail rollbacks) in the
        store they share. With one router the store holds exactly what this one made, and nothing changes."""
        failing = False
        while True:
            await asyncio.sleep(period_s)
            try:
                # Read under the lock: an override this replica is making cannot be undone by an older read.
                async with self._changes:
                    stored = await asyncio.to_thread(self.store.overrides, self.config.experiments_digest)
                    stored = {name: o for name, o in stored.items() if name in self.config.experiments}
                    changed = sorted(name for name in {*stored, *self.overrides}
                                     if _decision(stored.get(name)) != _decision(self.overrides.get(name)))
                    if changed:
                        self._apply(self.config, stored, changed[0] if len(changed) == 1 else None)
                for name in changed:
                    override = stored.get(name)
                    log.warning("experiment %s: %s (made by another replica)", name, "weights back to the file"
                                if override is None else f"weights {override.weights} ({override.reason})")
                failing = False
            except Exception as error:  # the database may be restarting: keep routing as we are, say so once
                if not failing:
                    log.error("could not read the shared overrides, keeping the current weights: %s", error)
                failing = True

    # --- runtime overrides --------------------------------------------------------------------------------------
    def _existing(self, name: str) -> Experiment:
        experiment = self.experiment(name)
        if experiment is None:
            raise NotFound(f"no experiment {quoted(name)} (experiments: {', '.join(self.config.experiments)})")
        return experiment

    async def set_weights(self, name: str, weights: dict[str, float], reason: str) -> Experiment:
        reason = " ".join(reason.split())  # one line in the log and the report, whatever the client sent
        async with self._changes:
            changed = with_weights(self._existing(name), weights)  # validates
            await self.store.set_override(name, changed.weights, reason, self.config.experiments_digest)
            self.overrides[name] = Override(changed.weights, reason, time.time())
            self._apply(self.config, self.overrides, name)
        detail = ", ".join(f"{arm}={weight:g}" for arm, weight in changed.weights.items())
        self.store.event(name, reason.split(":", 1)[0], f"{reason}; weights {detail}")
        log.warning("experiment %s: weights %s (%s)", name, detail, reason)
        return changed

    async def clear_override(self, name: str) -> None:
        async with self._changes:
            self._existing(name)
            await self.store.clear_overrides(name)
            self.overrides.pop(name, None)
            self._apply(self.config, self.overrides, name)
        self.store.event(name, "reset", "weights back to the experiment file")
        log.warning("experiment %s: weights back to the experiment file", name)

    async def rollback(self, experiment: Experiment, reason: str) -> None:
        """Send all traffic to control (sticky keys included) until an operator resets or edits the weights."""
        control = experiment.arm(experiment.control)
        weights = {arm.name: (control.weight or 1.0) if arm.name == control.name else 0.0 for arm in experiment.arms}
        await self.set_weights(experiment.name, weights, f"{ROLLBACK}: {reason}")

    def describe(self, circuit_state: Callable[[Any], str]) -> dict[str, Any]:
        described = {}
        for name in self.config.experiments:
            experiment = self._existing(name)
            override = self.overrides.get(name)
            described[name] = {
                "control": experiment.control,
                "arms": {arm.name: {"model": arm.target.model, "version": arm.target.version, "weight": arm.weight,
                                    "circuit": circuit_state(arm.target)}
                         for arm in experiment.arms},
                "shadow": None if experiment.shadow is None else {
                    "model": experiment.shadow.target.model, "version": experiment.shadow.target.version,
                    "sample": experiment.shadow.sample},
                "override": None if override is None else {"reason": override.reason, "at": override.at},
                "rolled_back": self.rolled_back(name),
            }
        return {"experiments": described, "config": str(self.config.source), "digest": self.config.digest}


def _decision(override: Override | None) -> tuple[dict[str, float], str] | None:
    """What an override decides (not when it was stored: each process stamps its own time)."""
    return None if override is None else (override.weights, override.reason)
