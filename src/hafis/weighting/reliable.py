"""Which pixels may feed the prototype bank.

Labelled pixels qualify when the model already predicts their class confidently; unlabelled pixels when they are
*reliable*. The paper's rule (confidence and a same-class detector box) needs detections; the confidence-only rule
here is its ablation and the fallback for classes the detector has no channel for.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def labelled_qualify_mask(logits: Tensor, labels: Tensor, threshold: float = 0.95, ignore_index: int = 255) -> Tensor:
    """Labelled pixels whose ground-truth class is predicted with probability ``> threshold`` (method.md step 2)."""
    conf, pred = logits.detach().softmax(dim=1).max(dim=1)
    return (pred == labels) & (conf > threshold) & (labels != ignore_index)


@torch.no_grad()
def confident_pixels(confidence: Tensor, pseudo_labels: Tensor, threshold: float = 0.95,
                     ignore_index: int = 255) -> Tensor:
    """Unlabelled pixels with confidence ``>= threshold`` that are not ignored (the confidence-only rule)."""
    return (confidence >= threshold) & (pseudo_labels != ignore_index)
