import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hafis.frameworks.ael import (
    AEL,
    category_confidence,
    component_box,
    cutmix_class_probabilities,
    equalization_rates,
    paste_class_probabilities,
    random_half_box,
)
from hafis.frameworks.base import FrameworkContext


@pytest.fixture
def ael(stub_segmenter, stub_config):
    """``ael(classes=3, **overrides)``: AEL on the stub segmenter."""

    def make(classes=3, **overrides):
        config = stub_config(*(f"{k}={v}" for k, v in overrides.items()))
        return AEL(config, stub_segmenter(classes), FrameworkContext(classes))

    return make


def test_sampling_distributions_from_a_given_confidence_bank():
    conf = torch.tensor([0.0, 0.75, 1.0])
    e = [math.exp(1.0), math.exp(0.5), 1.0]  # sqrt(1 - conf) = 1, 0.5, 0
    assert paste_class_probabilities(conf).tolist() == pytest.approx([v / sum(e) for v in e])
    e = [math.exp(1.0), math.exp(0.25), 1.0]
    assert cutmix_class_probabilities(conf).tolist() == pytest.approx([v / sum(e) for v in e])
    conf = torch.tensor([0.2, 0.6, 0.9])  # 1 - conf = 0.8, 0.4, 0.1; divided by the max 0.8
    assert equalization_rates(conf).tolist() == pytest.approx([1.0, 0.5, 0.125])
    assert equalization_rates(conf, 2.0).tolist() == pytest.approx([1.0, 0.25, 0.015625])


def test_category_confidence():
    # two pixels labelled 0 with p0 = 0.5 and 0.7, one labelled 1 with p1 = 0.2, one ignored; class 2 absent
    prob = torch.tensor([[0.5, 0.7, 0.1, 0.3], [0.25, 0.2, 0.2, 0.3], [0.25, 0.1, 0.7, 0.4]]).view(1, 3, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 255]]])
    got = category_confidence(prob.log(), labels, 3)
    assert got.tolist() == pytest.approx([0.6, 0.2, 0.0])


def test_confidence_bank_update_in_a_step_and_the_labelled_loss(ael):
    fw = ael(**{"ael.confidence_init": 0.5, "ael.momentum": 0.9, "ael.copy_paste": False, "ael.cutmix": False,
                "loss.labelled": "ohem", "loss.ohem_min_kept": 1, "loss.ohem_threshold": 0.0})
    with torch.no_grad():  # logits = the image: each pixel's softmax is the probabilities written below
        fw.model.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]],  # image 0: labels 0, 1
                          [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]])  # image 1: labels 0, 1 (class 2 absent)
    labelled = {"image": probs.log().permute(0, 2, 1)[..., None, :], "mask": torch.tensor([[[0, 1]], [[0, 1]]])}
    unlabelled = {"weak": torch.zeros(2, 3, 1, 2), "ignore": torch.zeros(2, 1, 2, dtype=torch.long)}
    out = fw.train_step(labelled, unlabelled, 0)
    # category confidence (0.5 + 0.7) / 2, (0.6 + 0.1) / 2, 0; then 0.9 * 0.5 + 0.1 * that
    assert fw.confidence.tolist() == pytest.approx([0.51, 0.485, 0.45])
    # OHEM, threshold 0, 1 pixel per image kept: the 2 lowest true-class probabilities of the batch (0.1 and 0.5)
    assert out.terms["loss_x"].item() == pytest.approx(-(math.log(0.1) + math.log(0.5)) / 2, rel=1e-6)


def test_dynamic_reweighting_and_equalization_sampling(ael):
    fw = ael(classes=2, **{"ael.threshold": 0.6, "ael.gamma": 2})
    teacher = torch.tensor([[2.0, -1.0, 0.0, 1.0], [0.0, 0.0, 1.0, -1.0]]).view(1, 2, 2, 2)
    student = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 0.5, 0.0]]).view(1, 2, 2, 2)
    q, target = teacher.softmax(1).max(1)
    ce = F.cross_entropy(student, target, reduction="none")

    # equal confidences: every class is sampled at rate 1, so the loss is Σ q² [q ≥ τ] ℓ / Σ q²
    fw.confidence = torch.tensor([0.3, 0.3])
    expected = (q.pow(2) * (q >= 0.6) * ce).sum() / q.pow(2).sum()
    assert fw.consistency_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)

    # class 0 fully confident: rate 0, so pixels the *student* predicts as 0 are never sampled
    fw.confidence = torch.tensor([1.0, 0.5])
    sampled = student.argmax(1) == 1
    assert sampled.tolist() == [[[False, True], [True, False]]]
    r = q.pow(2) * sampled
    expected = (r * (q >= 0.6) * ce).sum() / r.sum()
    assert fw.consistency_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)

    # the weighting multiplies after AEL's own sampling and re-weighting; count keeps AEL's normaliser
    w = torch.tensor([[[0.5, 1.0], [0.0, 1.0]]])
    got = fw.consistency_loss(student, teacher, weight=w)
    assert got.item() == pytest.approx(((w * r * (q >= 0.6) * ce).sum() / r.sum()).item(), rel=1e-6)


def test_adaptive_copy_paste_pastes_only_the_drawn_class(ael):
    fw = ael(**{"ael.paste_exclude": "[0, 2]", "ael.copy_paste_prob": 1.0})  # only class 1 can be pasted
    x = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 2, 2).clone()
    y = torch.tensor([[[0, 1], [2, 2]], [[1, 255], [0, 1]]])
    x2, y2 = fw.copy_paste(x, y)
    # image 0 takes image 1's class-1 pixels; image 1 takes image 0's
    assert y2.tolist() == [[[1, 1], [2, 1]], [[1, 1], [0, 1]]]
    assert x2[:, 0].tolist() == [[[1, 0], [0, 1]], [[1, 0], [1, 1]]]
    with pytest.raises(ValueError, match="paste_exclude"):
        ael(**{"ael.paste_exclude": "[7]"})


def test_cutmix_box_follows_a_large_enough_component():
    mask = np.zeros((6, 8), dtype=bool)
    mask[0, 0:2] = True  # area 2
    mask[2:4, 3:6] = True  # area 6
    g = torch.Generator().manual_seed(0)
    assert component_box(mask, 3, g) == (2, 3, 4, 6)
    assert component_box(mask, 6, g) is None and component_box(np.zeros((3, 3), bool), 0, g) is None
    y0, x0, y1, x1 = random_half_box(16, 16, g)
    assert 0 <= y0 < y1 <= 16 and 0 <= x0 < x1 <= 16 and abs((y1 - y0) * (x1 - x0) - 128) <= 16


def test_cutmix_boxes_take_the_sampled_class_from_another_image(ael):
    fw = ael(classes=3, **{"ael.area_thresh": 0.1})
    fw.confidence = torch.tensor([1.0, 1.0, -30.0])  # softmax(1 - conf): class 2 almost surely
    pred = torch.zeros(3, 8, 8, dtype=torch.long)
    pred[1, 2:5, 1:7] = 2  # only image 1 holds class 2
    boxes, source = fw.cutmix_boxes(pred)
    assert source[0] == 1 and source[2] == 1
    assert boxes[0].nonzero().min(0).values.tolist() == [2, 1] and boxes[0].sum() == 18
    assert source[1] == 2 and boxes[1].sum() > 0  # image 1 has no other image with class 2: a random box
