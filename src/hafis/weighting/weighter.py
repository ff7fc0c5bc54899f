"""The plug-in: per-pixel pseudo-label weights from top-k index similarity to class prototypes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .alignment import check_align, resize_features
from .bank import PrototypeBank
from .checks import check_features_labels
from .similarity import _check_k, topk_mask


class PseudoLabelWeighter(nn.Module):
    """``W_i = offset + s_i / k``, ``s_i = |topk(f_i) ∩ topk(P_{ŷ_i})|`` (the paper, Eq. for W).

    Args:
        num_classes, feature_dim: ``C`` and ``D``.
        k: number of high-activation channels compared (the paper: 5).
        offset: ``0`` gives the paper's ``W = s/k`` (a pixel sharing nothing with its prototype is dropped);
            ``1`` gives the authors' released code, ``W = 1 + s/k`` (no pixel dropped, similar ones count up to 2x).
        align: features at a lower resolution than the pseudo-labels are brought to the labels' size, never the
            reverse: ``bilinear`` (default, like the authors' code and the logits) or ``nearest`` (each label pixel
            takes the similarity of the feature cell it falls in; cheaper, since only ``C`` score maps are resized).
        memory_per_class, samples_per_class, seed, gather_distributed, validate: passed to :class:`PrototypeBank`.

    A pseudo-label class with no prototype yet, and an ignored pixel, get ``s = 0`` (so ``W = offset``). Weights
    carry no gradient.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        k: int = 5,
        offset: float = 0.0,
        memory_per_class: int = 256,
        samples_per_class: int = 32,
        ignore_index: int = 255,
        align: str = "bilinear",
        seed: int = 0,
        gather_distributed: bool = True,
        validate: bool = True,
    ) -> None:
        super().__init__()
        _check_k(k, feature_dim)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.k = k
        self.offset = float(offset)
        self.ignore_index = ignore_index
        self.align = check_align(align)
        self.validate = validate
        self.bank = PrototypeBank(num_classes, feature_dim, memory_per_class, samples_per_class, ignore_index,
                                  seed, align, gather_distributed, validate)

    def update_labelled(self, features: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> None:
        """Feed labelled pixels (where ``mask`` holds) to the prototype bank."""
        self.bank.push_labelled(features.detach(), labels, mask)

    def update_unlabelled(self, features: Tensor, pseudo_labels: Tensor, reliable: Tensor) -> None:
        """Feed reliable unlabelled pixels to the prototype bank."""
        self.bank.push_unlabelled(features.detach(), pseudo_labels, reliable)

    @torch.no_grad()
    def similarity(self, features: Tensor, pseudo_labels: Tensor) -> Tensor:
        """``s_i`` as an integer count ``(B, H, W)`` in ``0..k`` at the resolution of ``pseudo_labels``."""
        if self.validate:
            check_features_labels(features, pseudo_labels, self.num_classes, self.ignore_index, "pseudo_labels",
                                  feature_dim=self.feature_dim)
        B, H, W = pseudo_labels.shape
        protos, has_proto = self.bank.prototypes()
        proto_mask = topk_mask(protos, self.k, dim=1) & has_proto[:, None]  # (C, D); all-False without prototype
        # channels-last: the top-k and its tie-break run along contiguous memory, and the resize keeps that layout
        features = features.contiguous(memory_format=torch.channels_last)
        if self.align == "bilinear":
            features = resize_features(features, (H, W), "bilinear")
        b, d, h, w = features.shape
        feat_mask = topk_mask(features.permute(0, 2, 3, 1), self.k, dim=-1)  # (B, h, w, D)
        # one (h*w x D) @ (D x C) product per image gives s for every class; then the pseudo-label's class is read
        work_dtype = torch.float32 if features.device.type == "cpu" else features.dtype
        scores = torch.matmul(feat_mask.reshape(b, h * w, d).to(work_dtype), proto_mask.t().to(work_dtype))
        scores = scores.view(b, h, w, self.num_classes).permute(0, 3, 1, 2)
        if (h, w) != (H, W):  # align == "nearest": score maps are resized, labels stay as they are
            scores = F.interpolate(scores, size=(H, W), mode="nearest")
        labels = pseudo_labels.long()
        ignored = labels == self.ignore_index
        s = scores.gather(1, torch.where(ignored, 0, labels)[:, None]).squeeze(1)
        return torch.where(ignored, 0, s.round().long())

    @torch.no_grad()
    def weights(self, features: Tensor, pseudo_labels: Tensor) -> Tensor:
        """``(B, H, W)`` float weights ``offset + s / k`` for pseudo-labels ``(B, H, W)`` and features ``(B, D, h, w)``."""
        s = self.similarity(features, pseudo_labels)
        dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
        return self.offset + s.to(dtype) / self.k
