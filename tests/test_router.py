"""The real router (`python -m router ... serve`, started as `make serve` starts it) in front of the real
TorchServe (real .mar files of the dry-run checkpoints), on free loopback ports, answering real REST and gRPC
requests: routing, stickiness across protocols, overrides, auth, shadow isolation, failover when a target
loses its workers or a worker is killed, the guardrail, live control, and feedback surviving a restart."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import yaml

from router import process
from router.config import load_config
from router.tokens import load_tokens
from serving import protos, server
from serving.instance import free_ports
from tests.conftest import Chain, encode_image, in_process_labels

pytestmark = pytest.mark.router

EXPERIMENTS: dict[str, Any] = {
    "fashion": {"control": "full", "arms": {
        "full": {"model": "fashion-full", "version": "1.0", "weight": 2},
        "pruned": {"model": "fashion-pruned", "version": "1.0", "weight": 1},
        "int8": {"model": "fashion-int8", "version": "1.0", "weight": 1}}},
    # Version 2.0 of the full model has the same weights as 1.0: the shadow must agree every time.
    "mirrored": {"arms": {"full": {"model": "fashion-full", "version": "1.0", "weight": 1}},
                 "shadow": {"model": "fashion-full", "version": "2.0", "sample": 1.0}},
    # The distilled test model waits 300 ms for a batch: far past the 0.15 s shadow timeout.
    "slow-shadow": {"arms": {"int8": {"model": "fashion-int8", "weight": 1}},
                    "shadow": {"model": "fashion-distilled", "sample": 1.0}},
    "failover": {"arms": {"pruned": {"model": "fashion-pruned", "weight": 1},
                          "int8": {"model": "fashion-int8", "weight": 1}}},
    # Any real request is slower than 0.01 ms: the candidate breaches the p99 limit as soon as it has 3 requests.
    "guarded": {"control": "full", "arms": {"full": {"model": "fashion-full", "version": "1.0", "weight": 1},
                                            "int8": {"model": "fashion-int8", "weight": 1}},
                "guardrail": {"max_p99_ms": 0.01, "min_requests": 3, "window_s": 60}},
}


@dataclass
class Stack:
    torchserve: server.Instance
    config_path: Path
    url: str
    grpc_target: str
    client_token: str
    admin_token: str
    log_file: Path

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.client_token}", "Content-Type": "image/png", **extra}

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def predict(self, name: str, body: bytes, **headers: str) -> requests.Response:
        return requests.post(f"{self.url}/predictions/{name}", data=body, headers=self.headers(**headers), timeout=30)

    def describe(self) -> dict[str, Any]:
        response = requests.get(f"{self.url}/admin/experiments", headers=self.admin(), timeout=10)
        assert response.status_code == 200, response.text
        described: dict[str, Any] = response.json()["experiments"]
        return described

    def report(self, name: str) -> dict[str, Any]:
        response = requests.get(f"{self.url}/admin/report/{name}", headers=self.admin(), timeout=10)
        assert response.status_code == 200, response.text
        report: dict[str, Any] = response.json()
        return report

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{"):
                found = ",".join(sorted(line[line.index("{") + 1: line.index("}")].split(",")))
                if all(part in found.split(",") for part in wanted.split(",")):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def grpc_predict(self, name: str, body: bytes, metadata: tuple[tuple[str, str], ...] = (),
                     token: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(grpc.insecure_channel(self.grpc_target))
        request = protos.load("inference_pb2").PredictionsRequest(model_name=name, input={"data": body})
        auth = (("authorization", f"Bearer {token or self.client_token}"),)
        response, call = stub.Predictions.with_call(request, metadata=auth + metadata, timeout=30)
        return json.loads(response.prediction), dict(call.trailing_metadata())


def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def scale(instance: server.Instance, model: str, workers: int, attempts: int = 5) -> None:
    """Scale `model` 1.0 to `workers` workers and wait until TorchServe lists that many.

    Under load, TorchServe 0.12's frontend can answer a scale request with a 500 ConcurrentModificationException
    (its worker map changed while it was walking it); the request is idempotent, so it is sent again."""
    url = f"{instance.management_url}/models/{model}/1.0"
    params: dict[str, str | int] = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
    for _ in range(attempts):
        response = requests.put(url, params=params, headers=instance.headers("management"), timeout=60)
        if response.status_code == 200:
            break
        assert response.status_code == 500 and "ConcurrentModificationException" in response.text, response.text
        time.sleep(0.2)
    else:
        raise AssertionError(f"scaling {model} to {workers} failed {attempts} times: {response.text}")

    def listed() -> int:
        described = requests.get(url, headers=instance.headers("management"), timeout=10).json()
        return len(described[0]["workers"])

    until(lambda: listed() == workers)


def launch(instance: server.Instance, root: Path, experiments: dict[str, Any], **settings: Any) -> Stack:
    """Start a real router (as `make serve` does) in front of TorchServe `instance`, on free loopback ports;
    `settings` add to (or replace) the experiment file's sections."""
    rest_port, grpc_port = free_ports(2)
    document = {
        "torchserve": {"inference_url": instance.inference_url, "management_url": instance.management_url,
                       "grpc_target": instance.grpc_target, "key_file": str(instance.key_file)},
        "listen": {"host": "127.0.0.1", "rest_port": rest_port, "grpc_port": grpc_port},
        "state_dir": str(root / "state"),
        "timeouts": {"connect_s": 1, "request_s": 20, "shadow_s": 0.15},
        "circuit_breaker": {"failures": 2, "reset_s": 1},
        "experiments": experiments,
        **settings,
    }
    config_path = root / "experiments.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    process.start(config_path)
    config = load_config(config_path)
    tokens = load_tokens(config.tokens_file)
    return Stack(instance, config_path, f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}",
                 tokens.client, tokens.admin, process.log_file(config))


@pytest.fixture(scope="module")
def stack(torchserve: server.Instance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    launched = launch(torchserve, tmp_path_factory.mktemp("router"), EXPERIMENTS)
    try:
        yield launched
    finally:
        process.stop(launched.config_path)


def test_each_arm_answers_like_its_model_and_names_itself(stack: Stack, chain: Chain, test_images: Any) -> None:
    images, _ = test_images
    body = encode_image(images[0])
    for arm, variant in (("full", "full"), ("pruned", "pruned"), ("int8", "int8")):
        response = stack.predict("fashion", body, **{"X-Arm": arm})
        assert response.status_code == 200, response.text
        assert response.json()["label"] == in_process_labels(chain, variant, images[:1])[0]
        assert response.headers["X-Arm"] == arm and response.headers["X-Experiment"] == "fashion"
        assert response.headers["X-Target"] == f"fashion-{variant}/1.0"
        assert len(response.headers["X-Request-Id"]) == 32
    direct = stack.predict("fashion-distilled", body)  # a plain model name passes through
    assert direct.status_code == 200 and direct.headers["X-Arm"] == "direct"
    assert direct.json()["model"]["variant"] == "distilled"
    unknown = stack.predict("no-such-model", body)
    assert unknown.status_code == 404 and "no experiment or TorchServe model 'no-such-model'" in unknown.text
    crafted = stack.predict("fashion-full/..%2F..%2Fexplanations%2Ffashion-full", body)  # no path tricks upstream
    assert crafted.status_code == 404 and "serves no version '../../explanations/fashion-full'" in crafted.text
    bad = stack.predict("fashion", b"not an image", **{"X-Arm": "int8"})  # TorchServe's 400 comes through
    assert bad.status_code == 400 and "cannot decode the image" in bad.json()["error"]["message"]


def test_a_user_sticks_to_one_arm_over_rest_and_grpc(stack: Stack, test_images: Any) -> None:
    images, _ = test_images
    body = encode_image(images[1])
    arms = {}
    for user in (f"user-{i}" for i in range(12)):
        seen = {stack.predict("fashion", body, **{"X-User-Id": user}).headers["X-Arm"] for _ in range(3)}
        _, trailers = stack.grpc_predict("fashion", body, (("x-user-id", user),))
        seen.add(trailers["x-arm"])
        assert len(seen) == 1, f"{user} moved between arms: {seen}"
        arms[user] = seen.pop()
    assert len(set(arms.values())) > 1  # and different users do spread over the arms
    answer, trailers = stack.grpc_predict("fashion", body, (("x-arm", "pruned"),))
    assert trailers["x-arm"] == "pruned" and trailers["x-target"] == "fashion-pruned/1.0"
    assert answer["model"]["variant"] == "pruned"


def test_auth_client_and_admin_tokens_and_no_management_api(stack: Stack, test_images: Any) -> None:
    body = encode_image(test_images[0][0])
    url = f"{stack.url}/predictions/fashion"
    assert requests.post(url, data=body, timeout=10).status_code == 401
    assert requests.post(url, data=body, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    inference_key = stack.torchserve.token()  # TorchServe's own key does not open the router
    assert requests.post(url, data=body, headers={"Authorization": f"Bearer {inference_key}"},
                         timeout=10).status_code == 401
    assert requests.get(f"{stack.url}/admin/experiments", headers=stack.headers(), timeout=10).status_code == 403
    assert requests.get(f"{stack.url}/admin/experiments", timeout=10).status_code == 401
    for path in ("/models", "/models/fashion-full", "/v2/repository/index"):  # v2 serves no model repository
        assert requests.get(stack.url + path, headers=stack.admin(), timeout=10).status_code == 404
    with pytest.raises(grpc.RpcError) as refused:
        stack.grpc_predict("fashion", body, token="wrong")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert requests.get(f"{stack.url}/healthz", timeout=10).json() == {"status": "alive"}
    assert requests.get(f"{stack.url}/ping", timeout=10).json() == {"status": "Healthy"}
    log = stack.log_file.read_text()
    assert inference_key not in log and stack.client_token not in log and stack.admin_token not in log


def test_shadows_never_touch_the_live_answer(stack: Stack, chain: Chain, test_images: Any) -> None:
    images, _ = test_images
    expected = in_process_labels(chain, "int8", images[:3])
    # Three copies never fill the shadow's batch of 4, so each waits out its 300 ms window: past the 0.15 s
    # shadow timeout every time. The client never notices.
    for i in range(3):
        response = stack.predict("slow-shadow", encode_image(images[i]))
        assert response.status_code == 200 and response.json()["label"] == expected[i]
    for i in range(6):
        assert stack.predict("mirrored", encode_image(images[i])).status_code == 200
    until(lambda: stack.metric("router_shadow_requests_total", experiment="slow-shadow") == 3)
    assert stack.metric("router_shadow_requests_total", experiment="slow-shadow", outcome="timeout") == 3
    until(lambda: stack.metric("router_shadow_requests_total", experiment="mirrored") == 6)
    (mirror,) = stack.report("mirrored")["shadow"]
    assert mirror["compared"] + mirror["errors"] == 6 and mirror["compared"] >= 3
    assert mirror["agreement"] == 1.0  # same weights under another version: it must agree every time


def test_failover_when_a_target_loses_its_workers_or_a_worker_is_killed(stack: Stack, test_images: Any) -> None:
    body = encode_image(test_images[0][1])
    scale(stack.torchserve, "fashion-pruned", 0)
    try:
        responses = [stack.predict("failover", body, **{"X-User-Id": f"u{i}"}) for i in range(16)]
        assert [r.status_code for r in responses] == [200] * 16  # no client saw the failure
        assert {r.headers["X-Arm"] for r in responses} == {"int8"}
        assert sum(r.headers.get("X-Retried-From") == "pruned" for r in responses) == 2  # then the circuit opened
        _, trailers = stack.grpc_predict("failover", body, (("x-user-id", "u-grpc"),))
        assert trailers["x-arm"] == "int8"
        pinned = stack.predict("failover", body, **{"X-Arm": "pruned"})  # pinned: fails, explicitly
        assert pinned.status_code == 503 and pinned.headers["Retry-After"] == "1"
        assert pinned.headers["X-Arm"] == "pruned" and pinned.headers["X-Target"] == "fashion-pruned"
        assert "arm 'pruned' (fashion-pruned) failed" in pinned.json()["error"]["message"]
        assert stack.describe()["failover"]["arms"]["pruned"]["circuit"] == "open"
        assert stack.metric("router_upstream_failures_total", experiment="failover", arm="pruned") >= 2
    finally:
        scale(stack.torchserve, "fashion-pruned", 1)

    def pruned_serves_again() -> bool:  # trial traffic after reset_s closes the circuit
        seen = {stack.predict("failover", body, **{"X-User-Id": f"u{i}"}).headers["X-Arm"] for i in range(16)}
        return "pruned" in seen

    until(pruned_serves_again)
    assert stack.describe()["failover"]["arms"]["pruned"]["circuit"] == "closed"

    described = requests.get(f"{stack.torchserve.management_url}/models/fashion-int8",
                             headers=stack.torchserve.headers("management"), timeout=10).json()
    (worker_pid,) = [worker["pid"] for worker in described[0]["workers"]]
    os.kill(worker_pid, signal.SIGKILL)
    responses = [stack.predict("failover", body, **{"X-User-Id": f"k{i}"}) for i in range(16)]
    assert [r.status_code for r in responses] == [200] * 16


def test_guardrail_rolls_the_candidate_back_and_admin_resets_it(stack: Stack, test_images: Any) -> None:
    body = encode_image(test_images[0][2])
    for i in range(4):  # pinned with the admin token: the rollback may land between two of them
        response = requests.post(f"{stack.url}/predictions/guarded", data=body, timeout=30, headers={
            **stack.admin(), "Content-Type": "image/png", "X-Arm": "int8", "X-User-Id": f"g{i}"})
        assert response.status_code == 200
    until(lambda: stack.describe()["guarded"]["rolled_back"])
    assert stack.predict("guarded", body, **{"X-Arm": "int8"}).status_code == 403  # rolled back: no client pins
    assert stack.describe()["guarded"]["arms"]["int8"]["weight"] == 0
    assert {stack.predict("guarded", body, **{"X-User-Id": f"g{i}"}).headers["X-Arm"] for i in range(12)} == {"full"}
    report = stack.report("guarded")
    assert report["rolled_back"] and any(event["kind"] == "rollback" and "p99" in event["detail"]
                                         for event in report["events"])
    assert stack.metric("router_rolled_back", experiment="guarded") == 1
    response = requests.delete(f"{stack.url}/admin/experiments/guarded/override", headers=stack.admin(), timeout=10)
    assert response.status_code == 200 and response.json()["arms"]["int8"]["weight"] == 1


def test_weights_change_live_through_the_admin_api_and_the_file(stack: Stack, test_images: Any) -> None:
    body = encode_image(test_images[0][3])
    url = f"{stack.url}/admin/experiments/failover/weights"
    bad = requests.put(url, json={"weights": {"pruned": -1}}, headers=stack.admin(), timeout=10)
    assert bad.status_code == 400 and "weights.pruned: must be a number >= 0" in bad.text
    response = requests.put(url, json={"weights": {"pruned": 0}}, headers=stack.admin(), timeout=10)
    assert response.status_code == 200
    assert {stack.predict("failover", body, **{"X-User-Id": f"w{i}"}).headers["X-Arm"] for i in range(8)} == {"int8"}

    document = yaml.safe_load(stack.config_path.read_text())
    document["experiments"]["failover"]["arms"]["int8"]["weight"] = -3  # an invalid edit is ignored
    stack.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    until(lambda: "experiment file not applied" in stack.log_file.read_text())
    assert stack.describe()["failover"]["arms"]["pruned"]["weight"] == 0
    document["experiments"]["failover"]["arms"]["int8"]["weight"] = 3  # a valid one applies, dropping overrides
    stack.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    until(lambda: stack.describe()["failover"]["arms"]["int8"]["weight"] == 3)
    assert stack.describe()["failover"]["arms"]["pruned"]["weight"] == 1
    kinds = [event["kind"] for event in stack.report("failover")["events"]]
    assert "admin" in kinds and "file-reload" in kinds


def test_feedback_gives_online_accuracy_that_survives_a_router_restart(stack: Stack, test_images: Any) -> None:
    images, labels = test_images
    answered = []
    for i in range(8):
        arm = "full" if i % 2 else "int8"
        response = stack.predict("fashion", encode_image(images[i]), **{"X-Arm": arm})
        answered.append((response.headers["X-Request-Id"], int(labels[i]), arm, response.json()["label"]))
    for request_id, truth, _, _ in answered:
        response = requests.post(f"{stack.url}/feedback", json={"request_id": request_id, "label": truth},
                                 headers=stack.headers(), timeout=10)
        assert response.status_code == 200, response.text
    first_id, first_truth = answered[0][0], answered[0][1]
    again = requests.post(f"{stack.url}/feedback", json={"request_id": first_id, "label": (first_truth + 1) % 10},
                          headers=stack.headers(), timeout=10)  # a second label for the same request
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["label"] == first_truth
    assert requests.post(f"{stack.url}/feedback", json={"request_id": "nope", "label": 1}, headers=stack.headers(),
                         timeout=10).status_code == 404
    assert requests.post(f"{stack.url}/feedback", json={"request_id": answered[0][0], "label": "x"},
                         headers=stack.headers(), timeout=10).status_code == 400

    def accuracy() -> dict[str, tuple[int, float]]:
        arms = {row["arm"]: row for row in stack.report("fashion")["arms"]}
        return {arm: (arms[arm]["feedback"], arms[arm]["accuracy"]) for arm in ("full", "int8")}

    expected = {arm: (4, sum(t == p for _, t, a, p in answered if a == arm) / 4) for arm in ("full", "int8")}
    assert accuracy() == expected
    process.stop(stack.config_path)
    process.start(stack.config_path)
    assert accuracy() == expected  # durable in SQLite
    report = stack.report("fashion")
    arms = {row["arm"]: row for row in report["arms"]}
    assert arms["full"]["accuracy_ci95"] is not None and arms["full"]["vs_control"] is None  # full is control
    versus = arms["int8"]["vs_control"]
    assert versus is not None and 0 <= versus["p_value"] <= 1
    assert versus["difference"] == pytest.approx(expected["int8"][1] - expected["full"][1])


def test_only_the_admin_token_may_pin_a_drained_arm(stack: Stack, test_images: Any) -> None:
    body = encode_image(test_images[0][4])
    url = f"{stack.url}/admin/experiments/failover/weights"
    assert requests.put(url, json={"weights": {"pruned": 0}}, headers=stack.admin(), timeout=10).status_code == 200
    try:
        refused = stack.predict("failover", body, **{"X-Arm": "pruned"})
        assert refused.status_code == 403 and "only the admin token may pin it" in refused.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as denied:
            stack.grpc_predict("failover", body, (("x-arm", "pruned"),))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        operator = requests.post(f"{stack.url}/predictions/failover", data=body, timeout=30,
                                 headers={**stack.admin(), "Content-Type": "image/png", "X-Arm": "pruned"})
        assert operator.status_code == 200 and operator.headers["X-Arm"] == "pruned"
    finally:
        requests.delete(f"{stack.url}/admin/experiments/failover/override", headers=stack.admin(), timeout=10)
    assert stack.predict("failover", body, **{"X-Arm": "pruned"}).status_code == 200


def test_deep_or_large_json_to_feedback_and_admin_is_a_400(stack: Stack) -> None:
    nested = b"[" * 5000 + b"]" * 5000  # 10 kB, but deeper than any JSON parser recurses
    big = b'"' + b"x" * 200_000 + b'"'
    for send, url, headers in ((requests.post, f"{stack.url}/feedback", stack.headers()),
                               (requests.put, f"{stack.url}/admin/experiments/fashion/weights", stack.admin())):
        deep = send(url, data=b'{"request_id": ' + nested + b', "label": 1}', headers=headers, timeout=10)
        assert deep.status_code == 400 and deep.json()["error"]["message"] == "body is JSON nested too deeply"
        large = send(url, data=b'{"request_id": ' + big + b', "label": 1}', headers=headers, timeout=10)
        assert large.status_code == 400 and "larger than this endpoint's 65536" in large.json()["error"]["message"]


def test_grpc_refuses_a_missing_token_before_reading_the_message(stack: Stack) -> None:
    """Bytes that are no protobuf at all: without a token the answer is UNAUTHENTICATED (nothing was parsed);
    with the token the router tries to parse them and fails."""
    method = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
    garbage = b"\xff" * 1024
    with grpc.insecure_channel(stack.grpc_target) as channel:
        call = channel.unary_unary(method)  # raw bytes in and out, no serializer
        with pytest.raises(grpc.RpcError) as anonymous:
            call(garbage, timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as parsed:
            call(garbage, metadata=(("authorization", f"Bearer {stack.client_token}"),), timeout=10)
        assert parsed.value.code() != grpc.StatusCode.UNAUTHENTICATED


def test_requests_beyond_the_in_flight_limit_are_refused_not_queued(torchserve: server.Instance,
                                                                    tmp_path: Path, test_images: Any) -> None:
    # fashion-distilled waits 300 ms for a batch of 4 in the test TorchServe: 6 concurrent requests to a router
    # that takes 2 at a time see 2 answered and the rest refused at once.
    limited = launch(torchserve, tmp_path, {"slow": {"arms": {"d": {"model": "fashion-distilled", "weight": 1}}}},
                     max_in_flight=2)
    body = encode_image(test_images[0][5])
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(limited.predict, "slow", body) for _ in range(6)]
            time.sleep(0.1)  # two are waiting out the 300 ms batch window: the limit is full
            health = requests.get(f"{limited.url}/healthz", timeout=10)
            rest = [future.result() for future in futures]
        assert health.status_code == 200  # probes, metrics and admin are never refused by the limit
        statuses = sorted(r.status_code for r in rest)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 2, statuses
        refused = next(r for r in rest if r.status_code == 503)
        assert refused.headers["Retry-After"] == "1" and "limit of 2 requests" in refused.json()["error"]["message"]

        def grpc_outcome(_: int) -> str:
            try:
                limited.grpc_predict("slow", body)
                return "OK"
            except grpc.RpcError as error:
                return str(error.code().name)

        with ThreadPoolExecutor(6) as pool:
            outcomes = sorted(pool.map(grpc_outcome, range(6)))
        assert outcomes.count("OK") >= 2 and outcomes.count("RESOURCE_EXHAUSTED") >= 2, outcomes
    finally:
        process.stop(limited.config_path)
