from __future__ import annotations

import math

import pytest
import torch

from fashion_cnn import FULL_CONFIG, CNNConfig, FashionCNN
from training.data import load_split
from training.engine import DistillationLoss, distillation_loss, evaluate, measure_latency


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_distillation_loss_equals_the_hand_computed_value() -> None:
    student, teacher, label = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 1
    temperature, alpha = 2.0, 0.7
    p_teacher = softmax([v / temperature for v in teacher])
    p_student = softmax([v / temperature for v in student])
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_teacher, p_student, strict=True))
    cross_entropy = -math.log(softmax(student)[label])
    expected = alpha * temperature**2 * kl + (1 - alpha) * cross_entropy

    loss = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]),
                             temperature, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # On paper: both softmaxes share a normaliser, so log(pt/ps) = (t − s)/T = [0.5, −1, 0.5];
    # pt = [0.5065, 0.1863, 0.3072] gives KL = 0.2206; CE = −log(e²/(e + e² + 1)) = 0.4076;
    # 0.7·4·0.2206 + 0.3·0.4076 = 0.7398.
    assert loss.item() == pytest.approx(0.7398, abs=2e-4)


def test_distillation_loss_is_plain_cross_entropy_at_alpha_zero_and_zero_when_student_copies_teacher() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([2, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert distillation_loss(logits, logits * 3, labels, 4.0, 0.0).item() == pytest.approx(ce.item())
    assert distillation_loss(logits, logits, labels, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("temperature", "alpha"), [(0.0, 0.5), (2.0, 1.5), (2.0, -0.1)])
def test_distillation_loss_rejects_bad_settings(temperature: float, alpha: float) -> None:
    with pytest.raises(ValueError):
        DistillationLoss(FashionCNN(FULL_CONFIG), temperature, alpha)


def test_evaluate_reports_overall_and_per_class_accuracy() -> None:
    split = load_split("fashion-mnist", "test").subset(200)

    class Oracle(torch.nn.Module):
        """Answers the true label for images of class < 5 and class 0 for the rest."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            index = self.calls
            self.calls += x.shape[0]
            truth = split.labels[index : index + x.shape[0]]
            answer = torch.where(truth < 5, truth, torch.zeros_like(truth))
            return torch.nn.functional.one_hot(answer, 10).float()

        calls = 0

    result = evaluate(Oracle(), split, batch_size=64)
    expected = (split.labels < 5).float().mean().item()
    assert result.accuracy == pytest.approx(expected, abs=1e-6)
    assert result.per_class_accuracy["Trouser"] == 1.0
    assert result.per_class_accuracy["Ankle boot"] == 0.0
    assert result.count == 200


def test_latency_has_every_thread_and_batch_cell_and_restores_threads() -> None:
    threads_before = torch.get_num_threads()
    latency = measure_latency(FashionCNN(CNNConfig(4, 8, 16)), repeats=3, warmup=1)
    assert set(latency) == {"threads_1", "threads_2"}
    assert all(set(row) == {"batch_1", "batch_64"} and all(v > 0 for v in row.values())
               for row in latency.values())
    assert torch.get_num_threads() == threads_before
