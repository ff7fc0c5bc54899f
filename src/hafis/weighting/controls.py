"""The weighting's controls (docs/method.md, 5): what ``W`` is replaced with to tell which part of it does the work.

``weighting.signal``: what a pixel's weight is computed from: ``similarity`` (the method, ``offset + s / k``) or
``confidence`` (``offset + q``, the softmax maximum of the prediction that gave the pseudo-label: the plainest
per-pixel signal, with no prototype). ``weighting.shuffle``: ``W`` permuted at random among the pixels of each
pseudo-label class that the loss counts (:func:`shuffle_within_classes`): each class keeps its weights, but which
pixel gets which is lost.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: what a pixel's weight is computed from: similarity = offset + s/k (the method); confidence = offset + the softmax
#: maximum of the pseudo-labelling prediction (a control)
SIGNALS = ("similarity", "confidence")


@torch.no_grad()
def confidence_weights(confidence: Tensor, offset: float) -> Tensor:
    """``offset + q`` per pixel, in float32 (or float64 for float64 confidences), like the similarity's weights."""
    dtype = confidence.dtype if confidence.dtype in (torch.float32, torch.float64) else torch.float32
    return offset + confidence.detach().to(dtype)


@torch.no_grad()
def shuffle_within_classes(weight: Tensor, labels: Tensor, eligible: Tensor, generator: torch.Generator) -> Tensor:
    """``weight`` with its values permuted at random among the ``eligible`` pixels of each class of ``labels``
    (all images of the batch together); the other pixels keep theirs. Same shape and dtype as ``weight``.

    Vectorised, no host sync: one random permutation of the pixels, then two stable sorts by class (the random order
    and the original one) list the same class blocks at the same positions; position ``j`` of the original order
    takes the weight at position ``j`` of the random one.
    """
    if weight.shape != labels.shape or eligible.shape != labels.shape:
        raise ValueError(f"weight {tuple(weight.shape)}, labels {tuple(labels.shape)} and eligible "
                         f"{tuple(eligible.shape)} must have one shape")
    w, flat_eligible = weight.flatten(), eligible.flatten().bool()
    # every ineligible pixel sorts last; which weight it would get is discarded below
    cls = torch.where(flat_eligible, labels.flatten().long(), torch.iinfo(torch.long).max)
    perm = torch.randperm(w.numel(), generator=generator, device=w.device)
    shuffled = perm[torch.argsort(cls[perm], stable=True)]
    original = torch.argsort(cls, stable=True)
    out = torch.empty_like(w)
    out[original] = w[shuffled]
    return torch.where(flat_eligible, out, w).view_as(weight)
