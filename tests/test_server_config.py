"""The serving stage's pieces one by one: the rendered TorchServe configuration (allowed_urls above all), the
models file, the key file, how the TorchServe client reads answers, pid-file process control — and key renewal
against the real TorchServe."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import requests
import yaml

from serving import server
from serving.client import AsyncClient, AttemptFailed, Client, Refused, Target, Unavailable
from serving.instance import Instance, Ports
from serving.keys import KeyFile, expires_soon
from serving.models_file import write_default
from serving.pidfile import PidFile
from serving.project import MODEL_CONFIGS
from serving.transports import GrpcFailed, GrpcRequest, HttpRequest, HttpResponse, SendFailed
from serving.ts_config import allowed_urls, read_properties, render_config

MODELS = """# comment that must survive
models:
  fashion-full:
    variant: full
    versions: ["1.0", "2.0"]
    default: "1.0"
  fashion-int8:
    variant: int8
    versions: ["1.0"]
    default: "1.0"
"""


def test_switching_the_default_keeps_the_file_as_written(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    write_default(models, "fashion-full", "2.0")
    assert models.read_text() == MODELS.replace('default: "1.0"', 'default: "2.0"', 1)
    with pytest.raises(server.ServeError, match=r"no version 3\.0"):
        write_default(models, "fashion-full", "3.0")


def instance_with_archives(tmp_path: Path, store_name: str = "store") -> Instance:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    store = tmp_path / store_name
    store.mkdir()
    for name in ("fashion-full-v1.0.mar", "fashion-full-v2.0.mar", "fashion-int8-v1.0.mar"):
        (store / name).write_bytes(b"")
    return Instance(tmp_path / "run", store, models, Ports(18080, 18081, 18082, 17070, 17071))


def test_rendered_config_is_loopback_only_with_the_declared_default(tmp_path: Path) -> None:
    instance = instance_with_archives(tmp_path)
    config = read_properties(render_config(instance))
    addresses = [config[key] for key in ("inference_address", "management_address", "metrics_address")]
    assert all(address.startswith("http://127.0.0.1:") for address in addresses)
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    assert config["disable_token_authorization"] == "false" and config["enable_model_api"] == "false"
    assert config["model_store"] == str(instance.model_store)
    snapshot = json.loads(config["model_snapshot"])
    assert snapshot["modelCount"] == 3
    assert snapshot["models"]["fashion-full"]["1.0"]["defaultVersion"] is True
    assert snapshot["models"]["fashion-full"]["2.0"]["defaultVersion"] is False
    settings = yaml.safe_load((MODEL_CONFIGS / "full.yaml").read_text())
    assert snapshot["models"]["fashion-full"]["2.0"]["batchSize"] == settings["batchSize"]


def torchserve_admits(patterns: str, url: str) -> bool:
    """TorchServe 0.12's ArchiveUtils.validateURL: allowed_urls split on ",", each part a Java regex that must
    match the whole URL, case-insensitively (the escapes and the scoped (?-i:...) we render mean the same in
    Java and Python)."""
    return any(re.fullmatch(pattern, url, re.IGNORECASE) for pattern in patterns.split(","))


def test_allowed_urls_admit_only_archives_directly_in_the_model_store(tmp_path: Path) -> None:
    # A store path with regex metacharacters: unescaped, "." would match any character and "+" repeat.
    instance = instance_with_archives(tmp_path, "model.store+1")
    rendered = render_config(instance)
    line = next(line for line in rendered.splitlines() if line.startswith("allowed_urls="))
    assert "\\\\." in line  # regex escapes doubled: Java's Properties.load drops a backslash before "."
    patterns = read_properties(rendered)["allowed_urls"]
    assert patterns == allowed_urls(instance.model_store)
    store, parent = instance.model_store, instance.model_store.parent
    assert torchserve_admits(patterns, f"file://{store}/fashion-full-v1.0.mar")
    refused = [
        f"file://{store}/../model.store+1/fashion-full-v1.0.mar",  # "../" out and back
        f"file://{store}/../outside.mar",
        f"file://{store}/%2E%2E/outside.mar",  # Java's file: URLs decode %2E; TorchServe's own ".." check misses it
        f"file://{store}/..%2Foutside.mar",
        f"file://{store}/sub/fashion-full-v1.0.mar",  # a subfolder
        f"file://{store}/fashion-full-v1.0.mar/../../etc/passwd",
        f"file://{store}/key_file.json",  # not an archive
        f"file://{parent}/modelXstore+1/fashion-full-v1.0.mar",  # "." taken as a regex
        f"file://{parent}/model.storeee1/fashion-full-v1.0.mar",  # "+" taken as a regex
        f"file://{store}-other/fashion-full-v1.0.mar",
        f"file://{str(store).upper()}/fashion-full-v1.0.mar",  # another folder on this file system
        f"http://169.254.169.254/latest/{store}/fashion-full-v1.0.mar",
        f"file://{store}/fashion-full-v1.0.mar,file:///etc/passwd",
    ]
    assert [url for url in refused if torchserve_admits(patterns, url)] == []


def test_a_model_store_path_that_cannot_be_expressed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(server.ServeError, match="may not contain ','"):
        allowed_urls(tmp_path / "a,b")


def test_a_missing_archive_is_named(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    instance = Instance(tmp_path / "run", tmp_path, models)
    with pytest.raises(server.ServeError, match=r"fashion-full-v1\.0\.mar is missing; run `make archive`"):
        render_config(instance)


def iso(seconds_from_now: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return moment.isoformat().replace("+00:00", "Z")


def test_the_expiry_test(tmp_path: Path) -> None:
    assert expires_soon(iso(30)) and not expires_soon(iso(1800)) and not expires_soon(None)
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "i1", "expiration time": iso(30)},
                                "management": {"key": "m1", "expiration time": iso(1800)}, "API": {"key": "a1"}}))
    keys = KeyFile(path)
    assert keys.expiring(60) == ["inference"] and keys.expiring(3600) == ["inference", "management"]
    assert keys.expiring(3600, ("API",)) == []  # the API key never expires


def test_the_key_file_is_re_read_when_it_changes_and_survives_a_half_written_one(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    keys = KeyFile(path, recheck_s=0)
    with pytest.raises(Exception, match="does not exist: is TorchServe running"):
        keys.key()
    document = {"inference": {"key": "i1"}, "management": {"key": "m1"}, "API": {"key": "a1"}}
    path.write_text(json.dumps(document))
    assert keys.key() == "i1"
    path.write_text(json.dumps({**document, "inference": {"key": "i2-longer"}}))
    assert keys.key() == "i2-longer"
    path.write_text('{"inference": {"ke')  # TorchServe caught mid-write
    assert keys.key() == "i2-longer"
    path.write_text(json.dumps({**document, "inference": {"key": "i3"}}))
    assert keys.key() == "i3"
    patient = KeyFile(path, recheck_s=3600)  # the router's kind: looks at the file once in a while
    assert patient.key() == "i3"
    path.write_text(json.dumps({**document, "inference": {"key": "i4"}}))
    assert patient.key() == "i3"
    patient.forget()  # what the client does when TorchServe refuses the key
    assert patient.key() == "i4"


# --- how the client reads TorchServe's answers: its operations driven by hand, with scripted answers ---------------
@pytest.fixture
def core(tmp_path: Path) -> Client:
    (tmp_path / "key_file.json").write_text(json.dumps(
        {"inference": {"key": "inf-1"}, "management": {"key": "man-1"}, "API": {"key": "api-1"}}))
    instance = Instance(tmp_path, tmp_path, tmp_path / "models.yaml", Ports(1, 2, 3, 4, 5))
    return Client(instance)  # never sends: the tests below play the transport


def drive(flow: Any, answers: list[Any]) -> tuple[Any, list[Any]]:
    """Run an operation, answering each request it yields with the next scripted answer (an exception is thrown
    in, as a transport does). Its result and the requests it made."""
    sent = [next(flow)]
    try:
        for answer in answers:
            sent.append(flow.throw(answer) if isinstance(answer, Exception) else flow.send(answer))
    except StopIteration as done:
        return done.value, sent
    raise AssertionError(f"the operation wanted more answers after {sent}")


def ok(body: Any, status: int = 200, **headers: str) -> HttpResponse:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, data, {"Content-Type": "application/json", **headers})


def test_a_prediction_is_a_reply_and_a_5xx_or_no_answer_an_attempt_that_failed(core: Client) -> None:
    target = Target("fashion-full", "2.0")
    reply, sent = drive(core._predict_rest_flow(target, b"png", "image/png", 3.0),
                        [ok({"label": 7}, **{"X-Batch-Size": "4"})])
    request = sent[0]
    assert isinstance(request, HttpRequest) and request.url == "http://127.0.0.1:1/predictions/fashion-full/2.0"
    assert request.headers == {"Authorization": "Bearer inf-1", "Content-Type": "image/png"}
    assert request.timeout_s == 3.0 and request.body == b"png"
    assert (reply.status, reply.json(), reply.headers) == (200, {"label": 7}, (("X-Batch-Size", "4"),))
    bad_input, _ = drive(core._predict_rest_flow(target, b"x", "image/png", None), [ok({"error": {}}, 400)])
    assert bad_input.status == 400  # the input's fault, not the target's: an answer
    for answer, kind in ((ok(b"no worker", 503), "server_error"), (SendFailed("timeout", "3 s"), "timeout"),
                         (SendFailed("connection", "refused"), "connection")):
        with pytest.raises(AttemptFailed) as failed:
            drive(core._predict_rest_flow(target, b"x", "image/png", None), [answer])
        assert failed.value.kind == kind and "fashion-full/2.0" in failed.value.detail


def test_a_refused_key_is_read_again_and_tried_once_more(core: Client, tmp_path: Path) -> None:
    target = Target("fashion-int8")
    refused = ok({"code": 400, "type": "InvalidKeyException",
                  "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"},
                 400)
    # A handler's 400 is the client's answer, whatever text it carries
    echo = ok({"error": {"code": 400, "type": "InvalidKeyException", "message": "unknown field 'InvalidKeyException'"}},
              400)
    assert drive(core._predict_rest_flow(target, b"x", "image/png", None), [echo])[0].status == 400
    flow = core._predict_rest_flow(target, b"x", "image/png", None)
    first = next(flow)
    assert first.headers["Authorization"] == "Bearer inf-1"
    # TorchServe renewed the key (someone else asked) and rewrote the file (same size) before the client looked again
    (tmp_path / "key_file.json").write_text(json.dumps(
        {"inference": {"key": "inf-2"}, "management": {"key": "man-1"}, "API": {"key": "api-1"}}))
    second = flow.send(refused)
    assert second.headers["Authorization"] == "Bearer inf-2"
    with pytest.raises(StopIteration) as done:
        flow.send(ok({"label": 1}))
    assert done.value.value.status == 200
    with pytest.raises(Unavailable, match="refused the inference key"):
        drive(core._predict_rest_flow(target, b"x", "image/png", None), [refused, refused])


def test_grpc_failures_and_refusals(core: Client) -> None:
    target = Target("fashion-int8")
    for code, kind in ((grpc.StatusCode.UNAVAILABLE, "connection"), (grpc.StatusCode.INTERNAL, "server_error"),
                       (grpc.StatusCode.DEADLINE_EXCEEDED, "timeout")):
        with pytest.raises(AttemptFailed) as failed:
            drive(core._predict_grpc_flow(target, {"data": b"x"}, 1.0), [GrpcFailed(code, "boom")])
        assert failed.value.kind == kind
    with pytest.raises(Refused) as refused:
        drive(core._predict_grpc_flow(target, {"data": b"x"}, 1.0), [GrpcFailed(grpc.StatusCode.NOT_FOUND, "no")])
    assert refused.value.grpc_code == grpc.StatusCode.NOT_FOUND
    _, sent = drive(core._predict_grpc_flow(target, {"data": b"x"}, 1.0),
                    [GrpcFailed(grpc.StatusCode.PERMISSION_DENIED, "key"), SimpleNamespace(prediction=b"{}")])
    assert len(sent) == 2 and all(isinstance(request, GrpcRequest) for request in sent)
    assert sent[0].metadata == (("authorization", "Bearer inf-1"),)


def test_the_model_list_is_read_page_by_page_with_the_management_key(core: Client) -> None:
    served, sent = drive(core._served_models_flow(), [
        ok({"models": [{"modelName": "a"}], "nextPageToken": "1"}),
        ok({"models": [{"modelName": "b"}]}),
        ok([{"modelVersion": "1.0"}, {"modelVersion": "2.0"}]),
        ok([{"modelVersion": "1.0"}]),
    ])
    assert served == {"a": {"1.0", "2.0"}, "b": {"1.0"}}
    assert [(r.url, r.params) for r in sent] == [
        ("http://127.0.0.1:2/models", {"limit": "100"}),
        ("http://127.0.0.1:2/models", {"limit": "100", "next_page_token": "1"}),
        ("http://127.0.0.1:2/models/a/all", None), ("http://127.0.0.1:2/models/b/all", None)]
    assert all(r.headers["Authorization"] == "Bearer man-1" for r in sent)
    with pytest.raises(Unavailable, match="HTTP 400"):
        drive(core._served_models_flow(), [ok(b"Token Authorization failed", 400)])
    assert drive(core._ping_flow(), [SendFailed("connection", "refused")])[0] is False


def test_the_router_sees_the_client_errors_as_its_own(tmp_path: Path) -> None:
    from router.config import Host, Timeouts
    from router.errors import BadRequest, NotFound, UpstreamUnavailable
    from router.upstream import TorchServeClient

    async def without_torchserve() -> None:
        client = TorchServeClient(Host(key_file=tmp_path / "key_file.json"), Timeouts())
        await client.open()
        try:
            assert await client.ping() is False
            with pytest.raises(UpstreamUnavailable, match="does not exist: is TorchServe running") as missing:
                await client.predict_rest(Target("m"), b"x", "image/png", 1.0)
            assert missing.value.retry_after_s == 5
        finally:
            await client.close()
        refusals = {code: client._translate(Refused("TorchServe: no", grpc_code=code))
                    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                 grpc.StatusCode.PERMISSION_DENIED)}
        assert [type(error) for error in refusals.values()] == [NotFound, BadRequest, UpstreamUnavailable]

    asyncio.run(without_torchserve())


# --- pid files ----------------------------------------------------------------------------------------------------
@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[PidFile]:
    pid_file = PidFile(tmp_path / "sleep.pid", lambda cmdline: "sleep-marker" in " ".join(cmdline), name="sleeper")
    yield pid_file
    pid_file.stop(timeout_s=5)


def test_a_pid_file_names_our_process_only_while_it_runs(sleeper: PidFile, tmp_path: Path) -> None:
    process = sleeper.launch([sys.executable, "-c", "import time; time.sleep(60)", "sleep-marker"],
                             tmp_path / "sleep.log")
    assert sleeper.pid() == process.pid
    assert PidFile(sleeper.path, lambda cmdline: "router" in cmdline).pid() is None  # someone else's command line
    assert sleeper.stop(timeout_s=5) == process.pid
    assert process.poll() is not None and not sleeper.path.exists()
    assert sleeper.stop() is None  # nothing left to stop
    sleeper.path.write_text(f"{process.pid}\n")  # a stale file: that pid has exited
    assert sleeper.pid() is None


def test_a_pid_file_survives_a_step_of_the_wall_clock(sleeper: PidFile, tmp_path: Path) -> None:
    """A live process whose pid file looks older than the process (the clock stepped forward since it started)
    is still ours: judged by its command line, not by comparing a start time with the file's time."""
    process = sleeper.launch([sys.executable, "-c", "import time; time.sleep(60)", "sleep-marker"],
                             tmp_path / "sleep.log")
    past = time.time() - 3600
    os.utime(sleeper.path, (past, past))
    assert sleeper.pid() == process.pid
    assert sleeper.stop(timeout_s=5) == process.pid


def test_torchserve_is_ours_only_with_its_own_run_directorys_config(tmp_path: Path) -> None:
    from serving.server import FRONTEND_CLASS, _pid_file

    instance = Instance(tmp_path / "run", tmp_path / "store", tmp_path / "models.yaml")
    owns = _pid_file(instance).owns
    java = ["java", "-cp", "x", FRONTEND_CLASS, "--python", "python", "-f"]
    assert owns([*java, str(tmp_path / "run" / "config.properties"), "-s", "store"])
    assert not owns([*java, str(tmp_path / "other" / "config.properties")])  # another instance's TorchServe
    assert not owns(["python", "-f", str(tmp_path / "run" / "config.properties")])


def test_a_process_that_ignores_sigterm_is_killed(sleeper: PidFile, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
               "time.sleep(60)"
    process = sleeper.launch([sys.executable, "-c", stubborn, "sleep-marker"], tmp_path / "sleep.log")
    deadline = time.monotonic() + 10
    while "ready" not in (tmp_path / "sleep.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="serving.pidfile"):
        assert sleeper.stop(timeout_s=0.5) == process.pid
    assert process.poll() == -9 and time.monotonic() - started < 5
    assert "did not stop within 0.5 s of SIGTERM: SIGKILL" in caplog.text


# --- key renewal, against the real TorchServe ---------------------------------------------------------------------
def expiry(key: dict[str, str]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(key["expiration time"].replace("Z", "+00:00"))


def refused(response: requests.Response) -> bool:
    """TorchServe's own refusal of a key (what the client tells apart from a handler's 400)."""
    return response.status_code == 400 and response.json()["type"] == "InvalidKeyException"


@pytest.mark.serving
def test_keys_close_to_expiry_are_renewed(torchserve: Instance) -> None:
    before = torchserve._read_keys()
    ping, models = f"{torchserve.inference_url}/ping", f"{torchserve.management_url}/models"
    with Client(torchserve) as client:
        assert client.renew_keys(margin_s=60) == []  # fresh keys (60 minutes) are left alone
        assert torchserve._read_keys() == before
        # A margin longer than token_expiration_min makes every key "close to expiry".
        assert client.renew_keys(margin_s=2 * 3600) == ["inference", "management"]
        after = torchserve._read_keys()
        assert client.token("inference") == after["inference"]["key"]
    for kind, url in (("inference", ping), ("management", models)):
        old, new = before[kind]["key"], after[kind]["key"]
        assert new != old and expiry(after[kind]) >= expiry(before[kind])
        assert requests.get(url, headers={"Authorization": f"Bearer {new}"}, timeout=10).status_code == 200
        assert refused(requests.get(url, headers={"Authorization": f"Bearer {old}"}, timeout=10))
    assert after["API"]["key"] == before["API"]["key"]

    async def through_the_async_client() -> tuple[bool, dict[str, set[str]], int]:
        client = AsyncClient(torchserve)
        client.keys.recheck_s = 3600  # it looks at the key file again only when told to, or refused
        await client.open()
        try:
            assert await client.ping()  # it has read the current keys
            with Client(torchserve) as someone_else:
                assert someone_else.renew_keys(margin_s=2 * 3600) == ["inference", "management"]
            # Its inference key is now refused: it reads the file again and tries once more. The 400 it returns
            # is the handler's, about the input.
            rest = await client.predict_rest(Target("fashion-int8", "1.0"), b"not an image", "image/png", 30.0)
            assert rest.status == 400 and "error" in rest.json()  # TorchServe's refusal has no "error" key
            reply = await client.predict_grpc(Target("fashion-int8"), {"data": b"not an image"}, 30.0)
            assert await client.renew_keys(margin_s=2 * 3600) == ["inference", "management"]
            return await client.ping(), await client.served_models(), json.loads(reply.body)["error"]["code"]
        finally:
            await client.close()

    healthy, served, grpc_error = asyncio.run(through_the_async_client())
    assert healthy and served["fashion-full"] == {"1.0", "2.0"} and grpc_error == 400
    assert refused(requests.get(ping, headers={"Authorization": f"Bearer {after['inference']['key']}"}, timeout=10))
