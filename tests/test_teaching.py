"""training.teaching: teachers beyond one checkpoint (an ensemble) and beyond logits (attention transfer), as
training.distill and training.prune use them. The distillation loss itself is tested in tests/test_engine.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fashion_cnn import FULL_CONFIG, STUDENT_CONFIG, CNNConfig, FashionCNN, sha256_file
from tests.conftest import Chain, run_module
from training.engine import DistillationLoss
from training.teaching import AttentionTransfer, BlockOutputs, Ensemble, attention_map, members_of


def models(*configs: CNNConfig, seed: int = 0) -> list[FashionCNN]:
    torch.manual_seed(seed)
    return [FashionCNN(config).eval() for config in configs]


def test_an_ensemble_answers_the_mean_of_its_members_logits() -> None:
    first, second = models(FULL_CONFIG, FULL_CONFIG)
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = (first(images) + second(images)) / 2
        assert torch.allclose(Ensemble([first, second])(images), expected, atol=1e-6)
        assert not torch.allclose(first(images), expected, atol=1e-3)  # the members differ: the mean is news


def test_an_attention_map_is_the_normalised_channel_mean_of_squares_whatever_the_width() -> None:
    features = torch.zeros(2, 3, 2, 2)
    features[0, :, 0, 0] = 2.0  # image 0: all its energy in one place
    features[1] = 1.0  # image 1: spread evenly
    maps = attention_map(features)
    assert maps.shape == (2, 4)
    assert torch.allclose(maps[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(maps[1], torch.full((4,), 0.5))
    # Twice the channels with the same per-channel picture: the same map (no adapter between widths needed).
    assert torch.allclose(attention_map(torch.cat([features, features], dim=1)), maps)


def test_block_outputs_keep_each_convolution_blocks_output_of_the_latest_pass() -> None:
    (student,) = models(STUDENT_CONFIG)
    blocks, training_blocks = BlockOutputs(student), BlockOutputs(student, training_only=True)
    student(torch.randn(3, 1, 28, 28))  # in eval mode: kept only by the hooks that keep every pass
    assert [tuple(blocks.outputs[b].shape) for b in sorted(blocks.outputs)] == [(3, 32, 14, 14), (3, 64, 7, 7)]
    assert training_blocks.outputs == {}
    with pytest.raises(RuntimeError, match="no forward pass"):
        training_blocks.take_attention_maps()
    assert [tuple(m.shape) for m in blocks.take_attention_maps()] == [(3, 196), (3, 49)] and blocks.outputs == {}


def test_attention_transfer_adds_nothing_when_the_student_sees_as_the_teacher_does() -> None:
    teacher, same = models(FULL_CONFIG, seed=1)[0], models(FULL_CONFIG, seed=1)[0].train()
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    distillation = DistillationLoss(teacher, temperature=2.0, alpha=0.9)
    criterion = AttentionTransfer(distillation, same, weight=1000.0)
    logits = same(images)
    assert criterion(logits, images, labels).item() == pytest.approx(distillation(logits, images, labels).item(),
                                                                     abs=1e-5)


def test_attention_transfer_pulls_the_students_convolutions_toward_the_ensembles_maps() -> None:
    teacher, other_teacher, student = models(FULL_CONFIG, FULL_CONFIG, STUDENT_CONFIG)
    student.train()
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    distillation = DistillationLoss(Ensemble([teacher, other_teacher]), temperature=2.0, alpha=0.9)
    criterion = AttentionTransfer(distillation, student, weight=1000.0)
    assert len(criterion.teachers) == 2  # one per member: the teacher's maps are the members' mean
    logits = student(images)
    term = criterion(logits, images, labels) - distillation(logits, images, labels)
    assert term.item() > 0  # the maps differ
    term.backward()  # the attention term alone reaches the convolutions, through the kept block outputs
    conv1 = student.features[0]
    assert isinstance(conv1, nn.Conv2d) and conv1.weight.grad is not None and conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="attention weight"):
        AttentionTransfer(distillation, student, weight=-1.0)


def test_members_of_a_teacher_are_its_checkpoints() -> None:
    first, second = models(FULL_CONFIG, FULL_CONFIG)
    assert members_of(first) == [first] and members_of(Ensemble([first, second])) == [first, second]
    with pytest.raises(TypeError, match="FashionCNN"):
        members_of(nn.Linear(2, 2))


def test_the_script_distils_from_an_ensemble_with_attention_transfer(chain: Chain, tmp_path: Path) -> None:
    full = chain.weights("full")
    output = tmp_path / "distilled.pt"
    run_module("training.distill", "--dry-run", "--teacher", str(full), str(full), "--attention-weight", "1000",
               "--output", str(output))
    card = json.loads(output.with_suffix(".card.json").read_text())
    assert card["parent"] == {"path": str(full), "sha256": sha256_file(full)}
    assert card["teacher_ensemble"] == [card["parent"], card["parent"]]
    assert card["teacher_parameters"] == 2 * chain.card("full")["parameters"]
    assert card["recipe"]["teacher"] == [str(full), str(full)] and card["recipe"]["attention_weight"] == 1000.0


def test_pruning_fine_tunes_with_attention_transfer_from_its_parent_only_while_distilling(
        chain: Chain, tmp_path: Path) -> None:
    full, output = chain.weights("full"), tmp_path / "pruned.pt"
    run_module("training.prune", "--dry-run", "--parent", str(full), "--attention-weight", "500", "--output",
               str(output))
    card = json.loads(output.with_suffix(".card.json").read_text())
    assert card["recipe"]["attention_weight"] == 500.0 and card["parameters"] == chain.card("pruned")["parameters"]
    refused = run_module("training.prune", "--dry-run", "--parent", str(full), "--attention-weight", "500",
                         "--kd-alpha", "0", "--output", str(tmp_path / "other.pt"), check=False)
    assert refused.returncode == 2 and "needs distillation from the parent" in refused.stderr
    assert not (tmp_path / "other.pt").exists()
