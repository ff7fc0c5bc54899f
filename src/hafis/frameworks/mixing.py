"""Pasting pixels of one image into another: the one box-paste under every framework's CutMix and copy-paste."""

from __future__ import annotations

import torch
from torch import Tensor


def paste(base: Tensor, inside: Tensor, box: Tensor) -> Tensor:
    """``base`` with the pixels where ``box`` (``(B, H, W)`` bool) holds taken from ``inside`` (``base``'s shape):
    images ``(B, C, H, W)`` and per-pixel maps ``(B, H, W)`` (labels, confidences, weights) alike."""
    return torch.where(box[:, None] if base.dim() == 4 else box, inside, base)


def partner_index(batch_size: int, device: torch.device) -> Tensor:
    """Image ``i`` takes its partner's pixels from image ``i + 1`` (mod B)."""
    return torch.roll(torch.arange(batch_size, device=device), -1)


__all__ = ["partner_index", "paste"]
