"""How good are the pseudo-labels, and does ``W`` single out the wrong ones? Measured against unlabelled ground truth.

Only for reports: training never reads the unlabelled ground truth. The numbers answer the questions behind the
method: what share of pseudo-label pixels is wrong, how clean are the pixels judged reliable, and is the mean
weight of wrong pseudo-labels lower than that of right ones.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from hafis.data.base import SegmentationSource
from hafis.data.transforms import normalize, to_tensor_image


def load_images(source: SegmentationSource, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole images (normalised) and their masks (255 where missing), stacked; images must share one size."""
    samples = [source.load(i) for i in indices]
    images = torch.stack([normalize(to_tensor_image(s.image)) for s in samples])
    masks = torch.stack([torch.from_numpy(s.mask).long() if s.mask is not None
                         else torch.full(s.image.shape[:2], 255, dtype=torch.long) for s in samples])
    return images, masks


@torch.no_grad()
def pseudo_label_quality(framework, images: torch.Tensor, gt: torch.Tensor, batch_size: int = 16,
                         box_masks: Optional[torch.Tensor] = None) -> dict:
    """Shares of wrong pseudo-label pixels (all, confident, reliable) and mean ``W`` on right vs wrong pixels.

    ``box_masks``: ``(N, C, H, W)`` detection box masks of the images, for ``weighting.reliable: detector``."""
    sums = torch.zeros(9, dtype=torch.float64)
    # per pseudo-label class: [right count, W on right, wrong count, W on wrong] -- W can only be judged within a
    # class, since classes differ in how well their prototype fits (the class mix alone moves the pooled means)
    per_class = torch.zeros(4, framework.num_classes, dtype=torch.float64)
    device = next(framework.model.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        box = None if box_masks is None else box_masks[start:start + batch_size].to(device)
        out = framework.pseudo_labels(images[start:start + batch_size].to(device), box)
        target = gt[start:start + batch_size].to(device)
        valid = target != 255
        wrong = (out["pseudo"] != target) & valid
        right = valid & ~wrong
        confident = (out["confidence"] >= framework.config.weighting.tau_seg) & valid
        reliable = out["reliable"] & valid
        w = out.get("weight")
        if w is not None:
            cls = out["pseudo"].clamp(0, framework.num_classes - 1).flatten().cpu()
            for row, values in enumerate((right, w * right, wrong, w * wrong)):
                per_class[row].index_add_(0, cls, values.flatten().double().cpu())
        sums += torch.tensor([
            valid.sum(), wrong.sum(), confident.sum(), (wrong & confident).sum(), reliable.sum(),
            (wrong & reliable).sum(), right.sum(),
            0.0 if w is None else (w * right).sum(), 0.0 if w is None else (w * wrong).sum(),
        ], dtype=torch.float64)
    n_valid, n_wrong, n_conf, n_wrong_conf, n_rel, n_wrong_rel, n_right, w_right, w_wrong = sums.tolist()
    stats = {
        "pseudo_error": n_wrong / max(n_valid, 1),
        "confident_share": n_conf / max(n_valid, 1),
        "confident_error": n_wrong_conf / max(n_conf, 1),
        "reliable_share": n_rel / max(n_valid, 1),
        "reliable_error": n_wrong_rel / max(n_rel, 1),
    }
    if framework.weighting.enabled:
        stats["weight_right"] = w_right / max(n_right, 1)
        stats["weight_wrong"] = w_wrong / max(n_wrong, 1)
        both = (per_class[0] > 0) & (per_class[2] > 0)  # classes with right and wrong pseudo-labels
        if bool(both.any()):
            stats["weight_right_within_class"] = float((per_class[1][both] / per_class[0][both]).mean())
            stats["weight_wrong_within_class"] = float((per_class[3][both] / per_class[2][both]).mean())
    return stats
