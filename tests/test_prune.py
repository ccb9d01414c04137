from __future__ import annotations

import pytest
import torch

from fashion_cnn import FULL_CONFIG, CNNConfig, FashionCNN, count_parameters
from training.prune import KeepRatios, kept_count, prune_cnn, select_kept


def masked_original(model: FashionCNN, keep: KeepRatios) -> FashionCNN:
    """The unpruned model with every removed filter/unit zeroed: what a mask-based pruning computes."""
    kept = select_kept(model, keep)
    masked = FashionCNN(model.config)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, keep in ((masked.features[0], kept.conv1), (masked.features[3], kept.conv2),
                            (masked.classifier[2], kept.hidden)):
            removed = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            removed[keep] = False
            layer.weight[removed] = 0
            layer.bias[removed] = 0
    return masked.eval()


@pytest.mark.parametrize("keep", [KeepRatios(0.5, 0.5, 0.5), KeepRatios(0.3, 0.3, 0.2), KeepRatios(0.25, 0.75, 0.32)])
def test_pruned_model_computes_what_the_masked_original_computes(keep: KeepRatios) -> None:
    torch.manual_seed(0)
    model = FashionCNN(FULL_CONFIG).eval()
    pruned = prune_cnn(model, keep).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = masked_original(model, keep)(x)
        assert torch.allclose(pruned(x), expected, atol=1e-4)
        assert not torch.allclose(model(x), expected, atol=1e-4)  # the masking did remove something


def test_pruning_physically_removes_channels_and_units() -> None:
    model = FashionCNN(FULL_CONFIG)
    pruned = prune_cnn(model, KeepRatios(0.5, 0.5, 0.5))
    assert (pruned.config.conv1, pruned.config.conv2, pruned.config.hidden) == (32, 64, 496)  # 500 → multiple of 8
    assert (pruned.config.num_classes, pruned.config.dropout) == (FULL_CONFIG.num_classes, FULL_CONFIG.dropout)
    assert pruned.classifier[2].weight.shape == (496, 64 * 7 * 7)
    assert count_parameters(pruned) < 0.3 * count_parameters(model)


def test_each_layer_keeps_its_own_fraction() -> None:
    pruned = prune_cnn(FashionCNN(FULL_CONFIG), KeepRatios(0.25, 0.75, 0.32))
    assert (pruned.config.conv1, pruned.config.conv2, pruned.config.hidden) == (16, 96, 320)
    assert pruned.features[3].weight.shape == (96, 16, 3, 3)
    assert pruned.classifier[2].weight.shape == (320, 96 * 7 * 7)


def test_the_pruned_model_keeps_its_parents_dropout_unless_told() -> None:
    model = FashionCNN(FULL_CONFIG)
    assert prune_cnn(model, KeepRatios(0.5, 0.5, 0.5)).config.dropout == FULL_CONFIG.dropout
    pruned = prune_cnn(model, KeepRatios(0.5, 0.5, 0.5), dropout=0.0)
    assert pruned.config.dropout == 0.0
    assert [layer.p for layer in pruned.classifier if isinstance(layer, torch.nn.Dropout)] == [0.0, 0.0]


def test_keeping_everything_changes_nothing() -> None:
    torch.manual_seed(1)
    model = FashionCNN(CNNConfig(8, 16, 32)).eval()
    same = prune_cnn(model, KeepRatios(1.0, 1.0, 1.0)).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), same(x), atol=1e-6)


def test_the_strongest_filters_are_kept() -> None:
    model = FashionCNN(CNNConfig(4, 4, 4))
    with torch.no_grad():
        model.features[0].weight.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 3, 3))
    pruned = prune_cnn(model, KeepRatios(0.5, 0.5, 1.0))
    assert pruned.features[0].weight[:, 0, 0, 0].tolist() == [2.0, 3.0]


def test_kept_counts_are_multiples_of_eight_where_the_layer_allows() -> None:
    assert [kept_count(64, 0.75), kept_count(128, 0.6), kept_count(1000, 0.32)] == [48, 80, 320]
    assert kept_count(4, 0.5) == 2  # too small a layer to round
    assert kept_count(16, 0.01) == 8


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_keep_ratio_out_of_range_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match="keep ratio"):
        prune_cnn(FashionCNN(CNNConfig(4, 4, 4)), KeepRatios(0.5, ratio, 0.5))
