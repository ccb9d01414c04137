"""ONNX exports of the dry-run chain (training.export_onnx, made by the shared chain: tests/conftest.py): their cards,
their answers against the PyTorch models, a free batch dimension, the handler serving them with the configured
threads, their archives, and the shared TorchServe serving them like their PyTorch parents."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from fashion_handler import CARD_FILE, LABELS_FILE, SIGNATURE_FILE, FashionHandler

import fashion_cnn
from fashion_cnn import (
    FORMAT_ONNX,
    FORMAT_STATE_DICT,
    IMAGE_SIZE,
    OnnxModel,
    load_model,
    normalize,
    sha256_file,
)
from serving import project, server
from serving.archive import MODEL_CONFIGS, build_archive, model_name
from serving.client import Client, Target
from tests.conftest import ONNX_PARENTS, QUANTIZED_ONNX, Chain, encode_image, in_process_labels, run_module
from tests.test_handler import Worker, make_context, model_dir_for, npy
from tests.test_handler import worker_environment as worker_environment  # autouse: undoes the worker's env change
from training.cli import DRY_RUN_TEST_IMAGES, DRY_RUN_TRAIN_IMAGES
from training.data import Split, load_split
from training.engine import evaluate, predict_logits
from training.export_onnx import MIN_FP32_AGREEMENT, OPSET

FP32_EXPORTS = tuple(variant for variant in ONNX_PARENTS if variant != QUANTIZED_ONNX)


@pytest.fixture(scope="module")
def dry_run_test() -> Split:
    """The test images every dry-run card is measured on."""
    return load_split("fashion-mnist", "test").subset(DRY_RUN_TEST_IMAGES)


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first.argmax(1) == second.argmax(1)).float().mean().item()


def max_probability_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return (torch.softmax(first, dim=1) - torch.softmax(second, dim=1)).abs().max().item()


@pytest.mark.parametrize("variant", sorted(ONNX_PARENTS))
def test_the_card_describes_the_onnx_file(chain: Chain, variant: str) -> None:
    card, path, parent = chain.card(variant), chain.weights(variant), ONNX_PARENTS[variant]
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
def test_an_fp32_export_answers_like_its_parent(chain: Chain, dry_run_test: Split, variant: str) -> None:
    """Measured here, not taken from the card: the same top-1 on >= 99.9 % of the dry-run test images, and the
    card's figures are these."""
    parent = load_model(chain.weights(ONNX_PARENTS[variant]), FORMAT_STATE_DICT)
    exported = load_model(chain.weights(variant), FORMAT_ONNX)
    expected, logits = predict_logits(parent, dry_run_test), predict_logits(exported, dry_run_test)
    card = chain.card(variant)
    assert agreement(logits, expected) >= MIN_FP32_AGREEMENT
    assert card["onnx"]["agreement_with_parent"] == pytest.approx(agreement(logits, expected), abs=1e-6)
    assert max_probability_difference(logits, expected) < 1e-4
    assert card["onnx"]["max_probability_difference"] == pytest.approx(
        max_probability_difference(logits, expected), rel=0.01, abs=1e-7)
    assert card["test_accuracy"] == pytest.approx(evaluate(exported, dry_run_test).accuracy, abs=1e-6)
    assert abs(card["test_accuracy"] - chain.card(ONNX_PARENTS[variant])["test_accuracy"]) <= 1 - MIN_FP32_AGREEMENT


def test_the_ort_int8_model_stores_int8_weights_per_channel_and_says_how_close_it_is(chain: Chain,
                                                                                   dry_run_test: Split) -> None:
    path, card = chain.weights("int8-onnx"), chain.card("int8-onnx")
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
    assert card["file_bytes"] < 0.3 * chain.card("full-onnx")["file_bytes"]
    parent = load_model(chain.weights("full"), FORMAT_STATE_DICT)
    expected = predict_logits(parent, dry_run_test)
    logits = predict_logits(load_model(path, FORMAT_ONNX), dry_run_test)
    assert card["onnx"]["agreement_with_parent"] == pytest.approx(agreement(logits, expected), abs=1e-6)
    assert card["onnx"]["max_probability_difference"] == pytest.approx(
        max_probability_difference(logits, expected), rel=0.01)
    # Recorded, not required to reach the fp32 bar; still an int8 model that follows its parent at all.
    assert card["onnx"]["agreement_with_parent"] >= 0.9


@pytest.mark.parametrize("variant", sorted(ONNX_PARENTS))
def test_the_batch_dimension_is_free(chain: Chain, dry_run_test: Split, variant: str) -> None:
    model = load_model(chain.weights(variant), FORMAT_ONNX)
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


def test_a_session_runs_the_threads_it_is_given(chain: Chain) -> None:
    """ONNX Runtime's intra-op pool has threads - 1 threads of its own (the caller's is the first): the setting is
    applied, not only stored."""
    path = chain.weights("distilled-onnx")
    load_model(path, FORMAT_ONNX)  # ONNX Runtime's process-wide threads start with the first session
    for threads in (1, 3):
        before = os_threads()
        model = load_model(path, FORMAT_ONNX, threads=threads)
        assert isinstance(model, OnnxModel)
        options = model.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
        assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        assert os_threads() - before == threads - 1


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """The handler sets the (process-wide) torch thread count from its model config."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_torch_threads")
@pytest.mark.parametrize("variant", sorted(ONNX_PARENTS))
def test_the_handler_serves_an_onnx_card_with_the_configured_threads(
        chain: Chain, test_images: Any, tmp_path: Path, variant: str) -> None:
    images, _ = test_images
    # fp32: the PyTorch model's labels; int8: the ONNX file's own (its agreement with full is in its card).
    expected = in_process_labels(chain, ONNX_PARENTS[variant] if variant in FP32_EXPORTS else variant, images)
    context = make_context(model_dir_for(chain, variant, tmp_path / variant), variant, threads=2)
    handler = FashionHandler()
    handler.initialize(context)
    worker = Worker(handler, context)
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
def test_an_onnx_archive_packs_the_onnx_file_and_its_own_settings(chain: Chain, test_images: Any,
                                                                  tmp_path: Path) -> None:
    """An ONNX variant's .mar: the .onnx file the card names, the model name `fashion-<variant>`, and the settings
    of handlers/model_configs/<variant>.yaml; a handler loads it from the unpacked archive."""
    images, _ = test_images
    archive = build_archive("full-onnx", "1.0", chain.directory, tmp_path / "store")
    assert archive.name == "fashion-full-onnx-v1.0.mar"
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as mar:
        assert {"full-onnx.onnx", CARD_FILE, LABELS_FILE, SIGNATURE_FILE, "fashion_cnn.py"} <= set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert mar.read(manifest["model"]["configFile"]) == (MODEL_CONFIGS / "full-onnx.yaml").read_bytes()
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


def test_the_names_without_torch_agree_with_fashion_cnn() -> None:
    """serving.project imports no torch, so it spells the ONNX suffix itself: the same as fashion_cnn's, and its
    ONNX variants are the ones export_onnx makes (ONNX_PARENTS)."""
    assert project.ONNX_SUFFIX == fashion_cnn.ONNX_SUFFIX
    assert sorted(project.ONNX_VARIANTS) == sorted(ONNX_PARENTS)


def test_export_refuses_a_parent_it_cannot_export(chain: Chain, tmp_path: Path) -> None:
    result = run_module("training.export_onnx", "--dry-run", "--parent", str(chain.weights("int8")),
                        "--output", str(tmp_path / "x.onnx"), check=False)
    assert result.returncode == 2
    assert "saved as torchscript; only state_dict variants" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def served(client: Client, variant: str, images: torch.Tensor) -> tuple[list[int], np.ndarray]:
    """One v2 request (an NPY body) of every image to the shared TorchServe's model of `variant`: labels and
    class probabilities, one row per image."""
    reply = client.predict_rest(Target(model_name(variant)), npy(images.numpy()), "application/octet-stream")
    assert reply.status == 200, reply.body[:300]
    outputs = {output["name"]: output["data"] for output in reply.json()["outputs"]}
    return outputs["label"], np.reshape(outputs["probabilities"], (len(images), -1))


@pytest.mark.serving
@pytest.mark.parametrize("variant", FP32_EXPORTS)
def test_the_shared_torchserve_serves_an_fp32_export_like_its_pytorch_parent(
        torchserve: server.Instance, chain: Chain, test_images: Any, variant: str) -> None:
    """The same weights on two runtimes, each a model of the shared TorchServe (real workers load the ONNX file
    through our handler): the same labels as the PyTorch model in this process, and class probabilities within
    1e-4 of what the PyTorch model's workers serve. (tests/test_serving.py asks each served model over REST, gRPC.)"""
    images, _ = test_images
    with Client(torchserve) as client:
        labels, probabilities = served(client, variant, images)
        parent_labels, parent_probabilities = served(client, ONNX_PARENTS[variant], images)
    assert labels == parent_labels == in_process_labels(chain, ONNX_PARENTS[variant], images)
    assert np.abs(probabilities - parent_probabilities).max() < 1e-4
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
