"""The router's core (retries, circuit breakers, shadow isolation, guardrail, feedback, overrides) with its real
SQLite store, driven through `Router.route` with scripted upstream answers instead of TorchServe. The same
behaviour against the real TorchServe is in test_router.py."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import RouterConfig, Target, parse_config
from router.core import Router
from router.errors import BadRequest, NotFound, UpstreamTimeout, UpstreamUnavailable
from router.store import Store
from router.upstream import AttemptFailed, Reply, TorchServeClient


def make_config(tmp_path: Path, **experiment: Any) -> RouterConfig:
    spec = {"control": "a", "arms": {"a": {"model": "model-a", "weight": 1}, "b": {"model": "model-b", "weight": 1}},
            **experiment}
    return parse_config({"experiments": {"exp": spec}, "state_dir": str(tmp_path),
                         "circuit_breaker": {"failures": 2, "reset_s": 30},
                         "timeouts": {"request_s": 1, "shadow_s": 0.2}}, digest="digest-1")


def answer(label: int) -> Reply:
    return Reply(200, json.dumps({"label": label}).encode())


class Upstream:
    """Scripted targets: each model name maps to a function of the call count giving a Reply or raising."""

    def __init__(self, behaviour: dict[str, Callable[[], Awaitable[Reply]]]) -> None:
        self.behaviour = behaviour
        self.calls: list[str] = []

    async def __call__(self, target: Target, timeout_s: float) -> Reply:
        self.calls.append(target.model)
        try:
            return await asyncio.wait_for(self.behaviour[target.model](), timeout_s)
        except TimeoutError as error:  # as TorchServeClient reports a timeout
            raise AttemptFailed("timeout", f"{target} did not answer within {timeout_s:g} s") from error


async def ok(label: int = 1) -> Reply:
    return answer(label)


async def fails() -> Reply:
    raise AttemptFailed("server_error", "HTTP 503 no worker")


async def hangs() -> Reply:
    await asyncio.sleep(3600)
    raise AssertionError


def with_router(config: RouterConfig, test: Callable[[Router], Awaitable[None]]) -> None:
    async def run() -> None:
        store = Store(config.database)
        router = Router(config, TorchServeClient(config.torchserve, config.timeouts), store, rng=random.Random(0))
        try:
            await test(router)
        finally:
            store.close()

    asyncio.run(run())


def test_a_failed_arm_is_retried_once_on_another_and_its_circuit_opens(tmp_path: Path) -> None:
    upstream = Upstream({"model-a": fails, "model-b": ok})

    async def test(router: Router) -> None:
        routed = [await router.route("exp", None, f"user-{i}", None, "rest", upstream) for i in range(20)]
        assert {r.arm for r in routed} == {"b"} and all(r.reply.status == 200 for r in routed)
        assert sum(r.retried_from == "a" for r in routed) == 2  # then the circuit opened: a is not tried
        assert upstream.calls.count("model-a") == 2
        assert router.describe()["experiments"]["exp"]["arms"]["a"]["circuit"] == "open"
        router.breakers[Target("model-b")].opened_at = 0.0  # now every arm is out
        router.breakers[Target("model-b")].reset_s = 1e12
        with pytest.raises(UpstreamUnavailable, match="no arm of experiment 'exp' is available") as all_out:
            await router.route("exp", None, "k", None, "rest", upstream)
        assert all_out.value.retry_after_s == 30
        router.breakers[Target("model-b")].opened_at = None
        with pytest.raises(UpstreamUnavailable) as pinned:  # a pinned request is not moved to another arm
            await router.route("exp", None, None, "a", "rest", upstream)
        assert pinned.value.retry_after_s == 30 and "arm 'a' (model-a) failed" in pinned.value.message
        report = await router.report("exp")
        arms = {row["arm"]: row for row in report["arms"]}
        assert arms["a"]["requests"] == 3 and arms["a"]["errors"] == 3  # failed attempts count against a
        assert arms["b"]["requests"] == 20 and arms["b"]["errors"] == 0

    with_router(make_config(tmp_path), test)


def test_when_every_arm_fails_the_client_gets_a_503_or_504_never_a_hang(tmp_path: Path) -> None:
    async def test(router: Router) -> None:
        with pytest.raises(UpstreamUnavailable, match=r"after '[ab]' failed too"):
            await router.route("exp", None, "k", None, "rest", Upstream({"model-a": fails, "model-b": fails}))
        with pytest.raises(UpstreamTimeout, match="did not answer within 1 s"):
            await asyncio.wait_for(router.route("exp", None, "k", None, "grpc",
                                                Upstream({"model-a": hangs, "model-b": hangs})), timeout=5)

    with_router(make_config(tmp_path), test)


def test_a_failing_or_slow_shadow_changes_nothing_for_the_client(tmp_path: Path) -> None:
    for shadow_behaviour, outcome in ((fails, "error"), (hangs, "timeout")):
        config = make_config(tmp_path / outcome, shadow={"model": "model-s", "sample": 1.0})
        upstream = Upstream({"model-a": ok, "model-b": ok, "model-s": shadow_behaviour})

        async def test(router: Router, upstream: Upstream = upstream, outcome: str = outcome) -> None:
            routed = [await router.route("exp", None, f"u{i}", None, "rest", upstream) for i in range(5)]
            if outcome == "timeout":  # every live answer came back while its shadow copy was still waiting
                assert len(router._shadow_tasks) == 5
            assert all(r.reply.status == 200 and json.loads(r.reply.body) == {"label": 1} for r in routed)
            await router.drain_shadows()
            shadow = (await router.report("exp"))["shadow"]
            assert shadow == [{"target": "model-s", "compared": 0, "agree": 0, "errors": 5, "agreement": None}]
            sample = router.metrics.registry.get_sample_value(
                "router_shadow_requests_total", {"experiment": "exp", "target": "model-s", "outcome": outcome})
            assert sample == 5

        with_router(config, test)


def test_shadow_agreement_is_measured(tmp_path: Path) -> None:
    config = make_config(tmp_path, shadow={"model": "model-s", "sample": 1.0})
    labels = iter([1, 2, 1, 1])

    async def shadow() -> Reply:
        return answer(next(labels))

    async def test(router: Router) -> None:
        for i in range(4):
            await router.route("exp", None, f"u{i}", None, "rest", Upstream({"model-a": ok, "model-b": ok,
                                                                            "model-s": shadow}))
        await router.drain_shadows()
        (report,) = (await router.report("exp"))["shadow"]
        assert (report["compared"], report["agree"], report["agreement"]) == (4, 3, 0.75)

    with_router(config, test)


def test_the_guardrail_rolls_back_to_control_and_an_admin_reset_restores_the_weights(tmp_path: Path) -> None:
    config = make_config(tmp_path, guardrail={"max_error_rate": 0.2, "min_requests": 4, "window_s": 60})
    config = parse_config({**_document(config), "circuit_breaker": {"failures": 100, "reset_s": 1}}, digest="d")
    upstream = Upstream({"model-a": ok, "model-b": fails})

    async def test(router: Router) -> None:
        for i in range(12):
            await router.route("exp", None, f"user-{i}", None, "rest", upstream)
        await router.check_guardrails()
        assert router.rolled_back("exp")
        calls_before = len(upstream.calls)
        routed = [await router.route("exp", None, f"user-{i}", None, "rest", upstream) for i in range(20)]
        assert {r.arm for r in routed} == {"a"} and len(upstream.calls) == calls_before + 20
        report = await router.report("exp")
        assert report["rolled_back"]
        assert any(e["kind"] == "rollback" and "arm b error rate 100.0% > 20.0%" in e["detail"]
                   for e in report["events"])
        await router.clear_override("exp")
        assert not router.rolled_back("exp") and router.experiment("exp").weights == {"a": 1, "b": 1}  # type: ignore[union-attr]

    with_router(config, test)


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
    upstream = Upstream({"model-a": ok, "model-b": ok})
    ids: list[str] = []

    async def first(router: Router) -> None:
        for i in range(6):
            ids.append((await router.route("exp", None, None, "a" if i % 2 else "b", "rest", upstream)).request_id)
        assert (await router.feedback(ids[0], 1))["correct"] is True
        assert (await router.feedback(ids[1], 3))["correct"] is False
        with pytest.raises(NotFound):
            await router.feedback("no-such-request", 1)
        await router.set_weights("exp", {"b": 0}, "admin: drain b")
        with pytest.raises(BadRequest):
            await router.route("exp", "1.0", None, None, "rest", upstream)

    async def restarted(router: Router) -> None:
        assert router.experiment("exp").weights == {"a": 1, "b": 0}  # type: ignore[union-attr]
        arms = {row["arm"]: row for row in (await router.report("exp"))["arms"]}
        assert (arms["b"]["feedback"], arms["b"]["accuracy"]) == (1, 1.0)
        assert (arms["a"]["feedback"], arms["a"]["accuracy"]) == (1, 0.0)

    with_router(config, first)
    with_router(config, restarted)
    edited = parse_config(_document(config), digest="digest-2")  # the file changed while the router was down
    with_router(edited, lambda router: _assert_weights(router, {"a": 1, "b": 1}))


async def _assert_weights(router: Router, weights: dict[str, float]) -> None:
    assert router.experiment("exp").weights == weights  # type: ignore[union-attr]
