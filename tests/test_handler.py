"""The handler, with TorchServe's own Context class standing in for a worker (no server)."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import ts
from fashion_handler import CARD_FILE, CPU_TIME_METRIC, DECODE_INPUT_ENV, LABELS_FILE, FashionHandler
from image_decoding import MAX_DECODED_PIXELS, MAX_IMAGE_BYTES, MAX_JPEG_PIXELS, image_to_pixels
from invalid_input import MAX_MESSAGE_CHARS
from PIL import Image, ImageFile
from request_decoding import decode_request
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.utils.util import list_classes_from_module

from serving.archive import label_mapping
from tests.conftest import Chain, encode_image, in_process_labels

TS_METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"  # what a worker loads by default
SIDE = math.isqrt(MAX_DECODED_PIXELS)  # the largest square any format is decoded at
ImageFile.MAXBLOCK = 1 << 24  # Pillow's JPEG encoder needs room to write progressive noise into a BytesIO


def model_dir_for(chain: Chain, variant: str, directory: Path, labels: dict[str, Any] | None = None) -> Path:
    """What TorchServe unpacks from a .mar: the weights, the card (as card.json) and index_to_name.json."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(chain.weights(variant), directory / f"{variant}.pt")
    shutil.copy(chain.directory / f"{variant}.card.json", directory / CARD_FILE)
    mapping = labels if labels is not None else label_mapping(chain.card(variant)["dataset"])
    (directory / LABELS_FILE).write_text(json.dumps(mapping))
    return directory


def make_context(model_dir: Path, variant: str, threads: int = 1) -> Context:
    manifest = {"model": {"modelName": f"fashion-{variant}", "serializedFile": f"{variant}.pt", "modelVersion": "1.0"}}
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
    "v2 wrong shape": (v2([3, 28, 28], [0] * 2352), "one 28×28 image"),
    "v2 shape and data disagree": (v2([28, 28], [0] * 783), "holds 784 elements but 'data' has 783"),
    "v2 unknown datatype": (v2([28, 28], [0] * 784, "FP64x"), "datatype must be one of"),
    "v2 BOOL pixels": (v2([28, 28], [True] * 784, "BOOL"), "got BOOL"),
    "v2 two inputs": ({"body": {"inputs": [v2([784], [0] * 784)["body"]["inputs"][0]] * 2}}, "exactly one entry"),
    "v2 long shape": (v2([1] * 1_000_000, [0] * 784), "1000000 dimensions; at most 4"),
    "v2 huge dimension": (v2([10**400, 28], [0] * 784), "dimensions must be integers from 0 to 784"),
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
        decode_request({"body": huge}, 10)


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
