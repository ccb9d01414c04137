"""Secure by default, checked on the running processes, each check a row of the reliability report's security
table: nothing listens beyond loopback; inference needs a token at the router and at TorchServe; TorchServe's
management API is not reachable through the router; the router's admin API needs its own token; models cannot be
registered over the API, and where a user turns that on, `allowed_urls` admits only our model store and a `.mar`
whose weights do not match their card's sha256 is refused at load; token files are private and no token is
written to any log."""

from __future__ import annotations

import ipaddress
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import requests
import yaml

from loadtest.workload import children
from router import process
from router.config import load_config
from serving import protos, server
from serving.archive import build_archive, model_name
from serving.instance import free_ports
from tests.conftest import Chain, encode_image
from tests.reliability.conftest import ChaosReport
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router

ROWS: list[tuple[str, str, str]] = []  # (check, what was tried, what happened)


@pytest.fixture(scope="module", autouse=True)
def security_table(chaos_report: ChaosReport) -> Iterator[None]:
    yield
    lines = ["| check | tried | result |", "|---|---|---|"]
    lines += [f"| {check} | {tried} | {result} |" for check, tried, result in ROWS]
    chaos_report.add("Security", "\n".join(lines))




def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by these processes (psutil)."""
    return {(connection.laddr.ip, connection.laddr.port) for pid in pids
            for connection in psutil.Process(pid).net_connections(kind="tcp")
            if connection.status == psutil.CONN_LISTEN}


def test_nothing_listens_beyond_loopback(stack: Stack) -> None:  # noqa: F811 (the imported fixture)
    frontend = server.running_pid(stack.torchserve)
    assert frontend is not None
    workers = children(frontend)
    router_pid = process.running_pid(load_config(stack.config_path))
    assert router_pid is not None
    listening = listening_addresses([frontend, *workers, router_pid])
    ports = stack.torchserve.ports
    expected = {ports.inference, ports.management, ports.metrics, ports.grpc_inference, ports.grpc_management,
                int(stack.url.rsplit(":", 1)[1]), int(stack.grpc_target.rsplit(":", 1)[1])}
    assert expected <= {port for _, port in listening}  # the check sees what it must see
    # Java listens on IPv6 sockets bound to the IPv4-mapped loopback address (::ffff:127.0.0.1): loopback too
    outside = [(address, port) for address, port in listening if not is_loopback(address)]
    assert not outside, f"listening beyond loopback: {outside}"
    ROWS.append(("no listener beyond loopback", f"every TCP socket in LISTEN state of TorchServe's frontend, its "
                 f"{len(workers)} workers and the router (psutil)",
                 f"{len(listening)} listeners, all on {', '.join(sorted({a for a, _ in listening}))}"))


def is_loopback(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return parsed.is_loopback or (mapped is not None and mapped.is_loopback)


def grpc_code(target: str, token: str | None, body: bytes, model: str = "fashion") -> str:
    stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(grpc.insecure_channel(target))
    request = protos.load("inference_pb2").PredictionsRequest(model_name=model, input={"data": body})
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        stub.Predictions(request, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return str(error.code().name)
    return "OK"


def test_inference_needs_a_token_at_the_router_and_at_torchserve(stack: Stack,  # noqa: F811
                                                                 test_images: Any) -> None:
    body = encode_image(test_images[0][0])
    router_url, direct_url = f"{stack.url}/predictions/fashion", \
        f"{stack.torchserve.inference_url}/predictions/{model_name('int8')}"
    inference_key = stack.torchserve.token()
    tokens = {"none": None, "a wrong one": "wrong", "TorchServe's inference key": inference_key}

    def rest(url: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(url, data=body, headers={**headers, "Content-Type": "image/png"}, timeout=10).status_code

    router_rest = {name: rest(router_url, token) for name, token in tokens.items()}
    router_grpc = {name: grpc_code(stack.grpc_target, token, body) for name, token in tokens.items()}
    direct_rest = {name: rest(direct_url, token) for name, token in list(tokens.items())[:2]}
    direct_grpc = {name: grpc_code(stack.torchserve.grpc_target, token, body, model_name("int8"))
                   for name, token in list(tokens.items())[:2]}
    assert set(router_rest.values()) == {401} and set(router_grpc.values()) == {"UNAUTHENTICATED"}
    # TorchServe 0.12 answers a missing or wrong key with 400 over REST and PERMISSION_DENIED over gRPC
    assert set(direct_rest.values()) == {400} and set(direct_grpc.values()) <= {"PERMISSION_DENIED", "UNAUTHENTICATED"}
    assert rest(router_url, stack.client_token) == 200 and rest(direct_url, inference_key) == 200  # keys do work
    ROWS.append(("inference needs a token (router)", "REST and gRPC with no token, a wrong one, TorchServe's key",
                 f"REST {sorted(set(router_rest.values()))}, gRPC {sorted(set(router_grpc.values()))}; the client "
                 "token: 200"))
    ROWS.append(("inference needs a token (TorchServe)", "REST and gRPC with no key and a wrong one",
                 f"REST {sorted(set(direct_rest.values()))} (TorchServe's code for it), gRPC "
                 f"{sorted(set(direct_grpc.values()))}; its inference key: 200"))


def test_torchserve_management_is_not_reachable_through_the_router(stack: Stack, test_images: Any) -> None:  # noqa: F811
    attempts = [("GET", "/models"), ("GET", "/models/fashion-full"), ("PUT", "/models/fashion-full?min_worker=0"),
                ("POST", "/models?url=http://169.254.169.254/x.mar"), ("DELETE", "/models/fashion-full/1.0"),
                ("GET", "/api-description"), ("OPTIONS", "/"),
                # the v2 paths the router serves are inference, metadata and health; the protocol's model
                # repository extension (load, unload) is management, and is not there
                ("POST", "/v2/repository/models/fashion-full/unload"), ("POST", "/v2/repository/index"),
                ("POST", "/predictions/..%2Fmodels"), ("GET", "/metrics/../models")]
    body = encode_image(test_images[0][0])
    answers = {f"{method} {path}": requests.request(method, stack.url + path, data=body, timeout=10,
                                                    headers={**stack.admin(), "Content-Type": "image/png"}).status_code
               for method, path in attempts}
    assert set(answers.values()) <= {404, 405}, answers
    management = protos.load("management_pb2_grpc").ManagementAPIsServiceStub(grpc.insecure_channel(stack.grpc_target))
    with pytest.raises(grpc.RpcError) as refused:
        management.ListModels(protos.load("management_pb2").ListModelsRequest(), timeout=10,
                              metadata=(("authorization", f"Bearer {stack.admin_token}"),))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    ROWS.append(("TorchServe's management API not reachable through the router",
                 f"{len(attempts)} management-style REST requests to the router with the admin token (list, "
                 "describe, scale, register from a URL, unregister, path tricks); gRPC ManagementAPIsService",
                 f"REST {sorted(set(answers.values()))} for all; gRPC {refused.value.code().name}"))


def test_the_admin_api_needs_its_own_token(stack: Stack) -> None:  # noqa: F811
    url = f"{stack.url}/admin/experiments"
    tried = {"none": {}, "the client token": {"Authorization": f"Bearer {stack.client_token}"},
             "TorchServe's management key": {"Authorization": f"Bearer {stack.torchserve.token('management')}"},
             "the admin token": stack.admin()}
    answers = {name: requests.get(url, headers=headers, timeout=10).status_code for name, headers in tried.items()}
    assert answers == {"none": 401, "the client token": 403, "TorchServe's management key": 401,
                       "the admin token": 200}
    ROWS.append(("the router's admin API needs its own token", f"GET /admin/experiments with {', '.join(tried)}",
                 ", ".join(f"{code}" for code in answers.values())))


def test_token_files_are_private(stack: Stack) -> None:  # noqa: F811
    files = [stack.torchserve.key_file, load_config(stack.config_path).tokens_file]
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    ROWS.append(("token files private", ", ".join(modes),
                 ", ".join(f"{name} {mode:o}" for name, mode in modes.items())))


def test_no_token_reaches_any_log(stack: Stack) -> None:  # noqa: F811
    keys = stack.torchserve._read_keys()
    secrets = [keys[kind]["key"] for kind in ("inference", "management", "API")]
    secrets += [stack.client_token, stack.admin_token]
    logs = [*stack.torchserve.run_dir.joinpath("logs").rglob("*.log"), stack.log_file]
    assert logs and all(path.is_file() for path in logs)
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = [secret[:6] + "…" for secret in secrets if secret in text]
        assert not leaked, f"{path} contains tokens {leaked}"
    ROWS.append(("no token in any log", f"{len(secrets)} tokens (TorchServe's 3 keys, the router's 2) searched in "
                 f"{len(logs)} log files of TorchServe and the router, after the whole suite's traffic",
                 "none found"))


def test_model_registration_is_off_and_allowed_urls_and_sha256_guard_it_when_on(
        stack: Stack, chain: Chain, test_images: Any, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    off = requests.post(f"{stack.torchserve.management_url}/models",
                        params={"url": "http://169.254.169.254/latest/x.mar"},
                        headers=stack.torchserve.headers("management"), timeout=10)
    assert off.status_code == 405
    # A user who turns registration on: only archives from our model store may load, and only untampered ones.
    store = tmp_path / "model_store"
    build_archive("distilled", "1.0", chain.directory, store)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    shutil.copy(chain.directory / "int8.card.json", tampered)
    shutil.copy(chain.weights("distilled"), tampered / "int8.pt")  # other weights under the int8 card
    archive = build_archive("int8", "1.0", tampered, store)
    base = tmp_path / "config.properties"
    base.write_text(server.BASE_CONFIG.read_text().replace("enable_model_api=false", "enable_model_api=true"))
    monkeypatch.setattr(server, "BASE_CONFIG", base)
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {model_name("distilled"): {
        "variant": "distilled", "versions": ["1.0"], "default": "1.0"}}}))
    instance = server.Instance(tmp_path / "run", store, models, server.Ports(*free_ports(6)),
                               model_configs=stack.torchserve.model_configs)
    server.start(instance, timeout=240)
    try:
        headers = instance.headers("management")
        outside = {url: requests.post(f"{instance.management_url}/models", params={"url": url}, headers=headers,
                                      timeout=30) for url in ("http://169.254.169.254/latest/x.mar",
                                                              "file:///etc/passwd",
                                                              f"file://{store}/%2E%2E/outside.mar")}
        loaded = requests.post(f"{instance.management_url}/models", headers=headers, timeout=120,
                               params={"url": archive.name, "initial_workers": 1, "synchronous": "true"})
        predicted = requests.post(f"{instance.inference_url}/predictions/{model_name('int8')}",
                                  data=encode_image(test_images[0][0]), headers=instance.headers(), timeout=30)
    finally:
        server.stop(instance)
    for answer in outside.values():
        assert answer.status_code == 404 and "does not match any allowed URL(s)" in answer.json()["message"]
    assert loaded.status_code == 500 and "Failed to start workers" in loaded.json()["message"]
    assert predicted.status_code == 503, predicted.text
    log_text = "".join(path.read_text(errors="replace") for path in (tmp_path / "run" / "logs").rglob("*.log"))
    assert "does not match its card" in log_text
    ROWS.append(("model registration over the API", "POST /models?url=http://169.254.169.254/… with the "
                 "management key", f"{off.status_code} (enable_model_api=false)"))
    ROWS.append(("allowed_urls (registration turned on)", ", ".join(outside),
                 ", ".join(f"{a.status_code} “{a.json()['message']}”" for a in outside.values())))
    ROWS.append(("a .mar whose weights do not match their card's sha256", "register it from the model store "
                 "(registration turned on); then predict", f"register {loaded.status_code} “"
                 f"{loaded.json()['message']}”, the worker log says the sha256 does not match its card; predict "
                 f"{predicted.status_code}"))
