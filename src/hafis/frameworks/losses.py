"""The supervised (labelled) loss of a framework: plain CE, or OHEM CE as the published Cityscapes recipes use.

OHEM (UniMatch's ``ProbOhemCrossEntropy2d``, also U2PL's / AEL's / AugSeg's on Cityscapes): keep the pixels whose
probability of their true class is at most ``threshold``, but at least the ``min_kept`` hardest ones (the threshold
is raised to the ``min_kept``-th smallest probability when that is larger), then the CE mean over the kept pixels.
The released codes count ``min_kept`` per GPU batch (UniMatch Cityscapes: 200,000 for 2 images); hafis counts it per
image (``loss.ohem_min_kept`` = 100,000), so the recipe does not depend on how a batch is split over GPUs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def ohem_keep(logits: Tensor, target: Tensor, threshold: float, min_kept: int, ignore_index: int = 255) -> Tensor:
    """``(B, H, W)`` bool: the pixels OHEM keeps (never an ignored one)."""
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if num_valid == 0 or min_kept > num_valid:
        return valid  # as released: too few valid pixels -> plain CE over all of them
    prob = logits.float().softmax(dim=1).gather(1, target.clamp(max=logits.shape[1] - 1).long().unsqueeze(1))[:, 0]
    prob = prob.masked_fill(~valid, 1.0)
    cut = threshold
    if min_kept > 0:
        kth = prob.flatten().kthvalue(min(num_valid, min_kept)).values
        cut = max(threshold, float(kth))
    return valid & (prob <= cut)


def ohem_cross_entropy(logits: Tensor, target: Tensor, threshold: float = 0.7, min_kept: int = 100000,
                       ignore_index: int = 255) -> Tensor:
    keep = ohem_keep(logits, target, threshold, min_kept, ignore_index)
    return F.cross_entropy(logits, target.masked_fill(~keep, ignore_index), ignore_index=ignore_index)


def _ce(logits: Tensor, target: Tensor, loss_config) -> Tensor:
    return F.cross_entropy(logits, target, ignore_index=255)


def _ohem(logits: Tensor, target: Tensor, loss_config) -> Tensor:
    return ohem_cross_entropy(logits, target, loss_config.ohem_threshold, loss_config.ohem_min_kept * logits.shape[0])


#: ``loss.labelled`` -> ``(logits, target, loss config) -> loss``: CE with ignore 255, or OHEM CE (``min_kept`` per
#: image times the batch); a new labelled loss is one entry
LABELLED_LOSSES = {"ce": _ce, "ohem": _ohem}


def supervised_loss(logits: Tensor, target: Tensor, loss_config=None) -> Tensor:
    """The labelled loss ``loss.labelled`` names (CE without a config)."""
    name = "ce" if loss_config is None else loss_config.labelled
    if name not in LABELLED_LOSSES:
        raise ValueError(f"unknown labelled loss {name!r}; valid: {', '.join(LABELLED_LOSSES)}")
    return LABELLED_LOSSES[name](logits, target, loss_config)


def labelled_loss(logits: Tensor, aux: Optional[Tensor], target: Tensor, config) -> Tensor:
    """The labelled term of a framework: ``loss.labelled`` on the logits, plus ``model.aux_weight`` times the same
    criterion on an auxiliary head's logits when the segmenter has one (the U2PL / AEL releases: main + 0.4 aux,
    each with its own OHEM selection)."""
    loss = supervised_loss(logits, target, config.loss)
    if aux is not None and config.model.aux_weight > 0:
        loss = loss + config.model.aux_weight * supervised_loss(aux, target, config.loss)
    return loss


__all__ = ["LABELLED_LOSSES", "labelled_loss", "ohem_cross_entropy", "ohem_keep", "supervised_loss"]
