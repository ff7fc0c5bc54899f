"""Which pixels may feed the prototype bank.

Labelled pixels qualify when the model already predicts their class confidently; unlabelled pixels when they are
*reliable*. The paper's rule (:func:`detector_reliable`: confidence and a same-class detector box, the boxes drawn by
:func:`box_mask_from_detections` from plain tensors, so this module never imports a detector) is the default; the
confidence-only rule (:func:`confident_pixels`) is its ablation and the fallback for classes the detector has no
channel for.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

#: classes the detector has no box for (background, stuff): ``exclude`` = never reliable (the authors' code),
#: ``confidence`` = judged by the confidence alone
STUFF_MODES = ("exclude", "confidence")


@torch.no_grad()
def labelled_qualify_mask(logits: Tensor, labels: Tensor, threshold: float = 0.95, ignore_index: int = 255) -> Tensor:
    """Labelled pixels whose ground-truth class is predicted with probability ``> threshold`` (docs/method.md, 2)."""
    conf, pred = logits.detach().softmax(dim=1).max(dim=1)
    return (pred == labels) & (conf > threshold) & (labels != ignore_index)


@torch.no_grad()
def confident_pixels(confidence: Tensor, pseudo_labels: Tensor, threshold: float = 0.95,
                     ignore_index: int = 255) -> Tensor:
    """Unlabelled pixels with confidence ``>= threshold`` that are not ignored (the confidence-only rule)."""
    return (confidence >= threshold) & (pseudo_labels != ignore_index)


@torch.no_grad()
def box_mask_from_detections(boxes: Tensor, labels: Tensor, scores: Tensor, num_classes: int,
                             size: tuple[int, int], score_threshold: float = 0.95) -> Tensor:
    """Per-class filled-box mask ``(C, H, W)`` bool of the detections scoring ``>= score_threshold``.

    ``boxes``: ``(n, 4)`` ``x0, y0, x1, y1`` in pixels (x1 / y1 exclusive, as :class:`hafis.data.base.Sample`'s);
    ``labels``: ``(n,)`` *segmentation* class ids (detections of a class outside ``0..C-1`` are dropped);
    ``scores``: ``(n,)``. Pixel ``(y, x)`` is covered when its centre ``(x + 0.5, y + 0.5)`` lies in
    ``[x0, x1) × [y0, y1)``, so integer boxes cover exactly their pixels and fractional detector boxes cover the
    pixels they mostly overlap.
    Vectorised: per-box row / column inside-tests, then one batched ``(C, H, n) @ (n, W)`` product; no loop over
    boxes or pixels.
    """
    h, w = int(size[0]), int(size[1])
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if not boxes.shape[0] == labels.shape[0] == scores.shape[0]:
        raise ValueError(f"boxes {tuple(boxes.shape)}, labels {tuple(labels.shape)} and scores "
                         f"{tuple(scores.shape)} disagree on the number of detections")
    keep = (scores >= score_threshold) & (labels >= 0) & (labels < num_classes)
    boxes, labels = boxes[keep], labels[keep]
    ys = torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # (n, H)
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # (n, W)
    onehot = torch.nn.functional.one_hot(labels, num_classes).T.float()  # (C, n)
    rows = onehot[:, None, :] * in_y.T.float()[None]  # (C, H, n): box rows, per class
    return (rows @ in_x.float()) > 0  # (C, H, W): some same-class box covers the row and the column


@torch.no_grad()
def detector_reliable(confidence: Tensor, pseudo_labels: Tensor, valid: Optional[Tensor], box_mask: Tensor,
                      thing_classes: Sequence[int], tau_seg: float = 0.95, stuff: str = "exclude",
                      ignore_index: int = 255) -> Tensor:
    """The paper's reliable pixels: segmenter ⊕ detector (docs/method.md, 1). ``(B, H, W)`` bool.

    A pixel is reliable when its confidence is ``>= tau_seg``, it is valid (``valid`` true, or ``None`` for all) and
    not ``ignore_index``, and a detection box of its pseudo-label's class covers it (``box_mask[b, ŷ, y, x]``,
    ``box_mask`` ``(B, C, H, W)`` bool / uint8, e.g. from :func:`box_mask_from_detections` and the same geometric
    augmentation as the pixels). Pseudo-labels of classes outside ``thing_classes`` (background, stuff: the
    detector has no box for them) are never reliable with ``stuff="exclude"`` (the authors' code, default), or are
    judged by the confidence alone with ``stuff="confidence"``.
    """
    if stuff not in STUFF_MODES:
        raise ValueError(f"stuff must be one of {STUFF_MODES}, got {stuff!r}")
    if box_mask.dim() != 4 or box_mask.shape[0] != pseudo_labels.shape[0] or \
            box_mask.shape[-2:] != pseudo_labels.shape[-2:]:
        raise ValueError(f"box_mask must be (B, C, H, W) matching pseudo-labels {tuple(pseudo_labels.shape)}, "
                         f"got {tuple(box_mask.shape)}")
    num_classes = box_mask.shape[1]
    ok = confident_pixels(confidence, pseudo_labels, tau_seg, ignore_index)
    if valid is not None:
        ok &= valid.bool()
    cls = pseudo_labels.long().clamp(0, num_classes - 1)
    covered = box_mask.bool().gather(1, cls[:, None])[:, 0]
    is_thing = torch.zeros(num_classes + 1, dtype=torch.bool, device=pseudo_labels.device)
    things = [c for c in thing_classes if 0 <= c < num_classes]
    if things:
        is_thing[torch.as_tensor(things, device=pseudo_labels.device)] = True
    thing_pixel = is_thing[pseudo_labels.long().clamp(0, num_classes)]
    return ok & torch.where(thing_pixel, covered, torch.full_like(covered, stuff == "confidence"))
