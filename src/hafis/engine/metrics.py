"""Segmentation metrics from one confusion matrix accumulated over the whole evaluation set, and the AUROC of the
pseudo-label diagnostics."""

from __future__ import annotations

from typing import Optional

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
    """mIoU over the classes present in the ground truth (the published protocol: a class absent from every
    validation mask does not count)."""
    iou = iou_per_class(confusion)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def auroc(scores: Tensor, positive: Tensor, groups: Optional[Tensor] = None,
          num_groups: Optional[int] = None) -> Tensor:
    """Area under the ROC curve of ``scores`` as a predictor of ``positive`` (Mann-Whitney U, ties averaged).

    The probability that a random positive outscores a random negative (a tie counts one half); it needs no
    threshold, so a weight and a confidence on different scales compare fairly. With ``groups`` (int, one per
    element) the AUROC of each group ``0 .. num_groups - 1`` is returned, NaN where a group lacks either outcome;
    without, one pooled value (0-d, NaN if an outcome is missing). One sort, no loop over elements or groups.
    """
    scores = scores.flatten().double()
    positive = positive.flatten().bool()
    pooled = groups is None
    if pooled:
        groups, num_groups = torch.zeros_like(positive, dtype=torch.long), 1
    groups = groups.flatten().long()
    num_groups = int(groups.max()) + 1 if num_groups is None and groups.numel() else (num_groups or 1)
    # sort by score, then (stably) by group: elements of a group are contiguous and ordered by score
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    s, g, pos = scores[order], groups[order], positive[order]
    n = s.numel()
    size = torch.bincount(g, minlength=num_groups)
    start = torch.cumsum(size, 0) - size
    rank0 = torch.arange(n, device=s.device) - start[g]  # 0-based rank within the group
    # tie blocks: runs of equal (group, score); each member gets the block's mean rank
    new_block = torch.ones(n, dtype=torch.bool, device=s.device)
    new_block[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    block = torch.cumsum(new_block.long(), 0) - 1
    block_size = torch.bincount(block).double()
    block_first = rank0[new_block].double()
    rank = block_first[block] + (block_size[block] + 1) / 2  # 1-based mean rank of the tie block
    n_pos = torch.bincount(g, weights=pos.double(), minlength=num_groups)
    n_neg = size.double() - n_pos
    rank_sum = torch.bincount(g, weights=rank * pos.double(), minlength=num_groups)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    area = u / (n_pos * n_neg)
    area = torch.where((n_pos > 0) & (n_neg > 0), area, torch.full_like(area, float("nan")))
    return area[0] if pooled else area
