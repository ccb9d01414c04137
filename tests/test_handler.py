"""The handler, with TorchServe's own Context class standing in for a worker (no server)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from fashion_handler import CARD_FILE, FashionHandler
from PIL import Image
from request_decoding import decode_request
from ts.context import Context, RequestProcessor

from tests.conftest import Chain, encode_image, in_process_labels


def model_dir_for(chain: Chain, variant: str, directory: Path) -> Path:
    """What TorchServe unpacks from a .mar: the weights, the card (as card.json) and the shared module."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(chain.weights(variant), directory / f"{variant}.pt")
    shutil.copy(chain.directory / f"{variant}.card.json", directory / CARD_FILE)
    return directory


def make_context(model_dir: Path, variant: str, threads: int = 1) -> Context:
    manifest = {"model": {"modelName": f"fashion-{variant}", "serializedFile": f"{variant}.pt", "modelVersion": "1.0"}}
    return Context(f"fashion-{variant}", str(model_dir), manifest, 8, None, "0.12.0",
                   model_yaml_config={"handler": {"threads": threads}})


class Worker:
    """A loaded handler plus the per-request status TorchServe would send back."""

    def __init__(self, handler: FashionHandler, context: Context) -> None:
        self.handler, self.context = handler, context

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        self.context.request_processor = [RequestProcessor({}) for _ in rows]
        answers = self.handler.handle(rows, self.context)
        return answers, [self.context.get_response_status(i)[0] for i in range(len(rows))]


@pytest.fixture(scope="module", params=["full", "int8"])
def worker(request: pytest.FixtureRequest, chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    variant = request.param
    directory = model_dir_for(chain, variant, tmp_path_factory.mktemp(variant))
    context = make_context(directory, variant)
    handler = FashionHandler()
    handler.initialize(context)
    return Worker(handler, context)


def test_every_input_form_gives_the_in_process_answer(worker: Worker, chain: Chain, test_images: Any) -> None:
    images, _ = test_images
    expected = in_process_labels(chain, worker.handler.card["variant"], images[:4])
    pil = [Image.fromarray(images[i].numpy(), mode="L") for i in range(4)]
    rows = [
        {"body": encode_image(pil[0])},
        {"body": {"data": images[1].tolist()}},  # TorchServe hands JSON bodies over already decoded
        {"data": json.dumps({"data": images[2].flatten().tolist()}).encode()},  # gRPC: JSON as bytes
        {"body": {"data": base64.b64encode(encode_image(pil[3])).decode()}},
    ]
    answers, statuses = worker(rows)
    assert statuses == [200] * 4
    assert [answer["label"] for answer in answers] == expected
    for answer in answers:
        assert answer["class"] == answer["topk"][0]["class"]
        assert answer["model"] == {"name": f"fashion-{worker.handler.card['variant']}", "version": "1.0",
                                   "variant": worker.handler.card["variant"]}


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


def lab_tiff() -> bytes:
    return encode_image(Image.new("LAB", (28, 28)), "TIFF")


def truncated_png() -> bytes:
    data = encode_image(Image.new("L", (28, 28), 128))
    return data[: len(data) // 2]


BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "corrupt image": ({"body": b"\x89PNG\r\n\x1a\nnot really a png"}, "cannot decode"),
    "truncated image": ({"body": truncated_png()}, "cannot decode"),
    "empty body": ({"body": b""}, "empty body"),
    "no body": ({}, "empty body"),
    "27 rows": ({"body": {"data": [[0] * 28] * 27}}, "28×28"),
    "783 values": ({"body": {"data": [0] * 783}}, "784"),
    "ragged rows": ({"body": {"data": [[0] * 28] * 27 + [[0] * 5]}}, "28×28"),
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
    "LAB colour mode": ({"body": lab_tiff()}, "cannot decode"),
    "integer too large for a float": ({"body": b'{"data": [' + b"1" * 400 + b", " + b"0, " * 782 + b"0]}"},
                                      "too large"),
    "JSON nested 100000 deep": ({"body": b"[" * 100000}, "does not parse"),
    "v2 nested too deep": ({"body": {"inputs": [{"name": "x", "shape": [784], "datatype": "FP32",
                                                 "data": [[[[[[0]]]]]]}]}}, "nested deeper"),
    "v2 wrong shape": ({"body": {"inputs": [{"name": "x", "shape": [3, 28, 28], "datatype": "FP32",
                                             "data": [0] * 2352}]}}, "one 28×28 image"),
    "v2 unknown datatype": ({"body": {"inputs": [{"name": "x", "shape": [28, 28], "datatype": "FP64x",
                                                  "data": [0] * 784}]}}, "datatype must be BYTES or one of"),
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
    assert answers[1]["error"]["code"] == 400 and message in answers[1]["error"]["message"]
    assert answers[0]["label"] == answers[2]["label"]


def test_an_image_too_large_to_decode_safely_is_refused_before_decoding() -> None:
    huge = encode_image(Image.new("L", (5000, 5000), 0))
    with pytest.raises(ValueError, match="too large to decode safely"):
        decode_request({"body": huge}, 10)


def test_a_batch_of_only_bad_requests_still_answers_each(worker: Worker) -> None:
    answers, statuses = worker([{"body": b""}, {"body": b"junk"}])
    assert statuses == [400, 400] and len(answers) == 2


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
