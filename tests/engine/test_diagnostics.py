import math

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
        self.weighting = type("W", (), {"enabled": True, "thing_classes": (1, 2)})()

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
    # mean W per pseudo-label class over the non-ignored pixels: class 0 = pixels 0, 3; 1 = 1, 2; 2 = 4
    assert [stats[f"weight_class_{c}"] for c in range(3)] == pytest.approx([0.3, 0.7, 1.0])


def test_weighted_error_auroc_and_bank_precision_by_hand():
    gt = torch.tensor([[[0, 0, 1, 1, 2, 255]]])
    pseudo = torch.tensor([[[0, 1, 1, 0, 2, 2]]])  # wrong at pixels 1 and 3; pixel 5 ignored
    conf = torch.tensor([[[0.99, 0.99, 0.5, 0.97, 0.99, 0.99]]])
    weight = torch.tensor([[[0.2, 0.8, 0.6, 0.4, 1.0, 0.0]]])
    boxes = torch.zeros(1, 3, 1, 6, dtype=torch.bool)
    boxes[0, 1, 0, 2] = True  # a class-1 box over pixel 2 only (not confident: it stays out of the bank)
    boxes[0, 2, 0, 4:] = True  # a class-2 box over pixels 4-5
    stub = StubFramework(pseudo, conf, torch.zeros_like(pseudo, dtype=torch.bool), weight)
    stats = pseudo_label_quality(stub, torch.zeros(1, 3, 1, 6), gt, box_masks=boxes)
    # sum W * wrong / sum W over the 5 valid pixels, and over the 4 confident ones (0, 1, 3, 4)
    assert stats["pseudo_error_weighted"] == pytest.approx((0.8 + 0.4) / (0.2 + 0.8 + 0.6 + 0.4 + 1.0))
    assert stats["confident_error_weighted"] == pytest.approx((0.8 + 0.4) / (0.2 + 0.8 + 0.4 + 1.0))
    # right: W 0.2, 0.6, 1.0 / conf 0.99, 0.5, 0.99; wrong: W 0.8, 0.4 / conf 0.99, 0.97.
    # W: 0.2 wins 0 pairs, 0.6 wins 1, 1.0 wins 2 -> 3/6; conf: 0.99 ties 0.99 and beats 0.97, twice -> 3/6
    assert stats["auroc_weight"] == pytest.approx(0.5)
    assert stats["auroc_confidence"] == pytest.approx(0.5)
    # within class: class 0 = right (W .2, conf .99) vs wrong (W .4, conf .97): W 0, conf 1;
    # class 1 = right (W .6, conf .5) vs wrong (W .8, conf .99): W 0, conf 0; class 2 has no wrong pixel
    assert stats["auroc_weight_within_class"] == pytest.approx(0.0)
    assert stats["auroc_confidence_within_class"] == pytest.approx(0.5)
    # bank by confidence: pixels 0, 1, 3, 4 (2 right); by the detector rule: class 0 is stuff (excluded), pixel 1
    # is class 1 but no class-1 box covers it, pixel 4 is covered by the class-2 box -> {4}, right
    assert stats["bank_confidence_share"] == pytest.approx(4 / 5)
    assert stats["bank_confidence_precision"] == pytest.approx(2 / 4)
    assert stats["bank_detector_share"] == pytest.approx(1 / 5)
    assert stats["bank_detector_precision"] == pytest.approx(1.0)


def test_without_weights_only_confidence_diagnostics():
    gt = torch.tensor([[[0, 1]]])
    stub = StubFramework(torch.tensor([[[0, 0]]]), torch.tensor([[[0.9, 0.3]]]),
                         torch.zeros(1, 1, 2, dtype=torch.bool), None)
    stub.weighting.enabled = False
    stats = pseudo_label_quality(stub, torch.zeros(1, 3, 1, 2), gt)
    assert stats["auroc_confidence"] == 1.0 and stats["pseudo_error"] == 0.5
    assert not [k for k in stats if "weight" in k] and "bank_detector_precision" not in stats
    assert math.isnan(stats["bank_confidence_precision"])  # nothing reaches 0.95


def test_diagnostics_are_logged_and_leave_training_unchanged(tmp_path, tiny_config):
    from hafis.engine.run_log import read_metrics
    from hafis.engine.trainer import Trainer

    runs = {}
    for n in (0, 3):
        config = load_config(tiny_config, ["weighting.enabled=true", "train.tensorboard=false",
                                           f"eval.diagnostics_images={n}", f"output_dir={tmp_path / str(n)}"])
        Trainer(config).train()
        runs[n] = read_metrics(tmp_path / str(n) / "metrics.jsonl")
    final = runs[3][-1]
    assert final["event"] == "eval" and final["diagnostics"]["images"] == 3 and final["labelled"] == 8
    assert {"pseudo_error", "pseudo_error_weighted", "auroc_weight", "auroc_confidence", "auroc_weight_within_class",
            "bank_confidence_precision"} <= set(final["diagnostics"])
    assert "diagnostics" not in runs[0][-1]
    strip = [[{k: v for k, v in r.items() if k not in ("seconds_per_iteration", "diagnostics")} for r in run]
             for run in (runs[0], runs[3])]
    assert strip[0] == strip[1]  # measuring draws no random numbers and changes no state


def test_negative_diagnostics_images_is_a_config_error():
    from hafis.config import ConfigError

    with pytest.raises(ConfigError, match=r"'eval.diagnostics_images' must be in \[0"):
        load_config(None, ["eval.diagnostics_images=-1"])
