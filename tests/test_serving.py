"""The real TorchServe, started from real .mar files (built from the dry-run checkpoints) on free loopback
ports in its own run directory, answering real REST and gRPC requests."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from serving import protos, server
from serving.client import Client, Target
from serving.project import SERVED_VARIANTS, model_name
from serving.ts_config import allowed_urls, read_properties
from tests.conftest import SLOW_BATCH_VARIANTS, Chain, encode_image, in_process_labels

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def instance(torchserve: server.Instance) -> server.Instance:
    return torchserve


@pytest.fixture(scope="module")
def client(instance: server.Instance) -> Iterator[Client]:
    """One client for the module: its connections and key file outlive a TorchServe restart (new keys)."""
    with Client(instance) as shared:
        yield shared


def rest(client: Client, model: str, body: bytes, content_type: str, version: str | None = None) -> tuple[int, Any]:
    reply = client.predict_rest(Target(model, version), body, content_type)
    return reply.status, reply.json()


def over_grpc(client: Client, model: str, body: bytes, version: str | None = None) -> Any:
    return client.predict_grpc(Target(model, version), {"data": body}).json()


@pytest.mark.parametrize("variant", SERVED_VARIANTS)  # each PyTorch variant and each ONNX form
def test_every_variant_answers_rest_and_grpc_like_the_in_process_model(
    client: Client, chain: Chain, test_images: Any, variant: str
) -> None:
    images, _ = test_images
    expected = in_process_labels(chain, variant, images[:4])
    name = model_name(variant)
    answers = [rest(client, name, encode_image(images[i]), "image/png") for i in range(4)]
    assert [status for status, _ in answers] == [200] * 4
    assert [answer["label"] for _, answer in answers] == expected
    assert answers[0][1]["model"] == {"name": name, "version": "1.0", "variant": variant}
    body = json.dumps({"data": images[0].tolist(), "topk": 5}).encode()
    status, answer = rest(client, name, body, "application/json")
    assert status == 200 and answer["label"] == expected[0] and len(answer["topk"]) == 5
    grpc_answers = [over_grpc(client, name, encode_image(images[i])) for i in range(4)]
    assert [answer["label"] for answer in grpc_answers] == expected


def test_versions_are_pinned_and_the_default_switch_survives_a_restart(instance: server.Instance, client: Client,
                                                                      test_images: Any) -> None:
    images, _ = test_images
    body = encode_image(images[0])
    model = model_name("full")
    for version in ("1.0", "2.0"):
        status, answer = rest(client, model, body, "image/png", version=version)
        assert status == 200 and answer["model"]["version"] == version
        assert over_grpc(client, model, body, version=version)["model"]["version"] == version
    assert rest(client, model, body, "image/png")[1]["model"]["version"] == "1.0"

    server.set_default(instance, model, "2.0")
    assert rest(client, model, body, "image/png")[1]["model"]["version"] == "2.0"
    old_key = client.token()
    server.stop(instance)
    assert not instance.key_file.exists() and server.running_pid(instance) is None
    server.start(instance, timeout=240)
    assert client.token() != old_key  # a restarted TorchServe has new keys: the client read them
    assert rest(client, model, body, "image/png")[1]["model"]["version"] == "2.0"
    assert over_grpc(client, model, body)["model"]["version"] == "2.0"
    assert server.model_status(instance)[(model, "2.0")]["default"]


def test_requests_without_a_valid_token_are_refused(instance: server.Instance, test_images: Any) -> None:
    images, _ = test_images
    url = f"{instance.inference_url}/predictions/{model_name('int8')}"
    assert requests.post(url, data=encode_image(images[0]), timeout=10).status_code == 400
    bad = {"Authorization": "Bearer not-the-key"}
    assert requests.post(url, data=encode_image(images[0]), headers=bad, timeout=10).status_code == 400
    assert requests.get(f"{instance.management_url}/models", headers=instance.headers(), timeout=10).status_code \
        == 400  # the inference key does not open the management API
    stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(grpc.insecure_channel(instance.grpc_target))
    request = protos.load("inference_pb2").PredictionsRequest(model_name=model_name("int8"),
                                                              input={"data": encode_image(images[0])})
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predictions(request, metadata=[("authorization", "Bearer wrong")], timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_model_registration_api_is_off(instance: server.Instance) -> None:
    response = requests.post(f"{instance.management_url}/models?url=fashion-full-v1.0.mar",
                             headers=instance.headers("management"), timeout=10)
    assert response.status_code == 405


def worker_pids(instance: server.Instance, model: str) -> list[int]:
    described = requests.get(f"{instance.management_url}/models/{model}", headers=instance.headers("management"),
                             timeout=10).json()
    return sorted(worker["pid"] for version in described for worker in version["workers"])


@pytest.mark.parametrize("variant", SLOW_BATCH_VARIANTS)  # PyTorch and ONNX Runtime, each with a 300 ms window
def test_a_bad_request_in_a_batch_of_good_ones_fails_alone(instance: server.Instance, client: Client, chain: Chain,
                                                          test_images: Any, variant: str) -> None:
    images, _ = test_images
    model = model_name(variant)
    pids_before = worker_pids(instance, model)
    bodies = [(encode_image(images[0]), "image/png"), (b"\x89PNG\r\n\x1a\ntruncated", "image/png"),
              (json.dumps({"data": images[1].tolist()}).encode(), "application/json"),
              (json.dumps({"data": [float("nan")] * 784}).encode(), "application/json")]
    url = f"{instance.inference_url}/predictions/{model}"

    def post(item: tuple[bytes, str]) -> requests.Response:
        return requests.post(url, data=item[0], headers={**instance.headers(), "Content-Type": item[1]}, timeout=30)

    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent, inside one 300 ms batch window
        responses = list(pool.map(post, bodies))
    assert [response.status_code for response in responses] == [200, 400, 200, 400]
    assert [responses[0].json()["label"], responses[2].json()["label"]] == in_process_labels(chain, variant,
                                                                                              images[:2])
    assert "cannot decode the image" in responses[1].json()["error"]["message"]
    assert "NaN or infinity" in responses[3].json()["error"]["message"]
    assert max(int(response.headers["X-Batch-Size"]) for response in responses) >= 2  # they did share a batch
    grpc_answer = over_grpc(client, model, b"not an image")
    assert grpc_answer["error"]["code"] == 400  # gRPC carries the error in the body
    assert worker_pids(instance, model) == pids_before  # no worker restarted


def test_open_inference_protocol_v2(instance: server.Instance, chain: Chain, test_images: Any) -> None:
    images, _ = test_images
    headers = instance.headers()
    assert requests.get(f"{instance.inference_url}/v2/health/ready", headers=headers, timeout=10).status_code == 200
    body = {"id": "req-1", "inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                                       "data": images[2].flatten().tolist()}]}
    response = requests.post(f"{instance.inference_url}/v2/models/{model_name('pruned')}/infer", json=body,
                             headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    assert outputs["label"]["data"] == [in_process_labels(chain, "pruned", images[2:3])[0]]
    assert len(outputs["probabilities"]["data"]) == 10
    image_body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                              "data": [base64.b64encode(encode_image(images[2])).decode()]}]}
    response = requests.post(f"{instance.inference_url}/v2/models/{model_name('pruned')}/infer", json=image_body,
                             headers=headers, timeout=10)
    assert response.json()["outputs"][0]["data"] == outputs["label"]["data"]


def test_cli_predicts_over_rest_and_grpc(instance: server.Instance, test_images: Any, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from serving.__main__ import get_args_parser, main

    images, _ = test_images
    image = tmp_path / "x.png"
    image.write_bytes(encode_image(images[3]))
    answers = []
    for extra in ([], ["--grpc"]):
        args = get_args_parser().parse_args(["--run-dir", str(instance.run_dir), "predict", str(image),
                                             "--model", model_name("int8"), "--topk", "2", *extra])
        assert main(args) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["label"] == answers[1]["label"]
    assert len(answers[0]["topk"]) == len(answers[1]["topk"]) == 2


def test_runtime_files_stay_in_the_run_directory(instance: server.Instance) -> None:
    config = (instance.run_dir / "config.properties").read_text()
    assert "disable_token_authorization=false" in config and "enable_model_api=false" in config
    assert read_properties(config)["allowed_urls"] == allowed_urls(instance.model_store)
    assert instance.key_file.is_file() and (instance.run_dir / "logs" / "ts_log.log").is_file()
    assert instance.pid_file.is_file()
    metrics = requests.get(f"{instance.metrics_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "# TYPE" in metrics.text


def test_stop_without_a_server_is_a_no_op(tmp_path: Path) -> None:
    from serving.__main__ import get_args_parser, main

    assert main(get_args_parser().parse_args(["--run-dir", str(tmp_path), "stop"])) == 0
