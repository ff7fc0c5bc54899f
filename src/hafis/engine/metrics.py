"""Segmentation metrics from one confusion matrix accumulated over the whole evaluation set."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction; ignored pixels are left out."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU of each class; NaN for a class absent from the ground truth (it does not enter the mean)."""
    confusion = confusion.double()
    tp = confusion.diag()
    gt = confusion.sum(dim=1)
    union = gt + confusion.sum(dim=0) - tp
    iou = tp / union.clamp_min(1)
    return torch.where(gt > 0, iou, torch.full_like(iou, float("nan")))


def mean_iou(confusion: Tensor) -> float:
    """mIoU over the classes present in the ground truth (datasets.md: 'Evaluation')."""
    iou = iou_per_class(confusion)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if bool(present.any()) else float("nan")
