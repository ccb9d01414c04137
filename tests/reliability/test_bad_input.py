"""The bad-input matrix: every kind of malformed request, and the worst valid images, over REST and gRPC, directly
to TorchServe and through the router, each sent inside a batch of good requests, to the distilled model in
PyTorch and to its ONNX export run by ONNX Runtime (the same handler, another runtime): each kind goes to both
models at once, into a batch of each model's own.

The Open Inference Protocol's own bad kinds (wrong shape or datatype, too many elements, missing data, raw contents
of the wrong length, an unknown output, a batch over the limit) go through the router's v2 endpoints (REST
`/v2/models/{model}/infer`, gRPC `ModelInfer`), beside good requests of both protocols, the same way.

Each bad kind must get a 4xx whose message names the problem (its key words are listed per kind; gRPC: the
documented in-body error with code 400; v2: the protocol's 400, on gRPC INVALID_ARGUMENT) — except where
TorchServe itself refuses a body over its max_request_size before any handler sees it, which is asserted exactly
as TorchServe does it. Each worst valid
image must be answered. The good requests beside them must be answered correctly; no worker may restart.

And each kind has a stated cost bound, measured on the worker that serves it, for each batch holding it (the
kind once, with good requests):
  * handler time <= HANDLER_TIME_BOUND_MS: TorchServe's own HandlerTime metric (wall clock, as BaseHandler
    records it), the figure a TorchServe operator watches. The handler's CPU time for the batch
    (HandlerCPUTime) is reported beside it;
  * worker memory: its peak resident memory while the kind is served, and what stays afterwards, at most
    MEMORY_BOUND_MB above what it held before.
The metrics are read from the [METRICS] lines TorchServe's frontend writes into ts_log.log for each batch, with
the batch's request ids and model. A kind over a bound on a model is measured again (up to TRIES times) and its
least cost kept: the two cores are shared, other processes only ever add time, and a real cost shows on every try.

Its table goes to the reliability report (`make chaos`: reports/reliability.md); `make test` runs it too.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import requests
from PIL import Image

from serving import protos, server
from serving.project import model_name
from tests.conftest import SLOW_BATCH_VARIANTS, Chain, encode_image, in_process_labels
from tests.reliability.conftest import ChaosReport
from tests.test_handler import worst_valid_images
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router

# The models under test, PyTorch's and ONNX Runtime's, each with a 300 ms batch window in the test TorchServe:
# concurrent requests share a batch, and the two models' windows run side by side, so sending each kind to both
# takes the time of one. Through the router each is a plain model name, which the router passes through (measured,
# logged, with its own limits).
VARIANTS = {model_name(variant): variant for variant in SLOW_BATCH_VARIANTS}
MODELS = tuple(VARIANTS)
TORCHSERVE_MAX_REQUEST_BYTES = 6_553_500  # its default max_request_size (config.properties leaves it as it is)
HANDLER_TIME_BOUND_MS = 50.0
MEMORY_BOUND_MB = 50.0
TRIES = 3
RETRY_PAUSE_S = 1.0
MB = 1 << 20

# How TorchServe refuses a body over max_request_size itself, before any worker sees it: REST gets a 413 with an
# empty body; its gRPC server resets the stream (RST_STREAM), which the client reports as CANCELLED.
TORCHSERVE_REST_REFUSAL = (413, "")
TORCHSERVE_GRPC_REFUSAL = ("CANCELLED", "Received RST_STREAM")


@dataclass(frozen=True)
class Kind:
    name: str
    body: bytes
    content_type: str
    words: tuple[str, ...] = ()  # what the refusal must say (lower case); none for a valid image
    valid: bool = False


def fixed_bytes(count: int, seed: int = 0) -> bytes:
    """Random-looking bytes that are the same on every run."""
    return random.Random(seed).randbytes(count)


def bomb() -> bytes:
    """A small PNG that claims 20,000 × 20,000 pixels (a decompression bomb)."""
    return encode_image(Image.new("1", (20_000, 20_000)))


def v2(shape: Any, data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}


def long_shape_body(total_bytes: int) -> tuple[bytes, int]:
    """A v2 request whose shape is a list of 1s padded to total_bytes (the CPU-time bomb of issue 11)."""
    head, tail = b'{"inputs": [{"name": "x", "datatype": "FP32", "data": [' + b"0, " * 783 + b'0], "shape": [', b"]}]}"
    factors = (total_bytes - len(head) - len(tail)) // 3
    return head + b"1, " * (factors - 1) + b"1" + tail, factors


def kinds() -> list[Kind]:
    """At least 30 ways to be wrong, and the worst images that are still right."""
    good = Image.new("L", (28, 28), 0)
    png, jpeg = encode_image(good), encode_image(good, "JPEG")
    pixels = [[0] * 28 for _ in range(28)]
    json_type = "application/json"

    def js(value: Any) -> bytes:
        return json.dumps(value).encode()

    deep: Any = 0
    for _ in range(200):
        deep = [deep]
    shape_6mb, factors_6mb = long_shape_body(6_300_000)
    shape_1mb, factors_1mb = long_shape_body(1_200_000)
    bad = [
        Kind("empty body", b"", "image/png", ("empty", "body")),
        Kind("truncated PNG", png[: len(png) // 2], "image/png", ("cannot decode",)),
        Kind("corrupt PNG (garbage after the signature)", png[:8] + fixed_bytes(64), "image/png", ("cannot decode",)),
        Kind("PNG signature only", png[:8], "image/png", ("cannot decode",)),
        Kind("truncated JPEG", jpeg[: len(jpeg) // 2], "image/jpeg", ("cannot decode",)),
        Kind("corrupt JPEG", jpeg[:4] + fixed_bytes(80), "image/jpeg", ("cannot decode",)),
        Kind("random bytes", fixed_bytes(512), "application/octet-stream", ("not an image in a format",)),
        Kind("decompression bomb (20000×20000 PNG)", bomb(), "image/png", ("too large to decode safely",)),
        Kind("PNG over the pixel cap (385×384)", encode_image(Image.new("L", (385, 384))), "image/png",
             ("too large to decode safely", "385×384")),
        Kind("image over the handler's byte limit (1.5 MB)", b"\x89PNG" + fixed_bytes(3 * MB // 2), "image/png",
             ("larger than the limit",)),
        Kind("image near the request limit (6 MB)", b"\x89PNG" + fixed_bytes(6 * MB), "image/png",
             ("larger than the limit",)),
        Kind("body over the request limit (7 MB)", b"\x89PNG" + fixed_bytes(7 * MB), "image/png", ("exceeded",)),
        Kind("invalid JSON", b'{"data": [1, 2,', json_type, ("does not parse",)),
        Kind("JSON string", js("hello"), json_type, ("not valid base64",)),
        Kind("JSON number", b"[42]", json_type, ("28×28",)),
        Kind("JSON object without data", js({"topk": 3}), json_type, ("needs a 'data' field",)),
        Kind("unknown JSON field", js({"data": pixels, "colour": "red"}), json_type, ("unknown json fields", "colour")),
        Kind("27×28 pixels", js({"data": pixels[:27]}), json_type, ("28×28", "27 rows")),
        Kind("783 flat pixels", js({"data": [0] * 783}), json_type, ("784", "783")),
        Kind("ragged rows", js({"data": [[0] * 28] * 27 + [[0] * 27]}), json_type, ("28×28", "27/28")),
        Kind("strings as pixels", js({"data": [["a"] * 28] * 28}), json_type, ("must be numbers",)),
        Kind("NaN pixels", b'{"data": [' + b",".join([b"NaN"] * 784) + b"]}", json_type, ("nan or infinity",)),
        Kind("infinite pixels", b'{"data": [' + b",".join([b"Infinity"] * 784) + b"]}", json_type,
             ("nan or infinity",)),
        Kind("negative pixels", js({"data": [-5] * 784}), json_type, ("[0, 255]", "-5")),
        Kind("huge pixels", js({"data": [1e30] * 784}), json_type, ("[0, 255]", "1e+30")),
        Kind("booleans as pixels", js({"data": [True] * 784}), json_type, ("must be numbers", "true")),
        Kind("null data", js({"data": None}), json_type, ("needs a 'data' field",)),
        Kind("deep nesting (200 levels)", js({"data": deep}), json_type, ("28×28",)),
        Kind("JSON nested 6 MB deep", b"[" * (6 * MB), json_type, ("does not parse",)),
        Kind("6 MB JSON list of numbers", b'{"data": [' + b"0.1," * (3 * MB // 2) + b"0]}", json_type,
             ("more than the 4096 accepted",)),
        Kind("invalid base64", js({"data": "!!not base64!!"}), json_type, ("not valid base64",)),
        Kind("base64 of a non-image", js({"data": base64.b64encode(b"hello world").decode()}), json_type,
             ("not an image in a format",)),
        Kind("unicode garbage", "{\"data\": \"\u202e\U0001f4a5\u0000\ufffd\"}".encode(), json_type,
             ("does not parse", "control character")),
        Kind("a PNG declared as JSON", png[:1] + b"{" + png[2:], json_type, ("cannot decode",)),
        Kind("topk 0", js({"data": pixels, "topk": 0}), json_type, ("topk must be between",)),
        Kind("topk not a number", js({"data": pixels, "topk": "three"}), json_type, ("topk must be an integer",)),
        Kind("topk above the class count", js({"data": pixels, "topk": 11}), json_type, ("topk must be between",)),
        Kind("KServe v2 wrong shape", js(v2([3, 3], [0] * 9, "UINT8")), json_type, ("one 28×28 image", "[3, 3]")),
        Kind("KServe v2 wrong datatype", js(v2([28, 28], [0] * 784, "FP64x")), json_type,
             ("datatype must be one of",)),
        Kind("KServe v2 shape [784, 784, 784, 784]", js(v2([784] * 4, [0] * 784)), json_type, ("one 28×28 image",)),
        Kind("KServe v2 shape of 3,000 factors", js(v2([1] * 3000, [0] * 784)), json_type,
             ("3000 dimensions", "at most 4")),
        Kind(f"KServe v2 shape of {factors_1mb:,} factors (1.2 MB)", shape_1mb, json_type,
             ("more than the 4096 accepted",)),
        Kind(f"KServe v2 shape of {factors_6mb:,} factors (6.3 MB)", shape_6mb, json_type,
             ("more than the 4096 accepted",)),
    ]
    types = {b"\x89PNG": "image/png", b"\xff\xd8": "image/jpeg", b"GIF8": "image/gif", b"II*\x00": "image/tiff",
             b"RIFF": "image/webp"}
    valid = [Kind(f"valid: {name}", data, next(t for magic, t in types.items() if data.startswith(magic)), valid=True)
             for name, data in worst_valid_images().items()]
    return bad + valid


KINDS = kinds()
RESULTS: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Good:
    body: bytes  # a PNG of a test image
    labels: dict[str, int]  # what each model must answer for it: its saved form's answer in this process


@pytest.fixture(scope="module")
def good(test_images: Any, chain: Chain) -> Good:
    images, _ = test_images
    return Good(encode_image(images[5]),
                {model: in_process_labels(chain, variant, images[5:6])[0] for model, variant in VARIANTS.items()})


# --- the worker and what it costs ------------------------------------------------------------------------------
def worker_pids(instance: server.Instance) -> dict[str, list[int]]:
    """{model/version: [worker pids]} from TorchServe's management API (the frontend's own child processes
    include its periodic metrics collector, which comes and goes)."""
    headers = instance.headers("management")
    models = requests.get(f"{instance.management_url}/models", headers=headers, timeout=10).json()["models"]
    pids = {}
    for model in models:
        described = requests.get(f"{instance.management_url}/models/{model['modelName']}/all", headers=headers,
                                 timeout=10).json()
        for version in described:
            pids[f"{model['modelName']}/{version['modelVersion']}"] = sorted(w["pid"] for w in version["workers"])
    return pids


def resident_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


def reset_peak(pid: int) -> None:
    """Start the kernel's peak-resident count (VmHWM) afresh. psutil has neither this nor VmHWM itself."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


METRIC_LINE = re.compile(r"\[METRICS\](?P<name>\w+)\.Milliseconds:(?P<value>[\d.]+)\|#ModelName:(?P<model>[^,|]+),"
                         r"[^|]*\|#type:GAUGE\|#hostname:[^,]*,\d+,(?P<ids>[^ ,][^ ]*?)(?:, pattern=.*)?$")


@dataclass
class Batch:
    request_ids: list[str]
    metrics: dict[str, float] = field(default_factory=dict)  # HandlerTime, HandlerCPUTime, PredictionTime (ms)


class TorchServeLog:
    """The per-batch metrics TorchServe's frontend writes into ts_log.log, from a given offset on."""

    def __init__(self, instance: server.Instance) -> None:
        self.path = instance.log_dir / "ts_log.log"
        self.offset = self.path.stat().st_size

    def batches(self, model: str) -> list[Batch]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            text = handle.read().decode("utf-8", "replace")
        batches: dict[str, Batch] = {}
        for line in text.splitlines():
            found = METRIC_LINE.search(line)
            if found and found["model"] == model:
                ids = found["ids"].split(",")
                batch = batches.setdefault(found["ids"], Batch(ids))
                batch.metrics[found["name"]] = float(found["value"])
        return [batch for batch in batches.values() if "HandlerTime" in batch.metrics
                and "HandlerCPUTime" in batch.metrics]

    def wait_for(self, model: str, requests_answered: int, timeout_s: float = 15.0) -> list[Batch]:
        """The batches that answered `requests_answered` requests (the frontend logs them asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while True:
            batches = self.batches(model)
            if sum(len(batch.request_ids) for batch in batches) >= requests_answered:
                return batches
            assert time.monotonic() < deadline, f"only {len(batches)} batches logged for {requests_answered} requests"
            time.sleep(0.05)


@dataclass
class Cost:
    handler_ms: float  # TorchServe's HandlerTime, the worst batch of the kind's
    cpu_ms: float  # HandlerCPUTime of the same batches
    peak_mb: float  # worker's peak resident memory during the kind, above what it held before
    kept_mb: float  # what stayed afterwards
    tries: int = 1

    def within_bounds(self) -> bool:
        return (self.handler_ms <= HANDLER_TIME_BOUND_MS and self.peak_mb <= MEMORY_BOUND_MB
                and self.kept_mb <= MEMORY_BOUND_MB)


@dataclass
class Watched:
    stack: Stack
    workers: dict[str, int]  # model: the pid of its one worker


@pytest.fixture(scope="module")
def watched(stack: Stack, chaos_report: ChaosReport) -> Iterator[Watched]:  # noqa: F811 (the imported fixture)
    """No worker may restart, and no worker's memory may grow past the bound over the whole matrix."""
    pids = worker_pids(stack.torchserve)
    live = Watched(stack, {})
    for model in MODELS:
        (live.workers[model],) = pids[f"{model}/1.0"]
    warm_up(live)
    memory = {pid: resident_mb(pid) for workers in pids.values() for pid in workers}
    yield live
    assert worker_pids(stack.torchserve) == pids, "a worker restarted"
    grown = {pid: resident_mb(pid) - before for pid, before in memory.items()}
    assert max(grown.values()) <= MEMORY_BOUND_MB, f"worker memory grew by {grown} MB over the matrix"
    chaos_report.add("Bad-input matrix", matrix_table(sum(len(workers) for workers in pids.values())))


def warm_up(live: Watched) -> None:
    """Each form of request, each way, and the matrix's batch sizes, before anything is measured: a worker's
    first requests allocate what it then keeps (buffers, torch's and ONNX Runtime's per-shape caches), which no one
    kind costs. The models are warmed side by side."""
    body = encode_image(Image.new("L", (28, 28)))
    forms = [(body, "image/png"), (json.dumps({"data": [0] * 784}).encode(), "application/json"),
             (json.dumps(v2([784], [0] * 784)).encode(), "application/json"), (b"junk", "application/octet-stream")]
    raw = oip.ModelInferRequest(inputs=[oip.ModelInferRequest.InferInputTensor(
        name="images", datatype="UINT8", shape=[1, 28, 28])], raw_input_contents=[bytes(784)]).SerializeToString()

    def each_form(model: str) -> None:
        for path in ("direct", "router"):
            for data, content_type in forms:
                rest(live.stack, path, model, data, content_type)
                grpc_call(live.stack, path, model, data)
        for v2_body in (v2_input("UINT8", [1, 28, 28], data=[0] * 784), good_v2(body)):
            v2_rest(live.stack, model, v2_body, None)
            v2_grpc(live.stack, model, raw)

    with ThreadPoolExecutor(len(MODELS)) as pool:
        list(pool.map(each_form, MODELS))
    for path in ("direct", "router"):
        send_in_batches(live, path, Kind("warm-up", body, "image/png", valid=True), body)


# --- the requests ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestAnswer:
    status: int
    text: str

    @property
    def from_handler(self) -> bool:  # every handler answer names the model; TorchServe's and the router's do not
        try:
            answer = json.loads(self.text)
        except ValueError:
            return False
        return isinstance(answer, dict) and "model" in answer

    @property
    def message(self) -> str:
        try:
            error = json.loads(self.text)["error"]
            return error if isinstance(error, str) else str(error["message"])  # v2: {"error": "<message>"}
        except (ValueError, KeyError, TypeError):
            return self.text


@dataclass(frozen=True)
class GrpcAnswer:
    outcome: str  # "ok", "in-body 400" or the gRPC status code's name
    message: str

    @property
    def from_handler(self) -> bool:
        return self.outcome in ("ok", "in-body 400")


def rest(live: Stack, path: str, model: str, body: bytes, content_type: str) -> RestAnswer:
    if path == "direct":
        url, headers = f"{live.torchserve.inference_url}/predictions/{model}", live.torchserve.headers()
    else:
        url, headers = f"{live.url}/predictions/{model}", {"Authorization": f"Bearer {live.client_token}"}
    response = requests.post(url, data=body, headers={**headers, "Content-Type": content_type}, timeout=60)
    return RestAnswer(response.status_code, response.text)


def grpc_call(live: Stack, path: str, model: str, body: bytes, key: str = "data") -> GrpcAnswer:
    target = live.torchserve.grpc_target if path == "direct" else live.grpc_target
    token = live.torchserve.token() if path == "direct" else live.client_token
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        stub = protos.load("inference_pb2_grpc").InferenceAPIsServiceStub(channel)
        request = protos.load("inference_pb2").PredictionsRequest(model_name=model, input={key: body})
        try:
            answer = json.loads(stub.Predictions(request, metadata=metadata, timeout=60).prediction)
        except grpc.RpcError as error:
            return GrpcAnswer(error.code().name, error.details() or "")
    if "error" in answer:
        return GrpcAnswer(f"in-body {answer['error']['code']}", answer["error"]["message"])
    return GrpcAnswer("ok", json.dumps(answer))


@dataclass(frozen=True)
class Sent:
    """What one model answered for a kind sent inside batches of good requests, and what the kind cost it."""

    goods: list[RestAnswer]
    answer: RestAnswer  # the kind over REST
    grpc_answer: GrpcAnswer  # the kind over gRPC
    cost: Cost


def cost_of(live: Watched, log: TorchServeLog, model: str, answered: int, before_mb: float) -> Cost:
    """The kind's cost on `model`'s worker: the worst of the batches that answered `answered` requests since `log`
    was opened, and its memory against `before_mb` (its peak counted afresh since then)."""
    batches = log.wait_for(model, answered)
    worker = live.workers[model]
    return Cost(max(batch.metrics["HandlerTime"] for batch in batches),
                max(batch.metrics["HandlerCPUTime"] for batch in batches),
                peak_mb(worker) - before_mb, resident_mb(worker) - before_mb)


def start_measuring(live: Watched) -> tuple[TorchServeLog, dict[str, float]]:
    """The log from here on, and each worker's memory now (its peak counted afresh)."""
    log = TorchServeLog(live.stack.torchserve)
    before = {model: resident_mb(worker) for model, worker in live.workers.items()}
    for worker in live.workers.values():
        reset_peak(worker)
    return log, before


def send_in_batches(live: Watched, path: str, kind: Kind, good_body: bytes) -> dict[str, Sent]:
    """To each model at once: the kind over REST between two good REST requests, then over gRPC beside a good one;
    each group is sent concurrently, into one 300 ms batch window per model, so every batch holds the kind once."""
    log, before = start_measuring(live)
    with ThreadPoolExecutor(3 * len(MODELS)) as pool:
        first = {model: [pool.submit(rest, live.stack, path, model, good_body, "image/png"),
                         pool.submit(rest, live.stack, path, model, kind.body, kind.content_type),
                         pool.submit(rest, live.stack, path, model, good_body, "image/png")] for model in MODELS}
        rests = {model: [future.result() for future in futures] for model, futures in first.items()}
        second = {model: (pool.submit(grpc_call, live.stack, path, model, kind.body),
                          pool.submit(rest, live.stack, path, model, good_body, "image/png")) for model in MODELS}
        grpcs = {model: (kind_future.result(), beside.result()) for model, (kind_future, beside) in second.items()}
    sent = {}
    for model in MODELS:
        (good_before, answer, good_after), (grpc_answer, good_beside) = rests[model], grpcs[model]
        goods = [good_before, good_after, good_beside]
        answered = sum(reply.from_handler for reply in (*goods, answer)) + grpc_answer.from_handler
        sent[model] = Sent(goods, answer, grpc_answer, cost_of(live, log, model, answered, before[model]))
    return sent


def measured(live: Watched, path: str, kind: Any, good_body: bytes,
             send: Callable[[Watched, str, Any, bytes], dict[str, Sent]] = send_in_batches) -> dict[str, Sent]:
    """`send` (send_in_batches, or send_v2_in_batches), again while a model is over a bound (up to TRIES times),
    keeping for each model its first try within the bounds (or, if none is, the one with the least handler time):
    every figure reported comes from one real try."""
    sent = send(live, path, kind, good_body)
    for attempt in range(2, TRIES + 1):
        over = [model for model, first in sent.items() if not first.cost.within_bounds()]
        if not over:
            break
        time.sleep(RETRY_PAUSE_S)  # let a burst of other work on the shared cores pass
        again = send(live, path, kind, good_body)
        for model in over:
            cost = again[model].cost
            if cost.within_bounds() or cost.handler_ms < sent[model].cost.handler_ms:
                sent[model] = dataclasses.replace(sent[model], cost=dataclasses.replace(cost, tries=attempt))
    return sent


# --- the matrix ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["direct", "router"])
@pytest.mark.parametrize("kind", KINDS, ids=[kind.name for kind in KINDS])
def test_each_kind_is_answered_alone_within_its_cost_bound(watched: Watched, good: Good, path: str,
                                                           kind: Kind) -> None:
    for model, sent in measured(watched, path, kind, good.body).items():
        check_answers(model, path, kind, sent, good.labels[model])


def check_answers(model: str, path: str, kind: Kind, sent: Sent, label: int) -> None:
    """One model's answers to a kind and its good neighbours, and the kind's cost: as the module says."""
    answer, grpc_answer, cost = sent.answer, sent.grpc_answer, sent.cost
    where = f"{kind.name} to {model} via {path}"
    for reply in sent.goods:
        assert reply.status == 200 and json.loads(reply.text)["label"] == label, f"{where}: a good request: {reply}"
    if kind.valid:
        assert answer.status == 200 and 0 <= json.loads(answer.text)["label"] < 10, f"{where}: {answer}"
        assert grpc_answer.outcome == "ok", f"{where} gRPC: {grpc_answer}"
    elif len(kind.body) > TORCHSERVE_MAX_REQUEST_BYTES and path == "direct":
        assert (answer.status, answer.text) == TORCHSERVE_REST_REFUSAL, f"{where}: {answer}"
        outcome, details = TORCHSERVE_GRPC_REFUSAL
        assert grpc_answer.outcome == outcome and details in grpc_answer.message, f"{where}: {grpc_answer}"
    elif len(kind.body) > TORCHSERVE_MAX_REQUEST_BYTES:  # the router refuses it, saying why
        assert answer.status == 413 and all(w in answer.message.lower() for w in kind.words), f"{where}: {answer}"
        assert grpc_answer.outcome == "RESOURCE_EXHAUSTED", f"{where} gRPC: {grpc_answer}"
    else:  # the handler refused it (REST 400; gRPC the same message in the body), or the router did, saying why
        assert answer.status == 400 and (answer.from_handler or path == "router"), f"{where}: {answer}"
        router_refused = path == "router" and grpc_answer.outcome == "INVALID_ARGUMENT"
        assert grpc_answer.outcome == "in-body 400" or router_refused, f"{where} gRPC: {grpc_answer}"
        for message in (answer.message, grpc_answer.message):
            assert all(word in message.lower() for word in kind.words), f"{where}: {message!r} lacks {kind.words}"
    RESULTS.append({"kind": kind.name, "model": model, "path": path, "rest": answer.status,
                    "rest_message": answer.message, "grpc": grpc_answer.outcome, "grpc_message": grpc_answer.message,
                    "cost": cost, "bytes": len(kind.body)})
    assert cost.handler_ms <= HANDLER_TIME_BOUND_MS, f"{where}: handler time {cost}"
    assert cost.peak_mb <= MEMORY_BOUND_MB and cost.kept_mb <= MEMORY_BOUND_MB, f"{where}: worker memory {cost}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", ["direct", "router"])
def test_grpc_with_the_wrong_input_key_is_refused(watched: Watched, path: str, model: str) -> None:
    answer = grpc_call(watched.stack, path, model, encode_image(Image.new("L", (28, 28))), key="image_bytes")
    assert answer.outcome == "in-body 400" and "'data'" in answer.message


def test_a_refused_request_is_not_retried_by_the_router(watched: Watched) -> None:
    """The 6 MB long-shape v2 body through an experiment that could fail over: the arm's 400 is passed through
    once, no retry, no failure counted against the arm (its circuit and guardrail judge only its own faults)."""
    live = watched.stack
    body, _ = long_shape_body(6_300_000)
    retries_before = live.metric("router_retries_total", experiment="failover")
    failures_before = live.metric("router_upstream_failures_total", experiment="failover")
    log = TorchServeLog(live.torchserve)
    headers = {"Authorization": f"Bearer {live.client_token}", "Content-Type": "application/json"}
    response = requests.post(f"{live.url}/predictions/failover", data=body, headers=headers, timeout=60)
    assert response.status_code == 400 and "more than the 4096 accepted" in response.json()["error"]["message"]
    model = response.headers["X-Target"].split("/")[0]
    (batch,) = log.wait_for(model, 1)  # the handler saw it once
    assert len(batch.request_ids) == 1 and batch.metrics["HandlerTime"] <= HANDLER_TIME_BOUND_MS
    assert live.metric("router_retries_total", experiment="failover") == retries_before
    assert live.metric("router_upstream_failures_total", experiment="failover") == failures_before


@pytest.mark.parametrize("model", MODELS)
def test_the_open_inference_endpoint_refuses_a_long_shape_within_the_bound(watched: Watched, good: Good,
                                                                         test_images: Any, model: str) -> None:
    """The same CPU-time bomb on TorchServe's own KServe v2 endpoint, beside a well-formed v2 request."""
    live = watched.stack.torchserve
    images, _ = test_images
    url = f"{live.inference_url}/v2/models/{model}/infer"
    headers = {**live.headers(), "Content-Type": "application/json"}
    valid = json.dumps({"id": "ok-1", **v2([1, 28, 28], images[5].flatten().tolist(), "UINT8")}).encode()
    bomb_body, factors = long_shape_body(6_300_000)
    log = TorchServeLog(live)
    with ThreadPoolExecutor(2) as pool:
        refused, answered = pool.map(lambda body: requests.post(url, data=body, headers=headers, timeout=60),
                                     [bomb_body, valid])
    assert refused.status_code == 400 and "more than the 4096 accepted" in refused.json()["error"]["message"]
    outputs = {output["name"]: output["data"] for output in answered.json()["outputs"]}
    assert answered.status_code == 200 and answered.json()["id"] == "ok-1" and outputs["label"] == [good.labels[model]]
    batches = log.wait_for(model, 2)
    assert max(batch.metrics["HandlerTime"] for batch in batches) <= HANDLER_TIME_BOUND_MS, (factors, batches)


# --- the Open Inference Protocol's kinds, through the router -----------------------------------------------------
oip = protos.load("open_inference_grpc_pb2")  # the protocol's messages (TorchServe's compiled grpc_predict_v2)
V2_INFER_RPC = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class V2Kind:
    """A bad v2 request as a REST body (JSON, or JSON and Triton's binary tensors after `header_length` bytes) and
    as a serialized gRPC ModelInferRequest without its model name (v2_grpc adds it); `router_refuses`: the router's
    codec refuses it before TorchServe."""

    name: str
    rest_body: bytes
    header_length: int | None
    grpc_request: bytes
    words: tuple[str, ...]  # what the refusals must say (lower case)
    router_refuses: bool = True
    grpc_words: tuple[str, ...] = ()  # what the gRPC refusal must say instead, where its wording differs


@dataclass(frozen=True)
class V2RestAnswer(RestAnswer):
    routed: bool = False  # it reached TorchServe (the answer names a request id)


@dataclass(frozen=True)
class V2GrpcAnswer(GrpcAnswer):
    routed: bool = False


def v2_input(datatype: str, shape: list[int], outputs: tuple[str, ...] = (), **entry: Any) -> bytes:
    document: dict[str, Any] = {"inputs": [{"name": "images", "datatype": datatype, "shape": shape, **entry}]}
    if outputs:
        document["outputs"] = [{"name": name} for name in outputs]
    return json.dumps(document).encode()


def good_v2(png: bytes) -> bytes:
    return v2_input("BYTES", [1], data=[base64.b64encode(png).decode()])


def v2_kind(name: str, datatype: str, shape: list[int], raw: bytes | None, words: tuple[str, ...],
            outputs: tuple[str, ...] = (), router_refuses: bool = True, grpc_words: tuple[str, ...] = ()) -> V2Kind:
    """REST: the tensor in JSON 'data' when it is whole numbers of its shape, else in the binary extension (as
    tritonclient sends it); gRPC: in raw_input_contents (as tritonclient sends it). No raw: no data at all."""
    header_length = None
    if raw is None:
        rest_body = v2_input(datatype, shape, outputs)
    elif datatype in ("UINT8", "INT32") and len(raw) == math.prod(shape) * (4 if datatype == "INT32" else 1):
        values = list(raw) if datatype == "UINT8" else [0] * (len(raw) // 4)
        rest_body = v2_input(datatype, shape, outputs, data=values)
    else:
        header = v2_input(datatype, shape, outputs, parameters={"binary_data_size": len(raw)})
        rest_body, header_length = header + raw, len(header)
    message = oip.ModelInferRequest(inputs=[oip.ModelInferRequest.InferInputTensor(
        name="images", datatype=datatype, shape=shape)], outputs=[
        oip.ModelInferRequest.InferRequestedOutputTensor(name=output) for output in outputs],
        raw_input_contents=[] if raw is None else [raw])
    return V2Kind(name, rest_body, header_length, message.SerializeToString(), words, router_refuses, grpc_words)


V2_KINDS = [
    v2_kind("v2 wrong shape [1, 3, 3]", "UINT8", [1, 3, 3], bytes(9), ("shape", "[1, 3, 3]"), router_refuses=False),
    v2_kind("v2 wrong datatype (INT32)", "INT32", [1, 784], bytes(4 * 784), ("datatype", "'int32'")),
    v2_kind("v2 too many elements [1, 300, 300]", "UINT8", [1, 300, 300], bytes(784),
            ("90000 elements", "over the limit of 50176")),
    v2_kind("v2 missing data", "UINT8", [1, 28, 28], None, ("needs 'data'",),
            grpc_words=("has no data", "raw_input_contents")),
    v2_kind("v2 raw contents of the wrong length (700 of 784 bytes)", "UINT8", [1, 28, 28], bytes(700),
            ("700 bytes", "needs 784")),
    v2_kind("v2 unknown output (logits)", "UINT8", [1, 28, 28], bytes(784), ("unknown output 'logits'",),
            outputs=("logits",)),
    v2_kind("v2 batch over the limit (65 images)", "UINT8", [65, 28, 28], bytes(65 * 784),
            ("50960 elements", "over the limit of 50176", "64 images")),
]


def v2_rest(live: Stack, model: str, body: bytes, header_length: int | None) -> V2RestAnswer:
    headers = {"Authorization": f"Bearer {live.client_token}", "Content-Type": "application/json"}
    if header_length is not None:
        headers.update({"Inference-Header-Content-Length": str(header_length),
                        "Content-Type": "application/octet-stream"})
    response = requests.post(f"{live.url}/v2/models/{model}/infer", data=body, headers=headers, timeout=60)
    return V2RestAnswer(response.status_code, response.text, "X-Request-Id" in response.headers)


def v2_grpc(live: Stack, model: str, request: bytes) -> V2GrpcAnswer:
    """`request` (a serialized ModelInferRequest) to `model`, through the router."""
    message = oip.ModelInferRequest.FromString(request)
    message.model_name = model
    with grpc.insecure_channel(live.grpc_target) as channel:
        call = channel.unary_unary(V2_INFER_RPC)  # bytes in, bytes out: the request as serialized here
        try:
            call(message.SerializeToString(), metadata=(("authorization", f"Bearer {live.client_token}"),), timeout=60)
        except grpc.RpcError as error:
            routed = any(key == "x-request-id" for key, _ in error.trailing_metadata() or ())
            return V2GrpcAnswer(error.code().name, error.details() or "", routed)
    return V2GrpcAnswer("ok", "", True)


def send_v2_in_batches(live: Watched, path: str, kind: V2Kind, good_body: bytes) -> dict[str, Sent]:
    """As send_in_batches, through the router's v2 endpoints, to each model at once: the kind over REST between two
    good TorchServe-protocol requests, then over gRPC beside a good v2 request; each group concurrently, into one
    300 ms batch window per model."""
    log, before = start_measuring(live)
    with ThreadPoolExecutor(3 * len(MODELS)) as pool:
        first = {model: (pool.submit(rest, live.stack, path, model, good_body, "image/png"),
                         pool.submit(v2_rest, live.stack, model, kind.rest_body, kind.header_length),
                         pool.submit(rest, live.stack, path, model, good_body, "image/png")) for model in MODELS}
        rests = {model: (a.result(), kind_future.result(), b.result()) for model, (a, kind_future, b) in first.items()}
        second = {model: (pool.submit(v2_grpc, live.stack, model, kind.grpc_request),
                          pool.submit(v2_rest, live.stack, model, good_v2(good_body), None)) for model in MODELS}
        grpcs = {model: (kind_future.result(), beside.result()) for model, (kind_future, beside) in second.items()}
    sent = {}
    for model in MODELS:
        (good_before, answer, good_after), (grpc_answer, good_beside) = rests[model], grpcs[model]
        answered = 3 + answer.routed + grpc_answer.routed
        sent[model] = Sent([good_before, good_after, good_beside], answer, grpc_answer,
                           cost_of(live, log, model, answered, before[model]))
    return sent


@pytest.mark.parametrize("kind", V2_KINDS, ids=[kind.name for kind in V2_KINDS])
def test_each_open_inference_kind_is_answered_alone_within_its_cost_bound(watched: Watched, good: Good,
                                                                          kind: V2Kind) -> None:
    for model, sent in measured(watched, "router", kind, good.body, send=send_v2_in_batches).items():
        check_v2_answers(model, kind, sent, good.labels[model])


def check_v2_answers(model: str, kind: V2Kind, sent: Sent, label: int) -> None:
    goods, answer, grpc_answer, cost = sent.goods, sent.answer, sent.grpc_answer, sent.cost
    where = f"{kind.name} to {model} via the router"
    for reply in goods[:2]:
        assert reply.status == 200 and json.loads(reply.text)["label"] == label, f"{where}: a good request: {reply}"
    outputs = {output["name"]: output["data"] for output in json.loads(goods[2].text)["outputs"]}
    assert goods[2].status == 200 and outputs["label"] == [label], f"{where}: the good v2 request: {goods[2]}"
    assert answer.status == 400 and grpc_answer.outcome == "INVALID_ARGUMENT", f"{where}: {answer} {grpc_answer}"
    for message, words in ((answer.message, kind.words), (grpc_answer.message, kind.grpc_words or kind.words)):
        assert all(word in message.lower() for word in words), f"{where}: {message!r} lacks {words}"
    # refused by the router's codec before TorchServe, or (an image rule) by the handler, its 400 passed on
    assert isinstance(answer, V2RestAnswer) and isinstance(grpc_answer, V2GrpcAnswer)
    assert answer.routed == grpc_answer.routed == (not kind.router_refuses), where
    RESULTS.append({"kind": kind.name, "model": model, "path": "router", "rest": answer.status,
                    "rest_message": answer.message, "grpc": grpc_answer.outcome, "grpc_message": grpc_answer.message,
                    "cost": cost, "bytes": len(kind.rest_body)})
    assert cost.handler_ms <= HANDLER_TIME_BOUND_MS, f"{where}: handler time {cost}"
    assert cost.peak_mb <= MEMORY_BOUND_MB and cost.kept_mb <= MEMORY_BOUND_MB, f"{where}: worker memory {cost}"


def matrix_table(workers: int) -> str:
    worst = max((row["cost"] for row in RESULTS), key=lambda cost: cost.handler_ms, default=None)
    lines = [f"{len(KINDS)} kinds ({sum(kind.valid for kind in KINDS)} of them valid worst-case images) × (REST, "
             f"gRPC) × (direct, router), and {len(V2_KINDS)} Open Inference Protocol kinds (v2 REST, v2 gRPC) through "
             f"the router, each to {' and '.join(MODELS)} (PyTorch, and ONNX Runtime through the same handler), "
             f"each inside a batch of good requests (which were all answered correctly). "
             f"Worker restarts: 0 ({workers} workers watched).", "",
             f"Cost per kind, on the worker that served it (the worst of the batches holding it, each with the kind "
             f"once; least of up to {TRIES} tries): TorchServe's HandlerTime (bound {HANDLER_TIME_BOUND_MS:g} ms), "
             f"the handler's CPU time for the same batch, and the worker's peak and kept memory growth (bound "
             f"{MEMORY_BOUND_MB:g} MB)." + (f" Worst handler time: {worst.handler_ms:.1f} ms." if worst else ""), "",
             "| kind | bytes | model | path | REST | REST message | gRPC | gRPC message | handler ms | CPU ms | "
             "peak MB | kept MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(RESULTS, key=lambda r: (r["kind"], r["path"], r["model"])):
        cost = row["cost"]
        cells = [row["kind"], f"{row['bytes']:,}", row["model"], row["path"], str(row["rest"]),
                 row["rest_message"][:110] or "(empty)", row["grpc"], row["grpc_message"][:110] or "(no details)",
                 f"{cost.handler_ms:.1f}" + (f" ({cost.tries} tries)" if cost.tries > 1 else ""),
                 f"{cost.cpu_ms:.1f}", f"{cost.peak_mb:.1f}", f"{cost.kept_mb:.1f}"]
        lines.append("| " + " | ".join(cell.replace("\n", " ").replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
