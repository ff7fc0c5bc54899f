import pytest
import torch
from torch import nn

from hafis.config import load_config
from hafis.engine.diagnostics import pseudo_label_quality


class StubFramework:
    """pseudo_labels returns fixed tensors, so every statistic can be computed by hand."""

    def __init__(self, pseudo, confidence, reliable, weight):
        self.out = {"pseudo": pseudo, "confidence": confidence, "reliable": reliable, "weight": weight}
        self.model = nn.Linear(1, 1)
        self.num_classes = 3
        self.config = load_config(None, ["weighting.enabled=true"])
        self.weighting = type("W", (), {"enabled": True})()

    def pseudo_labels(self, images, box_mask=None):
        return self.out


def test_quality_numbers_by_hand():
    gt = torch.tensor([[[0, 0, 1, 1, 2, 255]]])
    pseudo = torch.tensor([[[0, 1, 1, 0, 2, 2]]])  # wrong at pixels 1 and 3 (pixel 5 is ignored)
    conf = torch.tensor([[[0.99, 0.99, 0.5, 0.97, 0.99, 0.99]]])
    reliable = torch.tensor([[[True, False, False, True, True, True]]])
    weight = torch.tensor([[[0.2, 0.8, 0.6, 0.4, 1.0, 0.0]]])
    stats = pseudo_label_quality(StubFramework(pseudo, conf, reliable, weight), torch.zeros(1, 3, 1, 6), gt)
    assert stats["pseudo_error"] == pytest.approx(2 / 5)
    assert stats["confident_share"] == pytest.approx(4 / 5)
    assert stats["confident_error"] == pytest.approx(2 / 4)
    assert stats["reliable_share"] == pytest.approx(3 / 5) and stats["reliable_error"] == pytest.approx(1 / 3)
    assert stats["weight_right"] == pytest.approx((0.2 + 0.6 + 1.0) / 3)
    assert stats["weight_wrong"] == pytest.approx((0.8 + 0.4) / 2)
    # classes 0 and 1 have right and wrong pseudo-labels: class 0 right 0.2 / wrong 0.4, class 1 right 0.6 / wrong 0.8
    assert stats["weight_right_within_class"] == pytest.approx((0.2 + 0.6) / 2)
    assert stats["weight_wrong_within_class"] == pytest.approx((0.4 + 0.8) / 2)
