import math

import torch

from hafis.engine.metrics import confusion_matrix, iou_per_class, mean_iou


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
