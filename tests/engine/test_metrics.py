import math

import pytest
import torch

from hafis.engine.metrics import auroc, confusion_matrix, iou_per_class, mean_iou


def test_confusion_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)  # the ignored pixel (predicted 2) is not counted
    iou = iou_per_class(cm)
    assert iou[0].item() == 1 / 3  # tp 1, gt 2, pred 2
    assert iou[1].item() == 2 / 3  # tp 2, gt 2, pred 3
    assert iou[2].item() == 0.0  # present in gt, never right
    assert math.isnan(iou[3].item())  # absent from gt: excluded from the mean
    assert mean_iou(cm) == (1 / 3 + 2 / 3 + 0) / 3


def test_predicted_but_absent_class_does_not_enter_the_mean():
    cm = torch.tensor([[3, 1], [0, 0]])
    assert mean_iou(cm) == 0.75


def test_auroc_by_hand_with_ties():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1 + 2 of 4 -> 0.75
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])).item() == 0.75
    # positives 0.5, 0.9 vs negatives 0.5, 0.5: 0.5 ties both (2 x 1/2), 0.9 wins both -> 3 / 4
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.9]), torch.tensor([False, True, False, True])).item() == 0.75
    # all scores equal: every pair ties -> 0.5; perfectly separated -> 1; reversed -> 0
    assert auroc(torch.full((5,), 0.3), torch.tensor([1, 0, 1, 0, 0])).item() == 0.5
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])).item() == 1.0
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 0])).item() == 0.0
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])).item())  # no negative


def test_auroc_within_groups_matches_pairwise_counting():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=gen).float() / 5  # many ties
    positive = torch.rand(300, generator=gen) < 0.6
    groups = torch.randint(0, 4, (300,), generator=gen)
    groups[groups == 3] = 2  # group 3 empty
    positive[groups == 1] = True  # group 1 has no negative
    got = auroc(scores, positive, groups, num_groups=4)

    def pairwise(s, p):  # the definition: P(positive outscores negative), a tie counts one half
        pos, neg = s[p].tolist(), s[~p].tolist()
        wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
        return wins / (len(pos) * len(neg))

    for g in (0, 2):
        assert got[g].item() == pytest.approx(pairwise(scores[groups == g], positive[groups == g]), abs=1e-12)
    assert math.isnan(got[1].item()) and math.isnan(got[3].item())
    assert auroc(scores, positive).item() == pytest.approx(pairwise(scores, positive), abs=1e-12)
