"""Shadow copies: a sampled copy of an experiment's live traffic goes to its shadow target after the live answer,
and the two answers are compared by label. Whatever happens to a copy (slow, failing, too many in flight) stays
here: the client's answer has already left."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from router.config import Experiment, Target, Timeouts
from router.metrics import Metrics
from router.request import InferenceRequest, Upstream, labels_of
from router.store import Store
from router.upstream import AttemptFailed

log = logging.getLogger(__name__)


class Shadows:
    def __init__(self, client: Upstream, store: Store, metrics: Metrics, timeouts: Timeouts, max_in_flight: int,
                 rng: random.Random) -> None:
        self.client = client
        self.store = store
        self.metrics = metrics
        self.timeouts = timeouts
        self.max_in_flight = max_in_flight
        self.rng = rng
        self.in_flight: set[asyncio.Task[None]] = set()

    def maybe_copy(self, request_id: str, experiment: Experiment, live_labels: tuple[int, ...] | None,
                   request: InferenceRequest) -> None:
        shadow = experiment.shadow
        if shadow is None or self.rng.random() >= shadow.sample:
            return
        if live_labels is not None and len(live_labels) > 1:
            # A batch of images (Open Inference Protocol) would count as one agreement or disagreement whatever
            # its size: agreement is judged on one-image requests, as feedback is.
            return
        target = str(shadow.target)
        if len(self.in_flight) >= self.max_in_flight:  # a slow shadow must not pile up
            self._outcome(request_id, experiment.name, target, "dropped")
            return
        task = asyncio.get_running_loop().create_task(
            self._copy(request_id, experiment.name, shadow.target, live_labels, request))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _copy(self, request_id: str, experiment: str, target: Target, live_labels: tuple[int, ...] | None,
                    request: InferenceRequest) -> None:
        started = time.perf_counter()
        name = str(target)
        try:
            reply = await self.client.infer(target, request, self.timeouts.shadow_s)
        except AttemptFailed as failure:
            self._outcome(request_id, experiment, name, "timeout" if failure.kind == "timeout" else "error")
            return
        except Exception as error:  # whatever happens to a shadow copy stays here
            log.debug("shadow request to %s failed: %s", name, error)
            self._outcome(request_id, experiment, name, "error")
            return
        latency_ms = (time.perf_counter() - started) * 1000
        shadow_labels = labels_of(reply) if reply.status == 200 else None
        if shadow_labels is None:
            self._outcome(request_id, experiment, name, "error", latency_ms=latency_ms)
            return
        agree = shadow_labels == live_labels  # a batch agrees only if every image does
        self.metrics.shadow_agreement.labels(experiment, name, str(agree).lower()).inc()
        self._outcome(request_id, experiment, name, "ok", agree, latency_ms)

    def _outcome(self, request_id: str, experiment: str, target: str, outcome: str, agree: bool | None = None,
                 latency_ms: float | None = None) -> None:
        self.metrics.shadow.labels(experiment, target, outcome).inc()
        self.store.record_shadow(request_id, experiment, target, outcome, agree, latency_ms)

    async def drain(self) -> None:
        if self.in_flight:
            await asyncio.gather(*self.in_flight, return_exceptions=True)
