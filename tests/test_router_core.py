"""The router's core (retries, circuit breakers, shadow isolation, guardrail, feedback, overrides) with its real
SQLite store, driven through `Router.route` with a scripted upstream client instead of TorchServe. The same
behaviour against the real TorchServe is in test_router.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import RouterConfig, Target, parse_config
from router.core import Router
from router.errors import BadRequest, Forbidden, NotFound, UpstreamTimeout, UpstreamUnavailable
from router.request import InferenceRequest
from router.store import Store
from router.upstream import AttemptFailed, Reply


def make_config(tmp_path: Path, **experiment: Any) -> RouterConfig:
    spec = {"control": "a", "arms": {"a": {"model": "model-a", "weight": 1}, "b": {"model": "model-b", "weight": 1}},
            **experiment}
    return parse_config({"experiments": {"exp": spec}, "state_dir": str(tmp_path),
                         "circuit_breaker": {"failures": 2, "reset_s": 30},
                         "timeouts": {"request_s": 1, "shadow_s": 0.2}}, digest="digest-1")


def answer(label: int) -> Reply:
    return Reply(200, json.dumps({"label": label}).encode())


class Upstream:
    """A scripted upstream client: each model name maps to a coroutine function giving a Reply or raising."""

    def __init__(self, behaviour: dict[str, Callable[[], Awaitable[Reply]]]) -> None:
        self.behaviour = behaviour
        self.calls: list[str] = []

    async def infer(self, target: Target, request: InferenceRequest, timeout_s: float) -> Reply:
        self.calls.append(target.model)
        try:
            limit_s = request.timeout_s(timeout_s)  # as router.hosts bounds an attempt
            return await asyncio.wait_for(self.behaviour[target.model](), limit_s)
        except TimeoutError as error:  # as TorchServeClient reports a timeout
            raise AttemptFailed("timeout", f"{target} did not answer within {limit_s:g} s") from error

    async def served_models(self) -> dict[str, set[str]]:
        return {name: {"1.0"} for name in self.behaviour}

    def describe(self) -> dict[str, Any]:
        return {}

    async def ping(self) -> bool:
        return True


def req(key: str | None = None, pin: str | None = None, protocol: str = "rest", version: str | None = None,
        privileged: bool = False) -> InferenceRequest:
    return InferenceRequest("exp", protocol, version=version, key=key, pin=pin, privileged=privileged)


async def ok(label: int = 1) -> Reply:
    return answer(label)


async def fails() -> Reply:
    raise AttemptFailed("server_error", "HTTP 503 no worker")


async def hangs() -> Reply:
    await asyncio.sleep(3600)
    raise AssertionError


def with_router(config: RouterConfig, test: Callable[[Router, Upstream], Awaitable[None]],
                upstream: Upstream | None = None) -> None:
    upstream = upstream or Upstream({"model-a": ok, "model-b": ok})

    async def run() -> None:
        store = Store(config.database)
        router = Router(config, upstream, store, rng=random.Random(0))
        try:
            await test(router, upstream)
        finally:
            store.close()

    asyncio.run(run())


def test_a_failed_arm_is_retried_once_on_another_and_its_circuit_opens(tmp_path: Path) -> None:
    async def test(router: Router, upstream: Upstream) -> None:
        routed = [await router.route(req(f"user-{i}")) for i in range(20)]
        assert {r.arm for r in routed} == {"b"} and all(r.reply.status == 200 for r in routed)
        assert sum(r.retried_from == "a" for r in routed) == 2  # then the circuit opened: a is not tried
        assert upstream.calls.count("model-a") == 2
        assert router.describe()["experiments"]["exp"]["arms"]["a"]["circuit"] == "open"
        breaker = router.circuits.breaker(Target("model-b"))
        breaker.opened_at, breaker.reset_s = 0.0, 1e12  # now every arm is out
        with pytest.raises(UpstreamUnavailable, match="no arm of experiment 'exp' is available") as all_out:
            await router.route(req("k"))
        assert all_out.value.retry_after_s == 30
        breaker.opened_at = None
        with pytest.raises(UpstreamUnavailable) as pinned:  # a pinned request is not moved to another arm
            await router.route(req(pin="a"))
        assert pinned.value.retry_after_s == 30 and "arm 'a' (model-a) failed" in pinned.value.message
        report = await router.evaluation.report("exp")
        arms = {row["arm"]: row for row in report["arms"]}
        assert arms["a"]["requests"] == 3 and arms["a"]["errors"] == 3  # failed attempts count against a
        assert arms["b"]["requests"] == 20 and arms["b"]["errors"] == 0

    with_router(make_config(tmp_path), test, Upstream({"model-a": fails, "model-b": ok}))


def test_when_every_arm_fails_the_client_gets_a_503_or_504_never_a_hang(tmp_path: Path) -> None:
    async def failing(router: Router, upstream: Upstream) -> None:
        with pytest.raises(UpstreamUnavailable, match=r"after '[ab]' failed too"):
            await router.route(req("k"))

    async def hanging(router: Router, upstream: Upstream) -> None:
        with pytest.raises(UpstreamTimeout, match="did not answer within 1 s"):
            await asyncio.wait_for(router.route(req("k", protocol="grpc")), timeout=5)

    with_router(make_config(tmp_path / "fails"), failing, Upstream({"model-a": fails, "model-b": fails}))
    with_router(make_config(tmp_path / "hangs"), hanging, Upstream({"model-a": hangs, "model-b": hangs}))


def test_a_client_deadline_shorter_than_the_routers_timeout_bounds_each_attempt(tmp_path: Path) -> None:
    async def test(router: Router, upstream: Upstream) -> None:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"within 0\.\d+ s"):
            await router.route(InferenceRequest("exp", "grpc", pin="a", deadline=time.monotonic() + 0.2))
        assert time.monotonic() - started < 0.9  # the router's own limit is 1 s

    with_router(make_config(tmp_path), test, Upstream({"model-a": hangs, "model-b": hangs}))


def test_a_failing_or_slow_shadow_changes_nothing_for_the_client(tmp_path: Path) -> None:
    for shadow_behaviour, outcome in ((fails, "error"), (hangs, "timeout")):
        config = make_config(tmp_path / outcome, shadow={"model": "model-s", "sample": 1.0})

        async def test(router: Router, upstream: Upstream, outcome: str = outcome) -> None:
            routed = [await router.route(req(f"u{i}")) for i in range(5)]
            if outcome == "timeout":  # every live answer came back while its shadow copy was still waiting
                assert len(router.shadows.in_flight) == 5
            assert all(r.reply.status == 200 and json.loads(r.reply.body) == {"label": 1} for r in routed)
            await router.shadows.drain()
            shadow = (await router.evaluation.report("exp"))["shadow"]
            assert shadow == [{"target": "model-s", "compared": 0, "agree": 0, "errors": 5, "agreement": None}]
            sample = router.metrics.registry.get_sample_value(
                "router_shadow_requests_total", {"experiment": "exp", "target": "model-s", "outcome": outcome})
            assert sample == 5

        with_router(config, test, Upstream({"model-a": ok, "model-b": ok, "model-s": shadow_behaviour}))


def test_shadow_agreement_is_measured(tmp_path: Path) -> None:
    config = make_config(tmp_path, shadow={"model": "model-s", "sample": 1.0})
    labels = iter([1, 2, 1, 1])

    async def shadow() -> Reply:
        return answer(next(labels))

    async def test(router: Router, upstream: Upstream) -> None:
        for i in range(4):
            await router.route(req(f"u{i}"))
        await router.shadows.drain()
        (report,) = (await router.evaluation.report("exp"))["shadow"]
        assert (report["compared"], report["agree"], report["agreement"]) == (4, 3, 0.75)

    with_router(config, test, Upstream({"model-a": ok, "model-b": ok, "model-s": shadow}))


def test_the_guardrail_rolls_back_to_control_and_an_admin_reset_restores_the_weights(tmp_path: Path) -> None:
    config = make_config(tmp_path, guardrail={"max_error_rate": 0.2, "min_requests": 4, "window_s": 60})
    config = parse_config({**_document(config), "circuit_breaker": {"failures": 100, "reset_s": 1}}, digest="d")

    async def test(router: Router, upstream: Upstream) -> None:
        for i in range(12):
            await router.route(req(f"user-{i}"))
        await router.guardrail.check()
        assert router.control.rolled_back("exp")
        calls_before = len(upstream.calls)
        routed = [await router.route(req(f"user-{i}")) for i in range(20)]
        assert {r.arm for r in routed} == {"a"} and len(upstream.calls) == calls_before + 20
        report = await router.evaluation.report("exp")
        assert report["rolled_back"]
        assert any(e["kind"] == "rollback" and "arm b error rate 100.0% > 20.0%" in e["detail"]
                   for e in report["events"])
        with pytest.raises(Forbidden, match="drained"):  # a client cannot pin the rolled-back arm ...
            await router.route(req(pin="b"))
        with pytest.raises(UpstreamUnavailable):  # ... an operator can (and b still fails)
            await router.route(req(pin="b", privileged=True))
        await router.control.clear_override("exp")
        assert not router.control.rolled_back("exp")
        assert router.control.experiment("exp").weights == {"a": 1, "b": 1}  # type: ignore[union-attr]
        with pytest.raises(UpstreamUnavailable):  # after the reset a client may pin b again (it still fails)
            await router.route(req(pin="b"))
        assert upstream.calls[-1] == "model-b"

    with_router(config, test, Upstream({"model-a": ok, "model-b": fails}))


def test_client_errors_and_their_latency_are_no_evidence_against_an_arm(tmp_path: Path) -> None:
    config = parse_config({"experiments": {"exp": {
        "control": "a", "arms": {"a": {"model": "model-a", "weight": 1}, "b": {"model": "model-b", "weight": 1}},
        "guardrail": {"max_error_rate": 0.1, "max_p99_ms": 50, "min_requests": 5, "window_s": 60}}},
        "state_dir": str(tmp_path)}, digest="d")

    async def slow_refusal() -> Reply:  # a body the model takes long to refuse: the client's doing
        await asyncio.sleep(0.08)
        return Reply(400, json.dumps({"error": {"code": 400, "message": "bad image"}}).encode())

    async def test(router: Router, upstream: Upstream) -> None:
        for i in range(20):
            routed = await router.route(req(f"u{i}", pin="b"))
            assert routed.reply.status == 400
        await router.guardrail.check()
        assert not router.control.rolled_back("exp")
        assert ("exp", "b") not in router.guardrail.windows  # nothing was judged
        for i in range(5):  # while its own slow answers do count
            upstream.behaviour["model-b"] = slow_ok
            await router.route(req(f"s{i}", pin="b"))
        await router.guardrail.check()
        assert router.control.rolled_back("exp")

    async def slow_ok() -> Reply:
        await asyncio.sleep(0.08)
        return answer(1)

    with_router(config, test, Upstream({"model-a": ok, "model-b": slow_refusal}))


def _document(config: RouterConfig) -> dict[str, Any]:
    experiment = config.experiments["exp"]
    spec: dict[str, Any] = {"control": experiment.control, "arms": {
        arm.name: {"model": arm.target.model, "weight": arm.weight} for arm in experiment.arms}}
    if experiment.guardrail:
        spec["guardrail"] = {"max_error_rate": experiment.guardrail.max_error_rate,
                             "min_requests": experiment.guardrail.min_requests,
                             "window_s": experiment.guardrail.window_s}
    return {"experiments": {"exp": spec}, "state_dir": str(config.state_dir)}


def test_feedback_and_weight_overrides_survive_a_restart_but_not_an_edited_file(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids: list[str] = []

    async def first(router: Router, upstream: Upstream) -> None:
        for i in range(6):
            ids.append((await router.route(req(pin="a" if i % 2 else "b"))).request_id)
        assert (await router.evaluation.feedback(ids[0], 1))["correct"] is True
        assert (await router.evaluation.feedback(ids[1], 3))["correct"] is False
        with pytest.raises(NotFound):
            await router.evaluation.feedback("no-such-request", 1)
        await router.control.set_weights("exp", {"b": 0}, "admin: drain b")
        with pytest.raises(BadRequest):
            await router.route(req(version="1.0"))

    async def restarted(router: Router, upstream: Upstream) -> None:
        assert router.control.experiment("exp").weights == {"a": 1, "b": 0}  # type: ignore[union-attr]
        arms = {row["arm"]: row for row in (await router.evaluation.report("exp"))["arms"]}
        assert (arms["b"]["feedback"], arms["b"]["accuracy"]) == (1, 1.0)
        assert (arms["a"]["feedback"], arms["a"]["accuracy"]) == (1, 0.0)

    with_router(config, first)
    with_router(config, restarted)
    edited = parse_config(_document(config), digest="digest-2")  # the file changed while the router was down
    with_router(edited, _weights_back_to_the_file)


async def _weights_back_to_the_file(router: Router, upstream: Upstream) -> None:
    assert router.control.experiment("exp").weights == {"a": 1, "b": 1}  # type: ignore[union-attr]


def test_an_answer_waits_until_its_request_row_is_committed(tmp_path: Path) -> None:
    """The durability promise at its source: while another connection holds SQLite's write lock, no answer leaves;
    once the lock is released, the answer comes with its row committed."""

    async def test(router: Router, upstream: Upstream) -> None:
        blocker = sqlite3.connect(router.store.path, timeout=0)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            routed = asyncio.ensure_future(router.route(req("user-1")))
            await asyncio.sleep(0.3)
            assert not routed.done()
        finally:
            blocker.rollback()
            blocker.close()
        answer = await routed
        with contextlib.closing(sqlite3.connect(router.store.path)) as db:
            assert db.execute("SELECT count(*) FROM requests WHERE request_id = ?",
                              (answer.request_id,)).fetchone() == (1,)

    with_router(make_config(tmp_path), test)
