"""The pixel-weighted unsupervised loss ``L_u = Σ W_i m_i ℓ_i / Z``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZE_MODES = ("count", "weight")


def weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    normalize: str = "count",
    denominator_mask: Optional[Tensor] = None,
    ignore_index: int = 255,
) -> Tensor:
    """Cross-entropy per pixel, multiplied by ``weight`` and ``mask``, summed and divided by ``Z``.

    Args:
        logits: ``(B, C, H, W)``; target: ``(B, H, W)`` with ``ignore_index`` for ignored pixels.
        weight: ``(B, H, W)`` per-pixel weights ``W`` (``None`` = all ones: the plain framework loss).
        mask: ``(B, H, W)`` the framework's own mask ``m`` (e.g. confidence ≥ τ); bool or float; ``None`` = all.
        normalize: ``count``: ``Z = Σ d_i`` (the paper); ``weight``: ``Z = Σ W_i d_i`` (the authors' released code).
        denominator_mask: ``d``, the pixels the framework's own normaliser counts. Defaults to ``m`` (the spec's
            ``Z = Σ m_i``); a framework whose published loss divides by another set passes it here (UniMatch
            divides by the non-ignored pixels, confident or not). Ignored target pixels are never counted.

    ``Z = 0`` (nothing to learn from) gives a loss of 0, not NaN.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] \
            or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits (B, C, H, W) and target (B, H, W) disagree: {tuple(logits.shape)} vs "
                         f"{tuple(target.shape)}")
    for name, t in (("weight", weight), ("mask", mask), ("denominator_mask", denominator_mask)):
        if t is not None and tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{name} must have the shape of target {tuple(target.shape)}, got {tuple(t.shape)}")
    loss = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).to(loss.dtype)
    m = valid if mask is None else mask.to(loss.dtype) * valid
    d = m if denominator_mask is None else denominator_mask.to(loss.dtype) * valid
    w = torch.ones_like(loss) if weight is None else weight.to(loss.dtype)
    numerator = (w * m * loss).sum()
    z = d.sum() if normalize == "count" else (w * d).sum()
    return torch.where(z > 0, numerator / z.clamp_min(torch.finfo(loss.dtype).tiny), numerator * 0)
