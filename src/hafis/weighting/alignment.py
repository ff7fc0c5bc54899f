"""Bringing decoder features to the resolution of the labels.

Segmenters give features at a fraction of the input size (stride 4 for DeepLabV3+) while labels and pseudo-labels
are at full size. hafis never resizes labels: features are brought to the labels' size, as the authors' code does
(bilinear, ``align_corners=False``, like the logits). Only the pixels actually used are resampled when possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALIGN_MODES = ("bilinear", "nearest")


def check_align(mode: str) -> str:
    if mode not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {mode!r}")
    return mode


def resize_features(features: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """``(B, D, h, w) -> (B, D, H, W)``; a no-op when the sizes already agree."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    if check_align(mode) == "bilinear":
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(features, size=size, mode="nearest")


def sample_features(features: Tensor, batch: Tensor, flat_pixel: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Features at chosen label-resolution pixels, ``(n, D)``: equal to ``resize_features(...)[b, :, y, x]``.

    ``flat_pixel`` indexes the ``H*W`` label grid. Sampling only the chosen pixels (a few per class) avoids
    upsampling the whole ``B x D x H x W`` map just to push a handful of vectors into the bank.
    """
    H, W = size
    h, w = features.shape[-2:]
    if (h, w) == (H, W):
        return features.flatten(2)[batch, :, flat_pixel]
    y = torch.div(flat_pixel, W, rounding_mode="floor")
    x = flat_pixel - y * W
    if check_align(mode) == "nearest":
        # F.interpolate(mode="nearest") maps destination pixel i to floor(i * in / out).
        sy = torch.div(y * h, H, rounding_mode="floor")
        sx = torch.div(x * w, W, rounding_mode="floor")
        return features.flatten(2)[batch, :, sy * w + sx]
    # Bilinear with align_corners=False, as F.interpolate computes it: source coordinate (i + 0.5) * in / out - 0.5,
    # clamped at 0; the four neighbours are gathered for the chosen pixels only.
    flat = features.flatten(2)  # (B, D, h*w)
    y0, y1, ly = _source_index(y, H, h, features.dtype)
    x0, x1, lx = _source_index(x, W, w, features.dtype)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat[batch, :, yy * w + xx]

    ly, lx = ly[:, None], lx[:, None]
    top = at(y0, x0) * (1 - lx) + at(y0, x1) * lx
    bottom = at(y1, x0) * (1 - lx) + at(y1, x1) * lx
    return top * (1 - ly) + bottom * ly


def _source_index(dst: Tensor, out_size: int, in_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0.to(torch.float32)).to(dtype)
