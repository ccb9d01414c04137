"""ONNX exports of the dry-run chain (training.export_onnx): their cards, their answers against the PyTorch models,
a free batch dimension, the handler serving them with the configured threads, their archives, a real TorchServe."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from fashion_handler import CARD_FILE, LABELS_FILE, SIGNATURE_FILE, FashionHandler

from fashion_cnn import (
    FORMAT_ONNX,
    FORMAT_STATE_DICT,
    IMAGE_SIZE,
    ONNX_SUFFIX,
    OnnxModel,
    load_model,
    normalize,
    sha256_file,
)
from serving.archive import MODEL_CONFIGS, SIGNATURE, build_archive, label_mapping, model_name
from tests.conftest import TEST_MODEL_CONFIG, Chain, encode_image, in_process_labels, run_module
from tests.test_handler import Worker, make_context, npy
from tests.test_handler import worker_environment as worker_environment  # autouse: undoes the worker's env change
from training.cli import DRY_RUN_TEST_IMAGES, DRY_RUN_TRAIN_IMAGES
from training.data import Split, load_split
from training.engine import evaluate, predict_logits
from training.export_onnx import MIN_FP32_AGREEMENT, OPSET

FP32_PARENTS = ("full", "pruned", "distilled")
# Each ONNX variant and the PyTorch checkpoint it was made from (its card compares the two).
PARENTS = {**{parent + ONNX_SUFFIX: parent for parent in FP32_PARENTS}, "int8" + ONNX_SUFFIX: "full"}
FP32_EXPORTS = tuple(parent + ONNX_SUFFIX for parent in FP32_PARENTS)


@dataclass(frozen=True)
class Exports:
    directory: Path

    def card(self, variant: str) -> dict[str, Any]:
        card: dict[str, Any] = json.loads((self.directory / f"{variant}.card.json").read_text())
        return card

    def path(self, variant: str) -> Path:
        return self.directory / self.card(variant)["file"]


@pytest.fixture(scope="module")
def exports(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """Every ONNX variant, each from its real script with --dry-run and no --output: the parents are copied into a
    directory of their own, so the default names (beside the parent) are what is checked."""
    directory = tmp_path_factory.mktemp("onnx")
    for parent in FP32_PARENTS:
        shutil.copy(chain.weights(parent), directory)
        shutil.copy(chain.directory / f"{parent}.card.json", directory)
        run_module("training.export_onnx", "--dry-run", "--parent", str(directory / f"{parent}.pt"))
    run_module("training.export_onnx", "--dry-run", "--parent", str(directory / "full.pt"), "--quantize")
    return Exports(directory)


@pytest.fixture(scope="module")
def dry_run_test() -> Split:
    """The test images every dry-run card is measured on."""
    return load_split("fashion-mnist", "test").subset(DRY_RUN_TEST_IMAGES)


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first.argmax(1) == second.argmax(1)).float().mean().item()


def max_probability_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return (torch.softmax(first, dim=1) - torch.softmax(second, dim=1)).abs().max().item()


@pytest.mark.parametrize("variant", sorted(PARENTS))
def test_the_card_describes_the_onnx_file(exports: Exports, chain: Chain, variant: str) -> None:
    card, path, parent = exports.card(variant), exports.path(variant), PARENTS[variant]
    assert (card["variant"], card["format"], card["file"]) == (variant, FORMAT_ONNX, f"{variant}.onnx")
    assert card["sha256"] == sha256_file(path) and card["file_bytes"] == path.stat().st_size
    model = onnx.load(str(path))
    assert card["onnx"]["opset"] == OPSET == next(entry.version for entry in model.opset_import if entry.domain == "")
    assert card["versions"]["onnxruntime"] == onnxruntime.__version__
    assert card["versions"]["onnx"] == onnx.__version__
    assert card["parent"]["sha256"] == sha256_file(chain.weights(parent))
    assert card["model_args"] == chain.card(parent)["model_args"]
    assert card["parameters"] == chain.card(parent)["parameters"]
    assert card["test_images"] == card["onnx"]["compared_images"] == DRY_RUN_TEST_IMAGES
    assert card["onnx"]["parent_test_accuracy"] == chain.card(parent)["test_accuracy"]
    assert 0.0 <= card["onnx"]["agreement_with_parent"] <= 1.0
    assert any("legacy TorchScript-based ONNX export" in warning for warning in card["onnx"]["warnings"])
    for row in card["latency_ms"].values():
        assert set(row) == {"batch_1", "batch_64"} and all(ms > 0 for ms in row.values())
    assert set(card["latency_ms"]) == {"threads_1", "threads_2"}
    (batch, *image) = model.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param == "batch" and [dim.dim_value for dim in image] == [1, IMAGE_SIZE, IMAGE_SIZE]


@pytest.mark.parametrize("variant", FP32_EXPORTS)
def test_an_fp32_export_answers_like_its_parent(exports: Exports, chain: Chain, dry_run_test: Split,
                                                variant: str) -> None:
    """Measured here, not taken from the card: the same top-1 on >= 99.9 % of the dry-run test images, and the
    card's figures are these."""
    parent = load_model(chain.weights(PARENTS[variant]), FORMAT_STATE_DICT)
    exported = load_model(exports.path(variant), FORMAT_ONNX)
    expected, logits = predict_logits(parent, dry_run_test), predict_logits(exported, dry_run_test)
    card = exports.card(variant)
    assert agreement(logits, expected) >= MIN_FP32_AGREEMENT
    assert card["onnx"]["agreement_with_parent"] == pytest.approx(agreement(logits, expected), abs=1e-6)
    assert max_probability_difference(logits, expected) < 1e-4
    assert card["onnx"]["max_probability_difference"] == pytest.approx(
        max_probability_difference(logits, expected), rel=0.01, abs=1e-7)
    assert card["test_accuracy"] == pytest.approx(evaluate(exported, dry_run_test).accuracy, abs=1e-6)
    assert abs(card["test_accuracy"] - chain.card(PARENTS[variant])["test_accuracy"]) <= 1 - MIN_FP32_AGREEMENT


def test_the_ort_int8_model_stores_int8_weights_per_channel_and_says_how_close_it_is(
        exports: Exports, chain: Chain, dry_run_test: Split) -> None:
    path, card = exports.path("int8-onnx"), exports.card("int8-onnx")
    model = onnx.load(str(path))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights = [node for node in model.graph.node if node.op_type == "DequantizeLinear"
               and node.input[0] in initializers and len(initializers[node.input[0]].dims) >= 2]
    assert len(weights) == 4  # both convolutions and both fully connected layers
    for node in weights:
        weight, scale = initializers[node.input[0]], initializers[node.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        assert list(scale.dims) == [weight.dims[axis]]  # one scale per output channel
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)  # activations too (QDQ)
    assert len(card["quantization"]["int8_weights"]) == 4
    assert card["quantization"]["calibration_images"] == DRY_RUN_TRAIN_IMAGES
    assert card["file_bytes"] < 0.3 * exports.card("full-onnx")["file_bytes"]
    parent = load_model(chain.weights("full"), FORMAT_STATE_DICT)
    expected = predict_logits(parent, dry_run_test)
    logits = predict_logits(load_model(path, FORMAT_ONNX), dry_run_test)
    assert card["onnx"]["agreement_with_parent"] == pytest.approx(agreement(logits, expected), abs=1e-6)
    assert card["onnx"]["max_probability_difference"] == pytest.approx(
        max_probability_difference(logits, expected), rel=0.01)
    # Recorded, not required to reach the fp32 bar; still an int8 model that follows its parent at all.
    assert card["onnx"]["agreement_with_parent"] >= 0.9


@pytest.mark.parametrize("variant", sorted(PARENTS))
def test_the_batch_dimension_is_free(exports: Exports, dry_run_test: Split, variant: str) -> None:
    model = load_model(exports.path(variant), FORMAT_ONNX)
    images = normalize(dry_run_test.images[:64])
    with torch.inference_mode():
        whole = model(images)
        assert whole.shape == (64, 10) and whole.dtype == torch.float32
        for size in (1, 7):
            part = model(images[:size])
            assert part.shape == (size, 10)
            torch.testing.assert_close(part, whole[:size], atol=1e-4, rtol=1e-4)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_session_runs_the_threads_it_is_given(exports: Exports) -> None:
    """ONNX Runtime's intra-op pool has threads - 1 threads of its own (the caller's is the first): the setting is
    applied, not only stored."""
    path = exports.path("distilled-onnx")
    load_model(path, FORMAT_ONNX)  # ONNX Runtime's process-wide threads start with the first session
    for threads in (1, 3):
        before = os_threads()
        model = load_model(path, FORMAT_ONNX, threads=threads)
        assert isinstance(model, OnnxModel)
        options = model.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
        assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        assert os_threads() - before == threads - 1


def model_dir_for_onnx(exports: Exports, variant: str, directory: Path) -> Path:
    """What TorchServe unpacks from an ONNX variant's .mar (test_an_onnx_archive_... checks a real one)."""
    directory.mkdir(parents=True)
    card = exports.card(variant)
    shutil.copy(exports.path(variant), directory / card["file"])
    shutil.copy(exports.directory / f"{variant}.card.json", directory / CARD_FILE)
    (directory / LABELS_FILE).write_text(json.dumps(label_mapping(card["dataset"])))
    (directory / SIGNATURE_FILE).write_text(SIGNATURE.read_text())
    return directory


def onnx_worker(directory: Path, variant: str, threads: int = 1) -> Worker:
    context = make_context(directory, variant, threads)
    context.manifest["model"]["serializedFile"] = json.loads((directory / CARD_FILE).read_text())["file"]
    handler = FashionHandler()
    handler.initialize(context)
    return Worker(handler, context)


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """The handler sets the (process-wide) torch thread count from its model config."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_torch_threads")
@pytest.mark.parametrize("variant", sorted(PARENTS))
def test_the_handler_serves_an_onnx_card_with_the_configured_threads(
        exports: Exports, chain: Chain, test_images: Any, tmp_path: Path, variant: str) -> None:
    images, _ = test_images
    # fp32: the PyTorch model's labels; int8: the ONNX file's own (its agreement with full is in its card).
    expected = (in_process_labels(chain, PARENTS[variant], images) if variant in FP32_EXPORTS else
                load_model(exports.path(variant), FORMAT_ONNX)(normalize(images)).argmax(1).tolist())
    worker = onnx_worker(model_dir_for_onnx(exports, variant, tmp_path / variant), variant, threads=2)
    assert isinstance(worker.handler.model, OnnxModel)
    options = worker.handler.model.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    rows: list[dict[str, Any]] = [{"body": encode_image(images[0])}, {"body": npy(images.numpy())},
                                  {"body": b"not an image"}]
    answers, statuses = worker(rows)
    assert statuses == [200, 200, 400]
    assert answers[0]["label"] == expected[0]
    assert answers[0]["model"] == {"name": model_name(variant), "version": "1.0", "variant": variant}
    labels = {output["name"]: output["data"] for output in answers[1]["outputs"]}["label"]
    assert labels == expected


@pytest.mark.usefixtures("restore_torch_threads")
def test_an_onnx_archive_packs_the_onnx_file_and_its_variant_s_settings(
        exports: Exports, chain: Chain, test_images: Any, tmp_path: Path) -> None:
    """An ONNX variant's .mar: the .onnx file the card names, the model name `fashion-<variant>`, and (no config of
    its own yet) the settings of the variant it stands in for; a handler loads it from the unpacked archive."""
    images, _ = test_images
    archive = build_archive("full-onnx", "1.0", exports.directory, tmp_path / "store")
    assert archive.name == "fashion-full-onnx-v1.0.mar"
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as mar:
        assert {"full-onnx.onnx", CARD_FILE, LABELS_FILE, SIGNATURE_FILE, "fashion_cnn.py"} <= set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert mar.read(manifest["model"]["configFile"]) == (MODEL_CONFIGS / "full.yaml").read_bytes()
        mar.extractall(unpacked)
    assert manifest["model"]["modelName"] == "fashion-full-onnx"
    assert manifest["model"]["serializedFile"] == "full-onnx.onnx"
    context = make_context(unpacked, "full-onnx")
    context.manifest = manifest
    handler = FashionHandler()
    handler.initialize(context)
    answers, statuses = Worker(handler, context)([{"body": npy(images.numpy())}])
    assert statuses == [200]
    labels = {output["name"]: output["data"] for output in answers[0]["outputs"]}["label"]
    assert labels == in_process_labels(chain, "full", images)


def test_export_refuses_a_parent_it_cannot_export(chain: Chain, tmp_path: Path) -> None:
    result = run_module("training.export_onnx", "--dry-run", "--parent", str(chain.weights("int8")),
                        "--output", str(tmp_path / "x.onnx"), check=False)
    assert result.returncode == 2
    assert "saved as torchscript; only state_dict variants" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.serving
def test_a_real_torchserve_serves_an_onnx_archive_like_the_pytorch_model(
        exports: Exports, chain: Chain, test_images: Any, tmp_path: Path) -> None:
    """One TorchServe of its own with fashion-full-onnx: real workers load the ONNX file through our handler."""
    from serving import server
    from serving.client import Client, Target
    from serving.instance import free_ports

    images, _ = test_images
    configs, store = tmp_path / "model_configs", tmp_path / "model_store"
    configs.mkdir()
    (configs / "full-onnx.yaml").write_text(yaml.safe_dump(TEST_MODEL_CONFIG))
    build_archive("full-onnx", "1.0", exports.directory, store, model_config=configs / "full-onnx.yaml")
    models = tmp_path / "models.yaml"
    name = model_name("full-onnx")
    models.write_text(yaml.safe_dump({"models": {name: {"variant": "full-onnx", "versions": ["1.0"],
                                                        "default": "1.0"}}}))
    instance = server.Instance(tmp_path / "run", store, models, server.Ports(*free_ports(6)), model_configs=configs)
    server.start(instance, timeout=240)
    try:
        with Client(instance) as client:
            replies = [client.predict_rest(Target(name), encode_image(images[i]), "image/png") for i in range(4)]
            batch = client.predict_rest(Target(name), npy(images.numpy()), "application/octet-stream")
    finally:
        server.stop(instance)
    assert [reply.status for reply in replies] == [200] * 4
    expected = in_process_labels(chain, "full", images)
    assert [reply.json()["label"] for reply in replies] == expected[:4]
    assert replies[0].json()["model"] == {"name": name, "version": "1.0", "variant": "full-onnx"}
    assert batch.status == 200
    assert {output["name"]: output["data"] for output in batch.json()["outputs"]}["label"] == expected
    probabilities = {output["name"]: output["data"] for output in batch.json()["outputs"]}["probabilities"]
    assert np.allclose(np.reshape(probabilities, (len(images), 10)).sum(axis=1), 1.0, atol=1e-4)
