"""The handler, with TorchServe's own Context class standing in for a worker (no server)."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import shutil
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import ts
from fashion_handler import CARD_FILE, CPU_TIME_METRIC, DECODE_INPUT_ENV, LABELS_FILE, SIGNATURE_FILE, FashionHandler
from image_decoding import MAX_DECODED_PIXELS, MAX_IMAGE_BYTES, MAX_JPEG_PIXELS, image_to_pixels
from invalid_input import MAX_MESSAGE_CHARS
from PIL import Image, ImageFile
from request_decoding import MAX_JSON_VALUES, NPY_MAX_HEADER, decode_request
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.utils.util import list_classes_from_module

import fashion_cnn
from fashion_cnn import ONNX_SUFFIX
from serving.archive import SIGNATURE, build_archive, label_mapping
from tests.conftest import Chain, encode_image, in_process_labels

TS_METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"  # what a worker loads by default
SIDE = math.isqrt(MAX_DECODED_PIXELS)  # the largest square any format is decoded at
MAX_IMAGES: int = json.loads(SIGNATURE.read_text())["max_images"]
ImageFile.MAXBLOCK = 1 << 24  # Pillow's JPEG encoder needs room to write progressive noise into a BytesIO


def model_dir_for(chain: Chain, variant: str, directory: Path, labels: dict[str, Any] | None = None,
                  signature: dict[str, Any] | None = None) -> Path:
    """What TorchServe unpacks from a .mar: the weights (or ONNX file) the card names, the card (as card.json),
    index_to_name.json and signature.json (test_the_archive_packs_what_the_handler_reads checks a real .mar holds
    these)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(chain.weights(variant), directory)
    shutil.copy(chain.directory / f"{variant}.card.json", directory / CARD_FILE)
    mapping = labels if labels is not None else label_mapping(chain.card(variant)["dataset"])
    (directory / LABELS_FILE).write_text(json.dumps(mapping))
    (directory / SIGNATURE_FILE).write_text(json.dumps(signature or json.loads(SIGNATURE.read_text())))
    return directory


def make_context(model_dir: Path, variant: str, threads: int = 1) -> Context:
    """TorchServe's Context for a worker of `variant` whose archive is unpacked in model_dir (its manifest names the
    file the card there names, as serving.archive packs it)."""
    weights = json.loads((model_dir / CARD_FILE).read_text())["file"]
    manifest = {"model": {"modelName": f"fashion-{variant}", "serializedFile": weights, "modelVersion": "1.0"}}
    with warnings.catch_warnings():  # TorchServe's loader leaves the YAML file for the garbage collector to close
        warnings.simplefilter("ignore", ResourceWarning)
        metrics = MetricsCacheYamlImpl(config_file_path=str(TS_METRICS_YAML))
    metrics.initialize_cache()
    metrics.model_name = f"fashion-{variant}"
    return Context(f"fashion-{variant}", str(model_dir), manifest, 8, None, "0.12.0", metrics=metrics,
                   model_yaml_config={"handler": {"threads": threads}})


@pytest.fixture(autouse=True, scope="module")
def worker_environment() -> Iterator[None]:
    """initialize() switches off TorchServe's JSON pre-decoding in its (worker) process: undo it here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(DECODE_INPUT_ENV, raising=False)
        yield


class Worker:
    """A loaded handler plus the per-request status TorchServe would send back."""

    def __init__(self, handler: FashionHandler, context: Context) -> None:
        self.handler, self.context = handler, context

    def __call__(self, rows: list[dict[str, Any]], headers: dict[str, str] | None = None,
                 ) -> tuple[list[dict[str, Any]], list[int]]:
        self.context.request_processor = [RequestProcessor(dict(headers or {})) for _ in rows]
        self.context.metrics.request_ids = {i: f"request-{i}" for i in range(len(rows))}
        answers = self.handler.handle(rows, self.context)
        return answers, [self.context.get_response_status(i)[0] for i in range(len(rows))]


# The full model, its FX int8 form (TorchScript), and the full model's ONNX export run by ONNX Runtime: every test
# of a worker runs on each, since the handler must decode, refuse and answer alike whatever runs the model.
@pytest.fixture(scope="module", params=["full", "int8", "full" + ONNX_SUFFIX])
def worker(request: pytest.FixtureRequest, chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    variant = request.param
    directory = model_dir_for(chain, variant, tmp_path_factory.mktemp(variant))
    context = make_context(directory, variant)
    handler = FashionHandler()
    handler.initialize(context)
    return Worker(handler, context)


def test_every_input_form_gives_the_in_process_answer(worker: Worker, chain: Chain, test_images: Any) -> None:
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:5])
    pil = [Image.fromarray(images[i].numpy(), mode="L") for i in range(5)]
    rows: list[dict[str, Any]] = [
        {"body": encode_image(pil[0])},
        {"body": {"data": images[1].tolist()}},  # TorchServe's own JSON decoding, when it is on
        {"data": json.dumps({"data": images[2].flatten().tolist()}).encode()},  # gRPC, and REST with it off
        {"body": {"data": base64.b64encode(encode_image(pil[3])).decode()}},
        {"body": json.dumps({"image": base64.b64encode(encode_image(pil[4])).decode()}).encode()},
    ]
    answers, statuses = worker(rows)
    assert statuses == [200] * 5
    assert [answer["label"] for answer in answers] == expected
    for answer in answers:
        assert answer["class"] == answer["topk"][0]["class"]
        assert answer["model"] == {"name": f"fashion-{worker.handler.card['variant']}", "version": "1.0",
                                   "variant": worker.handler.card["variant"]}


def test_open_inference_protocol_answers_in_its_own_format(worker: Worker, chain: Chain, test_images: Any) -> None:
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:2])
    numeric = {"id": "r-1", "inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                                        "data": images[0].tolist()}]}  # nested row-major data is fine too
    image = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                         "data": [base64.b64encode(encode_image(images[1])).decode()]}]}
    answers, statuses = worker([{"body": json.dumps(numeric).encode()}, {"body": image}])
    assert statuses == [200, 200]
    for answer, label in zip(answers, expected, strict=True):
        outputs = {output["name"]: output for output in answer["outputs"]}
        assert outputs["label"] == {"name": "label", "shape": [1], "datatype": "INT64", "data": [label]}
        assert outputs["class"]["data"] == [worker.handler.classes[label]]
        assert outputs["probabilities"]["shape"] == [1, 10] and len(outputs["probabilities"]["data"]) == 10
        assert answer["model_name"] == f"fashion-{worker.handler.card['variant']}" and answer["model_version"] == "1.0"
    assert [answers[0]["id"], answers[1]["id"]] == ["r-1", ""]


# --- the Open Inference Protocol's upstream forms: NPY bodies and v2 JSON, N images a request ---------------------
def npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    """An array as the bytes of a .npy file, as the router sends a client's numeric tensor."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def npy_header(header: bytes) -> bytes:
    """An NPY 1.0 body with this header text and no data: for headers numpy itself would never write."""
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def rows_of(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in answer["outputs"]}


def check_v2_answer(worker: Worker, answer: dict[str, Any], labels: list[int], request_id: str = "") -> None:
    """N rows: label INT64 [N], class BYTES [N], probabilities FP32 [N, 10], each row summing to 1."""
    count = len(labels)
    assert answer["id"] == request_id and answer["model_version"] == "1.0"
    assert answer["model_name"] == f"fashion-{worker.handler.card['variant']}"
    outputs = rows_of(answer)
    assert [output["name"] for output in answer["outputs"]] == ["label", "class", "probabilities"]
    assert outputs["label"] == {"name": "label", "datatype": "INT64", "shape": [count], "data": labels}
    assert outputs["class"] == {"name": "class", "datatype": "BYTES", "shape": [count],
                                "data": [worker.handler.classes[label] for label in labels]}
    probabilities = outputs["probabilities"]
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [count, 10]
    table = np.array(probabilities["data"]).reshape(count, 10)
    assert np.allclose(table.sum(axis=1), 1, atol=1e-4) and table.argmax(axis=1).tolist() == labels
    assert all(value == round(value, 6) for value in probabilities["data"])


@pytest.mark.parametrize("dtype", ["|u1", "<f4"])
@pytest.mark.parametrize("count", [1, 5])
def test_npy_bodies_give_the_in_process_labels(worker: Worker, chain: Chain, test_images: Any, dtype: str,
                                               count: int) -> None:
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:count])
    array = images[:count].numpy().astype(dtype)
    # REST hands the handler a bytearray body, gRPC bytes under the input key "data"; both NPY versions numpy writes
    rows: list[dict[str, Any]] = [{"body": bytearray(npy(array))}, {"data": npy(array)},
                                  {"body": npy(array, version=(2, 0))}]
    answers, statuses = worker(rows)
    assert statuses == [200] * 3, answers
    for answer in answers:
        check_v2_answer(worker, answer, expected)


@pytest.mark.parametrize(("shape", "count"), [
    ((28, 28), 1), ((784,), 1), ((1, 784), 1), ((1, 28, 28), 1), ((1, 1, 28, 28), 1),
    ((3, 28, 28), 3), ((3, 784), 3), ((3, 1, 28, 28), 3), ((3, 1, 784), 3),
])
def test_every_accepted_shape_counts_its_images(worker: Worker, chain: Chain, test_images: Any,
                                                shape: tuple[int, ...], count: int) -> None:
    """One rule for NPY and v2 JSON alike: the trailing dims are an image, the first counts them."""
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:count])
    pixels = images[:count].numpy().reshape(shape)
    as_json = {"id": "s", "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(shape),
                                      "data": pixels.tolist()}]}
    answers, statuses = worker([{"body": npy(pixels)}, {"body": json.dumps(as_json).encode()}])
    assert statuses == [200, 200], answers
    check_v2_answer(worker, answers[0], expected)
    check_v2_answer(worker, answers[1], expected, "s")


def test_v2_json_batches_of_pixels_and_of_images(worker: Worker, chain: Chain, test_images: Any) -> None:
    """[N, 28, 28] pixel values (five images fit the JSON bound) and BYTES [N] of PNGs, each answered with N rows."""
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:7])
    pixels = {"id": "px", "inputs": [{"name": "images", "datatype": "FP32", "shape": [5, 28, 28],
                                      "data": images[:5].float().tolist()}]}
    pngs = {"id": "png", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [7],
                                     "data": [base64.b64encode(encode_image(image)).decode() for image in images[:7]]}]}
    column = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2, 1],
                          "data": [[base64.b64encode(encode_image(image)).decode()] for image in images[:2]]}]}
    answers, statuses = worker([{"body": json.dumps(pixels).encode()}, {"body": json.dumps(pngs).encode()},
                                {"data": json.dumps(column).encode()}])
    assert statuses == [200, 200, 200], answers
    check_v2_answer(worker, answers[0], expected[:5], "px")
    check_v2_answer(worker, answers[1], expected, "png")
    check_v2_answer(worker, answers[2], expected[:2])


def test_a_batch_mixing_every_form_answers_each_request(worker: Worker, chain: Chain, test_images: Any) -> None:
    """NPY of three images, a PNG, v2 JSON, a bad request and NPY of two: one forward pass, each its own rows."""
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:7])
    v2_json = {"id": "m-1", "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 784],
                                        "data": images[4].flatten().tolist()}]}
    rows = [{"body": npy(images[:3].numpy())}, {"body": encode_image(images[3])},
            {"body": json.dumps(v2_json).encode()}, {"body": npy(images[:3].numpy())[:-1]},
            {"data": npy(images[5:7].numpy().astype("<f4"))}]
    answers, statuses = worker(rows)
    assert statuses == [200, 200, 200, 400, 200], answers
    check_v2_answer(worker, answers[0], expected[:3])
    assert answers[1]["label"] == expected[3] and len(answers[1]["topk"]) == 3
    check_v2_answer(worker, answers[2], expected[4:5], "m-1")
    assert "needs exactly" in answers[3]["error"]["message"]
    check_v2_answer(worker, answers[4], expected[5:7])


def _zeros(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


BAD_NPY: dict[str, tuple[bytes, str]] = {
    "float64": (npy(_zeros((28, 28), "<f8")), "dtype must be |u1 (UINT8) or <f4 (FP32), got '<f8'"),
    "object (pickled)": (npy(np.array([None] * 784, dtype=object)), "got '|O'"),
    "big-endian float32": (npy(_zeros((28, 28), ">f4")), "got '>f4'"),
    "int64": (npy(_zeros((28, 28), "<i8")), "got '<i8'"),
    "structured dtype": (npy(np.zeros(784, dtype=[("a", "<f4")])), "got '|V4'"),
    "fortran order": (npy(np.asfortranarray(_zeros((2, 784)))), "C order"),
    "truncated data": (npy(_zeros((2, 28, 28)))[:-10], "1558 bytes after the header, but shape [2, 28, 28] of |u1 "
                                                       "needs exactly 1568"),
    "extra data": (npy(_zeros((2, 28, 28))) + b"\0", "needs exactly 1568"),
    "float32 data one value short": (npy(_zeros((784,), "<f4"))[:-4], "needs exactly 3136"),
    "over max_images": (npy(_zeros((MAX_IMAGES + 1, 784))), f"holds {MAX_IMAGES + 1} images, over the limit of "
                                                            f"{MAX_IMAGES} images per request"),
    "no images": (npy(_zeros((0, 28, 28))), "holds no image"),
    "wrong image shape": (npy(_zeros((27, 28))), "one 28×28 image"),
    "images counted by a second dimension": (npy(_zeros((1, 2, 28, 28))), "only the first dimension counts"),
    "five dimensions": (npy(_zeros((1, 1, 1, 28, 28))), "5 dimensions"),
    "a scalar": (npy(np.array(3, dtype=np.uint8)), "0 dimensions"),
    "NaN": (npy(np.full((2, 784), np.nan, "<f4")), "NaN or infinity"),
    "infinity": (npy(np.concatenate([_zeros((783,), "<f4"), [np.inf]]).astype("<f4")), "NaN or infinity"),
    "out of range": (npy(np.full((784,), 255.5, "<f4")), "[0, 255], got values from 255.5 to 255.5"),
    "negative": (npy(np.full((784,), -1, "<f4")), "[0, 255]"),
    "garbage after the magic": (b"\x93NUMPY" + b"garbage" * 100, "version b'ga' after its magic string"),
    "nothing after the magic": (b"\x93NUMPY", "version b''"),
    "version 3.0": (b"\x93NUMPY\x03\x00" + npy(_zeros((784,)))[8:], "versions 1.0 and 2.0 are accepted"),
    "header cut short": (npy(_zeros((784,)))[:40], "NPY header does not parse: EOF"),
    "header not a dict": (npy_header(b"[1, 2, 3]"), "NPY header does not parse: Header is not a dictionary"),
    "header not a literal": (npy_header(b"{'descr': __import__('os')}"), "NPY header does not parse"),
    "header of unclosed brackets": (npy_header(b"(" * 1000), "NPY header does not parse"),  # numpy retokenizes it
    "header with a non-integer shape": (npy_header(b"{'descr': '|u1', 'fortran_order': False, 'shape': (28.0, 28)}"),
                                        "shape is not valid"),
    "header with a negative dimension": (npy_header(b"{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 784)}"),
                                         "non-negative integers"),
    "header longer than the bound": (npy_header(b" " * (NPY_MAX_HEADER + 1)),
                                     f"NPY header of {NPY_MAX_HEADER + 1} bytes is longer than the {NPY_MAX_HEADER}"),
}


@pytest.mark.parametrize("kind", sorted(BAD_NPY))
def test_bad_npy_gets_400_alone_in_its_batch(worker: Worker, chain: Chain, test_images: Any, kind: str) -> None:
    images, _ = test_images
    bad, message = BAD_NPY[kind]
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:2])
    answers, statuses = worker([{"body": npy(images[:2].numpy())}, {"body": bad}, {"body": encode_image(images[0])}])
    assert statuses == [200, 400, 200], answers
    assert message in answers[1]["error"]["message"], answers[1]
    assert len(answers[1]["error"]["message"]) <= MAX_MESSAGE_CHARS
    check_v2_answer(worker, answers[0], expected)
    assert answers[2]["label"] == expected[0]


def test_the_batch_limit_is_the_signatures(worker: Worker) -> None:
    """max_images from signature.json: exactly that many images are answered, one more is refused."""
    answers, statuses = worker([{"body": npy(_zeros((MAX_IMAGES, 28, 28)))},
                                {"body": npy(_zeros((MAX_IMAGES + 1, 28, 28)))}])
    assert statuses == [200, 400]
    assert rows_of(answers[0])["probabilities"]["shape"] == [MAX_IMAGES, 10]
    assert f"over the limit of {MAX_IMAGES} images" in answers[1]["error"]["message"]


def test_a_photo_like_image_is_converted_like_the_data_set(worker: Worker, test_images: Any) -> None:
    """A large RGB JPEG of a dark garment on a white background answers like the 28×28 original."""
    images, _ = test_images
    original = Image.fromarray(images[0].numpy(), mode="L")
    photo = Image.eval(original, lambda v: 255 - v).resize((280, 280), Image.Resampling.BICUBIC).convert("RGB")
    answers, statuses = worker([{"body": encode_image(original)}, {"body": encode_image(photo, "JPEG")}])
    assert statuses == [200, 200]
    assert answers[0]["label"] == answers[1]["label"]


def test_topk_is_settable_and_ranked(worker: Worker, test_images: Any) -> None:
    images, _ = test_images
    answers, _ = worker([{"body": {"data": images[0].tolist(), "topk": 5}},
                         {"body": encode_image(Image.fromarray(images[0].numpy())), "topk": b"10"},
                         {"body": {"data": images[0].tolist()}}])
    assert [len(answer["topk"]) for answer in answers] == [5, 10, 3]
    probabilities = [entry["probability"] for entry in answers[1]["topk"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert {entry["class"] for entry in answers[1]["topk"]} == set(worker.handler.classes)


def test_topk_ranks_ties_lowest_label_first_like_the_v2_argmax(worker: Worker) -> None:
    """Equal probabilities rank by label, so a REST answer's label is the v2 answer's argmax (torch.topk's order
    for ties is unspecified); distinct ones rank by probability."""
    from request_decoding import Request

    tied = torch.full((1, 10), 0.1)
    answer = worker.handler.answer((Request(torch.zeros(1, 28, 28), topk=3), tied))
    assert [entry["label"] for entry in answer["topk"]] == [0, 1, 2] and answer["label"] == int(tied.argmax())
    mixed = torch.tensor([[0.05, 0.3, 0.05, 0.3, 0.1, 0.05, 0.05, 0.05, 0.0, 0.05]])
    answer = worker.handler.answer((Request(torch.zeros(1, 28, 28), topk=4), mixed))
    assert [entry["label"] for entry in answer["topk"]] == [1, 3, 4, 0]
    assert [entry["probability"] for entry in answer["topk"]] == [0.3, 0.3, 0.1, 0.05]


def test_each_batch_records_torchserve_stage_metrics(worker: Worker, test_images: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """HandlerTime as BaseHandler records it (TorchServe's [METRICS] line with the batch's request ids), plus the
    batch's CPU time; and the worker stops TorchServe from parsing JSON bodies before the handler can bound them."""
    images, _ = test_images
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        worker([{"body": {"data": images[0].tolist()}}, {"body": b"junk"}])
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("[METRICS]")]
    for metric in ("HandlerTime", CPU_TIME_METRIC):
        line = next(line for line in lines if line.startswith(f"[METRICS]{metric}.Milliseconds:"))
        assert float(line.split(":")[1].split("|")[0]) >= 0
        assert "|#ModelName:fashion-" in line  # (TorchServe's default dimensions are shared by every model here)
        assert line.endswith("request-0,request-1")
    assert os.environ[DECODE_INPUT_ENV] == "false"


def test_describe_and_explain_headers_cannot_change_what_a_batch_gets(worker: Worker, test_images: Any) -> None:
    """BaseHandler.handle would answer a batch whose first request says `describe: True` with one answer (503
    for everyone) and `explain: True` with captum explanations: any client can send those headers."""
    images, _ = test_images
    rows = [{"body": {"data": images[0].tolist()}}, {"body": {"data": images[1].tolist()}}]
    plain, _ = worker(rows)
    for header in ("describe", "explain"):
        answers, statuses = worker(rows, headers={header: "True"})
        assert statuses == [200, 200] and answers == plain


def lab_tiff() -> bytes:
    return encode_image(Image.new("LAB", (28, 28)), "TIFF")


def truncated_png() -> bytes:
    data = encode_image(Image.new("L", (28, 28), 128))
    return data[: len(data) // 2]


def v2(shape: Any, data: Any, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"body": {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}], **extra}}


BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "corrupt image": ({"body": b"\x89PNG\r\n\x1a\nnot really a png"}, "cannot decode"),
    "truncated image": ({"body": truncated_png()}, "cannot decode"),
    "empty body": ({"body": b""}, "empty body"),
    "no body": ({}, "empty body"),
    "27 rows": ({"body": {"data": [[0] * 28] * 27}}, "28×28"),
    "783 values": ({"body": {"data": [0] * 783}}, "784"),
    "ragged rows": ({"body": {"data": [[0] * 28] * 27 + [[0] * 5]}}, "28×28"),
    "rows and numbers mixed": ({"body": {"data": [[0] * 28] * 27 + [0]}}, "mixes numbers and lists"),
    "NaN": ({"body": b'{"data": [' + b"NaN, " + b"0, " * 782 + b"0]}"}, "NaN or infinity"),
    "infinity": ({"body": {"data": [float("inf")] + [0] * 783}}, "NaN or infinity"),
    "strings": ({"body": {"data": ["a"] * 784}}, "must be numbers"),
    "booleans": ({"body": {"data": [True] * 784}}, "must be numbers"),
    "out of range": ({"body": {"data": [300] * 784}}, "[0, 255]"),
    "negative": ({"body": {"data": [-1] * 784}}, "[0, 255]"),
    "object instead of list": ({"body": {"data": {"x": 1}}}, "unsupported input"),
    "unknown field": ({"body": {"pixels": [0] * 784}}, "unknown JSON fields"),
    "bad base64": ({"body": {"data": "@@@not base64@@@"}}, "base64"),
    "broken JSON": ({"data": b'{"data": [1, 2'}, "does not parse"),
    "JSON with too many values": ({"body": b"[" + b"0," * 5000 + b"0]"}, "more than the 4096 accepted"),
    "LAB colour mode": ({"body": lab_tiff()}, "cannot decode"),
    "a format this model does not open (ICO)": ({"body": encode_image(Image.new("L", (28, 28)), "ICO")},
                                                "not an image in a format this model accepts"),
    "integer too large for a float": ({"body": b'{"data": [' + b"1" * 400 + b", " + b"0, " * 782 + b"0]}"},
                                      "too large"),
    "JSON nested 100000 deep": ({"body": b"[" * 100000}, "does not parse"),
    "v2 nested too deep": (v2([784], [[[[[[0]]]]]]), "nested deeper"),
    "v2 wrong shape": (v2([3, 3], [0] * 9), "one 28×28 image"),
    "v2 images counted by a second dimension": (v2([1, 3, 28, 28], [0] * 2352), "only the first dimension counts"),
    "v2 two counting dimensions": (v2([2, 2, 784], [0] * 3136), "only the first dimension counts"),
    "v2 batch over max_images": (v2([MAX_IMAGES + 1, 28, 28], [0] * 784),
                                 f"holds {MAX_IMAGES + 1} images, over the limit of {MAX_IMAGES} images"),
    "v2 no images": (v2([0, 28, 28], []), "holds no image"),
    "v2 JSON of six images (over the JSON bound)": ({"body": json.dumps(v2([6, 28, 28], [[[0] * 28] * 28] * 6)[
        "body"]).encode()}, f"more than the {MAX_JSON_VALUES} accepted"),
    "v2 NaN in a batch": ({"body": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 784], "data": ['
                           + b"0, " * 1000 + b"NaN, " + b"0, " * 566 + b"0]}]}"}, "NaN or infinity"),
    "v2 pixel out of range in a batch": (v2([2, 784], [0] * 1567 + [256]), "[0, 255]"),
    "v2 datatype outside the signature": (v2([28, 28], [0] * 784, "INT64"), "must be FP32, UINT8"),
    "v2 BYTES of two dimensions": (v2([2, 2], ["x"] * 4, "BYTES"), "BYTES shape must be [N]"),
    "v2 BYTES batch over max_images": (v2([MAX_IMAGES + 1], ["x"], "BYTES"), f"over the limit of {MAX_IMAGES}"),
    "v2 BYTES element not a string": (v2([2], [5, "x"], "BYTES"), "needs base64 image strings in 'data', element 0"),
    "v2 BYTES element not base64": (v2([2], [base64.b64encode(encode_image(Image.new("L", (28, 28)))).decode(), "@@"],
                                       "BYTES"), "v2 BYTES element 1 of 2 is a string but not valid base64"),
    "v2 BYTES element a corrupt image": (v2([1], [base64.b64encode(b"GIF89a junk").decode()], "BYTES"),
                                         "v2 BYTES element 0 of 1: cannot decode the image"),
    "v2 shape and data disagree": (v2([28, 28], [0] * 783), "holds 784 elements but 'data' has 783"),
    "v2 unknown datatype": (v2([28, 28], [0] * 784, "FP64x"), "datatype must be one of"),
    "v2 BOOL pixels": (v2([28, 28], [True] * 784, "BOOL"), "got BOOL"),
    "v2 string pixels": (v2([28, 28], ["0"] * 784, "UINT8"), "must be numbers"),
    "v2 two inputs": ({"body": {"inputs": [v2([784], [0] * 784)["body"]["inputs"][0]] * 2}}, "exactly one entry"),
    "v2 long shape": (v2([1] * 1_000_000, [0] * 784), "1000000 dimensions; at most 4"),
    "v2 huge dimension": (v2([10**400, 28], [0] * 784), f"dimensions must be integers from 0 to {MAX_IMAGES * 784}"),
    "v2 non-string id": (v2([784], [0] * 784, id=["x"]), "'id' must be a string"),
    "bad topk": ({"body": {"data": [0] * 784, "topk": 11}}, "topk must be between"),
    "non-integer topk": ({"body": {"data": [0] * 784, "topk": "three"}}, "topk must be an integer"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gets_400_alone_in_its_batch(worker: Worker, test_images: Any, kind: str) -> None:
    images, _ = test_images
    bad, message = BAD_INPUTS[kind]
    good = {"body": {"data": images[0].tolist()}}
    answers, statuses = worker([good, bad, good])
    assert statuses == [200, 400, 200]
    assert answers[1]["error"]["code"] == 400 and message in answers[1]["error"]["message"], answers[1]
    assert answers[1]["model"] == worker.handler.model_info
    assert answers[0]["label"] == answers[2]["label"]


# Inputs far larger than any message may be: each is refused with a message of bounded length that quotes none of it.
LONG = "Z" * 1_000_000
HUGE_INPUTS: dict[str, dict[str, Any]] = {
    "long topk string": {"body": {"data": [0] * 784, "topk": LONG}},
    "long topk bytes": {"body": encode_image(Image.new("L", (28, 28))), "topk": LONG.encode()},
    "long datatype": v2([784], [0] * 784, LONG),
    "long v2 id": v2([784], [0] * 784, id=LONG),
    "long v2 name": {"body": {"inputs": [{"name": LONG, "shape": [784], "datatype": "FP32", "data": [0] * 784}]}},
    "long shape": v2([1] * 1_000_000, [0] * 784),
    "long string shape": v2(LONG, [0] * 784),
    "many long unknown fields": {"body": {f"{LONG[:1000]}{i}": 0 for i in range(1000)}},
    "long string pixel": {"body": {"data": [LONG] + [0] * 783}},
    "rows of many lengths": {"body": {"data": [[0] * n for n in range(28)]}},
    "a million rows": {"body": {"data": [[0]] * 1_000_000}},
    "long base64": {"body": {"data": LONG + "!"}},
    "long non-base64 image string": {"body": {"data": base64.b64encode(LONG.encode()).decode()}},
    "long v2 data": v2([784], [0] * 1_000_000),
    "v2 data of a million empty lists": v2([784], [[] for _ in range(1_000_000)]),
    "long JSON body": {"body": b'{"data": "' + LONG.encode() + b'", "x": [' + b"1," * 10_000 + b"1]}"},
    "long garbage after the NPY magic": {"body": b"\x93NUMPY" + LONG.encode()},
    "NPY header with a long descr": {"body": npy_header(b"{'descr': '" + LONG[:900].encode()
                                                        + b"', 'fortran_order': False, 'shape': (784,)}")},
    "NPY header of a long string": {"body": npy_header(b"'" + LONG[:1000].encode() + b"'")},
    "NPY header with a huge dimension": {"body": npy_header(b"{'descr': '|u1', 'fortran_order': False, 'shape': ("
                                                            + b"9" * 900 + b", 784)}")},
}


@pytest.mark.parametrize("kind", sorted(HUGE_INPUTS))
def test_messages_are_capped_and_quote_no_unbounded_input(worker: Worker, kind: str) -> None:
    answers, statuses = worker([HUGE_INPUTS[kind]])
    message = answers[0]["error"]["message"]
    assert statuses == [400] and 20 < len(message) <= MAX_MESSAGE_CHARS, message
    assert "Z" * 50 not in message and "0, 0, 0, 0, 0" not in message and "1, 1, 1, 1, 1" not in message, message


def test_an_image_too_large_to_decode_safely_is_refused_before_decoding() -> None:
    huge = encode_image(Image.new("L", (5000, 5000), 0))
    with pytest.raises(ValueError, match="too large to decode safely: a PNG image of 5000×5000 pixels"):
        decode_request({"body": huge}, 10, MAX_IMAGES)


# --- the worst valid images: each at the edge of what is accepted, and each must be decoded (correctly) ----------
_rng = np.random.default_rng(0)


def noise(width: int, height: int, mode: str) -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    values = _rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(values[..., 0] if channels == 1 else values, mode=mode)


def save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def largest_noise_jpeg(max_bytes: int) -> bytes:
    """The most expensive baseline JPEG to entropy-decode under the byte limit: incompressible 4:4:4 noise."""
    side = math.isqrt(max_bytes * 10 // 24)  # such noise takes ~2.5 bytes a pixel
    while True:
        data = save(noise(side, side, "RGB"), "JPEG", quality=95, subsampling=0)
        if len(data) <= max_bytes:
            return data
        side -= 8


def worst_valid_images() -> dict[str, bytes]:
    """Images at the accepted limits, built to cost the most to decode (noise does not compress)."""
    frames = [noise(SIDE, SIDE, "L").convert("P") for _ in range(3)]
    palette = noise(SIDE, SIDE, "RGB").quantize(256)
    sixteen = Image.fromarray(_rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16))
    jpeg_side = math.isqrt(MAX_JPEG_PIXELS)
    big = noise(128, 128, "L").resize((jpeg_side, jpeg_side), Image.Resampling.BICUBIC).convert("RGB")
    largest_jpeg = next(data for data in (save(big, "JPEG", quality=q) for q in (95, 90, 85, 80, 70, 50))
                        if len(data) <= MAX_IMAGE_BYTES)
    return {
        f"largest PNG, RGBA noise {SIDE}×{SIDE}": save(noise(SIDE, SIDE, "RGBA"), "PNG"),
        f"widest PNG, {SIDE * SIDE}×1": save(noise(SIDE * SIDE, 1, "L"), "PNG"),
        f"palette PNG with transparency {SIDE}×{SIDE}": save(palette, "PNG", transparency=0),
        f"16-bit grayscale PNG {SIDE}×{SIDE}": save(sixteen, "PNG"),
        f"progressive JPEG, 4:4:4 noise {SIDE}×{SIDE}": save(noise(SIDE, SIDE, "RGB"), "JPEG", quality=95,
                                                             subsampling=0, progressive=True),
        f"largest baseline JPEG, {jpeg_side}×{jpeg_side}": largest_jpeg,
        "baseline JPEG of noise at the byte limit": largest_noise_jpeg(MAX_IMAGE_BYTES),
        f"GIF of 3 frames {SIDE}×{SIDE}": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        f"2-page TIFF, RGBA {SIDE}×{SIDE}": save(noise(SIDE, SIDE, "RGBA"), "TIFF", save_all=True,
                                               append_images=[noise(64, 64, "RGBA")]),
        f"lossy WebP {SIDE}×{SIDE}": save(noise(SIDE, SIDE, "RGB"), "WEBP", quality=90),
    }


@pytest.fixture(scope="module")
def worst_valid() -> dict[str, bytes]:
    return worst_valid_images()


def test_the_worst_valid_images_are_accepted(worker: Worker, worst_valid: dict[str, bytes]) -> None:
    names = sorted(worst_valid)
    answers, statuses = worker([{"body": worst_valid[name]} for name in names])
    assert statuses == [200] * len(names), [a.get("error") for a in answers]
    assert all(size <= MAX_IMAGE_BYTES for size in map(len, worst_valid.values()))


def test_sixteen_bit_images_keep_their_range(test_images: Any) -> None:
    """Pillow's own 16-bit → 8-bit conversion clips at 255 (nearly all white); the handler scales."""
    images, _ = test_images
    eight = images[0].numpy()
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # 0..255 → 0..65535
    assert torch.equal(image_to_pixels(save(sixteen, "PNG")), images[0])


def test_transparent_backgrounds_are_white_and_palettes_are_read(test_images: Any) -> None:
    """A dark garment cut out on a transparent background is the light-on-black original, exactly."""
    images, _ = test_images
    original = images[0].numpy()
    dark = 255 - original
    rgba = np.stack([dark, dark, dark, np.where(original > 0, 255, 0).astype(np.uint8)], axis=-1)
    assert torch.equal(image_to_pixels(save(Image.fromarray(rgba, mode="RGBA"), "PNG")), images[0])
    palette = Image.fromarray(dark, mode="L").convert("P")
    palette.putpalette([value for gray in range(256) for value in (gray, gray, gray)])
    assert torch.equal(image_to_pixels(save(palette, "PNG", transparency=255)), images[0])


def test_only_the_first_frame_of_an_animation_or_a_multipage_tiff_is_read(test_images: Any) -> None:
    images, _ = test_images
    first, second = (Image.fromarray(images[i].numpy(), mode="L") for i in (0, 1))
    for fmt in ("GIF", "TIFF"):
        data = save(first, fmt, save_all=True, append_images=[second, second])
        assert torch.equal(image_to_pixels(data), images[0]), fmt


def test_big_and_progressive_jpegs_decode_like_their_originals(test_images: Any) -> None:
    images, _ = test_images
    original = Image.fromarray(images[0].numpy(), mode="L")
    baseline = save(original.resize((300, 300)), "JPEG", quality=90)
    progressive = save(original.resize((300, 300)), "JPEG", quality=90, progressive=True)
    assert torch.equal(image_to_pixels(baseline), image_to_pixels(progressive))  # the same coefficients
    big = save(original.resize((2048, 2048), Image.Resampling.NEAREST), "JPEG", quality=90)
    difference = (image_to_pixels(big).float() - images[0].float()).abs().mean()
    assert difference < 8, difference  # decoded at 1/8 scale (256×256), then resized like any image


@pytest.mark.parametrize(("kind", "image", "fmt", "options", "message"), [
    ("PNG one pixel over", (SIDE + 1, SIDE), "PNG", {}, f"a PNG image of {SIDE + 1}×{SIDE} pixels"),
    ("progressive JPEG over", (SIDE + 8, SIDE), "JPEG", {"progressive": True}, "a progressive JPEG of"),
    ("baseline JPEG over", (2048 + 8, 2048), "JPEG", {}, "a baseline JPEG image of 2056×2048"),
])
def test_images_over_the_pixel_caps_are_refused(kind: str, image: tuple[int, int], fmt: str,
                                                options: dict[str, Any], message: str) -> None:
    data = save(Image.new("L", image, 0), fmt, **options)
    with pytest.raises(ValueError, match="too large to decode safely") as refused:
        image_to_pixels(data)
    assert message in str(refused.value) and "downscale" in str(refused.value)
    assert image[0] * image[1] > (MAX_JPEG_PIXELS if "baseline" in kind else MAX_DECODED_PIXELS)


def test_a_batch_of_only_bad_requests_still_answers_each(worker: Worker) -> None:
    answers, statuses = worker([{"body": b""}, {"body": b"junk"}])
    assert statuses == [400, 400] and len(answers) == 2


def test_class_names_come_from_index_to_name(chain: Chain, tmp_path: Path, test_images: Any) -> None:
    images, _ = test_images
    renamed = {str(i): f"class {i}" for i in range(10)}
    handler = FashionHandler()
    context = make_context(model_dir_for(chain, "pruned", tmp_path / "renamed", renamed), "pruned")
    handler.initialize(context)
    answers, _ = Worker(handler, context)([{"body": {"data": images[0].tolist()}}])
    assert answers[0]["class"] == f"class {answers[0]['label']}"
    for broken in ({str(i): "x" for i in range(9)}, {**renamed, "10": "extra"}, {**renamed, "3": 3}):
        directory = model_dir_for(chain, "pruned", tmp_path / f"broken{len(broken)}", broken)
        with pytest.raises(RuntimeError, match="must name each of the model's 10 classes"):
            FashionHandler().initialize(make_context(directory, "pruned"))


def test_torchserve_finds_the_one_handler_class_in_the_module() -> None:
    """TorchServe's loader refuses a handler module that defines more than one class (ts/model_loader.py)."""
    import fashion_handler

    assert list_classes_from_module(fashion_handler) == [FashionHandler]


def test_weights_that_do_not_match_the_card_are_refused(chain: Chain, tmp_path: Path) -> None:
    directory = model_dir_for(chain, "pruned", tmp_path)
    card = json.loads((directory / CARD_FILE).read_text())
    card["sha256"] = "0" * 64
    (directory / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(RuntimeError, match="does not match its card"):
        FashionHandler().initialize(make_context(directory, "pruned"))


def test_thread_count_comes_from_the_model_config(chain: Chain, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        directory = model_dir_for(chain, "distilled", tmp_path)
        FashionHandler().initialize(make_context(directory, "distilled", threads=1))
        assert torch.get_num_threads() == 1
        FashionHandler().initialize(make_context(directory, "distilled", threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_memory_format_comes_from_the_model_config(chain: Chain, tmp_path: Path, test_images: Any) -> None:
    """channels_last (what loadtest.forward_speed measured faster for the torch variants) answers as contiguous
    does; a saved form with a layout of its own (the int8 TorchScript) ignores it; an unknown layout is refused at
    load, not per request."""
    images, _ = test_images
    rows = [{"body": encode_image(Image.fromarray(images[i].numpy(), mode="L"))} for i in range(8)]
    answers = {}
    for memory_format in ("contiguous", "channels_last"):
        directory = model_dir_for(chain, "full", tmp_path / memory_format)
        context = make_context(directory, "full")
        context.model_yaml_config = {"handler": {"threads": 1, "memory_format": memory_format}}
        handler = FashionHandler()
        handler.initialize(context)
        assert isinstance(handler.model, fashion_cnn.ChannelsLast) == (memory_format == "channels_last")
        answers[memory_format], statuses = Worker(handler, context)(rows)
        assert statuses == [200] * 8
    assert [a["label"] for a in answers["channels_last"]] == [a["label"] for a in answers["contiguous"]]
    for fast, plain in zip(answers["channels_last"], answers["contiguous"], strict=True):
        assert abs(fast["topk"][0]["probability"] - plain["topk"][0]["probability"]) < 1e-4
    context = make_context(model_dir_for(chain, "int8", tmp_path / "int8"), "int8")
    context.model_yaml_config = {"handler": {"threads": 1, "memory_format": "channels_last"}}
    handler = FashionHandler()
    handler.initialize(context)
    assert not isinstance(handler.model, fashion_cnn.ChannelsLast)
    context.model_yaml_config = {"handler": {"threads": 1, "memory_format": "nhwc"}}
    with pytest.raises(ValueError, match="memory_format must be one of"):
        FashionHandler().initialize(context)


def test_the_archive_packs_what_the_handler_reads(chain: Chain, tmp_path: Path) -> None:
    """A real .mar holds signature.json (the file the router reads, byte for byte) beside the card and the labels,
    and a handler initialized from the unpacked archive takes the signature's batch limit."""
    archive = build_archive("pruned", "1.0", chain.directory, tmp_path / "store")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as mar:
        assert {SIGNATURE_FILE, CARD_FILE, LABELS_FILE, "pruned.pt"} <= set(mar.namelist())
        assert mar.read(SIGNATURE_FILE) == SIGNATURE.read_bytes()
        mar.extractall(unpacked)
    context = make_context(unpacked, "pruned")
    handler = FashionHandler()
    handler.initialize(context)
    assert handler.max_images == MAX_IMAGES
    answers, statuses = Worker(handler, context)([{"body": npy(_zeros((MAX_IMAGES, 784)))}])
    assert statuses == [200] and rows_of(answers[0])["label"]["shape"] == [MAX_IMAGES]


def test_the_signature_names_the_outputs_and_sets_the_limit(chain: Chain, tmp_path: Path, test_images: Any) -> None:
    images, _ = test_images
    signature = json.loads(SIGNATURE.read_text())
    changed = {**signature, "max_images": 2, "outputs": [{**output, "datatype": "INT32"} if output["name"] == "label"
                                                         else output for output in reversed(signature["outputs"])]}
    handler = FashionHandler()
    context = make_context(model_dir_for(chain, "pruned", tmp_path / "changed", signature=changed), "pruned")
    handler.initialize(context)
    answers, statuses = Worker(handler, context)([{"body": npy(images[:2].numpy())},
                                                  {"body": npy(images[:3].numpy())}])
    assert statuses == [200, 400]
    assert [(output["name"], output["datatype"]) for output in answers[0]["outputs"]] == [
        ("probabilities", "FP32"), ("class", "BYTES"), ("label", "INT32")]
    assert "over the limit of 2 images" in answers[1]["error"]["message"]


def _outputs_with(signature: dict[str, Any], name: str, **change: Any) -> list[dict[str, Any]]:
    return [{**output, **change} if output["name"] == name else output for output in signature["outputs"]]


def test_a_signature_that_does_not_fit_the_model_is_refused_at_initialize(chain: Chain, tmp_path: Path) -> None:
    signature = json.loads(SIGNATURE.read_text())
    broken = {
        "the 10 classes of index_to_name.json": {**signature, "outputs": _outputs_with(signature, "probabilities",
                                                                                       shape=[-1, 9])},
        "max_images must be a positive integer": {**signature, "max_images": 0},
        "is what this handler decodes": {**signature, "inputs": [{**signature["inputs"][0], "also": ["UINT8"]}]},
        "outputs must be label, class, probabilities": {**signature, "outputs": signature["outputs"][:2]},
        "whose first dimension is -1": {**signature, "outputs": _outputs_with(signature, "label", shape=[1])},
    }
    for index, (message, changed) in enumerate(broken.items()):
        directory = model_dir_for(chain, "pruned", tmp_path / f"broken{index}", signature=changed)
        with pytest.raises(RuntimeError, match=message):
            FashionHandler().initialize(make_context(directory, "pruned"))
